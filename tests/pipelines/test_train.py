"""pipelines/training/ and pipelines/runs.py with the tiny llama: metrics rows, the masked loss against the model's
own full-logits loss, checkpoints (keep_last, half-written ones, resume == uninterrupted), stop, NaN, the errors a
user gets before training, and - in subprocesses - the queue, kill -9 then resume, and a two-process DDP run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines import jobs, runs
from pipelines import training as train
from pipelines.training import loss as train_loss
from pipelines.errors import BadInput, Conflict, NotFound
from pipelines.training import (COMPLETE_MARKER, IGNORE, TrainConfig, TrainingFailed, encode_conversation, list_checkpoints,
                             run_training, validate)

ROOT = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s",
               "peak_memory", "elapsed"}


def conversations(n: int, long_system: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        system = "You are a tiny model. " + "The quick brown fox jumps over the lazy dog. " * long_system
        rows.append({"messages": [
            {"role": "system", "content": system.strip()},
            {"role": "user", "content": f"What is LoRA, question {i}?"},
            {"role": "assistant", "content": f"A low-rank adapter that trains few weights ({i})." + " Hello." * (i % 3)},
        ]})
    return rows


def write_dataset(ws, name="chat", version=1, train_rows=None, val_rows=None) -> Path:
    d = ws.datasets / name / f"v{version}"
    d.mkdir(parents=True, exist_ok=True)
    train_rows = conversations(12) if train_rows is None else train_rows
    val_rows = conversations(4) if val_rows is None else val_rows
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    (d / "meta.json").write_text(json.dumps({"rows": len(train_rows)}))
    return d


def tiny_cfg(model_dir, **kw) -> TrainConfig:
    base = dict(base_model=str(model_dir), dataset="chat", max_steps=4, batch_size=2, max_length=64,
                learning_rate=1e-3, save_every=0, threads=1, warmup_steps=1, dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def ws(workspace):
    write_dataset(workspace)
    return workspace


def assert_bad_input(excinfo, *needles):
    err = excinfo.value
    assert type(err) is BadInput, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg.strip() and "\n" not in msg.strip() and "Traceback" not in msg
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    return msg


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------- config


def test_config_yaml_roundtrip_and_coercion(tmp_path):
    cfg = TrainConfig(dataset="chat", target_modules=["q_proj", "v_proj"], learning_rate=3e-4)
    p = tmp_path / "c.yaml"
    cfg.to_yaml(p)
    assert TrainConfig.from_yaml(p) == cfg
    # YAML reads 2e-4 as a string and 1 as an int: both become the field's type
    got = TrainConfig.from_yaml("learning_rate: 2e-4\nepochs: 1\npacking: 'yes'\ndataset: chat\n")
    assert got.learning_rate == 2e-4 and isinstance(got.epochs, float) and got.packing is True
    with pytest.raises(NotFound):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(BadInput, match="Unknown setting"):
        TrainConfig.from_yaml("lr: 1\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n\n")
    assert TrainConfig.from_yaml(empty) == TrainConfig()  # the CLI: every default
    with pytest.raises(BadInput, match="holds no settings"):
        TrainConfig.from_yaml(empty, allow_empty=False)  # the form: a reset nobody asked for
    with pytest.raises(BadInput, match="rank must be a whole number"):
        TrainConfig.from_dict({"rank": 2.5})
    assert all(TrainConfig.help().values()), "every field carries help text"


def test_validate_resolves_latest_version(ws, tiny_llama_dir):
    write_dataset(ws, version=3)
    cfg = validate(tiny_cfg(tiny_llama_dir, dataset_version=0), ws)
    assert cfg.dataset_version == 3 and Path(cfg.base_model) == tiny_llama_dir.resolve()


def test_learning_rate_zero_refused(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, learning_rate=0), ws)
    assert_bad_input(e, "learning rate", "positive")


def test_missing_dataset_version(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, dataset_version=7), ws)
    assert_bad_input(e, "no version 7", "available: v1")
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, dataset="nope"), ws)
    assert_bad_input(e, "no dataset 'nope'")


def test_qlora_refused_on_cpu_with_reason(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, method="qlora"), ws)
    assert_bad_input(e, "QLoRA", "CUDA", "lora")


def test_other_bad_settings(ws, tiny_llama_dir):
    for kw, needle in [({"method": "full"}, "method"), ({"scheduler": "step"}, "scheduler"),
                       ({"target_modules": "mlp"}, "target_modules"), ({"batch_size": 0}, "batch_size"),
                       ({"dtype": "float16"}, "GPU"), ({"max_steps": 0, "epochs": 0}, "epochs"),
                       ({"base_model": str(tiny_llama_dir.parent / 'missing')}, "nothing at")]:
        with pytest.raises(Exception) as e:
            validate(tiny_cfg(tiny_llama_dir, **kw), ws)
        assert needle.lower() in str(e.value).lower(), (kw, str(e.value))


# ---------------------------------------------------------------------------------------------- data and loss


def test_labels_cover_only_the_assistant_reply(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how are you?"},
            {"role": "user", "content": "Fine"}, {"role": "assistant", "content": "Good to hear"}]
    ids, labels = encode_conversation(tok, msgs, responses_only=True)
    assert len(ids) == len(labels)
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert "Hi, how are you?" in learned and "Good to hear" in learned
    assert "Hello there" not in learned and "Fine" not in learned and "user" not in learned
    assert learned.count("</s>") == 2  # each reply's end-of-turn token is learned
    ids2, labels2 = encode_conversation(tok, msgs, responses_only=False)
    assert ids2 == ids and labels2 == ids


def test_mask_is_the_data_tabs_preview_mask(tiny_llama_dir):
    """Training learns exactly the tokens the Data tab's preview marks as trained."""
    from transformers import AutoTokenizer

    from pipelines import data

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for row in conversations(3) + [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]:
        ids, labels = encode_conversation(tok, row["messages"])
        assert [int(lab != IGNORE) for lab in labels] == data.preview_example(row, tok).mask


