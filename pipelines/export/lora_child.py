"""The child process of adapter.py: a PEFT LoRA adapter -> a llama.cpp LoRA GGUF, run with llama.cpp's converter on
the path (its `conversion` package and its own `gguf`), never imported by MacTuner itself:

    PYTHONPATH=<converter folder> python -P lora_child.py ADAPTER_DIR BASE_DIR OUT_FILE OUTTYPE NAME

Each LoRA pair (A, B) of a base weight W is named the way the converter names W in the base model's GGUF: the
converter's own model class for the base architecture maps (and, for Llama-style models, permutes) the weight. Those
changes reorder or split W's output rows, and W = B @ A, so they are applied to B and A is kept as is. The file holds
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` and `<gguf name>.lora_a` / `.lora_b` tensors,
which is what llama.cpp's `--lora` (llama_adapter_lora_init) and Ollama's ADAPTER read.

Rows of the token embedding trained outright (PEFT's trainable tokens: `trainable_tokens_delta`, the new rows of the
ids in `trainable_token_indices`) are a rank-k change of the embedding, E' = E + S @ D (S: vocab x k picking the
rows, D: k x width, new row - old row), so they become a `token_embd.weight` pair, which llama.cpp adds to the rows
it looks up (llm_graph_context::build_inp_embd: delta = lora_b x get_rows(lora_a, tokens), scaled by alpha / k;
lora_a is the vocab x k selection, lora_b the width x k differences - transposed against a linear layer's pair).
A tied output layer (Gemma) changes with those rows too. llama.cpp finds a LoRA by tensor name, and a tied head is
token_embd.weight itself, where it would apply the pair as a linear layer's (build_lora_mm) - whose shapes cannot
fit: it aborts. So for a tied model the output layer's change is an `output.weight` pair (lora_a: D, lora_b: S),
applied on the base GGUF with its output layer written out (serving.lora.untied_gguf: output.weight = token_embd,
the same model); on a tied base GGUF llama.cpp refuses this LoRA ("output.weight does not exist in base model").

A refusal (an adapter llama.cpp cannot apply) exits with code 3 and one line `REFUSED: <reason>` on stderr; success
prints one JSON line: {"architecture", "tensors", "alpha", "rank", "token_rows", "untied_base"} (untied_base:
the LoRA needs the base GGUF with its output layer written out).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REFUSED = 3
ROWS_KEY = ".token_adapter.trainable_tokens_delta"  # PEFT's saved name of a layer's trained rows


class Refused(Exception):
    """An adapter that cannot become a llama.cpp LoRA GGUF, with the reason."""


def peft_settings(adapter_dir: Path) -> dict:
    """adapter_config.json, refused (with the reason) when llama.cpp's LoRA cannot express it."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise Refused(f"it is a {cfg.get('peft_type')} adapter; llama.cpp applies LoRA adapters only")
    if cfg.get("use_dora"):
        raise Refused("it is a DoRA adapter (weight-decomposed LoRA): llama.cpp's LoRA has no magnitude vector, so "
                      "only the merged GGUF carries this fine-tune")
    if cfg.get("alpha_pattern"):
        raise Refused("its alpha differs from module to module (alpha_pattern); a llama.cpp LoRA has one alpha")
    if cfg.get("modules_to_save"):
        raise Refused(f"it also trains whole modules ({', '.join(cfg['modules_to_save'])}); a llama.cpp LoRA holds "
                      "low-rank pairs only, so only the merged GGUF carries this fine-tune")
    return cfg


