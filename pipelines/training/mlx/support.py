"""What the MLX trainer can take, checked before anything runs (`check_config`, called by config.validate when the
backend resolves to mlx), and the model config as mlx-lm must read it (`mlx_model_config`).

Refused, each with the reason and the torch alternative: an architecture mlx-lm has no module for; a folder that is
already quantized (an mlx-community 4-bit folder, GPTQ, AWQ...: the adapter must merge into full-precision weights,
which export and chat read with transformers); weights only as PyTorch pickles; packing (mlx-lm's models take no
per-conversation attention mask); layer names that differ between mlx-lm and transformers (the adapter could not
leave in PEFT format); target layers that are not plain linear layers (mixture-of-experts switch layers); several
processes or machines (ONE_PROCESS: runs.create_run, multinode_commands and the trainer under torchrun say it).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import BadInput

TORCH = "choose backend torch"
ONE_PROCESS = ("The MLX backend trains in one process on one machine: several processes or machines are PyTorch's "
               "DDP. Choose backend torch for that, or train with one process.")


def read_config(base: Path) -> dict:
    return json.loads((Path(base) / "config.json").read_text())


def legacy_rope_keys(config: dict) -> dict:
    """transformers 5 saves the rotary settings as `rope_parameters` (per layer type for Gemma 3); mlx-lm's models
    read the older flat keys and would silently use their defaults without them. The flat keys for what is there."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in config:
        return {}
    out: dict = {}
    full = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
    if "rope_theta" in full:
        out["rope_theta"] = full["rope_theta"]
    if full.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    local = params.get("sliding_attention")
    if isinstance(local, dict) and "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
    return out


def mlx_model_config(base: Path) -> dict:
    """Overrides for mlx_lm.utils.load_model(model_config=...): the flat rotary keys (see legacy_rope_keys)."""
    return legacy_rope_keys(read_config(base))


def mlx_model_type(config: dict) -> str | None:
    """The mlx-lm module that builds this config's model, or None when mlx-lm has none."""
    import importlib.util  # noqa: PLC0415

    from mlx_lm.utils import MODEL_REMAPPING  # noqa: PLC0415

    model_type = MODEL_REMAPPING.get(config.get("model_type"), config.get("model_type"))
    if not isinstance(model_type, str) or not model_type.replace("_", "").isalnum():
        return None
    return model_type if importlib.util.find_spec(f"mlx_lm.models.{model_type}") else None


def check_config(cfg) -> None:
    """BadInput for a validated config (absolute base_model) the MLX trainer cannot take, from its files alone
    (mlx.refuse adds the checks that need the model's layers)."""
    base = Path(cfg.base_model)
    config = read_config(base)
    if cfg.packing:
        raise BadInput("Packing needs an attention mask per conversation, which mlx-lm's models do not take: untick "
                       f"packing for the MLX backend, or {TORCH}.")
    if not mlx_model_type(config):
        raise BadInput(f"mlx-lm has no '{config.get('model_type')}' architecture, so MLX cannot train "
                       f"{base.name}: {TORCH} (it trains every transformers causal LM).")
    quant = config.get("quantization") or config.get("quantization_config")
    if quant:
        kind = quant.get("quant_method", "MLX") if isinstance(quant, dict) else "quantized"
        raise BadInput(f"{base.name} is already quantized ({kind}): MacTuner merges and exports adapters into "
                       "full-precision weights. Train its full-precision original with base_bits 4 or 8 (MLX "
                       f"quantizes it while training), or {TORCH}.")
    if not list(base.glob("*.safetensors")):
        raise BadInput(f"{base.name} has its weights only as PyTorch pickles; MLX reads safetensors: {TORCH}, or "
                       "save the model with safetensors.")


def hf_weight_names(base: Path) -> set[str]:
    """The tensor names of the folder's safetensors (headers only)."""
    from safetensors import safe_open  # noqa: PLC0415

    names: set[str] = set()
    for f in sorted(Path(base).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as fh:
            names.update(fh.keys())
    return names


def check_names(targets: list[str], hf_names: set[str], base_name: str) -> None:
    """BadInput unless every adapted layer `targets` (mlx-lm module paths) has a weight of the same name in the HF
    folder: the PEFT adapter is named after transformers' modules, and merge / export / chat load it there."""
    missing = [t for t in targets if f"{t}.weight" not in hf_names]
    if missing:
        raise BadInput(f"mlx-lm names this model's layers differently from transformers ({missing[0]} has no weight "
                       f"of that name in {base_name}), so an MLX adapter could not be saved in PEFT format for merge, "
                       f"export and chat: {TORCH}.")