def test_text_rows_are_trained_in_full(ws, tiny_llama_dir):
    write_dataset(ws, name="plain", train_rows=[{"text": "The quick brown fox jumps over the lazy dog."}] * 4,
                  val_rows=[])
    cfg = tiny_cfg(tiny_llama_dir, dataset="plain", max_steps=1)
    info = train.check_data(cfg, ws)
    assert info["usable"] == 4 and info["label_tokens"] > 4 * 8
    assert run_training(cfg, ws.runs / "t", None, ws=ws).state == "finished"


def test_masked_loss_equals_full_logits_loss(ws, tiny_llama_dir):
    """Our loss (output layer on label positions only) equals transformers' own loss over full logits on the same
    batch, and so do the gradients of the adapter weights."""
    import torch
    from transformers import AutoTokenizer

    from pipelines.training.session import build_model

    cfg = validate(tiny_cfg(tiny_llama_dir, dropout=0.0), ws)
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    torch.manual_seed(0)
    model, _rows = build_model(cfg, torch.float32, torch.device("cpu"))
    with torch.no_grad():  # non-zero B so that the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    enc, _ = train.encode_dataset(cfg, ws, tok)
    batch = train.collate(enc.examples[:4], tok.pad_token_id, packed=False)
    loss_mod = train_loss.CausalLMLoss(model)

    s, n = loss_mod(**batch)
    ours = s / n
    ours.backward()
    ours = ours.detach()
    g_ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != tok.pad_token_id).long(),
                labels=batch["labels"]).loss
    ref.backward()
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_ours[k], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_linear_cross_entropy_matches_reference(softcap, with_rows, dtype, monkeypatch):
    """Several chunks, against full logits; with trained rows (loss.trained_rows) replacing three of the weight's,
    their gradient included. bf16: each chunk's logits of a bf16 matmul taken to float32 in blocks of rows (the last
    one short) and their gradient back, against the same logits all at once."""
    import torch
    import torch.nn.functional as F

    monkeypatch.setattr(train_loss, "BLOCK_BYTES", 3 * 300 * 4)  # bf16: blocks of 3 rows in chunks of 8
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(37, 16).to(dt).requires_grad_()
    w = torch.randn(300, 16).to(dt)
    t = torch.randint(0, 300, (37,))
    idx = torch.tensor([3, 250, 7])
    delta = torch.randn(3, 16, requires_grad=True)
    rows = (idx, delta) if with_rows else None
    if with_rows:
        t[:3] = idx  # the trained rows are targets too
    got = train_loss.linear_cross_entropy(h, w, t, softcap, chunk_bytes=8 * 300 * 4, rows=rows)  # several chunks
    got.backward()
    gh, gd = h.grad.clone(), delta.grad
    h.grad = delta.grad = None
    z = (h @ w.t()).float()
    if with_rows:
        z = z.index_copy(1, idx, (h @ delta.to(dt).t()).float())
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ref = F.cross_entropy(z, t, reduction="sum")
    ref.backward()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == "float32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, h.grad, **tol)
    if with_rows:
        torch.testing.assert_close(gd, delta.grad, **tol)
    else:
        assert gd is None and delta.grad is None  # rows not given: delta takes no part
        per_row = train_loss.linear_token_nll(h.detach(), w, t, softcap, chunk_bytes=8 * 300 * 4)
        torch.testing.assert_close(per_row, F.cross_entropy(z.detach(), t, reduction="none"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- training


def test_metrics_rows_and_final_adapter(ws, tiny_llama_dir, tmp_path):
    rows = []
    run_dir = ws.runs / "r"
    res = run_training(tiny_cfg(tiny_llama_dir, max_steps=4, eval_every=2), run_dir, rows.append, ws=ws)
    assert res.state == "finished" and res.step == 4
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert METRIC_KEYS <= set(r), set(r)
        assert all(isinstance(r[k], (int, float)) for k in METRIC_KEYS)
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory"] > 10 * 2**20
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert rows[0]["learning_rate"] < rows[1]["learning_rate"]  # warm-up
    json.dumps(rows)  # plain dicts
    ad = run_dir / "adapter"
    assert (ad / "adapter_model.safetensors").exists() and (ad / "adapter_config.json").exists()
    assert (ad / "tokenizer.json").exists() and (ad / "chat_template.jinja").exists()
    assert json.loads((ad / "adapter_config.json").read_text())["r"] == 16
    assert not (run_dir / "checkpoints").exists() or not list_checkpoints(run_dir)


def test_packing_and_dora_train(ws, tiny_llama_dir):
    rows = []
    res = run_training(tiny_cfg(tiny_llama_dir, max_steps=2, packing=True, method="dora", target_modules="attention",
                                max_length=128), ws.runs / "p", rows.append, ws=ws)
    assert res.state == "finished" and len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    keys = adapter_tensors(ws.runs / "p" / "adapter")
    assert any("magnitude" in k for k in keys) and not any("mlp" in k for k in keys)


def test_rslora_with_gradient_checkpointing_matches_plain(ws, tiny_llama_dir):
    cfg = tiny_cfg(tiny_llama_dir, max_steps=2, method="rslora", target_modules=["q_proj", "v_proj"])
    plain, ckpt = [], []
    run_training(cfg, ws.runs / "g0", plain.append, ws=ws)
    run_training(replace(cfg, gradient_checkpointing=True), ws.runs / "g1", ckpt.append, ws=ws)
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in ckpt], rel=1e-5)
    cfg_json = json.loads((ws.runs / "g1" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["use_rslora"] is True and sorted(cfg_json["target_modules"]) == ["q_proj", "v_proj"]


def test_checkpoints_and_keep_last(ws, tiny_llama_dir):
    run_dir = ws.runs / "k"
    run_training(tiny_cfg(tiny_llama_dir, max_steps=5, save_every=1, keep_last=2), run_dir, None, ws=ws)
    ckpts = list_checkpoints(run_dir)
    assert [p.name for p in ckpts] == ["step-3", "step-4"]
    for c in ckpts:
        for f in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
                  "trainer_state.json", COMPLETE_MARKER):
            assert (c / f).exists(), f
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"] == 4
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_equals_uninterrupted(ws, tiny_llama_dir):
    cfg = tiny_cfg(tiny_llama_dir, max_steps=6, dropout=0.1, save_every=0, scheduler="cosine", eval_every=0)
    full = []
    run_training(cfg, ws.runs / "a", full.append, ws=ws)

    part = []
    res = run_training(cfg, ws.runs / "b", part.append, ws=ws, should_stop=lambda: len(part) >= 3)
    assert res.state == "stopped" and res.step == 3
    ckpt = list_checkpoints(ws.runs / "b")[-1]
    assert ckpt.name == "step-3"
    res = run_training(cfg, ws.runs / "b", part.append, ws=ws, resume=ckpt)
    assert res.state == "finished" and [r["step"] for r in part] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, part):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["learning_rate"] == pytest.approx(b["learning_rate"])
    assert full[-1]["eval_loss"] == pytest.approx(part[-1]["eval_loss"], rel=1e-5)
    ta, tb = adapter_tensors(ws.runs / "a" / "adapter"), adapter_tensors(ws.runs / "b" / "adapter")
    assert ta.keys() == tb.keys()
    import torch

    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


