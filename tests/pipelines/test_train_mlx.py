"""The MLX trainer (pipelines/training/mlx/) on this CPU with the tiny llama: per-step parity with the torch trainer
(SFT and DPO / ORPO, float32, same initial adapter, same batches), the adapter read by PEFT with the same logits
(LoRA, DoRA, trained embedding rows on a tied head), the run folder as the torch backend writes it (metrics rows,
checkpoints with the optimizer state, resume == uninterrupted, stop, kill -9 then resume, verdict), a 4-bit base,
and the embedded Gemma 3 270M (slow)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from test_train import METRIC_KEYS, _wait_for, assert_bad_input, conversations, tiny_cfg, write_dataset
from test_train_preference import pairs

from pipelines import jobs, runs
from pipelines.errors import BadInput
from pipelines.training import COMPLETE_MARKER, list_checkpoints, run_training, validate

pytest.importorskip("mlx_lm")

# Parity tolerance, relative, per step. Both sides compute in float32 and sum in different orders (BLAS blocking,
# logsumexp, the gradient accumulation), which moves a loss by ~1e-7 relative at step 1 (float32's unit roundoff is
# 6e-8); Adam normalises each update by the gradient's own scale, so the parameters drift apart no faster than that,
# and five steps here ended within 2e-7 (SFT) and 7e-7 (DPO) of each other. 1e-5 leaves 15x for other CPUs' kernels
# while each step moves the loss by 1e-2 or more (asserted), so any real difference - a missing bias correction, another
# LoRA scale, one label token more or less - fails it.
PARITY_RTOL = 1e-5


@pytest.fixture
def ws(workspace):
    write_dataset(workspace, train_rows=conversations(8), val_rows=conversations(4))
    write_dataset(workspace, name="prefs", train_rows=pairs(8), val_rows=pairs(4))
    return workspace


def mcfg(model_dir, **kw):
    return tiny_cfg(model_dir, backend="mlx", **kw)


def torch_initial_adapter(cfg, out):
    """The adapter the torch trainer starts from for `cfg` (it seeds torch with cfg.seed, then builds the model)."""
    import torch

    from pipelines.training.session import build_model

    torch.manual_seed(cfg.seed)
    model, _rows = build_model(cfg, torch.float32, torch.device("cpu"))
    model.save_pretrained(out)
    return out


def parity_runs(ws, cfg, tmp_path):
    """(torch rows, MLX rows) of the same config: every step takes all 8 rows (batch 4 x 2 accumulated), so the
    batches are the same whatever each trainer's data order."""
    from pipelines.training.mlx import loop as mloop
    from pipelines.training.mlx import peft_io

    t_cfg = validate(replace(cfg, backend="torch"), ws)
    torch_rows, mlx_rows = [], []
    run_training(t_cfg, ws.runs / "torch", torch_rows.append, ws=ws, validated=True, log=lambda m: None)
    session = mloop.setup(validate(cfg, ws), ws.runs / "mlx", ws, log=lambda m: None)
    peft_io.load_adapter(torch_initial_adapter(t_cfg, tmp_path / "init"), session.model)
    mloop.train(session, mlx_rows.append, lambda: False)
    return torch_rows, mlx_rows


