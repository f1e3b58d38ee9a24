"""Training precision: float32, or bf16 / fp16 mixed precision.

Mixed precision here means: the frozen base weights are loaded in bf16, the trained weights - LoRA
matrices, trained embedding rows - stay float32 (PEFT keeps adapter weights in float32 when the base is not), and
so do the optimizer state, the gradients and the loss (loss.py computes it in float32). The decoder's forward runs
under torch.autocast, so its matmuls take bf16 inputs; PEFT's own cast of each LoRA layer's input to float32 is
switched off, since it would copy every activation to float32 and back (measured on Gemma 3 270M, 2 Xeon
threads: 3.0 s/step float32, 2.4 with the base in bf16 alone, 1.9 with autocast and no casts).

    dtype, name, why = resolve(cfg, prof, ws)  # torch dtype of the base weights, "bfloat16", the reason
    apply_mixed(model, device_type, dtype)     # after get_peft_model; no-op for float32
"""

from __future__ import annotations

from .config import TrainConfig


def resolve(cfg: TrainConfig, prof, ws) -> tuple[object, str, str]:
    """(torch dtype, its name, why) for `cfg` on device profile `prof` (in the trainer): dtype "auto" asks
    device.train_dtype (on a CPU calibrated once, kept in the workspace `ws`), anything else is taken as set."""
    import torch  # noqa: PLC0415

    from .. import device as devicemod  # noqa: PLC0415

    if cfg.dtype == "auto":
        name, why = devicemod.train_dtype(prof, ws.root / devicemod.CALIBRATION_FILE)
    else:
        name, why = cfg.dtype, f"{cfg.dtype}: set in the config"
    return getattr(torch, name), name, why


def describe(name: str | None) -> str:
    """How training computes with base dtype `name` (for the log and the pre-flight)."""
    if name == "bfloat16":
        return "bf16 mixed precision (base weights bf16, adapter, optimizer and loss float32)"
    if name == "float16":
        return "fp16 base weights (adapter, optimizer and loss float32)"
    return f"{name} throughout" if name else "chosen by the trainer on this CPU"


def apply_mixed(model, device_type: str, dtype) -> bool:
    """Make a PEFT model with a bf16 base train in mixed precision: its decoder's forward under autocast and
    PEFT's per-layer input casts off. Returns whether it did (False for a float32 base or a quantized one)."""
    import torch  # noqa: PLC0415
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    if dtype is not torch.bfloat16:  # fp16 would need a GradScaler: an fp16 base keeps PEFT's float32 casts
        return False
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return False  # QLoRA: bitsandbytes computes in its compute dtype already
    try:
        autocast = torch.autocast(device_type, dtype=dtype)
    except RuntimeError:  # a backend without autocast for this dtype: the base's dtype alone
        return False
    if not getattr(autocast, "_enabled", True):  # unsupported here (warned, disabled): keep PEFT's casts
        return False
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    decoder = base.get_decoder()
    decoder.forward = autocast(decoder.forward)  # our loss, the preference log-probs and generate all call it
    return True
