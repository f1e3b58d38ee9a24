"""A LoRA adapter as it lies on disk, before any backend loads it: `read_lora_folder` checks a PEFT adapter folder
(adapter_config.json of a LoRA, safetensors weights - never a pickle) and `AdapterInfo` describes an adapter once a
backend has checked it against its model; the rows of the token embeddings an adapter trained outright
(`token_rows`), which the GGUF of a model with a tied output layer takes written into a copy of itself
(`gguf_with_token_rows`). Shared by every backend (pipelines.serving.backend) and pipelines.adapters.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BadInput, NotFound


@dataclass
class AdapterInfo:
    name: str
    path: str
    base_model: str | None  # adapter_config.json's base_model_name_or_path
    peft_type: str
    rank: int | None
    target_modules: list[str]
    warnings: list[str] = field(default_factory=list)
    chat_template: str | None = None  # the template it was trained with, when the base model's differs or is absent

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoraFolder:
    """A PEFT LoRA adapter folder as read from disk (nothing loaded): its config and its weights file."""

    path: Path
    config: dict
    weights: Path

    def info(self, warnings: list[str] | None = None) -> AdapterInfo:
        targets = self.config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        return AdapterInfo(name=self.path.name, path=str(self.path.resolve()),
                           base_model=self.config.get("base_model_name_or_path"), peft_type="LORA",
                           rank=self.config.get("r"), target_modules=sorted(map(str, targets)),
                           warnings=list(warnings or []))


def read_lora_folder(adapter_dir: str | Path) -> LoraFolder:
    """Check that `adapter_dir` is a PEFT LoRA folder with safetensors weights (NotFound / BadInput say what is
    wrong); nothing is loaded."""
    path = Path(str(adapter_dir)).expanduser()
    if not path.exists():
        raise NotFound(f"No adapter folder at {path} (the run or checkpoint may have been deleted).")
    if not path.is_dir():
        raise BadInput(f"{path} is a file; choose the adapter's folder (it holds adapter_config.json).")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise BadInput(f"{path.name} is not a PEFT adapter folder: it has no adapter_config.json.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"adapter_config.json in {path.name} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"adapter_config.json in {path.name} is not a JSON object.")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise BadInput(f"{path.name} is a {peft_type or 'unknown'} adapter; MacTuner chats with LoRA adapters.")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        if any(path.glob("adapter_model.bin")) or any(path.glob("*.pt")):
            raise BadInput(f"{path.name} has its weights as a pickle file (adapter_model.bin), which could run code "
                           "when loaded; MacTuner only loads adapter_model.safetensors.")
        raise BadInput(f"{path.name} has no adapter_model.safetensors.")
    return LoraFolder(path=path, config=cfg, weights=weights)



# ------------------------------------------------------------------------------------------ trained token rows
# PEFT's trainable tokens (pipelines.training.tokens: rows of the embedding a base model never trained, such as
# Gemma 3 270M's <end_of_turn>). k rows are a rank-k change, which the LoRA GGUF holds as a token_embd pair when the
# output layer is the model's own (export/lora_child.py). A tied output layer reads token_embd under the same name,
# and llama.cpp applies that pair to it as a linear layer's, where the shapes cannot fit (it aborts): such a GGUF
# base takes the rows written into a copy of its token_embd instead; the low-rank rest becomes the LoRA GGUF.

TOKEN_ROWS_KEY = "trainable_tokens_delta"  # PEFT's name for the new rows (the values themselves, not a difference)


@dataclass
class TokenRows:
    """The embedding rows an adapter trained outright: token ids and their new values (ids x width, float32)."""

    ids: list[int]
    values: object  # numpy array


def token_rows(adapter_dir: Path) -> TokenRows | None:
    """The adapter's trained embedding rows (PEFT trainable tokens on the input embedding), or None."""
    folder = read_lora_folder(adapter_dir)
    indices = folder.config.get("trainable_token_indices")
    if isinstance(indices, dict):  # {module: ids}: the embedding's
        indices = next((v for k, v in indices.items() if "embed" in k), None)
    if not indices:
        return None
    from safetensors.torch import load_file  # noqa: PLC0415 - torch: rows may be bf16, which numpy cannot hold

    tensors = load_file(str(folder.weights))
    key = next((k for k in tensors if TOKEN_ROWS_KEY in k and "embed" in k), None)
    if key is None:
        raise BadInput(f"{folder.path.name} names trainable tokens but holds no {TOKEN_ROWS_KEY} rows.")
    values = tensors[key].float().numpy()
    if values.shape[0] != len(indices):
        raise BadInput(f"{folder.path.name} holds {values.shape[0]} trained token rows for {len(indices)} tokens.")
    return TokenRows(ids=[int(i) for i in indices], values=values)