def lora_pairs(tensors: dict) -> dict[str, dict]:
    """{base weight name: {"A": tensor, "B": tensor}} from PEFT's saved names
    (base_model.model.<module>.lora_A.weight)."""
    if any(".lora_embedding_" in key for key in tensors):
        raise Refused("it adapts the token embeddings (lora_embedding_A/B), which MacTuner's LoRA GGUF does not "
                      "write; the merged GGUF carries this fine-tune")
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.endswith(ROWS_KEY):  # trained rows: trained_rows()
            continue
        if ".lora_" not in key:
            module = key.removeprefix("base_model.model.").removesuffix(".weight").removesuffix(".base_layer")
            raise Refused(f"it carries a whole {module} matrix (saved when tokens were added or a layer was trained "
                          "in full), which a llama.cpp LoRA cannot hold; the merged GGUF carries this fine-tune")
        for part in ("A", "B"):
            marker = f".lora_{part}.weight"
            if key.endswith(marker):
                base = key[: -len(marker)].removeprefix("base_model.model.") + ".weight"
                pairs.setdefault(base, {})[part] = value
                break
        else:
            raise Refused(f"it holds {key}, which is not a LoRA A or B matrix")
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise Refused(f"{name} has only its lora_{''.join(pair)} matrix")
    return pairs


def trained_rows(tensors: dict, cfg: dict) -> dict[str, tuple[list[int], object]]:
    """{module: (token ids, their new rows (k x width))} from PEFT's trainable tokens (trainable_token_indices: a
    list for the input embedding, or {module name: ids})."""
    indices = cfg.get("trainable_token_indices")
    out = {}
    for key, rows in tensors.items():
        if not key.endswith(ROWS_KEY):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(ROWS_KEY)
        ids = indices if isinstance(indices, list) else next(
            (v for k, v in (indices or {}).items() if module == k or module.endswith("." + k)), None)
        if not ids or len(ids) != rows.shape[0]:
            raise Refused(f"its trained rows of {module} do not match trainable_token_indices")
        out[module] = ([int(i) for i in ids], rows.float())
    return out


def tied_head(base_dir: Path) -> bool:
    """Whether transformers ties the output layer of the model in `base_dir` to its input embedding (PEFT's trained
    rows then change both, and the LoRA needs an output.weight pair), as its config resolves it (class defaults
    included; a config transformers cannot read counts as tied, as most small models are). Also used by adapter.py."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError, KeyError):
        return True
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def rows_tensors(model, module: str, ids: list[int], rows, alpha: float, tied: bool) -> list[tuple[str, object]]:
    """The LoRA tensors of trained embedding rows: the input embedding's pair (lora_a, vocab x k, selects the rows;
    lora_b, width x k, holds new row - old row over llama.cpp's scale alpha / k) and, for a tied output layer, the
    output layer's (the same matrices, as a linear layer's pair: lora_a k x width, lora_b vocab x k)."""
    import torch

    hf_name = f"{module}.weight"
    item = model.filter_tensors((hf_name, lambda: None))
    if item is None or item[0] not in model.model_tensors:
        raise Refused(f"it trains rows of {module}, which is not in the base model's weights")
    weight = model.model_tensors[item[0]]()  # a view of the checkpoint: only the rows read below are loaded
    shaped = list(model.modify_tensors(torch.empty(weight.shape, device="meta"), item[0], None))
    if [n for n, _t in shaped] != ["token_embd.weight"] or shaped[0][1].shape[1] != rows.shape[1]:
        raise Refused(f"it trains rows of {module}, which is not the token embedding of the GGUF")
    if not tied and not _own_head(model):  # untied here, yet the GGUF reads its output layer from token_embd
        raise Refused("it trains rows of the token embeddings, which this model's GGUF also reads as its output "
                      "layer, unlike the model itself")
    n_vocab = shaped[0][1].shape[0]
    if max(ids) >= n_vocab or min(ids) < 0:
        raise Refused(f"it trains rows of tokens beyond the GGUF's {n_vocab}-token vocabulary")
    delta = rows - weight[torch.tensor(ids)].float()
    ((_n, delta),) = model.modify_tensors(delta, item[0], None)  # what the converter does to rows (linear), if any
    k = len(ids)
    pick = torch.zeros(n_vocab, k)
    pick[torch.tensor(ids), torch.arange(k)] = 1.0
    change = delta / (alpha / k if alpha else 1.0)  # llama.cpp multiplies by alpha / rank (k)
    out = [("token_embd.weight.lora_a", pick), ("token_embd.weight.lora_b", change.T.contiguous())]
    if tied:
        out += [("output.weight.lora_a", change.contiguous()), ("output.weight.lora_b", pick)]
    return out


def _own_head(model) -> bool:
    """Whether the converter writes the model's lm_head as a GGUF output.weight of its own."""
    import torch

    head = model.filter_tensors(("lm_head.weight", lambda: None))
    if head is None or head[0] not in model.model_tensors:
        return False
    meta = torch.empty(model.model_tensors[head[0]]().shape, device="meta")
    return [n for n, _t in model.modify_tensors(meta, head[0], None)] == ["output.weight"]


