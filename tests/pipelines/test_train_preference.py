"""pipelines/training/preference.py with the tiny llama: DPO and ORPO runs end to end (metrics rows with reward margin
and preference accuracy, eval on the validation pairs, stop + resume equal to an uninterrupted run, the verdict),
the reference being the adapter switched off (step-1 DPO loss exactly log 2, one model loaded, the reference
log-probs equal to a separately loaded base), per-sequence log-probs and gradients equal to full logits, loss parity
with TRL's DPOTrainer and ORPOTrainer formulas on identical log-probs, and the errors a user gets before training."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
from test_train import adapter_tensors, assert_bad_input, tiny_cfg, write_dataset

from pipelines import jobs, runs
from pipelines.errors import BadInput
from pipelines.training import TrainConfig, check_data, list_checkpoints, plan_training, run_training, validate
from pipelines.training import preference as pref
from pipelines.training import verdict as tverdict
from pipelines.training.encode import collate_pairs, encode_pairs


def pairs(n: int) -> list[dict]:
    """Preference rows as the Data tab saves them: one shared prompt, a chosen and a rejected answer."""
    return [{"prompt": [{"role": "system", "content": "You are a tiny model."},
                        {"role": "user", "content": f"Say the line, please ({i % 3})."}],
             "chosen": [{"role": "assistant", "content": "The cat sat on the mat."}],
             "rejected": [{"role": "assistant", "content": "Hello, how are you today?" + " Hello." * (i % 2)}]}
            for i in range(n)]


@pytest.fixture
def ws(workspace):
    write_dataset(workspace, name="prefs", train_rows=pairs(12), val_rows=pairs(4))
    write_dataset(workspace, name="chat")  # conversations, no rejected answers
    return workspace


def pcfg(model_dir, objective="dpo", **kw) -> TrainConfig:
    kw.setdefault("max_length", 128)
    return tiny_cfg(model_dir, dataset="prefs", objective=objective, **kw)


# ---------------------------------------------------------------------------------------------- config, errors


def test_yaml_and_form_fields(tmp_path):
    cfg = TrainConfig.from_yaml("dataset: prefs\nobjective: orpo\norpo_lambda: 0.2\nbeta: '0.3'\n")
    assert (cfg.objective, cfg.orpo_lambda, cfg.beta) == ("orpo", 0.2, 0.3)
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    helps = TrainConfig.help()
    assert "dpo" in helps["objective"] and "beta" in helps["beta"].lower() and "lambda" in helps["orpo_lambda"].lower()


def test_dpo_on_a_dataset_without_rejected_answers(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, dataset="chat", objective="dpo"), ws)
    assert_bad_input(e, "DPO", "preference pairs", "'chat'", "rejected", "objective 'sft'")
    with pytest.raises(BadInput) as e:
        check_data(tiny_cfg(tiny_llama_dir, dataset="chat", objective="orpo"), ws)
    assert_bad_input(e, "ORPO", "rejected")


def test_sft_on_preference_data_names_dpo(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        check_data(pcfg(tiny_llama_dir, objective="sft"), ws)
    assert_bad_input(e, "preference pairs", "dpo", "orpo")


def test_bad_preference_settings(ws, tiny_llama_dir):
    for kw, needles in [({"objective": "ppo"}, ("objective must be one of", "sft, dpo, orpo")),
                        ({"beta": 0.0}, ("beta", "positive")),
                        ({"objective": "orpo", "orpo_lambda": -1.0}, ("orpo_lambda", "positive")),
                        ({"packing": True}, ("packing", "untick"))]:
        with pytest.raises(BadInput) as e:
            validate(pcfg(tiny_llama_dir, **kw), ws)
        assert_bad_input(e, *needles)
    write_dataset(ws, name="mixed", train_rows=pairs(2) + [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(BadInput) as e:
        check_data(tiny_cfg(tiny_llama_dir, dataset="mixed", objective="dpo"), ws)
    assert_bad_input(e, "train.jsonl line 3", "not a preference pair")


def test_check_data_and_plan_count_pairs(ws, tiny_llama_dir):
    info = check_data(pcfg(tiny_llama_dir), ws)
    assert info["usable"] == 12 and info["validation_rows"] == 4 and "12 of 12 preference pairs" in info["note"]
    plan = plan_training(pcfg(tiny_llama_dir, max_steps=0, epochs=1.0, batch_size=4), ws)
    assert plan.items == 12 and plan.steps_per_epoch == 3 and plan.total_steps == 3
    sft = plan_training(tiny_cfg(tiny_llama_dir, max_steps=0, batch_size=4), ws)
    assert plan.memory.estimate.total > sft.memory.estimate.total  # twice the sequences per batch


def test_encode_pair_labels_only_the_answers(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier reply"},
                      {"role": "user", "content": "and now?"}],
           "chosen": [{"role": "assistant", "content": "good answer"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    split = encode_pairs(tok, [row], 128)
    (c_ids, c_lab), (r_ids, r_lab) = split.pairs[0]
    for ids, lab, text in ((c_ids, c_lab, "good answer"), (r_ids, r_lab, "bad")):
        trained = tok.decode([t for t in lab if t != -100])
        assert text in trained and "earlier reply" not in trained and "and now" not in trained
    k = min(next(j for j, x in enumerate(lab) if x != -100) for lab in (c_lab, r_lab))
    assert k > 10 and c_ids[:k] == r_ids[:k]  # the shared prompt, never a label
    assert len(split.examples) == 2 and split.items is split.pairs


# ------------------------------------------------------------------------------------------------- the math


def _peft(tiny_llama_dir, seed=0, b_scale=0.5):
    """The tiny llama with a LoRA adapter whose B is random (so the policy differs from the base)."""
    import torch

    from pipelines.training.loss import CausalLMLoss
    from pipelines.training.session import build_model

    cfg = validate_free(tiny_llama_dir)
    model, _rows = build_model(cfg, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    return model, CausalLMLoss(model)


def validate_free(model_dir) -> TrainConfig:
    return TrainConfig(base_model=str(model_dir), dataset="prefs", rank=4, alpha=8, dropout=0.0)


def _batch(tiny_llama_dir, n=3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    split = encode_pairs(tok, pairs(n), 64)
    return split, collate_pairs(split.pairs, tok.pad_token_id)


def test_sequence_logps_and_gradients_match_full_logits(tiny_llama_dir):
    import torch

    model, loss_mod = _peft(tiny_llama_dir)
    _split, b = _batch(tiny_llama_dir)
    ours, counts = pref.sequence_logps(loss_mod, b["input_ids"], b["labels"])
    ours.square().sum().backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=b["input_ids"]).logits[:, :-1].float()
    tgt = b["labels"][:, 1:]
    mask = tgt != -100
    tok_logp = logits.log_softmax(-1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(2) * mask
    ref = tok_logp.sum(1)
    ref.square().sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == mask.sum(1).tolist()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-3, atol=1e-5)


def test_reference_is_the_base_with_the_adapter_off(tiny_llama_dir):
    """With a trained (random) adapter, the reference log-probs inside the DPO module are the base model's own,
    computed from the same weights (a separately loaded base agrees), and the policy's differ."""
    import torch
    from transformers import AutoModelForCausalLM

    model, loss_mod = _peft(tiny_llama_dir)
    _split, b = _batch(tiny_llama_dir)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = pref.sequence_logps(loss_mod, b["input_ids"], b["labels"])
    with torch.no_grad():
        policy, _ = pref.sequence_logps(loss_mod, b["input_ids"], b["labels"])
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        logits = base(input_ids=b["input_ids"]).logits[:, :-1].float()
    tgt = b["labels"][:, 1:]
    base_lp = (logits.log_softmax(-1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(2) * (tgt != -100)).sum(1)
    torch.testing.assert_close(ref, base_lp, rtol=1e-5, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-2


class _Acc:
    device = "cpu"

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def test_dpo_loss_matches_trl_dpotrainer_on_the_same_logps():
    """TRL's DPOTrainer._compute_loss (sigmoid loss, precomputed reference log-probs) on per-token log-probs we
    hand it, against ours on the same numbers: loss, margins and accuracies within 1e-5."""
    import torch
    from trl import DPOTrainer

    torch.manual_seed(0)
    n, t, beta = 4, 12, 0.1
    mask = torch.zeros(2 * n, t, dtype=torch.long)
    for i in range(2 * n):
        mask[i, 3 + i % 3: t - i % 4] = 1
    per_token = -torch.rand(2 * n, t - 1) * 3 * mask[:, 1:]
    ref_sums = -torch.rand(2 * n) * 20
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, t - 1),
                          mean_logits=torch.zeros(2 * n, t - 1), is_top1=torch.zeros(2 * n, t - 1, dtype=torch.bool))
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * n, t, dtype=torch.long), "attention_mask": torch.ones(2 * n, t),
              "completion_mask": mask, "ref_chosen_logps": ref_sums[:n], "ref_rejected_logps": ref_sums[n:]}
    trl_loss = DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, False)
    sums = per_token.sum(1)
    losses, cr, rr = pref.dpo_terms(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], beta)
    assert abs(float(losses.mean()) - float(trl_loss)) < 1e-5
    m = stub._metrics["train"]
    assert abs(float((cr - rr).mean()) - m["rewards/margins"][0]) < 1e-5
    assert abs(float((cr > rr).float().mean()) - m["rewards/accuracies"][0]) < 1e-6
    assert abs(float(cr.mean()) - m["rewards/chosen"][0]) < 1e-5