def test_resume_with_incompatible_config_refused(ws, tiny_llama_dir, model_variants):
    cfg = tiny_cfg(tiny_llama_dir, max_steps=3)
    run_training(cfg, ws.runs / "c", None, ws=ws, should_stop=lambda: True)
    ckpt = list_checkpoints(ws.runs / "c")[-1]
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, max_steps=3, rank=8), ws, resume=ckpt)
    assert_bad_input(e, "cannot resume", "rank")
    other = model_variants.pickle_only()  # same architecture, another folder: a different base model
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(other, max_steps=3), ws, resume=ckpt)
    assert_bad_input(e, "cannot resume", "base model")
    with pytest.raises(BadInput) as e:
        validate(cfg, ws, resume=ws.runs / "c" / "checkpoints" / "step-99")
    assert_bad_input(e, "not a complete checkpoint")


def test_stop_flag_saves_a_checkpoint(ws, tiny_llama_dir):
    run_dir = ws.runs / "s"
    rows = []

    def on_metrics(row):
        rows.append(row)
        if row["step"] == 2:
            (run_dir / train.STOP_FLAG).touch()

    res = run_training(tiny_cfg(tiny_llama_dir, max_steps=50), run_dir, on_metrics, ws=ws)
    assert res.state == "stopped" and res.step == 2 and len(rows) == 2
    assert "step 2" in res.reason
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]
    assert not (run_dir / "adapter").exists()


