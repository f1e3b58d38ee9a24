"""RMSNorm layers of the frozen base applied in one autograd function with a hand-written gradient, instead of the
model's chain of elementwise ops (square, mean, rsqrt, two multiplies, casts), each a pass over the activations with
an autograd node of its own. Forward: one fused dot product per row for the sum of squares, then one scaled
multiply; backward: `dx = g w r - x (r^3 (g w . x) / n)` in three passes. Measured on a Xeon with AMX (2 threads,
Gemma 3 270M, six norms in each of its 18 layers; bench/train.py --method levers): the bf16 mixed-precision step
1.07x, where the model's norms also cast to float32 and back; the float32 step unchanged (within 2%).

Models write RMSNorm two ways, both computed in float32 and given back in the input's dtype:

    "offset"  x_hat * (1 + w)             Gemma, Gemma 2, Gemma 3
    "plain"   w * x_hat                   Llama, Qwen 2/3, Mistral, Phi 3, SmolLM, ...

Which one a norm class computes is not taken from its name: at fuse time each class's own forward is run on a probe
and compared with both; a class that matches neither, a trained weight, extra arguments or a norm without a 1-D
weight keep the model's own forward.

    fuse_rms_norms(model) -> n    give the frozen RMSNorm layers this forward (n: how many)
    unfuse_rms_norms(model) -> n  the models' own forward again (the bench's lever)

Imports torch: trainer process only.
"""

from __future__ import annotations

import types

import torch

KINDS = ("offset", "plain")


class RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * scale over the last dimension, in float32, returned in x's dtype; `scale` is
    the frozen float32 weight already in its final form (1 + w or w): no gradient for it."""

    @staticmethod
    def forward(ctx, x, scale, eps: float):
        xf = x.float()
        rstd = torch.linalg.vecdot(xf, xf, dim=-1).unsqueeze_(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        y = (xf * rstd).mul_(scale)
        ctx.save_for_backward(x, rstd, scale)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, scale = ctx.saved_tensors
        xf = x.float()
        g = grad.float() * scale
        coef = torch.linalg.vecdot(g, xf, dim=-1).unsqueeze_(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        return g.mul_(rstd).addcmul_(xf, coef, value=-1).to(x.dtype), None, None


def _eps(norm) -> float | None:
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _scale(norm, kind: str):
    w = norm.weight.detach().float()
    return w + 1 if kind == "offset" else w


def _kind(cls, norm) -> str | None:
    """Which formula `norm`'s class computes ("offset" / "plain"), from its own forward on a probe; None: neither."""
    eps = _eps(norm)
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[0], generator=g).to(weight.device)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        try:
            own = cls.forward(norm, probe.to(weight.dtype)).float()
        except Exception:  # noqa: BLE001 - a forward that wants other arguments: not a plain RMSNorm
            return None
        for kind in KINDS:
            mine = RMSNormFunction.apply(probe.to(weight.dtype), _scale(norm, kind), eps).float()
            if own.shape == mine.shape and torch.allclose(own, mine, rtol=2e-2, atol=1e-3):
                return kind
    return None


def _fused_forward(kind: str):
    """The forward for a norm of formula `kind`, as a function to bind to the instance."""

    def forward(self, x, *args, **kwargs):
        if args or kwargs or self.weight.requires_grad or not x.is_floating_point():
            return type(self).forward(self, x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):  # computed in float32 inside, as the models do
            return RMSNormFunction.apply(x, _scale(self, kind), _eps(self))

    return forward


FORWARDS = {kind: _fused_forward(kind) for kind in KINDS}  # one function per formula, bound to each instance


def fuse_rms_norms(model) -> int:
    """Give every frozen RMSNorm layer of `model` whose class computes one of the two formulas the fused forward (per
    instance; each class probed once). Returns the number of layers changed."""
    n, kinds = 0, {}
    for m in model.modules():
        cls = type(m)
        if "rmsnorm" not in cls.__name__.lower() or "forward" in m.__dict__:
            continue
        if cls not in kinds:
            kinds[cls] = _kind(cls, m)
        if kinds[cls] is not None:
            m.forward = types.MethodType(FORWARDS[kinds[cls]], m)
            n += 1
    return n


def unfuse_rms_norms(model) -> int:
    """Undo fuse_rms_norms (the model's own forward again); the bench compares the two. Returns how many changed."""
    n = 0
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) in FORWARDS.values():
            del m.forward
            n += 1
    return n
