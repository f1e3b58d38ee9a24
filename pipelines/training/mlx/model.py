"""The model the MLX trainer trains: the base loaded by mlx-lm (`mlx_lm.utils.load_model`, lazily), cast to the
compute dtype, frozen, optionally quantized to 4 or 8 bits by MLX's own `nn.quantize` (QLoRA on a Mac), with
mlx-lm's LoRA / DoRA layers (`mlx_lm.tuner.utils.linear_to_lora_layers`, `LoRALinear`, `DoRALinear`) on the targeted
linear layers, and - as tokens.py does for torch - the embedding rows of target tokens the base never learned
trained too (`TrainableRows`, ours: mlx-lm has no such layer).

    model, info = build_model(cfg, dtype, label_ids)   # info: targets, token rows, quantization
    checkpoint_layers(model)                            # gradient checkpointing (cfg.gradient_checkpointing)
    with adapter_disabled(model): ...                   # the base model (DPO's reference, the verdict's base)
    parts = LossParts(model)                            # decoder / output layer, for the label-position loss

Only the glue is ours: which layers (our target_modules presets), the scale (alpha / r, or alpha / sqrt(r) for
rsLoRA, as PEFT), the quantization group size, and swapping adapters out for the reference.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ...errors import BadInput
from .. import tokens as token_rows
from . import support

LINEAR = (nn.Linear, nn.QuantizedLinear)
ADAPTERS = (LoRALinear, DoRALinear)


class TrainableRows(nn.Module):
    """An embedding whose rows for `ids` are trained (PEFT's trainable tokens): the frozen embedding runs as it is
    and only those rows of its output - and of the tied output layer's logits (`as_linear`) - are replaced by the
    trained values. `rows` starts as the base's rows."""

    def __init__(self, embedding: nn.Module, ids: list[int], rows: mx.array):
        super().__init__()
        self.embedding = embedding
        self.token_ids = np.asarray(ids, dtype=np.int32)  # numpy: not a parameter
        self.rows = rows.astype(mx.float32)

    def _delta(self) -> mx.array:
        base = mx.stop_gradient(self.embedding(mx.array(self.token_ids)).astype(mx.float32))
        return self.rows - base

    def __call__(self, x: mx.array) -> mx.array:
        y = self.embedding(x)
        hit = (x[..., None] == mx.array(self.token_ids)).astype(mx.float32)  # [..., k]: which row each token is
        return y + (hit @ self._delta()).astype(y.dtype)

    def as_linear(self, h: mx.array) -> mx.array:
        out = self.embedding.as_linear(h)
        own = (h.astype(mx.float32) @ self.rows.T).astype(out.dtype)  # the trained rows' logits replace theirs
        return out.at[..., mx.array(self.token_ids)].add(own - out[..., mx.array(self.token_ids)])


@dataclass
class ModelInfo:
    targets: list[str]  # full module paths of the adapted layers (the PEFT names)
    token_rows: list[int] = field(default_factory=list)
    bits: int = 0
    group_size: int = 0
    quantized_layers: int = 0


def _scale(cfg) -> float:
    return cfg.alpha / math.sqrt(cfg.rank) if cfg.method == "rslora" else cfg.alpha / cfg.rank


def layer_keys(model, targets) -> list[str]:
    """The module paths inside a decoder layer (e.g. "self_attn.q_proj") that get adapters: every linear layer
    ('all-linear', like PEFT's, which leaves the output layer alone), the attention projections ('attention'), or
    those whose last name is listed."""
    found: dict[str, nn.Module] = {}
    for layer in model.layers:
        for name, mod in layer.named_modules():
            if name:
                found.setdefault(name, mod)
    linear = sorted(n for n, m in found.items() if isinstance(m, LINEAR))
    if targets == "all-linear":
        keys = linear
    elif targets == "attention":
        keys = [n for n in linear if any("attn" in p or "attention" in p for p in n.split(".")[:-1])]
    else:
        wanted = set(targets)
        keys = [n for n in found if n.split(".")[-1] in wanted]
        odd = [n for n in keys if not isinstance(found[n], LINEAR)]
        if odd:
            names = ", ".join(sorted({n.split(".")[-1] for n in linear}))
            raise BadInput(f"{odd[0]} is a {type(found[odd[0]]).__name__}, not a linear layer: MLX adapters go on "
                           f"linear layers only. Name linear layers ({names}) or choose backend torch.")
        missing = wanted - {n.split(".")[-1] for n in keys}
        if missing:
            raise BadInput(f"This model has no layer named {sorted(missing)[0]}; its linear layers are "
                           f"{', '.join(sorted({n.split('.')[-1] for n in linear}))}.")
    if not keys:
        raise BadInput("This model has no layers that LoRA recognises for these target modules; use 'all-linear'.")
    return sorted(keys)


def _group_size(model) -> int:
    """MLX quantizes groups of 64 (mlx-lm's default) or, when some layer's width is not a multiple of 64, 32."""
    widths = [m.weight.shape[-1] for _n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return 64 if all(w % 64 == 0 for w in widths) else 32


def quantize(model, bits: int) -> tuple[int, int]:
    """Quantize the frozen base's linear layers and embedding to `bits` (affine, MLX's format); returns (group size,
    layers quantized). Layers whose width is no multiple of the group stay as they are."""
    group = _group_size(model)
    count = [0]

    def predicate(_path, module) -> bool:
        ok = hasattr(module, "to_quantized") and module.weight.shape[-1] % group == 0
        count[0] += ok
        return ok

    nn.quantize(model, group_size=group, bits=bits, class_predicate=predicate)
    return group, count[0]


def untrained_ids(embedding, label_ids) -> list[int]:
    """tokens.untrained_targets for an MLX embedding (before quantization): the label tokens whose embedding row
    is a copy of an untrained vector (many random rows point the same way)."""
    weight = embedding.weight
    ids = sorted({int(i) for i in label_ids if 0 <= int(i) < weight.shape[0]})
    if not ids or weight.shape[0] < 4 * token_rows.MIN_HITS:
        return []
    rng = np.random.default_rng(0)
    sample = mx.array(rng.integers(0, weight.shape[0], min(token_rows.SAMPLE, weight.shape[0])))

    def unit(x):
        x = x.astype(mx.float32)
        return x / mx.maximum(mx.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    ref = unit(weight[sample])
    out = []
    for k in range(0, len(ids), 4096):
        part = ids[k:k + 4096]
        hits = ((unit(weight[mx.array(part)]) @ ref.T) > token_rows.CLOSE).sum(axis=1) - 1  # as tokens.py counts
        out += [t for t, h in zip(part, np.array(hits).tolist()) if h >= token_rows.MIN_HITS]
    return out


def lazy_targets(cfg):
    """(the base loaded lazily by mlx-lm - nothing read yet -, the layer keys to adapt, their full module paths),
    after checking that every adapted layer has a weight of that name in the HF folder (support.check_names).
    BadInput when mlx-lm cannot build the model or the targets do not fit it."""
    from mlx_lm.utils import load_model  # noqa: PLC0415

    base = Path(cfg.base_model)
    try:
        model, _config = load_model(base, lazy=True, model_config=support.mlx_model_config(base),
                                    trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:  # mlx-lm's errors for a config or weights it
        raise BadInput(f"mlx-lm could not build {base.name}: {str(e).splitlines()[0][:200]}; "  # cannot take
                       f"{support.TORCH}.") from None
    keys = layer_keys(model, cfg.target_modules)
    targets = [f"{prefix}.{k}" for prefix, layer in _layers(model) for k in keys if _has(layer, k)]
    support.check_names(targets, support.hf_weight_names(base), base.name)
    return model, keys, targets


def build_model(cfg, dtype: str, label_ids=(), bits: int = 0):
    """The base of `cfg` with a fresh adapter (seeded by cfg.seed); returns (model, ModelInfo). `bits` 4 / 8: the
    frozen base quantized first."""
    model, keys, targets = lazy_targets(cfg)
    model.set_dtype(getattr(mx, dtype))
    model.freeze()
    embedding = _embedding(model)
    rows = untrained_ids(embedding, label_ids) if embedding is not None else []
    start_rows = embedding.weight[mx.array(rows)] if rows else None
    info = ModelInfo(targets, rows, bits)
    if bits:
        info.group_size, info.quantized_layers = quantize(model, bits)
    mx.random.seed(cfg.seed)
    linear_to_lora_layers(model, len(model.layers), {"rank": cfg.rank, "scale": _scale(cfg), "dropout": cfg.dropout,
                                                     "keys": set(keys)}, use_dora=cfg.method == "dora")
    if rows:
        model.model.update_modules({"embed_tokens": TrainableRows(model.model.embed_tokens, rows, start_rows)})
    if cfg.gradient_checkpointing:
        checkpoint_layers(model)
    mx.eval(model.parameters())
    model.train()
    return model, info


def checkpoint_layers(model) -> None:
    """Gradient checkpointing: each decoder layer recomputes its activations in the backward pass (mx.checkpoint),
    as mlx-lm's tuner.trainer.grad_checkpoint does - but for this model's layers only (their class is swapped for a
    subclass), not for every instance of the class in the process. In eval mode (generation) the layer runs plain."""
    for layer in model.layers:
        base = type(layer)

        class Checkpointed(base):
            def __call__(self, *args, _plain=base, **kwargs):
                if not self.training:
                    return _plain.__call__(self, *args, **kwargs)

                def inner(params, *inputs):
                    self.update(params)
                    return _plain.__call__(self, *inputs, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args)

        Checkpointed.__name__ = Checkpointed.__qualname__ = f"Checkpointed{base.__name__}"
        layer.__class__ = Checkpointed


def _layers(model):
    prefix = next(n for n, m in model.named_modules() if m is model.layers[0]).rsplit(".", 1)[0]
    return [(f"{prefix}.{i}", layer) for i, layer in enumerate(model.layers)]


def _has(layer, key: str) -> bool:
    mod = layer
    for part in key.split("."):
        mod = mod.get(part) if isinstance(mod, dict) else None
        if mod is None:
            return False
    return True


def _embedding(model):
    inner = model.get("model") if isinstance(model.get("model"), nn.Module) else None
    emb = inner.get("embed_tokens") if inner is not None else None
    return emb if isinstance(emb, nn.Embedding) else None


def adapter_modules(model) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every adapter layer: LoRA / DoRA linear layers and the trainable embedding rows."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTERS + (TrainableRows,))]


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside the block: each adapter layer is swapped for the layer it wraps, and back after."""
    wrapped = adapter_modules(model)
    plain = [(n, m.linear if isinstance(m, ADAPTERS) else m.embedding) for n, m in wrapped]
    model.update_modules(tree_unflatten(plain), strict=False)
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(wrapped), strict=False)


class LossParts:
    """The model's decoder (token ids -> final hidden states) and output layer, so the loss applies the output
    layer only where a label counts; `full_logits` falls back to the whole model's logits (an unusual head)."""

    def __init__(self, model):
        self.model = model
        args = getattr(model, "args", None)
        self.softcap = getattr(args, "final_logit_softcapping", None) or None
        self.full_logits = not isinstance(model.get("model"), nn.Module)

    def _head(self, hidden: mx.array) -> mx.array:
        if "lm_head" in self.model:
            return self.model.lm_head(hidden)
        return self.model.model.embed_tokens.as_linear(hidden)

    def token_logps(self, ids: mx.array, positions: mx.array, targets: mx.array) -> mx.array:
        """float32 log-probs of `targets` at the flat `positions` of the predicting tokens (ids[:, :-1])."""
        if self.full_logits:
            logits = self.model(ids)[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])[positions].astype(mx.float32)
        else:
            hidden = self.model.model(ids)[:, :-1]
            logits = self._head(hidden.reshape(-1, hidden.shape[-1])[positions]).astype(mx.float32)
            if self.softcap:
                logits = mx.tanh(logits / self.softcap) * self.softcap
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return picked - mx.logsumexp(logits, axis=-1)
