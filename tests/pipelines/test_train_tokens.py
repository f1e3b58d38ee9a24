"""pipelines/training/tokens.py: target tokens whose embedding the base never trained (Gemma 3 270M's <end_of_turn>
is a copy of its <unused…> rows) are found and trained as rows of their own; a model without such rows gets a plain
LoRA adapter. Tiny llama with rows made untrained on purpose."""

from __future__ import annotations

import shutil

import pytest
from test_train import tiny_cfg, write_dataset

from pipelines import training as train
from pipelines.training import IGNORE, run_training, validate
from pipelines.training.tokens import MIN_HITS, untrained_targets


def _untrained_copy(src, dst, ids):
    """`src` model saved to `dst` with the embedding rows `ids` (and 40 unused-like rows) one shared vector plus
    noise, the way an untrained row of a big vocabulary looks; returns the rows made alike."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    emb = model.get_input_embeddings().weight
    vocab = emb.shape[0]
    alike = sorted(set(ids) | set(range(vocab - 40, vocab)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        base = torch.randn(emb.shape[1], generator=g)
        for i in alike:
            emb[i] = base + 1e-3 * torch.randn(emb.shape[1], generator=g)
    model.save_pretrained(dst, safe_serialization=True)
    return alike


def _label_ids(cfg, ws):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    enc, _ = train.encode_dataset(cfg, ws, tok)
    return tok, {t for _ids, labels in enc.examples for t in labels if t != IGNORE}


@pytest.fixture
def ws(workspace):
    write_dataset(workspace)
    return workspace


def test_trained_vocabulary_has_no_untrained_targets(ws, tiny_llama_dir):
    import torch

    cfg = validate(tiny_cfg(tiny_llama_dir), ws)
    _tok, labels = _label_ids(cfg, ws)
    from pipelines.training.session import build_model

    model, rows = build_model(cfg, torch.float32, torch.device("cpu"), label_ids=labels)
    assert rows == []
    assert not any("trainable_tokens" in n for n, _ in model.named_parameters())


def test_untrained_end_token_is_found_and_trained(ws, tiny_llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg0 = validate(tiny_cfg(tiny_llama_dir, max_length=128), ws)
    tok, labels = _label_ids(cfg0, ws)
    eos = tok.eos_token_id
    assert eos in labels  # the turn's end is a target
    model_dir = tmp_path / "tiny-untrained"
    alike = _untrained_copy(tiny_llama_dir, model_dir, [eos])
    assert len(alike) - 1 >= MIN_HITS

    # Only targets are returned, and among them only the alike ones.
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    found = untrained_targets(base, labels, sample=base.get_input_embeddings().weight.shape[0])
    assert found == sorted(set(alike) & labels)
    assert eos in found
    assert untrained_targets(base, labels - set(alike)) == []

    cfg = validate(tiny_cfg(model_dir, max_steps=6, learning_rate=5e-2, max_length=128), ws)
    lines = []
    res = run_training(cfg, tmp_path / "run", None, ws=ws, log=lines.append)
    assert res.state == "finished"
    assert any("never learned" in line and tok.eos_token in line for line in lines), lines
    adapter = tmp_path / "run" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in saved), sorted(saved)[:10]

    # The end token's row moved away from the copy it started as; a row not trained stayed.
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload()
    before, after = base.get_input_embeddings().weight.detach(), tuned.get_input_embeddings().weight.detach()
    assert not torch.allclose(before[eos], after[eos], atol=1e-4)
    untouched = next(i for i in range(before.shape[0]) if i not in found)
    torch.testing.assert_close(before[untouched], after[untouched])

    # The chat attaches such an adapter (its token rows included) and answers with it, and without it.
    from pipelines import chat, models

    lm = models.load_hf(model_dir)
    info = chat.attach_adapter(lm, adapter, "tok")
    assert info.name == "tok"
    for name in ("tok", None):
        out = list(chat.stream_chat(lm, [{"role": "user", "content": "hi"}],
                                    chat.ChatParams(max_new_tokens=3, temperature=0.0, adapter=name)))
        assert out[-1].n_tokens >= 1


@pytest.mark.parametrize("tied", [False, True])
def test_fast_token_rows_match_peft(tiny_llama_dir, tmp_path, tied):
    """The rows-only forward gives PEFT's own outputs and gradients (embedding and tied output layer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from pipelines.training.tokens import fast_token_rows

    if tied:
        cfg = LlamaConfig.from_pretrained(tiny_llama_dir)
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    idx = [2, 5, 17]
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=idx))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    x = torch.tensor([[1, 2, 3, 5, 17, 17, 40]])

    def run():
        model.zero_grad()
        logits = model(input_ids=x).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    ref, ref_g = run()
    with model.disable_adapter(), torch.no_grad():
        ref_base = model(input_ids=x).logits
    assert fast_token_rows(model) == (2 if tied else 1)  # the embedding, and the output layer tied to it
    assert fast_token_rows(model) == 0  # once
    out, g = run()
    torch.testing.assert_close(out, ref)
    assert ref_g.keys() == g.keys() and any("trainable_tokens_delta" in k for k in g)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6)
    with model.disable_adapter(), torch.no_grad():  # the base model: the rows as they were
        torch.testing.assert_close(model(input_ids=x).logits, ref_base)
    assert not torch.allclose(ref_base, ref)
