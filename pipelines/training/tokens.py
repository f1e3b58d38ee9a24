"""Target tokens a base model never learned: some base models carry their chat markup in the vocabulary without ever
having trained it - Gemma 3 270M's `<end_of_turn>` embedding is all but identical (cosine 0.995) to those of its
`<unused…>` tokens. A LoRA adapter cannot tell such a token apart from the others (the output layer is the tied
embedding), so after fine-tuning the model "ends its turn" with a random unused token and never stops. Those rows of
the embedding are trained as well (PEFT's trainable tokens: only these rows, tied output layer included).

A row is untrained when many random rows of the embedding point the same way (cosine > 0.99): trained embeddings
of different tokens are far apart in hundreds of dimensions; untrained ones are copies of one initial vector.
"""

from __future__ import annotations

SAMPLE = 8192  # random rows compared with each candidate
CLOSE = 0.99  # cosine similarity of two copies of the same untrained vector
MIN_HITS = 16  # of SAMPLE rows that close: a cluster, not a coincidence


def untrained_targets(model, label_ids, sample: int = SAMPLE) -> list[int]:
    """The ids among `label_ids` (the tokens the training targets hold) whose input embedding is untrained."""
    import torch  # noqa: PLC0415

    emb = model.get_input_embeddings().weight
    ids = sorted({int(i) for i in label_ids if 0 <= int(i) < emb.shape[0]})
    if not ids or emb.shape[0] < 4 * MIN_HITS:
        return []
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, emb.shape[0], (min(sample, emb.shape[0]),), generator=g)
        ref = torch.nn.functional.normalize(emb[rows.to(emb.device)].float(), dim=1)
        out = []
        for k in range(0, len(ids), 4096):
            part = torch.tensor(ids[k:k + 4096], device=emb.device)
            cand = torch.nn.functional.normalize(emb[part].float(), dim=1)
            hits = ((cand @ ref.T) > CLOSE).sum(dim=1) - 1  # a candidate drawn among the rows matches itself
            out += [ids[k + j] for j in torch.nonzero(hits >= MIN_HITS).flatten().tolist()]
    return out


def fast_token_rows(model) -> int:
    """Give every trainable-tokens layer of `model` (PEFT) a forward that costs what its few rows cost. PEFT's own
    forward builds a copy of the whole weight with the trained rows swapped in at every call (index_copy): on
    Gemma's 262k-row vocabulary that is 670 MB copied twice per generated token (2.5 tok/s instead of ~10 on 2
    cores). Here the frozen layer runs as it is and only the trained rows are put in its output - the same values
    and gradients. Returns the number of layers changed (merged or disabled adapters keep PEFT's path)."""
    import types  # noqa: PLC0415

    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer  # noqa: PLC0415
    except ImportError:  # an older PEFT without trainable tokens: nothing to change
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, TrainableTokensLayer) and "forward_adapters" not in m.__dict__:
            m.forward_adapters = types.MethodType(_rows_forward, m)
            n += 1
    return n


def _rows_forward(self, x, active_adapters, *args, **kwargs):
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    base = self.base_layer
    plain = type(self).forward_adapters  # PEFT's own
    if self.disable_adapters or not active_adapters or self.merged or args or kwargs:
        return plain(self, x, active_adapters, *args, **kwargs)
    self._check_overlapping_tokens(active_adapters)
    if isinstance(base, torch.nn.Embedding):
        out = base(x)  # Gemma's scaled embedding scales here, as PEFT scales its own lookup
        scale = self._get_embed_scale()
        for name in active_adapters:
            idx = torch.as_tensor(self.token_indices[name], device=x.device)
            order = torch.argsort(idx)  # a few ids: find each input token among them without a vocabulary-sized table
            j = torch.searchsorted(idx[order], x).clamp(max=len(idx) - 1)
            sel = idx[order][j] == x
            if bool(sel.any()):
                rows = self.trainable_tokens_delta[name][order[j[sel]]].to(out.dtype)
                out = out.index_put((sel,), rows * scale.to(out.dtype) if scale is not None else rows)
        return out
    if isinstance(base, torch.nn.Linear) and base.bias is None:  # a tied output layer
        out = base(x)
        for name in active_adapters:
            idx = torch.as_tensor(self.token_indices[name], device=x.device)
            out = out.index_copy(-1, idx, F.linear(x, self.trainable_tokens_delta[name].to(x.dtype)))
        return out
    return plain(self, x, active_adapters, *args, **kwargs)
