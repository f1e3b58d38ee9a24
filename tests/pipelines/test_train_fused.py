"""The trainer's two fused paths against the PEFT ones they replace, tiny llama: LoRA layers in one autograd function
(fused_lora.py: same loss and gradients in float32 under the same dropout masks, those masks' distribution, bf16
within bf16's rounding, PEFT's path kept where it must be) and the chunked loss over an output layer with trained
token rows (loss.py: same loss and gradients, the rows' own included, as the head module over full logits; against
full logits in several chunks: test_train.py)."""

from __future__ import annotations

import pytest


def _peft(tiny_llama_dir, dtype=None, tied=False, rows=None, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if tied:
        cfg = LlamaConfig.from_pretrained(tiny_llama_dir)
        cfg.tie_word_embeddings = True
        base = LlamaForCausalLM(cfg)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    if dtype is not None:
        base = base.to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            trainable_token_indices=rows, **lora))
    with torch.no_grad():  # non-zero B (and rows) so that the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    return model


def _loss_and_grads(loss_mod, batch, seed=1):
    import torch

    loss_mod.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both paths
    total, n = loss_mod(**batch)
    mean = total / n
    mean.backward()
    grads = {k: p.grad.clone() for k, p in loss_mod.model.named_parameters() if p.grad is not None}
    return float(mean.detach()), grads


def _count_fused(monkeypatch) -> list:
    """Calls of the fused function from now on (one entry per layer call)."""
    from pipelines.training import fused_lora

    calls, real = [], fused_lora.LoraLinearFunction.apply
    monkeypatch.setattr(fused_lora.LoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _batch(vocab: int, rows=()):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 18:] = -100
    for j, r in enumerate(rows):  # the trained rows are targets too
        labels[j % 3, 10 + j] = r
        ids[j % 3, 10 + j] = r
    return {"input_ids": ids, "labels": labels}


def test_fused_lora_matches_peft_in_float32_with_dropout(tiny_llama_dir, monkeypatch):
    from pipelines.training.fused_lora import fuse_lora, unfuse_lora
    from pipelines.training.loss import CausalLMLoss

    import torch

    from pipelines.training.fused_lora import dropout_keep

    # PEFT's dropout modules draw their masks as the fused function does, so that both paths drop the same inputs
    monkeypatch.setattr(torch.nn.Dropout, "forward",
                        lambda self, x: x * dropout_keep(x, self.p) / (1 - self.p) if self.training else x)
    model = _peft(tiny_llama_dir, lora_dropout=0.1)
    loss_mod = CausalLMLoss(model)
    batch = _batch(model.config.vocab_size)
    ref, ref_g = _loss_and_grads(loss_mod, batch)
    n = fuse_lora(model)
    assert n == 7 * model.config.num_hidden_layers and fuse_lora(model) == 0  # every projection, once
    calls = _count_fused(monkeypatch)
    got, g = _loss_and_grads(loss_mod, batch)
    assert len(calls) == n
    assert got == pytest.approx(ref, rel=1e-6)  # the same dropout masks: else the loss would move far more
    assert g.keys() == ref_g.keys() and any("lora_A" in k for k in g)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6)
    other, _ = _loss_and_grads(loss_mod, batch, seed=2)
    assert abs(other - ref) > 1e-4  # another seed: other masks, another loss (the test can tell masks apart)
    assert unfuse_lora(model) == n
    back, _ = _loss_and_grads(loss_mod, batch)
    assert back == ref


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_keep_drops_p_of_the_inputs(p):
    import torch

    from pipelines.training.fused_lora import dropout_keep

    x = torch.ones(1000, 333)  # not a multiple of 4 elements per row: the draws are cut to size
    torch.manual_seed(7)
    keep = dropout_keep(x, p)
    assert keep.shape == x.shape and keep.dtype == x.dtype
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    dropped = float((keep == 0).float().mean())
    assert dropped == pytest.approx(p, abs=0.005)  # 333,000 draws: the standard error is under 0.001
    rows = (keep == 0).float().mean(dim=1)  # no row or column pattern from the 16-bit slicing
    cols = (keep == 0).float().mean(dim=0)
    assert float(rows.std()) < 1.3 * (p * (1 - p) / 333) ** 0.5
    assert float(cols.std()) < 1.3 * (p * (1 - p) / 1000) ** 0.5
    torch.manual_seed(7)
    assert torch.equal(dropout_keep(x, p), keep)  # seeded: a resumed run draws the same masks
    assert not torch.equal(dropout_keep(x, p), keep)
    assert dropout_keep(x.bfloat16(), p).dtype == torch.bfloat16


