"""The loss: cross-entropy on label positions only. The decoder's hidden states are gathered where a label counts and
the output layer is applied to them alone, chunk by chunk, inside one autograd function that also computes the
gradient (`linear_cross_entropy`), so the [batch, seq, vocab] logits (262,144 wide for Gemma 3) never exist.

    LinearCrossEntropy   autograd function: sum over rows of cross-entropy(hidden @ weight.T), chunked, the
                         logits computed in memory kept from call to call (LogitsBuffers)
    LinearTokenNLL       the same, one loss per row (the preference losses need each sequence's log-prob)
    CausalLMLoss         wraps the PEFT model: forward(batch) -> (sum of token losses, label tokens); `full_logits`
                         falls back to the model's own forward for an output layer the chunked path cannot take
    trained_rows         a tied head with PEFT's trained token rows (Gemma's <end_of_turn>): the chunked path takes
                         those rows too, instead of the head module's full float32 logits at every label position
                         (500 rows of Gemma 3's 262k vocabulary, forward + backward, Xeon: 4.0 -> 3.4 s float32,
                         2.2 -> 1.8 s CPU bf16; the whole float32 step 1.06x, bench/train.py --method levers)
    reference_loss       the model's own mean loss over full logits: the check the trainer makes once

Imports torch: only the trainer process imports this module (pipelines.training itself stays torch-free).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .encode import IGNORE

CHUNK_BYTES = 256 * 2**20  # float32 logits computed at a time
BLOCK_BYTES = 4 * 2**20  # float32 logits of a bf16 matmul a CPU takes through the softmax at a time: in cache


class LogitsBuffers:
    """Memory for the chunked output layer's logits, kept from one call to the next: a float32 [rows, vocab] chunk
    (bf16 under mixed precision, with a float32 block beside it) is 256 MiB, and a fresh one per chunk costs the
    page faults and the zeroing of that much new memory every time - glibc maps blocks that large anew and unmaps
    them when freed.
    Measured on Gemma 3 270M (Xeon, 2 threads): with the in-place softmax below, the output layer and loss over 400
    rows 1.32 -> 1.08 s in float32 (the matmuls alone 1.10); keeping the memory from call to call as well, the whole
    step 1.03-1.06x (bench/train.py --method levers). One per CausalLMLoss; `get` hands out a view of the front of
    a flat tensor, grown as needed."""

    def __init__(self):
        self._flat: dict = {}

    def get(self, rows: int, cols: int, dtype, device):
        need = rows * cols
        flat = self._flat.get((dtype, device))
        if flat is None or flat.numel() < need:
            self._flat[(dtype, device)] = flat = None  # the old one goes before the larger one comes
            flat = self._flat[(dtype, device)] = torch.empty(need, dtype=dtype, device=device)
        return flat[:need].view(rows, cols)


def _softmax_rows(z):
    """Per row: the log-sum-exp of `z`, with `z` turned into its softmax in place (no vocabulary-wide temporary;
    torch.logsumexp would allocate two)."""
    top = z.amax(dim=1, keepdim=True)
    total = z.sub_(top).exp_().sum(dim=1, keepdim=True)
    z.div_(total)
    return (top + total.log()).squeeze(1)


def _block_rows(hidden, vocab: int, chunk: int) -> int:
    """Rows of logits the float32 softmax takes at a time. Logits of a bf16 (or fp16) matmul on a CPU: BLOCK_BYTES
    of float32, so each block's copy to float32, the softmax's five passes and the copy of the gradient back run in
    cache instead of over the whole chunk in memory (Gemma 3 270M, bf16 step on a Xeon with AMX: 1.57 -> 1.48 s).
    float32 logits (computed in place, no copies; no gain measured) and a GPU (a block per launch costs more than it
    saves): the whole chunk."""
    if hidden.device.type != "cpu" or hidden.dtype == torch.float32:
        return chunk
    return max(1, BLOCK_BYTES // (4 * vocab))


def _ce_block(z, h, t, softcap: float, need_grad: bool, rows):
    """One block of the chunk, `z` its float32 logits (changed in place): the rows' losses; with `need_grad`, `z`
    is left holding the logits' gradient, and the trained rows' share of it is returned too (zero in `z`)."""
    idx, delta = rows if rows is not None else (None, None)
    if idx is not None:  # these columns come from the trained rows (as tokens.py's head computes them)
        z[:, idx] = (h @ delta.to(h.dtype).t()).float()
    if softcap:
        z = torch.tanh(z.div_(softcap), out=z).mul_(softcap)
    picked = z.gather(1, t[:, None]).squeeze(1)
    factor = (1 - (z / softcap) ** 2) if softcap and need_grad else None
    loss = _softmax_rows(z) - picked
    if not need_grad:
        return loss, None
    z.scatter_add_(1, t[:, None], torch.full_like(t[:, None], -1, dtype=z.dtype))  # softmax minus one-hot
    if factor is not None:
        z.mul_(factor)
    if idx is None:
        return loss, None
    p_rows = z[:, idx]
    z[:, idx] = 0
    return loss, p_rows


def _ce_chunks(hidden, weight, target, softcap: float, chunk: int, need_grad: bool, rows=None, buffers=None):
    """The shared kernel: per-row cross-entropy of `hidden @ weight.T` (frozen weight) chunk by chunk, and, when
    `need_grad`, its gradient w.r.t. hidden computed on the way, so no chunk's logits are kept. Each chunk's logits
    come from one matmul in hidden's dtype; the float32 softmax then takes them a block of rows at a time (a bf16
    block is copied to float32 and its gradient back). `rows`: (indices, trained rows) that replace those rows of
    `weight` (PEFT's trainable tokens on a tied output layer), whose gradient is computed too. `buffers`: the
    LogitsBuffers to compute in (a fresh one if None). Returns (the blocks' float32 row losses, the gradient or
    None, the trained rows' gradient or None)."""
    buffers = buffers if buffers is not None else LogitsBuffers()
    grad = torch.empty_like(hidden) if need_grad else None
    delta = rows[1] if rows is not None else None
    grad_delta = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device) if rows is not None else None
    vocab = weight.shape[0]
    block = _block_rows(hidden, vocab, chunk)
    losses = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s: s + chunk], target[s: s + chunk]
        logits = torch.mm(h, weight.t(), out=buffers.get(h.shape[0], vocab, h.dtype, h.device))
        p_rows = []
        for b in range(0, h.shape[0], block):
            part = logits[b: b + block]
            z = part if part.dtype == torch.float32 else buffers.get(part.shape[0], vocab, torch.float32,
                                                                     h.device).copy_(part)
            loss, p_part = _ce_block(z, h[b: b + block], t[b: b + block], softcap, need_grad, rows)
            losses.append(loss)
            if need_grad and z is not part:
                part.copy_(z)
            if p_part is not None:
                p_rows.append(p_part)
        if not need_grad:
            continue
        out = torch.mm(logits, weight, out=grad[s: s + chunk])
        if p_rows:  # the trained rows' share of the chunk's gradient, for them and for hidden
            p_chunk = torch.cat(p_rows)
            grad_delta += p_chunk.t() @ h.float()
            out.addmm_(p_chunk.to(h.dtype), delta.to(h.dtype))
    return losses, grad, grad_delta


