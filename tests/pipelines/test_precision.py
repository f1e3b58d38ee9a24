"""bf16 mixed precision: the calibrated choice of dtype "auto" (cached per CPU, overridable), the mixed path on the
tiny model (base weights bf16; LoRA, optimizer state and loss float32; the decoder under autocast without PEFT's
per-layer input casts) and its loss curve against the float32 run's.

Tolerance: bf16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per operation); over a short run the per-step
loss stays within 3% of float32's (measured: the tiny llama within 0.01%; Gemma 3 270M in bench/train.py within 1.6%)."""

from __future__ import annotations

import json

import pytest
from test_train import tiny_cfg, write_dataset

from pipelines import device as devicemod
from pipelines.training import run_training

TOLERANCE = 0.03


def _cpu(bf16: bool):
    p = devicemod.profile()
    return devicemod.DeviceProfile(**{**p.as_dict(), "kind": "cpu", "bf16": bf16})


def test_auto_dtype_is_calibrated_once_and_cached(monkeypatch, tmp_path):
    from pipelines.errors import BadInput

    monkeypatch.delenv("MACTUNER_TRAIN_DTYPE", raising=False)
    cache = tmp_path / "ws" / devicemod.CALIBRATION_FILE
    calls = []

    def probe(threads):
        calls.append(threads)
        return 3.2

    monkeypatch.setattr(devicemod, "_bf16_speedup_probe", probe)
    assert devicemod.train_dtype(_cpu(True), cache, measure=False)[0] is None  # the studio only reads: not yet
    assert not calls and not cache.exists()
    dtype, why = devicemod.train_dtype(_cpu(True), cache)  # the trainer measures
    assert dtype == "bfloat16" and "3.2x" in why and "calibrated" in why
    assert devicemod.train_dtype(_cpu(True), cache, measure=False)[0] == "bfloat16" and len(calls) == 1  # cached
    assert list(json.loads(cache.read_text()).values()) == [3.2]
    monkeypatch.setattr(devicemod, "_calibration_key", lambda prof: "another-cpu")
    monkeypatch.setattr(devicemod, "_bf16_speedup_probe", lambda threads: 1.1)  # bf16 barely faster: float32
    dtype, why = devicemod.train_dtype(_cpu(True), cache)
    assert dtype == "float32" and "1.1x" in why
    assert len(json.loads(cache.read_text())) == 2  # one entry per CPU
    assert devicemod.train_dtype(_cpu(False), cache) == ("float32", "float32: this CPU has no native bf16")
    monkeypatch.setenv("MACTUNER_TRAIN_DTYPE", "bfloat16")
    assert devicemod.train_dtype(_cpu(False))[0] == "bfloat16"
    monkeypatch.setenv("MACTUNER_TRAIN_DTYPE", "fp32")
    with pytest.raises(BadInput, match="MACTUNER_TRAIN_DTYPE"):
        devicemod.train_dtype(_cpu(True))


def test_the_trainer_calibrates_in_the_workspace_and_the_plan_reads_it(monkeypatch, ws, tiny_llama_dir):
    """dtype auto: the pre-flight (in the studio) never measures; the trainer does, into the workspace's file, and
    the next pre-flight says what it chose."""
    from pipelines.training import plan_training

    monkeypatch.delenv("MACTUNER_TRAIN_DTYPE", raising=False)
    prof = _cpu(True)
    monkeypatch.setattr(devicemod, "profile", lambda refresh=False: prof)
    monkeypatch.setattr(devicemod, "_bf16_speedup_probe", lambda threads: 4.0)
    cfg = tiny_cfg(tiny_llama_dir, max_steps=1)
    assert "chosen by the trainer" in plan_training(cfg, ws).memory.precision
    logs = []
    run_training(cfg, ws.runs / "auto", ws=ws, log=logs.append)
    assert any("bf16 mixed precision" in m for m in logs)
    assert (ws.root / devicemod.CALIBRATION_FILE).exists()
    mem = plan_training(cfg, ws).memory
    assert mem.dtype == "bfloat16" and "calibrated 4.0x" in mem.precision


@pytest.fixture
def ws(workspace):
    write_dataset(workspace)
    return workspace


def test_bf16_mixed_tracks_float32(ws, tiny_llama_dir):
    """The same 6 steps in float32 and in bf16 mixed precision: losses within TOLERANCE; the trained weights stay
    float32 and the base weights are bf16; the log says which precision it used."""
    import torch

    out = {}
    for dtype in ("float32", "bfloat16"):
        rows, logs = [], []
        cfg = tiny_cfg(tiny_llama_dir, max_steps=6, dtype=dtype)
        res = run_training(cfg, ws.runs / dtype, rows.append, ws=ws, log=logs.append)
        out[dtype] = ([r["loss"] for r in rows if "loss" in r], logs, res)
    (l32, logs32, _), (l16, logs16, _) = out["float32"], out["bfloat16"]
    assert len(l32) == len(l16) == 6
    for a, b in zip(l32, l16):
        assert abs(a - b) <= TOLERANCE * abs(a), (l32, l16)
    assert l16[-1] < l16[0]  # it learns
    assert any("bf16 mixed precision" in m for m in logs16) and any("float32 throughout" in m for m in logs32)
    from safetensors.torch import load_file

    saved = load_file(str(ws.runs / "bfloat16" / "adapter" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # the adapter was trained in float32


def test_mixed_model_has_a_bf16_base_and_float32_adapter(tiny_llama_dir):
    import torch

    from pipelines.training.session import build_model

    cfg = tiny_cfg(tiny_llama_dir, dtype="bfloat16")
    model, _rows = build_model(cfg, torch.bfloat16, torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)  # activations are never copied to fp32
    ids = torch.tensor([[1, 5, 7, 9]])
    hidden = model.get_base_model().get_decoder()(input_ids=ids).last_hidden_state
    assert hidden.dtype == torch.bfloat16  # the decoder runs under autocast
    out = model(input_ids=ids).logits
    out.float().sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trained)
    assert any(p.grad is not None for p in trained)