def test_fused_lora_in_bf16_mixed_precision(tiny_llama_dir, monkeypatch):
    import torch

    from pipelines.training import precision
    from pipelines.training.fused_lora import fuse_lora, unfuse_lora
    from pipelines.training.loss import CausalLMLoss

    model = _peft(tiny_llama_dir, dtype=torch.bfloat16, lora_dropout=0.0)
    for n, p in model.named_parameters():  # the trainer's mixed precision: adapter float32, base bf16
        if p.requires_grad:
            p.data = p.data.float()
    assert precision.apply_mixed(model, "cpu", torch.bfloat16)
    loss_mod = CausalLMLoss(model)
    batch = _batch(model.config.vocab_size)
    ref, ref_g = _loss_and_grads(loss_mod, batch)
    n = fuse_lora(model)
    calls = _count_fused(monkeypatch)
    got, g = _loss_and_grads(loss_mod, batch)
    assert len(calls) == n  # autocast's bf16 is the base's: the fused path takes every layer
    assert got == pytest.approx(ref, rel=1e-2)  # bf16 activations: a few bf16 roundings apart
    for k in g:
        assert g[k].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g[k].flatten(), ref_g[k].flatten(), dim=0)
        assert cos > 0.99, k
    unfuse_lora(model)


def test_fused_lora_keeps_peft_where_it_must(tiny_llama_dir, monkeypatch):
    import torch

    from pipelines.training.fused_lora import fuse_lora

    model = _peft(tiny_llama_dir)
    x = torch.randint(3, model.config.vocab_size, (2, 9))
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=x).logits
    with torch.no_grad():
        tuned = model(input_ids=x).logits
    fuse_lora(model)
    calls = _count_fused(monkeypatch)
    with model.disable_adapter(), torch.no_grad():  # DPO's reference pass: the base model
        torch.testing.assert_close(model(input_ids=x).logits, base)
    assert not calls
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, tuned, rtol=1e-5, atol=1e-5)
    dora = _peft(tiny_llama_dir, use_dora=True)
    with torch.no_grad():
        before = dora(input_ids=x).logits
    fuse_lora(dora)  # DoRA's variant: PEFT's forward, the same output
    calls.clear()
    with torch.no_grad():
        assert torch.equal(dora(input_ids=x).logits, before)
    assert not calls


def test_chunked_loss_with_trained_rows_matches_the_head_module(tiny_llama_dir):
    import torch

    from pipelines.training.loss import CausalLMLoss, trained_rows
    from pipelines.training.tokens import fast_token_rows

    rows = [2, 5, 17]
    model = _peft(tiny_llama_dir, tied=True, rows=rows)
    fast_token_rows(model)
    loss_mod = CausalLMLoss(model, chunked_rows=False)
    assert trained_rows(loss_mod.parts()[1]) is not None
    batch = _batch(model.config.vocab_size, rows)
    ref, ref_g = _loss_and_grads(loss_mod, batch)
    loss_mod.chunked_rows = True
    got, g = _loss_and_grads(loss_mod, batch)
    assert got == pytest.approx(ref, rel=1e-6)
    assert g.keys() == ref_g.keys() and any("trainable_tokens_delta" in k for k in g)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6)
    with model.disable_adapter():
        assert trained_rows(loss_mod.parts()[1]) is None  # the base head as it is