class LinearCrossEntropy(torch.autograd.Function):
    """Sum-reduced cross-entropy of `hidden @ weight.T` (frozen weight; the rows `indices` replaced by the trained
    `delta` when given), computed in chunks of rows; the gradients w.r.t. hidden and delta are computed in the
    forward pass, so no chunk's logits are kept."""

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, chunk, indices=None, delta=None, buffers=None):
        need_grad = ctx.needs_input_grad[0] or (delta is not None and ctx.needs_input_grad[6])
        rows = (indices, delta) if delta is not None else None
        losses, grad, grad_delta = _ce_chunks(hidden, weight, target, softcap, chunk, need_grad, rows, buffers)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for r in losses:
            total += r.sum()
        empty = hidden.new_empty(0)
        ctx.save_for_backward(grad if need_grad else empty, grad_delta if need_grad and rows else empty)
        ctx.delta_dtype = delta.dtype if delta is not None else None
        return total

    @staticmethod
    def backward(ctx, g):
        grad, grad_delta = ctx.saved_tensors
        grad_delta = (grad_delta * g).to(ctx.delta_dtype) if ctx.delta_dtype is not None else None
        return grad * g.to(grad.dtype), None, None, None, None, None, grad_delta, None


class LinearTokenNLL(torch.autograd.Function):
    """Like LinearCrossEntropy, but one loss per row: each row's loss depends on its own hidden row only, so the
    gradient of row i computed in the forward pass is scaled by the incoming gradient of row i."""

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, chunk, buffers=None):
        need_grad = ctx.needs_input_grad[0]
        rows, grad, _ = _ce_chunks(hidden, weight, target, softcap, chunk, need_grad, buffers=buffers)
        out = torch.cat(rows) if rows else torch.empty(0, dtype=torch.float32, device=hidden.device)
        ctx.save_for_backward(grad if need_grad else hidden.new_empty(0))
        return out

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype)[:, None], None, None, None, None, None