def test_nan_loss_fails_with_reason(ws, tiny_llama_dir, monkeypatch):
    real = train_loss.linear_cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(train_loss, "linear_cross_entropy", poisoned)
    run_dir = ws.runs / "nan"
    run_dir.mkdir()
    tiny_cfg(tiny_llama_dir, max_steps=5).to_yaml(run_dir / "config.yaml")
    rc = runs.run_job(runs.RunDir(run_dir))  # the trainer process's entry, in this process
    st = runs.RunDir(run_dir).status()
    assert rc == 1 and st.state == "failed"
    assert "loss became nan" in st.reason.lower() and "learning rate" in st.reason


def test_out_of_memory_suggests_smaller_batch(ws, tiny_llama_dir, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB. out of memory")

    monkeypatch.setattr(train_loss, "linear_cross_entropy", oom)
    with pytest.raises(TrainingFailed) as e:
        run_training(tiny_cfg(tiny_llama_dir, batch_size=8), ws.runs / "oom", None, ws=ws)
    assert "out of memory at batch size 8" in str(e.value).lower() and "batch size" in str(e.value)


def test_zero_usable_rows(ws, tiny_llama_dir):
    only_users = [{"messages": [{"role": "user", "content": "hello"}]} for _ in range(5)]
    write_dataset(ws, name="nousable", train_rows=only_users, val_rows=[])
    cfg = tiny_cfg(tiny_llama_dir, dataset="nousable")
    with pytest.raises(BadInput) as e:
        train.check_data(cfg, ws)
    assert_bad_input(e, "0 usable rows", "assistant")
    with pytest.raises(BadInput):
        run_training(cfg, ws.runs / "z", None, ws=ws)
    assert not (ws.runs / "z" / "checkpoints").exists()


def test_max_length_smaller_than_prompt(ws, tiny_llama_dir):
    write_dataset(ws, name="longprompt", train_rows=conversations(4, long_system=4), val_rows=[])
    cfg = tiny_cfg(tiny_llama_dir, dataset="longprompt", max_length=24)
    with pytest.raises(BadInput) as e:
        train.check_data(cfg, ws)
    assert_bad_input(e, "max_length=24", "raise max length")
    assert train.check_data(tiny_cfg(tiny_llama_dir, dataset="longprompt", max_length=256), ws)["usable"] == 4


def test_half_written_checkpoint_is_never_listed(ws, tiny_llama_dir, monkeypatch):
    import torch

    run_dir = ws.runs / "h"
    real_save = torch.save
    count = {"n": 0}

    def save(obj, f, *a, **k):  # the disk fills up while the second checkpoint's optimizer state is written
        if str(f).endswith("optimizer.pt"):
            count["n"] += 1
            if count["n"] == 2:
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TrainingFailed) as e:
        run_training(tiny_cfg(tiny_llama_dir, max_steps=6, save_every=2), run_dir, None, ws=ws)
    assert "could not write checkpoint step-4" in str(e.value).lower() and "no space left" in str(e.value).lower()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]
    assert not (run_dir / "checkpoints" / "step-4").exists()
    # a folder without the COMPLETE marker (an older writer, a manual copy) is not a checkpoint either
    fake = run_dir / "checkpoints" / "step-9"
    shutil.copytree(run_dir / "checkpoints" / "step-2", fake)
    (fake / COMPLETE_MARKER).unlink()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]
    with pytest.raises(BadInput):
        validate(tiny_cfg(tiny_llama_dir), ws, resume=fake)


