"""pipelines/training/verdict.py with the tiny llama: a run that learns repetitive data says "better" and writes
verdict.json; an untrained adapter (LoRA B = 0) says "no better"; an error in the verdict does not fail the run;
no validation split, no verdict."""

from __future__ import annotations

import json

import pytest
from test_train import tiny_cfg, write_dataset

from pipelines.runs import RunStatus
from pipelines.training import run_training, verdict


def repetitive(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say the line, please ({i % 2})."},
                          {"role": "assistant", "content": "The cat sat on the mat."}]} for i in range(n)]


@pytest.fixture
def ws(workspace):
    write_dataset(workspace, train_rows=repetitive(16), val_rows=repetitive(6))
    return workspace


def test_trained_run_is_better_and_written(ws, tiny_llama_dir):
    logs: list[str] = []
    cfg = tiny_cfg(tiny_llama_dir, max_steps=30, learning_rate=1e-2, rank=8)
    res = run_training(cfg, ws.runs / "t", None, ws=ws, log=logs.append)
    assert res.state == "finished"
    v = json.loads((ws.runs / "t" / "verdict.json").read_text())
    assert v["better"] is True and v["verdict"].startswith("the tuned model is better than the base: validation loss")
    assert v["tuned"]["loss"] < v["base"]["loss"] and "perplexity" in v["verdict"] and "→" in v["verdict"]
    assert v["examples"] == 6 and len(v["prompts"]) == verdict.N_PROMPTS
    p = v["prompts"][0]
    assert p["reference"] == "The cat sat on the mat." and p["prompt"].startswith("Say the line")
    assert 0 <= p["base_similarity"] <= 1 and 0 <= p["tuned_similarity"] <= 1
    assert v["tuned"]["similarity"] > v["base"]["similarity"]
    assert any(line.startswith("Verdict: the tuned model is better") for line in logs)
    md = verdict.verdict_markdown(verdict.read_verdict(ws.runs / "t"))
    assert "| validation loss |" in md and "The cat sat on the mat." in md
    from types import SimpleNamespace

    from studio.handlers import train_monitor as monitor

    run = SimpleNamespace(path=ws.runs / "t")
    shown, chart = monitor.verdict_view(run, RunStatus(state="finished"))
    assert shown == md and chart["visible"] is True
    fig = chart["value"]  # base vs tuned bars: the validation loss, and each held-out prompt's similarity
    bars = {(tr.name, tr.xaxis): list(tr.y) for tr in fig.data}
    assert bars[("base", "x")] == [v["base"]["loss"]] and bars[("tuned", "x")] == [v["tuned"]["loss"]]
    assert bars[("tuned", "x2")] == [p["tuned_similarity"] for p in v["prompts"]]
    assert monitor.verdict_view(run, RunStatus(state="running")) == ("", {"__type__": "update", "visible": False})
    assert monitor.verdict_figure({"error": "boom", "verdict": "failed"})["visible"] is False
    from pipelines.export.merge import _model_card

    card = _model_card(tiny_llama_dir, ws.runs / "t" / "adapter", ws.runs / "t", "float32")
    assert f"- Did the fine-tune help? {v['verdict']}" in card
    print(v["verdict"], v["prompts"][0]["tuned"], v["seconds"])


def test_untrained_adapter_is_no_better(ws, tiny_llama_dir):
    import torch
    from transformers import AutoTokenizer

    from pipelines.training.config import validate
    from pipelines.training.encode import collate, encode_dataset
    from pipelines.training.loss import CausalLMLoss
    from pipelines.training.session import build_model

    cfg = validate(tiny_cfg(tiny_llama_dir), ws)
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    _train, val = encode_dataset(cfg, ws, tok)
    model, _rows = build_model(cfg, torch.float32, torch.device("cpu"))  # a fresh LoRA: B = 0, the base's outputs
    model.generation_config.eos_token_id = [tok.eos_token_id, 5]  # a list, as Gemma's (its turn end too)
    out = verdict.after_training(ws.runs / "u", lambda _m: None, cfg=cfg, ws=ws, model=model,
                                 loss_mod=CausalLMLoss(model), tok=tok, val_items=val.examples,
                                 collate=lambda its: collate(its, tok.pad_token_id, False),
                                 pad_id=tok.pad_token_id, device=torch.device("cpu"))
    assert "error" not in out, out
    assert out["better"] is False and out["verdict"].startswith("the tuned model is no better than the base")
    assert out["base"]["loss"] == pytest.approx(out["tuned"]["loss"])
    assert [p["base"] for p in out["prompts"]] == [p["tuned"] for p in out["prompts"]]
    assert json.loads((ws.runs / "u" / "verdict.json").read_text())["verdict"] == out["verdict"]


def test_verdict_error_does_not_fail_the_run(ws, tiny_llama_dir, monkeypatch):
    def boom(**_kw):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(verdict, "compare", boom)
    logs: list[str] = []
    res = run_training(tiny_cfg(tiny_llama_dir, max_steps=1), ws.runs / "e", None, ws=ws, log=logs.append)
    assert res.state == "finished" and res.adapter
    v = json.loads((ws.runs / "e" / "verdict.json").read_text())
    assert v["error"] == "RuntimeError: simulated failure" and "no verdict" in v["verdict"]
    assert any("comparison failed" in line and "still finished" in line for line in logs)
    assert "comparison failed" in verdict.verdict_markdown(v)


def test_no_validation_split_no_verdict(workspace, tiny_llama_dir):
    write_dataset(workspace, train_rows=repetitive(4), val_rows=[])
    res = run_training(tiny_cfg(tiny_llama_dir, max_steps=1), workspace.runs / "n", None, ws=workspace)
    assert res.state == "finished" and not (workspace.runs / "n" / "verdict.json").exists()


def test_verdict_line_and_prompts():
    assert verdict.verdict_line(2.31, 1.12) == (
        True, "the tuned model is better than the base: validation loss 2.31 → 1.12 (perplexity 10.1 → 3.1)")
    assert verdict.verdict_line(2.31, 2.30)[0] is False
    rows = [{"text": "plain"}, {"messages": [{"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "a2"}]}]
    (msgs, ref), = verdict.held_out_prompts(rows)
    assert ref == "a2" and [m["content"] for m in msgs] == ["s", "q", "a", "q2"]
    assert verdict.similarity("abc", "abc") == 1.0 and verdict.similarity("", "abc") == 0.0
