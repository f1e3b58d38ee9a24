"""Which backend trains (and, for HF models on a Mac, chats): PyTorch or Apple's MLX, and why. `auto` is MLX on
Apple silicon when mlx and mlx-lm are installed, else torch (MPS, CUDA or CPU); MLX elsewhere (Linux: its CPU build)
runs only when asked. Also the dtype the MLX trainer computes in. device.py re-exports these: the device profile
carries the choice (`prof.backend`, `prof.backend_reason`). Nothing of MLX is imported here.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from .errors import BadInput


@dataclass
class BackendChoice:
    name: str  # "torch" | "mlx"
    reason: str


def apple_silicon() -> bool:
    """A Mac with an Apple chip (arm64 macOS): where MLX computes on the GPU in unified memory."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def mlx_installed() -> tuple[bool, str]:
    """(mlx and mlx-lm are installed, their versions or what is missing). Looks at the installed distributions only:
    nothing of MLX is imported."""
    from importlib import metadata  # noqa: PLC0415

    found, missing = [], []
    for dist in ("mlx", "mlx-lm"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        return False, f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"
    return True, ", ".join(found)


def mlx_install_hint() -> str:
    return ('pip install mlx-lm (it brings mlx)' if apple_silicon()
            else 'pip install "mlx[cpu]" mlx-lm')


def choose_backend(requested: str = "auto", prof=None) -> BackendChoice:
    """Which backend trains (and chats, for HF models) for `requested` ("auto" | "torch" | "mlx"), and why.
    auto: MLX on Apple silicon when mlx and mlx-lm are installed, else torch (its device: MPS, CUDA or CPU). MLX off
    Apple silicon (Linux: its CPU build) runs only when asked: there it is slower than torch. BadInput when mlx is
    asked for and cannot run here."""

    kind = prof.kind.upper() if prof is not None else "its device"
    ok, what = mlx_installed()
    if requested == "torch":
        return BackendChoice("torch", f"torch on {kind}: chosen in the config")
    if requested == "mlx":
        if not ok:
            raise BadInput(f"The MLX backend needs mlx and mlx-lm: {what}. Install them ({mlx_install_hint()}), or "
                           "choose backend torch.")
        if platform.system() not in ("Darwin", "Linux"):
            raise BadInput("MLX runs on macOS (Apple silicon) and Linux only: choose backend torch.")
        where = "the Apple GPU (Metal, unified memory)" if apple_silicon() else "the CPU (slower than torch here)"
        return BackendChoice("mlx", f"MLX on {where}: chosen in the config ({what})")
    if apple_silicon():
        if ok:
            return BackendChoice("mlx", f"MLX: Apple silicon with {what} - unified memory, 4-/8-bit bases")
        return BackendChoice("torch", f"torch on {kind}: MLX would be the faster Mac path but {what} "
                                      f"({mlx_install_hint()})")
    return BackendChoice("torch", f"torch on {kind}: MLX is chosen automatically only on Apple silicon"
                                  + (" (backend mlx runs it on this CPU when asked)" if ok else ""))


def mlx_train_dtype(requested: str = "auto") -> tuple[str, str]:
    """(dtype, why) the MLX trainer computes in: the config's dtype, else (auto) MACTUNER_TRAIN_DTYPE, else bfloat16
    on the Apple GPU - as mlx-lm trains - and float32 on a CPU (MLX's CPU kernels have no fast bf16 path)."""
    if requested and requested != "auto":
        return requested, f"{requested}: set in the config"
    forced = os.environ.get("MACTUNER_TRAIN_DTYPE", "").strip()
    if forced in ("float32", "bfloat16", "float16"):
        return forced, f"set by MACTUNER_TRAIN_DTYPE={forced}"
    if apple_silicon():
        return "bfloat16", "bf16 base weights on the Apple GPU (adapter, optimizer and loss float32), as mlx-lm trains"
    return "float32", "float32: MLX on a CPU"