# ---------------------------------------------------------------------------------------------- runs


def test_read_metrics_from_offset(tmp_path):
    run = runs.RunDir(tmp_path / "run")
    run.path.mkdir()
    assert runs.read_metrics(run, 0) == ([], 0)
    run.append_metrics({"step": 1, "loss": 2.0})
    run.append_metrics({"step": 2, "loss": 1.5})
    rows, off = runs.read_metrics(run, 0)
    assert [r["step"] for r in rows] == [1, 2] and off == run.metrics_path.stat().st_size
    with open(run.metrics_path, "ab") as fh:  # a row being written: not returned until its newline is there
        fh.write(b'{"step": 3, "lo')
    rows, off2 = runs.read_metrics(run, off)
    assert rows == [] and off2 == off
    with open(run.metrics_path, "ab") as fh:
        fh.write(b'ss": 1.0}\n')
    rows, off3 = runs.read_metrics(run, off2)
    assert rows == [{"step": 3, "loss": 1.0}] and off3 > off2


def test_a_trainer_that_dies_is_recorded_failed_by_whoever_started_it(ws, tiny_llama_dir):
    run = runs.create_run(ws, tiny_cfg(tiny_llama_dir))
    run.stop_flag.touch()
    jobs.start(run, [sys.executable, "-c", "raise SystemExit(3)"])  # its starter (here) records how it ended
    # the starter writes the end, then clears the stop request: wait for both (a loaded machine parts them)
    assert _wait_for(lambda: json.loads(run.status_path.read_text())["state"] != "running"
                     and not run.stop_flag.exists(), 30)
    st = run.status()
    assert st.state == "failed" and "ended unexpectedly (exit code 3)" in st.reason and st.exit_code == 3
    assert "no checkpoint was written" in st.reason


