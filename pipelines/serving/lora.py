"""A LoRA adapter as it lies on disk, before any backend loads it: `read_lora_folder` checks a PEFT adapter folder
(adapter_config.json of a LoRA, safetensors weights - never a pickle) and `AdapterInfo` describes an adapter once a
backend has checked it against its model; how many rows of the token embeddings an adapter trained outright
(`token_row_count`), and `untied_gguf`, the base GGUF with its output layer written out, which the LoRA GGUF of such
an adapter needs when the output layer is tied to the embedding. Shared by every backend (pipelines.serving.backend)
and pipelines.adapters.
"""

from __future__ import annotations

import json
import os
import uuid
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
# Gemma 3 270M's <end_of_turn>). k rows are a rank-k change, which the LoRA GGUF holds as a token_embd pair
# (export/lora_child.py). A tied output layer reads token_embd under that same name, where llama.cpp cannot apply
# the pair, so its change is an output.weight pair, applied on the base GGUF with its output layer written out.

def token_row_count(adapter_dir: Path) -> int:
    """How many rows of the token embeddings the adapter trained outright (its trainable_token_indices; 0 when its
    adapter_config.json cannot be read)."""
    try:
        indices = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("trainable_token_indices")
    except (OSError, ValueError, AttributeError):
        return 0
    indices = indices or []
    if isinstance(indices, dict):  # {module: ids}
        return sum(len(v) for v in indices.values())
    return len(indices)


def untied_gguf(src: Path, out: Path) -> Path:
    """The GGUF `src` with its output layer written out: an output.weight tensor holding token_embd's data (as
    stored, quantized or not) - the same model, which llama.cpp then reads the output layer from (it falls back on
    token_embd only when output.weight is absent), so a LoRA's output.weight pair applies to the output layer alone.
    `src` itself when it has an output.weight already. Written under a temporary name and renamed (`out` may be
    `src`). BadInput when it has no token_embd."""

    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(src))
    tensors = list(reader.tensors)
    if any(t.name == "output.weight" for t in tensors):
        return src
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise BadInput(f"{src.name} has no token_embd.weight to write its output layer from.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # two requests may write it at once
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


def missing_lora_targets(lora: Path, base: Path) -> list[str]:
    """The tensors the LoRA GGUF `lora` adapts that the model GGUF `base` lacks (names only, nothing loaded) - e.g.
    the output.weight of a tied-row LoRA on a GGUF whose output layer is tied. llama.cpp refuses such a LoRA, and
    llama-cpp-python's Llama(lora_path=) misses that refusal (a NULL it does not check) and crashes later."""
    import gguf  # noqa: PLC0415

    targets = {t.name.removesuffix(".lora_a").removesuffix(".lora_b") for t in gguf.GGUFReader(str(lora)).tensors}
    return sorted(targets - {t.name for t in gguf.GGUFReader(str(base)).tensors})
