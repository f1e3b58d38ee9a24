"""The export request and its plan: `ExportRequest` (the one request: the Export tab, the job and the CLI build it),
and `plan_export` - every check made before anything is written (types, source, name, converter, architecture,
disk space).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from ..errors import BadInput, Conflict
from ..runs import resolve_adapter, resolve_base
from ..serving.lora import token_row_count
from ..workspace import Workspace, human_bytes
from .adapter import needs_untied_base
from .common import BYTES_PER_PARAM, DEFAULT_QUANTS, OUTTYPES, QUANT_TYPES, RequestFields, file_slug, help_meta
from .convert import check_architecture, model_stem
from .merge import weights_dtype
from .quantize import ftype_of
from .sizes import category, gguf_bytes, metadata_bytes, tensor_shapes, tied_embeddings


@dataclass
class ExportRequest(RequestFields):
    """What one export does - the one request the Export tab, the export job and `mactuner export run` build."""

    source: str = field(default="", metadata=help_meta(
        "A run folder, its adapter/ or a checkpoint (merged into the base first), or an HF model folder (converted as is)."))
    name: str = field(default="", metadata=help_meta("Export folder name under exports/ (empty: <run>-<timestamp>)."))
    base_model: str = field(default="", metadata=help_meta("Base model of the adapter (empty: from the run's config.yaml)."))
    outtypes: list[str] = field(default_factory=lambda: ["f16"], metadata=help_meta(
        "GGUF float types written by the converter: f32 | f16 | bf16. The first one is quantized."))
    quants: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTS), metadata=help_meta(
        "llama.cpp quantizations made from the first float GGUF: " + ", ".join(QUANT_TYPES) + ". Q8_0 by "
        "default: it keeps a small fine-tune, which Q4_K_M can lose (the validation says when)."))
    validate: bool = field(default=True, metadata=help_meta(
        "Check each GGUF: loads, chat template, sane generations, perplexity vs HF, fine-tune survived."))
    system: str = field(default="", metadata=help_meta("SYSTEM prompt written into the Ollama Modelfiles (optional)."))
    lora_gguf: bool = field(default=True, metadata=help_meta(
        "When exporting an adapter: also write it as a LoRA GGUF (a few MB, for llama.cpp --lora and Ollama's "
        "ADAPTER) with the base model's GGUF to apply it on, in lora-gguf/, validated on that base."))


def estimate_bytes(n_params: int, outtypes: list[str], quants: list[str], merged_bytes_per_param: float = 4.0,
                   hf_dir: str | Path | None = None, lora_of: Path | None = None) -> dict:
    """Bytes an export will write: the merged HF copy, each float GGUF and each quantization. Given the HF folder,
    each GGUF is sized tensor by tensor (sizes.gguf_bytes: the type llama.cpp gives each tensor, the tokenizer in
    the metadata), within about 1% of the file written; else n_params x an average bytes-per-parameter. With
    `lora_of` (the adapter folder), the LoRA GGUF (f32) and the base GGUF it is applied on count too (with its
    output layer written out when the LoRA needs it: adapter.needs_untied_base)."""
    parts = {"merged HF": n_params * merged_bytes_per_param} if merged_bytes_per_param else {}
    shapes = tensor_shapes(hf_dir) if hf_dir else None
    tied = tied_embeddings(shapes) if shapes else True
    meta = metadata_bytes(hf_dir, len(shapes)) if shapes else 0
    for t in list(outtypes) + list(quants):
        key = t if t in BYTES_PER_PARAM else t.upper()
        if key not in BYTES_PER_PARAM:
            raise BadInput(f"Unknown type {t!r}; choose from {', '.join(BYTES_PER_PARAM)}.")
        parts[key] = gguf_bytes(shapes, key, tied, meta) if shapes else n_params * BYTES_PER_PARAM[key]
    if lora_of is not None and outtypes:
        base, lora = parts[outtypes[0]], 4 * count_params(lora_of, "adapter_model") + 65536  # f32, plus the header
        embd = {n: s for n, s in (shapes or {}).items() if category(n) == "token_embd"}
        untied = bool(embd) and tied and needs_untied_base(lora_of, hf_dir)
        if untied:  # its output layer written out: token_embd twice
            key = outtypes[0] if outtypes[0] in BYTES_PER_PARAM else outtypes[0].upper()
            base += gguf_bytes(embd, key, tied)
        rows = token_row_count(lora_of)
        if rows and embd:  # trained rows: the k rows counted, + each pair's vocab x k selection (lora_child)
            (n_vocab, width), = embd.values()
            lora += 4 * rows * (n_vocab * (2 if untied else 1) + (width if untied else 0))
        parts[f"base {outtypes[0]} (for the LoRA)"] = base
        parts["LoRA GGUF"] = lora
    return {"parts": {k: int(v) for k, v in parts.items()}, "total": int(sum(parts.values()))}


def disk_check(ws: Workspace, n_params: int, outtypes: list[str], quants: list[str],
               free_fn: Callable[[Path], int] | None = None, merged_bytes_per_param: float = 4.0,
               hf_dir: str | Path | None = None, lora_of: Path | None = None) -> dict:
    """Refuse (BadInput) when exports/ lacks the space the export needs (+5% margin); else the estimate."""
    est = estimate_bytes(n_params, outtypes, quants, merged_bytes_per_param, hf_dir, lora_of)
    ws.exports.mkdir(parents=True, exist_ok=True)
    free = int(free_fn(ws.exports) if free_fn else shutil.disk_usage(ws.exports).free)
    need = int(est["total"] * 1.05)
    est["free"] = free
    if free < need:
        raise BadInput(f"Not enough disk space for this export: it needs about {human_bytes(need)} ("
                       + ", ".join(f"{k} {human_bytes(v)}" for k, v in est["parts"].items())
                       + f") and {ws.exports} has {human_bytes(free)} free. Free some space or export fewer types.")
    return est


def count_params(hf_dir: Path, prefix: str = "") -> int:
    """Parameters of an HF folder (its <prefix>*.safetensors), from the safetensors headers (nothing loaded)."""
    from safetensors import safe_open  # noqa: PLC0415

    n = 0
    for f in Path(hf_dir).glob(f"{prefix}*.safetensors"):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                n += math.prod(fh.get_slice(k).get_shape())
    return n


@dataclass
class ExportPlan:
    """What an export will do, decided (and checked) before anything is written."""

    name: str
    folder: Path
    source: Path
    hf_src: Path  # the HF folder that is merged into (an adapter's base) or converted as is
    architecture: str
    adapter: Path | None
    base: Path | None
    run_dir: Path | None
    outtypes: list[str]
    quants: list[str]
    estimate: dict
    lora_gguf: bool = False  # write lora-gguf/ (the source is an adapter and the request asks for it)


def plan_export(ws: Workspace, req: ExportRequest, free_fn: Callable[[Path], int] | None = None) -> ExportPlan:
    """Every check an export makes before it writes anything: types known, source an adapter (with a base) or an HF
    folder, name free, converter present, architecture supported, tokenizer readable by the converter, enough disk.
    Raises the reason, else the plan."""
    outtypes = [str(t) for t in (req.outtypes or [])]
    quants = [str(q).upper() for q in (req.quants or [])]
    name, base_model, source = (req.name or "").strip() or None, (req.base_model or "").strip() or None, req.source
    if not outtypes:
        raise BadInput("Choose at least one GGUF type (f16, bf16 or f32): quantizations are made from it.")
    for t in outtypes:
        if t not in OUTTYPES:
            raise BadInput(f"outtype must be one of {', '.join(OUTTYPES)}, not {t!r}.")
    from ..serving.llamacpp import llama_cpp_module  # noqa: PLC0415

    llama_cpp = llama_cpp_module()
    for q in quants:
        ftype_of(llama_cpp, q)
    if not str(source or "").strip():
        raise BadInput("Choose what to export: a training run (its adapter or a checkpoint) or an HF model folder.")
    src = ws.check_path(source).resolve()  # confined (a studio reachable from elsewhere): workspace, HF cache
    if ws.confined and base_model:
        from ..models import resolve_source  # noqa: PLC0415

        base_model = str(resolve_source(base_model, ws))
    is_hf = (src / "config.json").is_file() and not (src / "adapter_config.json").is_file()
    adapter = base = run_dir = None
    if is_hf:
        hf_src = src
    else:
        adapter, run_dir = resolve_adapter(src)
        base = resolve_base(ws, adapter, run_dir, base_model)
        hf_src = base
    default_name = model_stem(src) if is_hf else (run_dir.name if run_dir else src.parent.name)
    name = file_slug(name or f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")
    folder = ws.exports / name
    if folder.exists():
        raise Conflict(f"The export '{name}' already exists ({folder}); choose another name.")
    arch = check_architecture(hf_src)
    from .convertible import tokenizer_problem  # noqa: PLC0415 - asks the converter (a subprocess, remembered)

    why = tokenizer_problem(hf_src)
    if why:
        raise BadInput(f"This model cannot be exported to GGUF: {why}")
    bpp = 0.0 if is_hf else (2.0 if "bfloat16" in str(weights_dtype(hf_src)) else 4.0)
    lora = bool(req.lora_gguf) and adapter is not None
    est = disk_check(ws, count_params(hf_src), outtypes, quants, free_fn, bpp, hf_src,
                     lora_of=adapter if lora else None)
    return ExportPlan(name, folder, src, hf_src, arch, adapter, base, run_dir, outtypes, quants, est, lora)
