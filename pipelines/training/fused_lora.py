"""LoRA layers applied in one autograd function: `y = x W^T + s * dropout(x) A^T B^T` with its gradient written by
hand, instead of PEFT's chain of modules (base linear, dropout, A, B, a multiply by the scaling, a sum), each a pass
over [tokens, width] activations with its own autograd node. Here the scaled B product is added into the base
output in the same matmul call (addmm, beta 1), the input gradient takes the LoRA term and the dropout mask in
one pass (addcmul), and dropout's 1 / (1 - p) joins the LoRA scale, on the [tokens, r] side - measured on a Xeon
(AMX), Gemma 3 270M's seven projections at 800 tokens: the LoRA part of forward + backward 297 -> 187 ms in
float32, 505 -> 266 ms in bf16 mixed precision (where PEFT's extra passes cost four times the frozen matmuls); the
whole training step 1.03x in float32 (bench/train.py --method levers).

The values are PEFT's up to rounding (float32: a few ulps; the loss within 1e-6 relative) for the same dropout
mask; the mask is drawn more cheaply than torch's dropout draws it (dropout_keep), so a seeded run's masks are not
PEFT's: the same in distribution (p rounded to 1/65536), not bit for bit.

    fuse_lora(model) -> n    give each plain LoRA Linear of a PEFT model this forward (n: how many)

Anything else - DoRA and other variants, a merged or disabled adapter (DPO's reference pass), several active
adapters, per-request adapter names, a quantized or biased-LoRA layer, PEFT's float32 input cast - keeps PEFT's
forward, checked at every call. Imports torch: trainer process only.
"""

from __future__ import annotations

import types

import numpy as np
import torch


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + scale * (dropout_p(x) A^T) B^T for a frozen W, trained A [r, in] and B [out, r]. All
    matmuls in `x`'s dtype (the caller picks it); A's and B's gradients come back in their own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, p: float, scale: float):
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        if p > 0:
            keep = dropout_keep(x, p)
            dropped = x * keep
            scale = scale / (1 - p)  # inverted dropout's 1 / (1 - p), applied on the rank-r side: no pass over x
        else:
            keep, dropped = None, x
        low = dropped @ a.t()  # [tokens, r]
        y = torch.nn.functional.linear(x, weight, bias)
        y.addmm_(low, b.t(), alpha=scale)  # the base output + scale * low @ B^T, in one call
        ctx.save_for_backward(weight, a, b, keep, dropped, low)
        ctx.scale = scale
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, a, b, keep, dropped, low = ctx.saved_tensors
        grad = grad.contiguous()
        grad_low = (grad @ b).mul_(ctx.scale)  # [tokens, r]
        grad_b = (grad.t() @ low).mul_(ctx.scale)
        grad_a = grad_low.t() @ dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
            if keep is None:
                grad_x.addmm_(grad_low, a)
            else:
                grad_x.addcmul_(grad_low @ a, keep)  # through the dropout: the same mask (its scale is in grad_low)
        return grad_x, None, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None, None


def dropout_keep(x, p: float):
    """Dropout's keep mask like `x`, in x's dtype: 0 with probability p, else 1 (the caller scales by 1 / (1 - p)).
    Eager on a CPU: four 16-bit draws per 64-bit number from numpy's SFC64, seeded by one draw of torch's
    generator (so torch.manual_seed fixes the masks), each compared with p rounded to 1/65536. Measured on a Xeon,
    [824, 640]: torch's bernoulli_ 2.9 ms; four 16-bit values per torch int64 draw 0.42 ms; per SFC64 draw 0.18 ms
    (torch's CPU generator is a Mersenne twister, and draws one number at a time). On a GPU, and under
    torch.compile (inductor generates it in its own kernel): bernoulli_, cheap there."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(1 - p)
    n = x.numel()
    seed = int(torch.randint(0, 2**63 - 1, (1,)))
    raw = np.random.SFC64(seed).random_raw((n + 3) // 4)  # uint64
    draws = torch.from_numpy(raw.view(np.int16)[:n]).view(x.shape)  # uniform over the 65536 int16 values
    keep = torch.empty_like(x)
    return torch.ge(draws, round(p * 65536) - 32768, out=keep)  # written in x's dtype: no bool mask, no second pass


def _compute_dtype(x):
    """The dtype the layer's matmuls run in: autocast's where it is on for x's device, else x's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _plain_parts(layer, x, args, kwargs):
    """(weight, bias, A, B, dropout p, scale, compute dtype) when this call can take the fused function, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or type(base) is not torch.nn.Linear:
        return None
    lora_a, lora_b, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if lora_a.bias is not None or lora_b.bias is not None or base.weight.requires_grad:
        return None
    dtype = _compute_dtype(x)
    if base.weight.dtype != dtype or not x.is_floating_point():
        return None
    if getattr(layer, "cast_input_dtype_enabled", True) and lora_a.weight.dtype != dtype:
        return None  # PEFT would compute the LoRA part in the adapter's dtype (float32): keep that
    if isinstance(drop, torch.nn.Dropout):
        p = drop.p if drop.training else 0.0
    elif isinstance(drop, torch.nn.Identity):
        p = 0.0
    else:
        return None
    return base.weight, base.bias, lora_a.weight, lora_b.weight, float(p), float(layer.scaling[name]), dtype


def _fused_forward(self, x, *args, **kwargs):
    parts = _plain_parts(self, x, args, kwargs)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own
    weight, bias, lora_a, lora_b, p, scale, dtype = parts
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are set above; autocast would recast inside
        y = LoraLinearFunction.apply(flat, weight, bias, lora_a, lora_b, p, scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fuse_lora(model) -> int:
    """Give every LoRA Linear layer of the PEFT `model` the fused forward (per instance; the checks above send any
    other case to PEFT's forward). Returns the number of layers changed."""
    from peft.tuners.lora import Linear as LoraLinear  # noqa: PLC0415

    n = 0
    for m in model.modules():
        if isinstance(m, LoraLinear) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_fused_forward, m)
            n += 1
    return n


def unfuse_lora(model) -> int:
    """Undo fuse_lora (PEFT's forward again); the bench compares the two. Returns the number of layers changed."""
    n = 0
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) is _fused_forward:
            del m.forward
            n += 1
    return n