def test_orpo_terms_match_trl_orpotrainer():
    import torch
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(1)
    c, r = -torch.rand(6) * 4 - 1e-3, -torch.rand(6) * 4 - 1e-3
    c[0], r[0] = -0.2, -0.9  # both branches of log1mexp
    lam = 0.25
    stub = SimpleNamespace(beta=lam, accelerator=_Acc())
    t_losses, t_cr, t_rr, t_ratio, t_odds = ORPOTrainer.odds_ratio_loss(stub, c, r)
    losses, cr, rr, odds = pref.orpo_terms(c, r, lam)
    torch.testing.assert_close(losses, -t_losses, rtol=0, atol=1e-6)  # TRL returns λ·log σ and subtracts its mean
    torch.testing.assert_close(cr, t_cr)
    torch.testing.assert_close(rr, t_rr)
    assert abs(float(odds.mean()) - float(t_odds)) < 1e-5


# ----------------------------------------------------------------------------------------------- runs


def test_dpo_run_first_step_is_log2_with_one_model(ws, tiny_llama_dir, monkeypatch):
    """A fresh adapter (LoRA B = 0) is the base: policy = reference, the first loss is exactly log 2, the margin 0.
    One model is loaded for the whole run (the verdict included): the reference is no second copy."""
    from transformers import AutoModelForCausalLM

    loads = []
    orig = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):
        loads.append(a[0] if a else kw.get("pretrained_model_name_or_path"))
        return orig(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    rows, logs = [], []
    res = run_training(pcfg(tiny_llama_dir, max_steps=2, eval_every=1), ws.runs / "d", rows.append, ws=ws,
                       log=logs.append)
    assert res.state == "finished" and len(loads) == 1
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and rows[0]["rewards/accuracies"] == 0.0
    assert rows[1]["rewards/margins"] > 0  # one step of DPO separates chosen from rejected
    assert any("adapter switched off" in m for m in logs)
    for r in rows:
        assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"} <= set(r)


def test_dpo_stop_resume_equals_uninterrupted(ws, tiny_llama_dir):
    cfg = pcfg(tiny_llama_dir, max_steps=4, eval_every=2, learning_rate=5e-3)
    full = []
    run_training(cfg, ws.runs / "a", full.append, ws=ws)
    part = []
    res = run_training(cfg, ws.runs / "b", part.append, ws=ws, should_stop=lambda: len(part) >= 2)
    assert res.state == "stopped" and list_checkpoints(ws.runs / "b")[-1].name == "step-2"
    res = run_training(cfg, ws.runs / "b", part.append, ws=ws, resume=list_checkpoints(ws.runs / "b")[-1])
    assert res.state == "finished" and [r["step"] for r in part] == [1, 2, 3, 4]
    for a, b in zip(full, part):
        for k in ("loss", "rewards/margins", "rewards/accuracies"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert full[-1]["eval_rewards/margins"] == pytest.approx(part[-1]["eval_rewards/margins"], rel=1e-5, abs=1e-6)
    assert full[-1]["rewards/accuracies"] == 1.0 and full[-1]["eval_rewards/accuracies"] == 1.0
    ta, tb = adapter_tensors(ws.runs / "a" / "adapter"), adapter_tensors(ws.runs / "b" / "adapter")
    import torch

    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    v = tverdict.read_verdict(ws.runs / "b")
    assert v["kind"] == "preference" and v["better"], v
    assert v["tuned"]["margin"] > v["base"]["margin"] and v["examples"] == 4
    md = tverdict.verdict_markdown(v)
    assert "preference accuracy" in md and "validation pairs" in md
    meta = json.loads((ws.runs / "b" / "adapter" / "mactuner.json").read_text())
    assert meta["config"]["objective"] == "dpo"


def test_orpo_run_through_the_run_folder(ws, tiny_llama_dir):
    """An ORPO run launched like the studio launches one (a job process writing the run folder)."""
    run = runs.launch(ws, pcfg(tiny_llama_dir, objective="orpo", max_steps=3, eval_every=3, save_every=2,
                               learning_rate=5e-3), name="orpo-1")
    st = jobs.wait(run, timeout=300)
    assert st.state == "finished", (st, run.log_tail(30))
    rows, _ = runs.read_metrics(run, 0)
    rows = [r for r in rows if "step" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"rewards/margins", "rewards/accuracies", "nll_loss", "log_odds_chosen"} <= set(r)
        # ORPO's loss: the NLL of the chosen answers plus λ·(−log σ(log odds)), as logged
        assert r["loss"] > r["nll_loss"] > 0
    assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_nll_loss"} <= set(rows[-1])
    assert [p.name for p in run.checkpoints()] == ["step-2"]
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    assert tverdict.read_verdict(run.path)["objective"] == "orpo"
    assert "ORPO (lambda 0.1)" in run.log_tail(200)
