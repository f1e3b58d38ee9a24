"""Quantize a float GGUF with llama.cpp's `llama_model_quantize` (Q8_0, Q6_K, Q5_K_M, Q4_K_M, ...), each type
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from ..errors import BadInput, Conflict, NotFound
from ..progress import ProgressFn, no_progress
from ..workspace import human_bytes
from .common import OUTTYPES, QUANT_TYPES, ExportFailed, is_gguf


def ftype_of(llama_cpp, qtype: str) -> int:
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if value is None or qtype.lower() in OUTTYPES:
        raise BadInput(f"Unknown quantization type {qtype!r}; choose from {', '.join(QUANT_TYPES)}.")
    return int(value)


def _quantize_file(src: Path, dst: Path, ftype: int, nthread: int) -> int:
    """One llama_model_quantize call (module-level so tests can simulate a crash)."""
    from ..serving.llamacpp import llama_cpp_module  # noqa: PLC0415

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params))


def quant_name(gguf_in: Path, qtype: str) -> Path:
    stem = re.sub(r"-(f32|f16|bf16)$", "", gguf_in.stem, flags=re.I)
    return gguf_in.with_name(f"{stem}-{qtype.upper()}.gguf")


def quantize(gguf_in: str | os.PathLike, types: list[str], progress: ProgressFn = no_progress) -> list[Path]:
    """Quantize one float GGUF into each type (<stem>-<TYPE>.gguf beside it), each via a temp name + rename.

    Tensors whose rows are not a multiple of the K-quant block (256) fall back to a legacy type (Q5_0 / Q8_0):
    llama.cpp does that itself; `tensor_types(path)` shows what each file really holds."""
    from .. import device as devicemod  # noqa: PLC0415
    from ..serving.llamacpp import llama_cpp_module  # noqa: PLC0415

    src = Path(gguf_in)
    if not src.is_file():
        raise NotFound(f"{src} does not exist.")
    llama_cpp = llama_cpp_module()
    plan = [(t.upper(), ftype_of(llama_cpp, t), quant_name(src, t)) for t in types]
    for _t, _f, dst in plan:
        if dst.exists():
            raise Conflict(f"{dst} already exists; not overwriting it.")
    outs = []
    for i, (qtype, ftype, dst) in enumerate(plan):
        progress(i / max(1, len(plan)), f"Quantizing to {qtype}...")
        tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}.partial")
        try:
            rc = _quantize_file(src, tmp, ftype, devicemod.cpu_threads())
            if rc != 0 or not is_gguf(tmp):
                raise ExportFailed(f"llama.cpp could not quantize {src.name} to {qtype} (return code {rc}). Its "
                                   "messages are on the studio's stderr; a common cause is an architecture this "
                                   "llama.cpp build does not know.")
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        outs.append(dst)
        progress((i + 1) / len(plan), f"{dst.name}: {human_bytes(dst.stat().st_size)}")
    return outs


def tensor_types(gguf_path: str | os.PathLike) -> dict:
    """{"types": {type: count of 2-D tensors}, "fallback": n} - n counts tensors stored in a legacy quant type
    (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) in a K-quant file: llama.cpp's fallback for rows not divisible by 256."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(gguf_path))
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    legacy = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    fallback = sum(n for t, n in types.items() if t in legacy) if "_K" in Path(gguf_path).name.upper() else 0
    return {"types": dict(types), "fallback": fallback}
