"""Choosing the training backend (device.choose_backend on simulated Macs and Linux boxes), what the MLX backend
refuses before anything runs (each with the reason and the torch alternative), the pre-flight plan and memory
estimates with MLX's 4-/8-bit bases, and the model config as mlx-lm must read it (transformers 5's rope_parameters)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from test_train import assert_bad_input, tiny_cfg, write_dataset

from pipelines import backend as backendmod
from pipelines import device as devicemod
from pipelines.device import GiB, ModelShape
from pipelines.errors import BadInput
from pipelines.training import TrainConfig, check_resume, plan_training, validate
from pipelines.training.plan import memory_advice

pytest.importorskip("mlx_lm")


@pytest.fixture
def ws(workspace):
    write_dataset(workspace)
    return workspace


def mac(monkeypatch, mlx=True):
    monkeypatch.setattr(backendmod.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(backendmod.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(backendmod, "mlx_installed", lambda: (True, "mlx 0.32.4, mlx-lm 0.32.2") if mlx
                        else (False, "mlx and mlx-lm are not installed"))


def linux(monkeypatch, mlx=True):
    monkeypatch.setattr(backendmod.platform, "system", lambda: "Linux")
    monkeypatch.setattr(backendmod.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(backendmod, "mlx_installed", lambda: (True, "mlx 0.32.4, mlx-lm 0.32.2") if mlx
                        else (False, "mlx-lm is not installed"))


# ---------------------------------------------------------------------------------------------- the choice


def test_auto_is_mlx_on_apple_silicon_with_mlx_installed(monkeypatch):
    mac(monkeypatch)
    choice = devicemod.choose_backend("auto")
    assert choice.name == "mlx" and "Apple silicon" in choice.reason and "mlx-lm 0.32.2" in choice.reason
    assert devicemod.choose_backend("torch").name == "torch"
    assert devicemod.mlx_train_dtype("auto")[0] in ("bfloat16", "float32")  # the test suite pins float32


def test_auto_on_a_mac_without_mlx_is_torch_and_says_how_to_get_mlx(monkeypatch):
    mac(monkeypatch, mlx=False)
    choice = devicemod.choose_backend("auto")
    assert choice.name == "torch" and "not installed" in choice.reason and "pip install mlx-lm" in choice.reason
    with pytest.raises(BadInput) as e:
        devicemod.choose_backend("mlx")
    assert_bad_input(e, "pip install mlx-lm", "backend torch")


def test_linux_runs_mlx_only_when_asked(monkeypatch):
    linux(monkeypatch)
    auto = devicemod.choose_backend("auto")
    assert auto.name == "torch" and "only on Apple silicon" in auto.reason and "backend mlx" in auto.reason
    asked = devicemod.choose_backend("mlx")
    assert asked.name == "mlx" and "CPU" in asked.reason and "slower than torch" in asked.reason
    linux(monkeypatch, mlx=False)
    with pytest.raises(BadInput) as e:
        devicemod.choose_backend("mlx")
    assert_bad_input(e, 'pip install "mlx[cpu]" mlx-lm', "backend torch")


def test_device_profile_names_the_backend(monkeypatch):
    from test_device import mps_torch

    mac(monkeypatch)
    prof = devicemod.detect(mps_torch())
    assert prof.kind == "mps" and prof.backend == "mlx" and "unified memory" in prof.backend_reason
    linux(monkeypatch)
    prof = devicemod.detect()
    assert prof.backend == "torch" and prof.backend_reason and json.dumps(prof.as_dict())


def test_validate_resolves_the_backend(ws, tiny_llama_dir):
    assert validate(tiny_cfg(tiny_llama_dir), ws).backend == "torch"  # auto on Linux
    assert validate(tiny_cfg(tiny_llama_dir, backend="mlx"), ws).backend == "mlx"
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, backend="jax"), ws)
    assert_bad_input(e, "backend must be one of", "auto, torch, mlx")
    cfg = TrainConfig.from_yaml("dataset: chat\nbackend: mlx\nbase_bits: '4'\n")
    assert (cfg.backend, cfg.base_bits) == ("mlx", 4) and TrainConfig.from_yaml(cfg.to_yaml()) == cfg


# ---------------------------------------------------------------------------------------------- refusals


def test_quantized_base_on_torch_is_refused_with_the_mlx_alternative(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, base_bits=8), ws)
    assert_bad_input(e, "base_bits 8", "backend mlx", "qlora")
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, method="qlora"), ws)
    assert_bad_input(e, "QLoRA", "CUDA", "backend mlx")
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, backend="mlx", base_bits=3), ws)
    assert_bad_input(e, "base_bits must be 0", "4 or 8")
    assert validate(tiny_cfg(tiny_llama_dir, backend="mlx", method="qlora"), ws).method == "qlora"


def test_packing_is_refused_on_mlx(ws, tiny_llama_dir):
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tiny_llama_dir, backend="mlx", packing=True, max_length=128), ws)
    assert_bad_input(e, "packing", "mlx-lm", "backend torch")


def _variant(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_an_architecture_mlx_lm_lacks_is_refused(ws, tmp_path):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "b")
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(tmp_path / "b", backend="mlx"), ws)
    assert_bad_input(e, "mlx-lm has no 'bloom' architecture", "backend torch")


def test_an_already_quantized_folder_is_refused(ws, tiny_llama_dir, tmp_path):
    q = _variant(tiny_llama_dir, tmp_path / "q4", quantization={"group_size": 64, "bits": 4})
    with pytest.raises(BadInput) as e:
        validate(tiny_cfg(q, backend="mlx"), ws)
    assert_bad_input(e, "already quantized", "full-precision original", "base_bits", "backend torch")


def test_resume_across_backends_is_refused(tiny_llama_dir, tmp_path):
    ckpt = tmp_path / "step-2"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text("1")
    old = replace(tiny_cfg(tiny_llama_dir), backend="torch").to_dict()
    del old["backend"], old["base_bits"]  # a checkpoint written before these settings existed: torch, no quantization
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "config": old}))
    check_resume(replace(tiny_cfg(tiny_llama_dir), backend="torch"), ckpt)
    with pytest.raises(BadInput) as e:
        check_resume(replace(tiny_cfg(tiny_llama_dir), backend="mlx"), ckpt)
    assert_bad_input(e, "cannot resume", "backend 'torch'", "'mlx'")


# ---------------------------------------------------------------------------------------------- plan, memory


def test_plan_says_which_backend_and_the_quantized_memory(ws, tiny_llama_dir):
    plan = plan_training(tiny_cfg(tiny_llama_dir, backend="mlx", base_bits=4), ws)
    assert plan.backend == "mlx" and "chosen in the config" in plan.backend_reason and plan.seconds is None
    assert plan.memory.mode == "lora, 4-bit base" and "quantized to 4 bits by MLX" in plan.memory.precision
    torch_plan = plan_training(tiny_cfg(tiny_llama_dir), ws)
    assert torch_plan.backend == "torch" and torch_plan.seconds is not None
    assert plan.memory.estimate.weights < torch_plan.memory.estimate.weights


def test_mlx_estimates_for_4_and_8_bit_bases():
    shape = ModelShape(n_params=7_000_000_000, hidden_size=4096, num_layers=32, vocab_size=32000,
                       intermediate_size=11008, num_kv_heads=8, head_dim=128)
    prof = devicemod.detect()
    est = {bits: memory_advice(shape, TrainConfig(backend="mlx", base_bits=bits, dtype="bfloat16", batch_size=1),
                               prof, available=16 * GiB) for bits in (0, 4, 8)}
    assert est[4].estimate.weights == int(7e9 * 4.5 / 8) and est[8].estimate.weights == int(7e9 * 8.5 / 8)
    assert est[0].estimate.weights == 14_000_000_000
    assert est[4].fits and not est[0].fits  # QLoRA of a 7B fits a 16 GB Mac; 16-bit does not
    assert est[4].recommended_batch >= 1 and est[0].recommended_batch == 0
    assert all(e.backend == "mlx" for e in est.values())


def test_transformers_5_rope_parameters_become_mlx_lm_keys():
    from pipelines.training.mlx.support import legacy_rope_keys

    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert legacy_rope_keys(gemma) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4}
    llama3 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 32.0}}
    assert legacy_rope_keys(llama3) == {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0}}
    assert legacy_rope_keys({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}) == {}


def test_mlx_logits_equal_transformers_with_a_non_default_rope_theta(tiny_llama_dir, tmp_path):
    """A config saved by transformers 5 keeps rope_theta inside rope_parameters: MLX must still use it."""
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.training.mlx.model import build_model

    d = _variant(tiny_llama_dir, tmp_path / "rope", rope_parameters={"rope_theta": 50.0, "rope_type": "default"})
    ids = [[1, 5, 9, 33, 70, 120, 7, 250, 3, 44, 90, 17, 200, 61]]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(torch.tensor(ids)).logits.numpy()
    model, _info = build_model(TrainConfig(base_model=str(d), rank=4, dropout=0.0), "float32")
    model.eval()
    mine = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4)
    default = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(default(torch.tensor(ids)).logits.numpy() - ref).max() > 1e-3  # the theta matters here


def test_model_cards_say_mlx_and_the_quantized_base(workspace):
    """The Hub card of an export made from an MLX run on a 4-bit base says how it was trained and that the merged
    model is the full-precision base plus the adapter; a plain torch run's card does not."""
    import json as _json

    from export_fixtures import make_export

    from pipelines.export import card

    folder = make_export(workspace)
    config = workspace.runs / "tiny-run" / "config.yaml"
    manifest = _json.loads((folder / "export.json").read_text())
    plain = card.run_info(workspace, manifest)
    assert plain.settings["backend"] == "auto"
    config.write_text(config.read_text().replace("backend: auto", "backend: mlx").replace("base_bits: 0",
                                                                                          "base_bits: 4"))
    info = card.run_info(workspace, manifest)
    text = card.model_card("ana/tiny", "tiny", info, {"merged", "adapter"}, [], [])
    assert "Trained with Apple's MLX (mlx-lm) on a 4-bit MLX-quantized copy of the base" in text
    assert "full-precision base" in text and "| backend | mlx |" in text and "| base_bits | 4 |" in text
    assert "MLX" not in card.model_card("ana/tiny", "tiny", plain, {"merged", "adapter"}, [], [])


def test_several_processes_are_refused_for_mlx(ws, tiny_llama_dir, monkeypatch):
    from pipelines import runs
    from pipelines.multinode_commands import commands
    from pipelines.training import run_training

    cfg = tiny_cfg(tiny_llama_dir, backend="mlx")
    with pytest.raises(BadInput) as e:
        runs.create_run(ws, cfg, nproc=2)
    assert_bad_input(e, "one process", "backend torch")
    assert not list(ws.runs.glob("*"))  # no run folder was written
    with pytest.raises(BadInput) as e:
        commands("c.yaml", 2, run_name="r", root=str(ws.root), cfg=validate(cfg, ws))
    assert_bad_input(e, "one process", "DDP")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun hands each process
    with pytest.raises(BadInput) as e:
        run_training(cfg, ws.runs / "w", None, ws=ws)
    assert_bad_input(e, "one process")