def without_token_rows(adapter_dir: Path, out: Path) -> Path:
    """A copy of the adapter folder with only its low-rank pairs (config and weights without the trainable tokens),
    for the LoRA GGUF writer."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    folder = read_lora_folder(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in folder.config.items() if k != "trainable_token_indices"}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {k: v for k, v in load_file(str(folder.weights)).items() if TOKEN_ROWS_KEY not in k}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def gguf_with_token_rows(src: Path, rows: TokenRows, out: Path) -> Path:
    """A copy of the GGUF `src` whose token_embd rows `rows.ids` hold `rows.values`, quantized as the tensor is
    (a tied output layer reads the same rows). Written under a temporary name, renamed when complete. BadInput
    when the rows do not fit the tensor, or its type is one the gguf library cannot write."""
    import os  # noqa: PLC0415

    import gguf  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    reader = gguf.GGUFReader(str(src))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise BadInput(f"{src.name} has no token_embd.weight to write the adapter's trained token rows into.")
    width, n_rows = int(embd.shape[0]), int(embd.shape[1])
    if rows.values.shape[1] != width or max(rows.ids) >= n_rows or min(rows.ids) < 0:
        raise BadInput(f"The adapter's trained token rows ({rows.values.shape[1]} wide) do not fit {src.name}'s "
                       f"embedding ({n_rows} x {width}).")
    row_bytes = int(embd.n_bytes) // n_rows
    try:
        packed = [gguf.quants.quantize(np.asarray(v, np.float32)[None, :], embd.tensor_type).tobytes()
                  for v in rows.values]
    except (NotImplementedError, gguf.quants.QuantError):
        raise BadInput(f"{src.name}'s embedding is {embd.tensor_type.name}, which MacTuner cannot write the "
                       "adapter's trained token rows in.") from None
    if any(len(data) != row_bytes for data in packed):  # a type whose rows are not stored one after another
        raise BadInput(f"{src.name}'s {embd.tensor_type.name} embedding does not store its rows one by one.")
    del reader
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "r+b") as f:
            for token, data in zip(rows.ids, packed):
                f.seek(int(embd.data_offset) + token * row_bytes)
                f.write(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def untied_gguf(src: Path, out: Path) -> Path:
    """The GGUF `src` with its output layer written out: an output.weight tensor holding token_embd's data (as
    stored, quantized or not) - the same model, which llama.cpp then reads the output layer from (it falls back on
    token_embd only when output.weight is absent), so a LoRA's output.weight pair applies to the output layer alone.
    `src` itself when it has an output.weight already. Written under a temporary name and renamed (`out` may be
    `src`). BadInput when it has no token_embd."""
    import os  # noqa: PLC0415

    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(src))
    tensors = list(reader.tensors)
    if any(t.name == "output.weight" for t in tensors):
        return src
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise BadInput(f"{src.name} has no token_embd.weight to write its output layer from.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
        alignment = reader.fields.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):  # the writer's own
                continue
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        for name, t in [(t.name, t) for t in tensors] + [("output.weight", embd)]:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors + [embd]:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
