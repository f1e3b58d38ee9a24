"""The MLX adapter in PEFT's format, both ways, so merge, GGUF export, validation, the Hub push, the Chat tab's
adapter menu and /v1 read an MLX-trained adapter exactly like a torch one:

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight  [r, in]   = mlx-lm's lora_a.T  [in, r]
                                base_model.model.<module>.lora_B.weight  [out, r]  = mlx-lm's lora_b.T  [r, out]
                                base_model.model.<module>.lora_magnitude_vector  [out]  = DoRA's m
                                base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta [k, d]
                                    = TrainableRows.rows (PEFT's trainable tokens hold the rows' values)
    adapter_config.json         PEFT's LoraConfig fields: r, lora_alpha, use_dora / use_rslora, the adapted
                                modules by their full names, trainable_token_indices

mlx-lm names its modules as transformers does for the architectures we take (support.check_names refuses the
others), so <module> is the same path on both sides. The float32 values go as they are; written with safetensors'
numpy API (no torch in the MLX trainer).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.dora import DoRALinear

from ...errors import BadInput
from ...workspace import write_json
from .model import TrainableRows, adapter_modules

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ROWS_KEY = "token_adapter.trainable_tokens_delta"


def peft_tensors(model) -> dict[str, np.ndarray]:
    """The adapter's tensors under PEFT's names."""
    out: dict[str, np.ndarray] = {}
    for name, mod in adapter_modules(model):
        if isinstance(mod, TrainableRows):
            out[f"{PREFIX}{name}.{ROWS_KEY}"] = np.array(mod.rows.astype(mx.float32))
            continue
        out[f"{PREFIX}{name}.lora_A.weight"] = np.array(mod.lora_a.astype(mx.float32).T)
        out[f"{PREFIX}{name}.lora_B.weight"] = np.array(mod.lora_b.astype(mx.float32).T)
        if isinstance(mod, DoRALinear):
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = np.array(mod.m.astype(mx.float32))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def peft_config(cfg, info) -> dict:
    """adapter_config.json as PEFT writes it for this run (the fields PEFT reads; the rest take its defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(cfg.base_model),
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(info.targets),
            "use_dora": cfg.method == "dora", "use_rslora": cfg.method == "rslora", "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "trainable_token_indices": list(info.token_rows) or None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(folder: Path, model, cfg, info) -> None:
    """The PEFT adapter files into `folder` (which exists)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    save_file(peft_tensors(model), str(Path(folder) / WEIGHTS), metadata={"format": "pt"})
    write_json(Path(folder) / CONFIG, peft_config(cfg, info))


def load_adapter(folder: Path, model) -> None:
    """Put a PEFT adapter's values (ours, or one PEFT wrote for the same settings) into the MLX model's adapter
    layers; BadInput when a tensor is missing or has another shape."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    tensors = load_file(str(Path(folder) / WEIGHTS))
    updates = []
    for name, mod in adapter_modules(model):
        if isinstance(mod, TrainableRows):
            pairs = [(f"{name}.rows", f"{PREFIX}{name}.{ROWS_KEY}", False)]
        else:
            pairs = [(f"{name}.lora_a", f"{PREFIX}{name}.lora_A.weight", True),
                     (f"{name}.lora_b", f"{PREFIX}{name}.lora_B.weight", True)]
            if isinstance(mod, DoRALinear):
                pairs.append((f"{name}.m", f"{PREFIX}{name}.lora_magnitude_vector", False))
        for mine, theirs, transpose in pairs:
            if theirs not in tensors:
                raise BadInput(f"The adapter in {folder} has no {theirs}: it was trained with other settings.")
            value = tensors[theirs].T if transpose else tensors[theirs]
            current = _get(model, mine)
            if tuple(value.shape) != tuple(current.shape):
                raise BadInput(f"The adapter's {theirs} has shape {value.shape}, this model needs {current.shape}: "
                               "it was trained with other settings.")
            updates.append((mine, mx.array(np.ascontiguousarray(value)).astype(current.dtype)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def _get(model, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node