def test_the_end_of_an_earlier_process_leaves_a_resumed_run_alone(ws, tiny_llama_dir):
    """The supervisor of a run's previous attempt may end after the run was resumed (its starter then hears of it):
    that end is not the resumed run's."""
    import psutil

    run = runs.create_run(ws, tiny_cfg(tiny_llama_dir))
    me = psutil.Process()
    run.update(state="running", pid=me.pid, create_time=me.create_time(), supervisor_pid=me.pid,
               supervisor_create_time=me.create_time())
    run.record_exit(me.pid + 100000, 137)  # not a process of this attempt
    st = run.status()
    assert st.state == "running" and st.exit_code is None and st.reason is None
    run.record_exit(me.pid, 137)
    assert run.status().state == "failed" and run.status().exit_code == 137


def test_a_trainer_that_stopped_with_an_earlier_process_is_interrupted(ws, tiny_llama_dir):
    """A trainer this process did not start (the studio, the machine or the Space restarted since) is gone without
    a word: the run is interrupted, its last complete checkpoint resumable."""
    run = runs.create_run(ws, tiny_cfg(tiny_llama_dir))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    ckpt = run.checkpoints_dir / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 2}')
    (ckpt / COMPLETE_MARKER).touch()
    run.update(state="running", pid=proc.pid, started=time.time())
    st = run.status()
    assert st.state == "interrupted" and st.state in runs.FINAL
    assert st.reason.startswith("interrupted") and "step-2 can be resumed" in st.reason, st.reason
    assert run.read().state == "running"  # reading it wrote nothing


def test_runs_of_the_previous_version_list_and_resume(ws, tiny_llama_dir):
    """A workspace written by the previous version: config.yaml and its status.json keys, no job.json. Its runs
    are listed as they were (one left "running" by a studio that is gone reads as interrupted) and one resumes."""
    cfg = tiny_cfg(tiny_llama_dir, max_steps=4, save_every=2)
    old = ws.runs / "old-stopped"
    res = run_training(cfg, old, None, ws=ws, should_stop=lambda: True)  # stops after step 1 with step-1
    cfg.to_yaml(old / "config.yaml")
    now = time.time()
    (old / "status.json").write_text(json.dumps({
        "state": "stopped", "reason": res.reason, "created": now - 60, "queued_at": now - 60, "nproc": 1,
        "updated": now - 30, "pid": 999999, "create_time": now - 50, "started": now - 50, "ended": now - 30,
        "trainer_pid": 999999, "step": 1, "total_steps": 4, "last_loss": 5.0, "final_loss": 5.0,
        "best_eval_loss": None, "adapter": None}))
    gone = ws.runs / "old-running"
    gone.mkdir()
    cfg.to_yaml(gone / "config.yaml")
    (gone / "status.json").write_text(json.dumps({"state": "running", "reason": None, "created": now - 10,
                                                  "pid": 999999, "create_time": now - 9, "started": now - 9}))
    listed = {r["name"]: r for r in runs.list_runs(ws)}
    assert listed["old-stopped"]["state"] == "stopped" and listed["old-stopped"]["step"] == 1
    assert listed["old-stopped"]["checkpoints"] == ["step-1"] and listed["old-stopped"]["duration"] == 20
    assert listed["old-running"]["state"] == "interrupted"
    run = runs.get_run(ws, "old-stopped")
    runs.resume(ws, run)
    st = jobs.wait(run, timeout=180)
    assert st.state == "finished" and st.step == 4, (st, run.log_tail())
    assert json.loads(run.spec_path.read_text()) == {"kind": "train"}


def test_stop_a_queued_run(ws, tiny_llama_dir):
    run = runs.create_run(ws, tiny_cfg(tiny_llama_dir))
    st = runs.stop(run)
    assert st.state == "stopped" and "before it started" in st.reason


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _reaped(pid: int, parent=None, timeout: float = 30.0) -> bool:
    """True once `pid` is no child of `parent` (default: this process) any more, not even a <defunct> one."""
    import psutil

    parent = parent or psutil.Process()
    return _wait_for(lambda: pid not in {c.pid for c in parent.children()}, timeout)


