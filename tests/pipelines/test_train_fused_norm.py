"""fused_norm.py against the models' own RMSNorm: a tiny Llama ("plain": w * x_hat) and a tiny Gemma 3 ("offset":
x_hat * (1 + w), q/k norms over 4-D heads) give the same logits and input gradients, in float32 and in bf16 within
its rounding; a norm class computing something else, or a trained weight, keeps the model's own forward."""

from __future__ import annotations

import pytest


def _tiny_gemma3():
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # Gemma's norm weights start at zero: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def _tiny_llama(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.5)
    return model


def _logits_and_input_grad(model, ids):
    import torch

    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach().float(), emb.grad.float()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_norms_match_the_models_own(family, dtype, tiny_llama_dir, monkeypatch):
    import copy

    import torch

    from pipelines.training import fused_norm

    model = _tiny_llama(tiny_llama_dir) if family == "llama" else _tiny_gemma3()
    model = model.to(getattr(torch, dtype))
    model.requires_grad_(False)
    exact = copy.deepcopy(model).double()  # the same (rounded) weights, computed in float64
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grad = _logits_and_input_grad(model, ids)
    n_norms = sum("RMSNorm" in type(m).__name__ for m in model.modules())
    assert fused_norm.fuse_rms_norms(model) == n_norms > 0
    assert fused_norm.fuse_rms_norms(model) == 0  # once
    calls = []
    real = fused_norm.RMSNormFunction.apply
    monkeypatch.setattr(fused_norm.RMSNormFunction, "apply", lambda *a: calls.append(1) or real(*a))
    logits, grad = _logits_and_input_grad(model, ids)
    assert len(calls) == n_norms
    if dtype == "float32":
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    else:  # bf16 rounds differently in each: ours is no farther from float64 than the model's own
        emb = exact.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = exact(inputs_embeds=emb).logits
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
        for mine, own, truth in ((logits, ref_logits, out.detach()), (grad, ref_grad, emb.grad)):
            err_mine, err_own = (float((x.double() - truth).norm() / truth.norm()) for x in (mine, own))
            assert err_mine <= 1.1 * err_own, (err_mine, err_own)
    assert fused_norm.unfuse_rms_norms(model) == n_norms
    assert torch.equal(_logits_and_input_grad(model, ids)[0], ref_logits)


def test_other_norms_and_trained_weights_keep_their_own_forward(tiny_llama_dir):
    import torch

    from pipelines.training import fused_norm

    class OddRMSNorm(torch.nn.Module):  # named like one, computes something else (mean-centred)
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    odd = torch.nn.Sequential(OddRMSNorm())
    assert fused_norm.fuse_rms_norms(odd) == 0 and "forward" not in odd[0].__dict__

    model = _tiny_llama(tiny_llama_dir)
    model.requires_grad_(False)
    norm = model.model.norm
    assert fused_norm.fuse_rms_norms(model) > 0
    norm.weight.requires_grad_(True)  # trained (e.g. modules_to_save): the model's own forward, with its gradient
    x = torch.randn(2, 3, norm.weight.shape[0])
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