def main(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str, name: str) -> dict:
    import gguf  # the converter's own gguf (PYTHONPATH): the names and keys it writes
    import torch
    from conversion import get_model_class
    from conversion.base import ModelBase
    from safetensors.torch import load_file

    cfg = peft_settings(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():  # adapter_model.bin is a pickle: never loaded here
        raise Refused("it has no adapter_model.safetensors")
    tensors = load_file(str(weights), device="cpu")
    pairs = lora_pairs(tensors)
    rows = trained_rows(tensors, cfg)
    hparams = ModelBase.load_hparams(base_dir, False)
    arch = (hparams.get("text_config") or {}).get("architectures", hparams.get("architectures") or [None])[0]
    try:
        model_class = get_model_class(arch)
    except NotImplementedError:
        raise Refused(f"llama.cpp's converter does not support the architecture {arch}") from None
    model = model_class(base_dir, gguf.LlamaFileType.ALL_F32, out_file, eager=True, hparams=hparams)
    alpha = float(cfg["lora_alpha"])
    dtype = {"f32": torch.float32, "f16": torch.float16}[outtype]
    tied = tied_head(base_dir) if rows else False
    row_tensors = [t for module, (ids, values) in rows.items()
                   for t in rows_tensors(model, module, ids, values, alpha, tied)]
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[model_class.model_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    ranks = set()
    for hf_name, pair in sorted(pairs.items()):
        a, b = pair["A"].float(), pair["B"].float()
        rank = a.shape[0]
        ranks.add(rank)
        # llama.cpp scales by alpha / rank; PEFT's rsLoRA by alpha / sqrt(rank): the difference goes into B
        if cfg.get("use_rslora"):
            b = b * math.sqrt(rank)
        item = model.filter_tensors((hf_name, lambda: None))
        if item is None:
            raise Refused(f"it adapts {hf_name}, which is not part of the GGUF of this model")
        mapped_name = item[0]
        bid = next((int(p) for p in mapped_name.split(".") if p.isdecimal()), None)
        try:
            outs = list(model.modify_tensors(b, mapped_name, bid))
        except ValueError as e:  # "Can not map tensor ..."
            raise Refused(f"llama.cpp's converter has no GGUF name for {hf_name}: {e}") from None
        if not outs:
            raise Refused(f"the converter leaves {hf_name} out of the GGUF (e.g. an output layer tied to the "
                          "embeddings), so its LoRA has nowhere to go")
        if any(t.dim() != 2 or t.shape[-1] != rank for _n, t in outs) or sum(t.shape[0] for _n, t in outs) != b.shape[0]:
            raise Refused(f"the converter reshapes {hf_name} in a way a LoRA pair cannot follow")
        for gguf_name, b_part in outs:  # e.g. blk.0.attn_q.weight.lora_a / .lora_b
            writer.add_tensor(f"{gguf_name}.lora_a", a.to(dtype).contiguous().numpy())
            writer.add_tensor(f"{gguf_name}.lora_b", b_part.to(dtype).contiguous().numpy())
    for gguf_name, value in row_tensors:  # after the pairs: readers take the rank from the first lora_a
        writer.add_tensor(gguf_name, value.to(dtype).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[model_class.model_arch], "tensors": 2 * len(pairs) + len(row_tensors),
            "alpha": alpha, "rank": sorted(ranks), "token_rows": sum(len(ids) for ids, _v in rows.values()),
            "untied_base": tied}


if __name__ == "__main__":
    try:
        summary = main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5])
    except Refused as e:
        sys.stderr.write(f"REFUSED: {e}\n")
        sys.exit(REFUSED)
    print(json.dumps(summary))