def test_finished_job_processes_are_reaped(tmp_path):
    """A job's process that ends is waited on at once, though nobody polls its status: no zombie is left."""
    import psutil

    from pipelines import procs

    ended = []
    for i, code in enumerate((0, 3)):
        job = jobs.JobDir(tmp_path / f"job-{i}")
        st = jobs.start(job, [sys.executable, "-c", f"raise SystemExit({code})"])
        assert st.state == "running" and st.pid
        ended.append((job, st.pid, code))
    for job, pid, _ in ended:
        assert _reaped(pid), psutil.Process(pid).status()
        assert not procs.process_alive(pid)
    zombies = [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    assert not {pid for _, pid, _ in ended} & set(zombies)
    # the one who waited for it recorded how it ended (it never wrote its end itself)
    assert _wait_for(lambda: all(job.read().state == "failed" for job, _, _ in ended), 10)
    assert [job.read().exit_code for job, _, _ in ended] == [0, 3]


def test_second_launch_is_queued_then_started(ws, tiny_llama_dir):
    a = runs.launch(ws, tiny_cfg(tiny_llama_dir, max_steps=3), name="first")
    b = runs.launch(ws, tiny_cfg(tiny_llama_dir, max_steps=2), name="second")
    assert a.status().state == "running"
    assert b.status().state == "queued"
    assert runs.advance_queue(ws) is None  # the first one is active: nothing else may start
    sa = jobs.wait(a, timeout=120)
    assert sa.state == "finished", (sa, a.log_tail())
    sb = jobs.wait(b, timeout=120)  # started when the first trainer ended (by its supervisor)
    assert sb.state == "finished", (sb, b.log_tail())
    assert sb.started >= sa.ended - 0.5
    rows, _ = runs.read_metrics(b, 0)
    assert [r["step"] for r in rows] == [1, 2]
    listed = {r["name"]: r for r in runs.list_runs(ws)}
    assert listed["first"]["state"] == "finished" and listed["first"]["best_eval_loss"] is not None
    assert listed["first"]["duration"] > 0 and listed["second"]["dataset"] == "chat v1"
    assert _reaped(sa.supervisor_pid, timeout=60), "a finished job lingers as a zombie of the process that started it"


def test_a_queued_run_that_crashes_is_failed_with_its_exit_code(ws, tiny_llama_dir):
    """The second run of the queue is started when the first one ends, not by this process: when its trainer dies
    (the OOM killer's kill -9 here) the run says failed with the exit code, as a first run would - not
    "interrupted ... the studio that started it stopped". Nothing here polls the runs while they train (a status
    read must not be what starts the queue)."""
    first = runs.launch(ws, tiny_cfg(tiny_llama_dir, max_steps=2), name="first")
    second = runs.launch(ws, tiny_cfg(tiny_llama_dir, max_steps=400, save_every=0), name="second")

    def on_disk(run) -> dict:
        return json.loads(run.status_path.read_text())

    assert _wait_for(lambda: on_disk(second).get("state") == "running" and runs.read_metrics(second, 0)[0], 180), \
        (on_disk(first), on_disk(second), second.log_tail())
    assert on_disk(first)["state"] == "finished"
    os.kill(on_disk(second)["pid"], signal.SIGKILL)
    assert _wait_for(lambda: second.status().state != "running", 30)
    st = second.status()
    assert st.state == "failed", st
    assert "exit code -9" in st.reason and "interrupted" not in st.reason, st.reason


def test_kill_9_then_resume(ws, tiny_llama_dir):
    cfg = tiny_cfg(tiny_llama_dir, max_steps=40, save_every=1, keep_last=2, eval_every=0)
    run = runs.launch(ws, cfg, name="killed")
    assert _wait_for(lambda: len(run.checkpoints()) >= 2, 90), run.log_tail()
    with pytest.raises(Conflict):
        runs.resume(ws, run)  # a running (or queued) run cannot be resumed
    pid = run.status().pid
    os.kill(pid, signal.SIGKILL)
    assert _wait_for(lambda: run.status().state == "failed", 30)
    st = run.status()
    assert "ended unexpectedly (exit code -9)" in st.reason and "resumed" in st.reason
    ckpts = run.checkpoints()
    assert ckpts, "the last complete checkpoint survives"
    last = ckpts[-1]
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    assert step < 40
    runs.resume(ws, run, last.name)
    st = jobs.wait(run, timeout=180)
    assert st.state == "finished", (st, run.log_tail())
    rows, _ = runs.read_metrics(run, 0)
    marker = [r for r in rows if r.get("event") == "resume"]
    assert marker and marker[-1]["step"] == step
    after = rows[rows.index(marker[-1]) + 1:]
    assert [r["step"] for r in after] == list(range(step + 1, 41))
    assert (run.adapter_dir / "adapter_model.safetensors").exists()


def test_cli_train_follows_the_run(ws, tiny_llama_dir, capsys, tmp_path):
    from pipelines import cli

    cfg = tmp_path / "train.yaml"
    tiny_cfg(tiny_llama_dir, max_steps=2).to_yaml(cfg)
    assert cli.main(["train", str(cfg), "--root", str(ws.root), "--name", "from-cli"]) == 0
    out = capsys.readouterr().out
    assert "run from-cli: running" in out and "step 2/2" in out and "[from-cli] finished" in out
    assert cli.main(["runs", "--root", str(ws.root)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "finished"
    assert cli.main(["train", "--example"]) == 0
    assert TrainConfig.from_yaml(capsys.readouterr().out) == TrainConfig()
    assert cli.main(["stop", "nope", "--root", str(ws.root)]) == 1


@pytest.mark.slow
def test_stop_a_running_subprocess(ws, tiny_llama_dir):
    run = runs.launch(ws, tiny_cfg(tiny_llama_dir, max_steps=100000, save_every=0), name="tostop")
    assert _wait_for(lambda: runs.read_metrics(run, 0)[0], 90), run.log_tail()
    st = runs.stop(run)
    assert st.state == "stopping"
    st = jobs.wait(run, timeout=60)
    assert st.state == "stopped" and st.checkpoints, (st, run.log_tail())
    assert not run.stop_flag.exists()


@pytest.mark.slow
def test_ddp_two_processes_with_torchrun(ws, tiny_llama_dir):
    run_dir = ws.runs / "ddp"
    run_dir.mkdir()
    tiny_cfg(tiny_llama_dir, max_steps=3, save_every=2, eval_every=3).to_yaml(run_dir / "config.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipelines.jobs", str(run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = runs.RunDir(run_dir).status()
    assert st.state == "finished", st
    rows, _ = runs.read_metrics(runs.RunDir(run_dir), 0)
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes
    assert "eval_loss" in rows[-1]
    assert "batch 2x1x2" in proc.stdout
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_planned_steps_match_the_trainer_with_packing_and_two_processes(ws, tiny_llama_dir):
    """plan_training counts steps as the trainer does: over packed sequences, split between the processes."""
    cfg = tiny_cfg(tiny_llama_dir, max_steps=0, epochs=1.0, packing=True, batch_size=1, max_length=256)
    one, two = train.plan_training(cfg, ws, nproc=1), train.plan_training(cfg, ws, nproc=2)
    assert one.items < one.usable == 12  # several conversations per packed sequence
    assert one.total_steps == one.items and two.total_steps == -(-one.items // 2)
    for name, nproc, want in (("plan-1", 1, one.total_steps), ("plan-2", 2, two.total_steps)):
        run = runs.launch(ws, cfg, name=name, nproc=nproc)
        st = jobs.wait(run, timeout=300)
        assert st.state == "finished", (st, run.log_tail())
        assert st.total_steps == st.step == want
