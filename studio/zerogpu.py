"""ZeroGPU: on a Space with ZeroGPU hardware (SPACES_ZERO_GPU=true) a GPU is lent only for the length of a call to a
function decorated with `@spaces.GPU`. `gpu(fn)` is that decoration there and `fn` itself everywhere else, so the
`spaces` package (preinstalled on Spaces) is never needed off one. Only inference with an HF (torch) model is
wrapped: GGUF models answer from their llama.cpp worker processes on the CPU, and training is refused on ZeroGPU
(pipelines.space.training_refusal).
"""

from __future__ import annotations

import logging
from typing import Callable

from pipelines.space import zero_gpu

log = logging.getLogger("mactuner.studio")
DURATION = 120  # seconds of GPU one answer may hold (ZeroGPU's own default is 60)


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU(duration=DURATION)(fn)` on ZeroGPU hardware, else `fn`. Decorate at import time: ZeroGPU
    registers its functions before the app starts."""
    if not zero_gpu():
        return fn
    try:
        import spaces  # noqa: PLC0415 - on a Space only
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the `spaces` package is missing: answers run without a GPU")
        return fn
    return spaces.GPU(duration=DURATION)(fn)


def for_model(lm, plain: Callable, on_gpu: Callable) -> Callable:
    """`on_gpu` (the gpu()-wrapped variant) for an HF model, `plain` for a GGUF one."""
    return on_gpu if getattr(lm, "backend_kind", None) == "transformers" else plain