def assert_parity(torch_rows, mlx_rows, keys=("loss",)):
    assert [r["step"] for r in mlx_rows] == [r["step"] for r in torch_rows] == [1, 2, 3, 4, 5]
    for key in keys:
        for a, b in zip(torch_rows, mlx_rows):
            assert b[key] == pytest.approx(a[key], rel=PARITY_RTOL, abs=1e-6), (key, a["step"], a[key], b[key])
    moves = [abs(a["loss"] - b["loss"]) for a, b in zip(torch_rows, torch_rows[1:])]
    assert min(moves) > 1000 * PARITY_RTOL * torch_rows[0]["loss"] or min(moves) > 5e-3, moves


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_sft_steps_match_the_torch_trainer(ws, tiny_llama_dir, tmp_path, method):
    cfg = mcfg(tiny_llama_dir, method=method, max_steps=5, batch_size=4, grad_accum=2, learning_rate=5e-3,
               weight_decay=0.01, eval_every=5)
    torch_rows, mlx_rows = parity_runs(ws, cfg, tmp_path)
    assert_parity(torch_rows, mlx_rows, ("loss", "grad_norm", "learning_rate"))
    assert mlx_rows[-1]["eval_loss"] == pytest.approx(torch_rows[-1]["eval_loss"], rel=PARITY_RTOL)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_steps_match_the_torch_trainer(ws, tiny_llama_dir, tmp_path, objective):
    cfg = mcfg(tiny_llama_dir, dataset="prefs", objective=objective, max_steps=5, batch_size=4, grad_accum=2,
               max_length=128, learning_rate=5e-3, eval_every=5)
    torch_rows, mlx_rows = parity_runs(ws, cfg, tmp_path)
    if objective == "dpo":
        assert mlx_rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 1
    assert_parity(torch_rows, mlx_rows, ("loss", "rewards/margins", "rewards/chosen"))
    assert set(torch_rows[-1]) <= set(mlx_rows[-1])  # the same metrics (MLX adds its allocator's peak)
    tv, mv = (json.loads((ws.runs / k / "verdict.json").read_text()) for k in ("torch", "mlx"))
    assert mv["kind"] == "preference" and mv["better"] == tv["better"]
    assert mv["tuned"]["margin"] == pytest.approx(tv["tuned"]["margin"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- PEFT format


@pytest.fixture(scope="module")
def tied_untrained_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny llama shape with a tied output layer (Gemma's) whose </s> row is a copy of 40 'unused' rows."""
    import torch
    from test_train_tokens import _untrained_copy
    from tiny_models import TINY_LLAMA
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tied = tmp_path_factory.mktemp("tied") / "tied"
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **TINY_LLAMA)
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(tied)
    tok.save_pretrained(tied)
    out = tied.parent / "tied-untrained"
    _untrained_copy(tied, out, [tok.eos_token_id])
    return out


@pytest.mark.parametrize("case", ["lora", "dora", "rows"])
def test_adapter_loads_in_peft_with_the_same_logits(ws, tiny_llama_dir, tied_untrained_dir, tmp_path, case):
    import mlx.core as mx
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.training.mlx import loop as mloop
    from pipelines.training.mlx import peft_io

    base = tied_untrained_dir if case == "rows" else tiny_llama_dir
    cfg = validate(mcfg(base, method="dora" if case == "dora" else "rslora", max_steps=1), ws)
    s = mloop.setup(cfg, ws.runs / "p", ws, log=lambda m: None)
    assert bool(s.info.token_rows) == (case == "rows")
    rng = np.random.default_rng(0)  # a trained-looking adapter: B, the magnitudes and the rows all moved
    s.model.update(_perturbed(s.model.trainable_parameters(), rng))
    peft_io.save_adapter(tmp_path, s.model, cfg, s.info)
    ids = [[1, 5, 9, 33, 70, 120, 2, 250, 3, 44, 90, 17, 2, 61]]
    s.model.eval()
    mine = np.array(s.model(mx.array(ids)))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path)
    with torch.no_grad():
        theirs = peft(torch.tensor(ids)).logits.numpy()
        with peft.disable_adapter():
            plain = peft(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=2e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] == (case == "dora") and config["trainable_token_indices"] == (s.info.token_rows or None)
    assert np.abs(plain - theirs).max() > 1e-2  # the adapter changes the logits: not two base models compared
    peft_io.load_adapter(tmp_path, s.model)  # and back: the same values
    np.testing.assert_allclose(np.array(s.model(mx.array(ids))), mine, rtol=1e-6, atol=1e-6)


def _perturbed(params, rng):
    import mlx.core as mx
    from mlx.utils import tree_map

    return tree_map(lambda p: p + mx.array(rng.normal(0, 0.05, p.shape).astype("float32")), params)


# ---------------------------------------------------------------------------------------------- the run folder


def test_run_writes_what_the_torch_backend_writes(ws, tiny_llama_dir):
    rows = []
    run_dir = ws.runs / "m"
    res = run_training(mcfg(tiny_llama_dir, max_steps=4, eval_every=2, save_every=2, keep_last=1), run_dir,
                       rows.append, ws=ws)
    assert res.state == "finished" and res.step == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert METRIC_KEYS <= set(r) and r["loss"] > 0 and r["tokens_per_s"] > 0 and r["device_peak_memory"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert rows[0]["learning_rate"] < rows[1]["learning_rate"]
    json.dumps(rows)
    ad = run_dir / "adapter"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (ad / f).exists(), f
    info = json.loads((ad / "mactuner.json").read_text())
    assert info["backend"] == "mlx" and info["config"]["backend"] == "mlx" and info["steps"] == 4
    [ckpt] = list_checkpoints(run_dir)
    assert ckpt.name == "step-2"
    for f in ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json",
              COMPLETE_MARKER):
        assert (ckpt / f).exists(), f
    assert json.loads((ckpt / "trainer_state.json").read_text())["config"]["backend"] == "mlx"
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["tuned"]["loss"] < verdict["base"]["loss"] and verdict["prompts"]


def test_resume_continues_the_loss_curve(ws, tiny_llama_dir):
    """Stopped at step 3 and resumed: the same losses and adapter as uninterrupted (dropout on: it is reseeded per
    step), because the checkpoint holds the optimizer's moments and step."""
    import numpy as np
    from safetensors.numpy import load_file

    cfg = mcfg(tiny_llama_dir, max_steps=6, dropout=0.1, scheduler="cosine")
    full, part = [], []
    run_training(cfg, ws.runs / "a", full.append, ws=ws)
    res = run_training(cfg, ws.runs / "b", part.append, ws=ws, should_stop=lambda: len(part) >= 3)
    assert res.state == "stopped" and res.step == 3 and "resumable from step-3" in res.reason
    assert not (ws.runs / "b" / "adapter").exists()
    ckpt = list_checkpoints(ws.runs / "b")[-1]
    res = run_training(cfg, ws.runs / "b", part.append, ws=ws, resume=ckpt)
    assert res.state == "finished" and [r["step"] for r in part] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, part):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"])
    a, b = (load_file(str(ws.runs / k / "adapter" / "adapter_model.safetensors")) for k in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    fresh = []  # without the optimizer state the curve would restart: the resumed step 4 is not a first step
    run_training(replace(cfg, max_steps=3), ws.runs / "c", fresh.append, ws=ws)
    assert part[3]["loss"] != pytest.approx(fresh[0]["loss"], rel=1e-3)


def test_gradient_checkpointing_gives_the_same_steps(ws, tiny_llama_dir):
    cfg = mcfg(tiny_llama_dir, max_steps=3, method="rslora", eval_every=0)
    plain, ckpt = [], []
    run_training(cfg, ws.runs / "g0", plain.append, ws=ws)
    run_training(replace(cfg, gradient_checkpointing=True), ws.runs / "g1", ckpt.append, ws=ws)
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert [r["grad_norm"] for r in ckpt] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-5)
    from pipelines.training.mlx import loop as mloop

    session = mloop.setup(validate(replace(cfg, gradient_checkpointing=True), ws), ws.runs / "g2", ws, log=print)
    assert {type(layer).__name__ for layer in session.model.layers} == {"CheckpointedTransformerBlock"}
    assert type(mloop.setup(validate(cfg, ws), ws.runs / "g3", ws, log=print).model.layers[0]).__name__ == \
        "TransformerBlock"  # only that model's layers