def _chunk_rows(hidden, weight, chunk_bytes: int) -> int:
    """Rows per chunk: `chunk_bytes` of float32 logits at a time."""
    vocab = weight.shape[0]
    return max(1, min(max(1, hidden.shape[0]), chunk_bytes // (4 * vocab)))


def linear_cross_entropy(hidden, weight, target, softcap: float | None = None, chunk_bytes: int = CHUNK_BYTES,
                         rows=None, buffers: LogitsBuffers | None = None):
    """Sum over rows of cross-entropy(hidden @ weight.T, target) without materialising all logits at once
    (`chunk_bytes` of fp32 logits at a time, in `buffers` when given). `weight` must be frozen; `rows`: (indices,
    trained rows) replacing those rows of `weight` (trained_rows below)."""
    indices, delta = rows if rows is not None else (None, None)
    return LinearCrossEntropy.apply(hidden, weight, target, float(softcap or 0.0),
                                    _chunk_rows(hidden, weight, chunk_bytes), indices, delta, buffers)


def linear_token_nll(hidden, weight, target, softcap: float | None = None, chunk_bytes: int = CHUNK_BYTES,
                     buffers: LogitsBuffers | None = None):
    """Per-row cross-entropy(hidden @ weight.T, target) as a float32 vector, chunked like `linear_cross_entropy`
    (no [rows, vocab] logits kept). `weight` must be frozen."""
    return LinearTokenNLL.apply(hidden, weight, target, float(softcap or 0.0),
                                _chunk_rows(hidden, weight, chunk_bytes), buffers)


def plain_head(head) -> bool:
    """True for a frozen bias-free nn.Linear output layer: the chunked functions can take its weight. Anything else
    (a trained tied head with trainable token rows, a bias, a wrapper) is applied as a module."""
    # the type first: PEFT's trainable-tokens wrapper answers `.weight` by building a merged copy of the whole
    # vocabulary's weight (670 MB for Gemma 3 in float32), which a check made at every forward cannot afford
    return type(head) is torch.nn.Linear and not head.weight.requires_grad and head.bias is None


def trained_rows(head):
    """(frozen weight, row indices, trained rows) of an output layer that is PEFT's trainable tokens over a frozen
    bias-free nn.Linear (Gemma's tied head with its <end_of_turn> row trained: tokens.py), with one adapter active;
    None for anything else (a merged or disabled adapter included: the head module is applied then)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer  # noqa: PLC0415

    layer = getattr(head, "token_adapter", head)
    if not isinstance(layer, TrainableTokensLayer) or (layer is not head and not head.active_adapters):
        return None
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if not plain_head(layer.base_layer) or name not in layer.trainable_tokens_delta:
        return None
    weight = layer.base_layer.weight
    return weight, torch.as_tensor(layer.token_indices[name], device=weight.device), layer.trainable_tokens_delta[name]


class CausalLMLoss(torch.nn.Module):
    """Wraps the PEFT model: forward(batch) -> (sum of token losses, number of label tokens). The output layer runs
    only on positions with a label. `full_logits=True` uses the model's own forward (the fallback)."""

    def __init__(self, model, full_logits: bool = False, chunked_rows: bool = True):
        super().__init__()
        self.model = model
        self.full_logits = full_logits
        self.chunked_rows = chunked_rows  # False: a trained-rows head as a module (full logits at the labels)
        cfg = getattr(self.base.config, "text_config", None) or self.base.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None) or None
        self.buffers = LogitsBuffers()  # the logits chunks' memory, kept from step to step

    @property
    def base(self):
        """The transformers model under the PEFT wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def parts(self):
        """(decoder, output layer) of the wrapped model."""
        return self.base.get_decoder(), self.base.get_output_embeddings()

    def head_logits(self, head, hidden):
        """Float32 logits of `hidden` through the output layer module `head`, soft-capped like the model's."""
        logits = head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        tgt = labels[:, 1:]
        sel = tgt != IGNORE
        n = sel.sum()
        if self.full_logits:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).logits[:, :-1]
            return F.cross_entropy(logits[sel].float(), tgt[sel], reduction="sum"), n
        decoder, head = self.parts()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        hs, ts = hidden[:, :-1][sel], tgt[sel]
        if plain_head(head):
            return linear_cross_entropy(hs, head.weight, ts, self.softcap, buffers=self.buffers), n
        rows = trained_rows(head) if self.chunked_rows else None
        if rows is not None:
            weight, indices, delta = rows
            return linear_cross_entropy(hs, weight, ts, self.softcap, rows=(indices, delta), buffers=self.buffers), n
        return F.cross_entropy(self.head_logits(head, hs), ts, reduction="sum"), n


def reference_loss(model, batch) -> float:
    """The model's own mean loss over full logits (transformers' forward with labels): the check for ours."""
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], labels=batch["labels"],
                           position_ids=batch.get("position_ids"), use_cache=False).loss)
