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
