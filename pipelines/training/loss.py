"""The loss: cross-entropy on label positions only. The decoder's hidden states are gathered where a label counts and
the output layer is applied to them alone, chunk by chunk, inside one autograd function that also computes the
gradient (`linear_cross_entropy`), so the [batch, seq, vocab] logits (262,144 wide for Gemma 3) never exist.
"""

from __future__ import annotations

from .encode import IGNORE

_LCE = None
_LTN = None


def _ce_chunks(torch, hidden, weight, target, softcap: float, chunk: int, need_grad: bool):
    """The shared kernel: per-row cross-entropy of `hidden @ weight.T` (frozen weight) chunk by chunk, and, when
    `need_grad`, its gradient w.r.t. hidden computed on the way, so no chunk's logits are kept. Returns (the chunks'
    float32 row losses, the gradient or None)."""
    grad = torch.empty_like(hidden) if need_grad else None
    rows = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s: s + chunk], target[s: s + chunk]
        z = (h @ weight.t()).float()
        if softcap:
            z = torch.tanh(z.div_(softcap)).mul_(softcap)
        lse = torch.logsumexp(z, dim=-1)
        rows.append(lse - z.gather(1, t[:, None]).squeeze(1))
        if need_grad:
            factor = (1 - (z / softcap) ** 2) if softcap else None
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place
            p.scatter_add_(1, t[:, None], torch.full_like(t[:, None], -1, dtype=p.dtype))
            if factor is not None:
                p.mul_(factor)
            grad[s: s + chunk] = p.to(weight.dtype) @ weight
    return rows, grad


def _linear_ce_function():
    """torch.autograd.Function for sum-reduced cross-entropy of `hidden @ weight.T` (frozen weight), computed in
    chunks of rows; the gradient w.r.t. hidden is computed in the forward pass, so no chunk's logits are kept."""
    global _LCE
    if _LCE is not None:
        return _LCE
    import torch  # noqa: PLC0415

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, target, softcap, chunk):
            need_grad = ctx.needs_input_grad[0]
            rows, grad = _ce_chunks(torch, hidden, weight, target, softcap, chunk, need_grad)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for r in rows:
                total += r.sum()
            ctx.save_for_backward(grad if need_grad else hidden.new_empty(0))
            return total

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g.to(grad.dtype), None, None, None, None

    _LCE = LinearCrossEntropy
    return _LCE


def _chunk_rows(hidden, weight, chunk_bytes: int) -> int:
    """Rows per chunk: `chunk_bytes` of float32 logits at a time."""
    vocab = weight.shape[0]
    return max(1, min(max(1, hidden.shape[0]), chunk_bytes // (4 * vocab)))


def linear_cross_entropy(hidden, weight, target, softcap: float | None = None, chunk_bytes: int = 256 * 2**20):
    """Sum over rows of cross-entropy(hidden @ weight.T, target) without materialising all logits at once
    (`chunk_bytes` of fp32 logits at a time). `weight` must be frozen."""
    return _linear_ce_function().apply(hidden, weight, target, float(softcap or 0.0),
                                       _chunk_rows(hidden, weight, chunk_bytes))


def _linear_token_nll_function():
    """Like LinearCrossEntropy, but one loss per row (the preference losses need each sequence's own log-prob): each
    row's loss depends on its own hidden row only, so the gradient of row i computed in the forward pass is scaled by
    the incoming gradient of row i."""
    global _LTN
    if _LTN is not None:
        return _LTN
    import torch  # noqa: PLC0415

    class LinearTokenNLL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, target, softcap, chunk):
            need_grad = ctx.needs_input_grad[0]
            rows, grad = _ce_chunks(torch, hidden, weight, target, softcap, chunk, need_grad)
            out = torch.cat(rows) if rows else torch.empty(0, dtype=torch.float32, device=hidden.device)
            ctx.save_for_backward(grad if need_grad else hidden.new_empty(0))
            return out

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g.to(grad.dtype)[:, None], None, None, None, None

    _LTN = LinearTokenNLL
    return _LTN


def linear_token_nll(hidden, weight, target, softcap: float | None = None, chunk_bytes: int = 256 * 2**20):
    """Per-row cross-entropy(hidden @ weight.T, target) as a float32 vector, chunked like `linear_cross_entropy`
    (no [rows, vocab] logits kept). `weight` must be frozen."""
    return _linear_token_nll_function().apply(hidden, weight, target, float(softcap or 0.0),
                                              _chunk_rows(hidden, weight, chunk_bytes))


def _loss_module_class():
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    class CausalLMLoss(torch.nn.Module):
        """Wraps the PEFT model: forward(batch) -> (sum of token losses, number of label tokens). The output layer
        runs only on positions with a label. `full_logits=True` uses the model's own forward (fallback)."""

        def __init__(self, model, full_logits: bool = False):
            super().__init__()
            self.model = model
            self.full_logits = full_logits
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            cfg = getattr(base.config, "text_config", None) or base.config
            self.softcap = getattr(cfg, "final_logit_softcapping", None) or None

        def _parts(self):
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            return base.get_decoder(), base.get_output_embeddings()

        def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
            tgt = labels[:, 1:]
            sel = tgt != IGNORE
            n = sel.sum()
            if self.full_logits:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).logits[:, :-1]
                return F.cross_entropy(logits[sel].float(), tgt[sel], reduction="sum"), n
            decoder, head = self._parts()
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
            hs, ts = hidden[:, :-1][sel], tgt[sel]
            if head.weight.requires_grad or getattr(head, "bias", None) is not None or type(head) is not torch.nn.Linear:
                logits = head(hs).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                return F.cross_entropy(logits, ts, reduction="sum"), n
            return linear_cross_entropy(hs, head.weight, ts, self.softcap), n

    return CausalLMLoss


def reference_loss(model, batch) -> float:
    """The model's own mean loss over full logits (transformers' forward with labels): the check for ours."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], labels=batch["labels"],
                           position_ids=batch.get("position_ids"), use_cache=False).loss)
