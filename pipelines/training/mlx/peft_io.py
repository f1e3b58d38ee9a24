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
numpy API (no torch in the MLX trainer). `adapter_layers` builds, from any PEFT LoRA folder (ours or one the torch
trainer wrote), the MLX layers that apply it to a loaded model - what the MLX chat backend attaches.
"""

from __future__ import annotations

from pathlib import Path

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ...errors import BadInput
from ...workspace import write_json
from .model import ADAPTERS, LINEAR, TrainableRows, adapter_modules

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


def _scale(config: dict, rank: int) -> float:
    alpha = float(config.get("lora_alpha") or rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_layers(model, folder: Path, config: dict | None = None) -> list[tuple[str, object]]:
    """(module path, MLX layer) that apply the PEFT LoRA adapter in `folder` to `model`: mlx-lm's LoRALinear /
    DoRALinear around each adapted linear layer (its values from the file), TrainableRows for trained embedding rows.
    Nothing in `model` changes. BadInput when a layer is missing, its shape differs, or the adapter holds what the MLX
    backend does not apply (LoRA on embeddings, per-layer ranks, whole modules to save)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    folder = Path(folder)
    config = config if config is not None else json.loads((folder / CONFIG).read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("modules_to_save"):
        raise BadInput(f"{folder.name} sets per-layer ranks or saves whole modules, which the MLX backend does not "
                       "apply: load the model with the torch backend to chat with it.")
    tensors = load_file(str(folder / WEIGHTS))
    modules = dict(model.named_modules())
    out, used = [], set()
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        path = key[len(PREFIX):-len(".lora_A.weight")]
        base = modules.get(path)
        base = base.linear if isinstance(base, ADAPTERS) else base
        a, b = tensors[key], tensors.get(f"{PREFIX}{path}.lora_B.weight")
        if not isinstance(base, LINEAR) or b is None:
            raise BadInput(f"{folder.name} adapts '{path}', which this model has no linear layer for: it was trained "
                           "for another base model.")
        packed = 32 // base.bits if isinstance(base, nn.QuantizedLinear) else 1  # 32-bit words of packed weights
        out_dims, in_dims = base.weight.shape[0], base.weight.shape[1] * packed
        if a.shape[1] != in_dims or b.shape[0] != out_dims:
            raise BadInput(f"{path} is {in_dims} -> {out_dims} here, the adapter expects {a.shape[1]} -> {b.shape[0]}: "
                           "it was trained for another base model.")
        magnitude = tensors.get(f"{PREFIX}{path}.lora_magnitude_vector")
        layer = (DoRALinear if config.get("use_dora") else LoRALinear).from_base(
            base, r=a.shape[0], dropout=0.0, scale=_scale(config, a.shape[0]))
        layer.lora_a, layer.lora_b = mx.array(np.ascontiguousarray(a.T)), mx.array(np.ascontiguousarray(b.T))
        if config.get("use_dora"):
            layer.m = mx.array(magnitude)
        out.append((path, layer))
        used |= {key, f"{PREFIX}{path}.lora_B.weight", f"{PREFIX}{path}.lora_magnitude_vector"}
    for key in sorted(k for k in tensors if k.endswith(ROWS_KEY)):
        path = key[len(PREFIX):-len(ROWS_KEY) - 1]
        ids = config.get("trainable_token_indices")
        emb = modules.get(path)
        if not isinstance(ids, list) or emb is None or not hasattr(emb, "as_linear"):
            raise BadInput(f"{folder.name} trains embedding rows of '{path}' in a form the MLX backend does not "
                           "apply: load the model with the torch backend to chat with it.")
        out.append((path, TrainableRows(emb, ids, mx.array(tensors[key]))))
        used.add(key)
    left = sorted(set(tensors) - used)
    if left:
        raise BadInput(f"{folder.name} also holds {left[0].replace(PREFIX, '')}, which the MLX backend does not "
                       "apply: load the model with the torch backend to chat with it.")
    return out