def test_torch_checkpoint_is_not_resumed_by_mlx(ws, tiny_llama_dir):
    run_training(tiny_cfg(tiny_llama_dir, max_steps=3), ws.runs / "t", None, ws=ws, should_stop=lambda: True)
    ckpt = list_checkpoints(ws.runs / "t")[-1]
    with pytest.raises(BadInput) as e:
        run_training(mcfg(tiny_llama_dir, max_steps=3), ws.runs / "t", None, ws=ws, resume=ckpt)
    assert_bad_input(e, "cannot resume", "backend")


def test_targets_mlx_cannot_adapt_are_refused_before_anything_runs(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(mcfg(tiny_llama_dir, target_modules=["q_proj", "input_layernorm"]), ws)
    assert_bad_input(e, "input_layernorm", "not a linear layer", "backend torch")
    with pytest.raises(BadInput) as e:
        validate(mcfg(tiny_llama_dir, target_modules=["q_proj", "c_attn"]), ws)
    assert_bad_input(e, "no layer named c_attn", "q_proj")


def test_kill_9_then_resume(ws, tiny_llama_dir):
    cfg = mcfg(tiny_llama_dir, max_steps=400, save_every=1, keep_last=2, eval_every=0)
    run = runs.launch(ws, cfg, name="killed")
    assert _wait_for(lambda: len(run.checkpoints()) >= 2, 120), run.log_tail()
    os.kill(run.status().pid, signal.SIGKILL)
    assert _wait_for(lambda: run.status().state == "failed", 30)
    assert "ended unexpectedly" in run.status().reason
    last = run.checkpoints()[-1]
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    assert (last / "optimizer.safetensors").exists() and step < 400
    # finish three steps after the checkpoint (max_steps is no resume key): 400 steps only kept it running till the kill
    run.config_path.write_text(replace(validate(cfg, ws), max_steps=step + 3).to_yaml())
    runs.resume(ws, run, last.name)
    st = jobs.wait(run, timeout=180)
    assert st.state == "finished", (st, run.log_tail())
    rows, _ = runs.read_metrics(run, 0)
    marker = [r for r in rows if r.get("event") == "resume"]
    after = rows[rows.index(marker[-1]) + 1:]
    assert marker[-1]["step"] == step and [r["step"] for r in after] == [step + 1, step + 2, step + 3]
    assert (run.adapter_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_trains(ws, tiny_llama_dir, bits):
    from pipelines.training.mlx import loop as mloop

    rows = []
    cfg = validate(mcfg(tiny_llama_dir, base_bits=bits, max_steps=8, batch_size=4, learning_rate=5e-3,
                        method="dora", eval_every=0), ws)
    session = mloop.setup(cfg, ws.runs / f"q{bits}", ws, log=lambda m: None)
    assert session.info.quantized_layers == 2 * 7 + 2  # every linear layer of both blocks, the embedding, the head
    res = mloop.train(session, rows.append, lambda: False)
    assert res.state == "finished"
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]
    info = json.loads((ws.runs / f"q{bits}" / "adapter" / "mactuner.json").read_text())
    assert info["base_bits"] == bits
    assert json.loads((ws.runs / f"q{bits}" / "adapter" / "adapter_config.json").read_text())["use_dora"]


@pytest.mark.slow
@pytest.mark.heavy  # ~90-170 s on two cores
def test_the_embedded_gemma_trains_on_mlx(workspace):
    """The default model on the default Mac path: Gemma 3 270M's HF copy (prepared first: about a minute), two MLX
    steps on one conversation (tens of seconds each on this CPU: mlx[cpu] links the reference BLAS)."""
    from pipelines import models

    models.materialize_default_hf(workspace)
    write_dataset(workspace, train_rows=conversations(1), val_rows=[])
    rows = []
    res = run_training(gemma_cfg(workspace), workspace.runs / "g", rows.append, ws=workspace)
    assert res.state == "finished" and len(rows) == 2 and rows[-1]["loss"] < rows[0]["loss"]
    cfg = json.loads((workspace.runs / "g" / "adapter" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"]  # <end_of_turn> is untrained in Gemma 3 270M: its rows are trained


def gemma_cfg(ws):
    from pipelines.training import TrainConfig

    return TrainConfig(base_model="default", dataset="chat", backend="mlx", max_steps=2, batch_size=1, max_length=64,
                       learning_rate=1e-3, save_every=0, dropout=0.0, rank=8)


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_mlx_runs_export_to_ggufs_that_validate_like_the_torch_one(workspace, spm_llama_dir):
    """The same run trained by torch and by MLX on a 4-bit base, each exported from its run folder (merged
    into the full-precision base, converted, validated in llama.cpp): every check gives the same outcome
    as for the torch run's GGUF, the fine-tune survived in each, and the model card says how it was trained. (The
    tiny base is random: its greedy text collapses, and the generation check says so for all three alike.)"""
    from pipelines import export as ex
    from pipelines.training import TrainConfig

    rows = [{"messages": [{"role": "user", "content": f"What is LoRA {i}?"},
                          {"role": "assistant", "content": "A low-rank adapter that trains few weights."}]}
            for i in range(8)]
    write_dataset(workspace, train_rows=rows, val_rows=[])
    outcomes, cards = {}, {}
    # MLX on a full-precision base leaves PEFT files like these (test_adapter_loads_in_peft_with_the_same_logits)
    for name, kw in (("torch", {}), ("mlx-q4", {"backend": "mlx", "base_bits": 4})):
        cfg = TrainConfig(base_model=str(spm_llama_dir), dataset="chat", dataset_version=1, max_steps=6, batch_size=4,
                          max_length=64, learning_rate=2e-2, save_every=0, dropout=0.0, rank=8,
                          target_modules="all-linear", **kw)
        run = workspace.runs / name
        run.mkdir(parents=True)
        cfg.to_yaml(run / "config.yaml")
        losses = []
        res = run_training(cfg, run, lambda r: losses.append(r["loss"]), ws=workspace, log=lambda _m: None)
        assert res.state == "finished" and losses[-1] < losses[0] - 0.1, (name, losses)
        # f16 alone: a quantized copy's rows would add time, not coverage (the quantizer is the torch run's too)
        result = ex.export(workspace, ex.ExportRequest(source=str(run), outtypes=["f16"], quants=[], validate=True))
        outcomes[name] = [{i.name: i.ok for i in v.items} for v in result.validations]
        for v in result.validations:
            item = next(i for i in v.items if i.name == "finetune_survived")
            assert item.ok is True, (name, item.detail)
        cards[name] = (Path(result.merged) / "README.md").read_text()
    assert outcomes["mlx-q4"] == outcomes["torch"], outcomes
    assert "Trained with Apple's MLX" in cards["mlx-q4"] and "4-bit MLX-quantized copy of the base" in cards["mlx-q4"]
    assert "MLX" not in cards["torch"]
