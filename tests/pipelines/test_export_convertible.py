"""Convertibility in the Train tab's pre-flight (pipelines/export/convertible.py), before hours of training: the
converter supports the architecture, its vocabulary step accepts the tokenizer (a BPE pre-tokenizer's hash is in its
table), and the Modelfile gets a translated template - each a line with what to do when not.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tiny_models import TINY_CHAT_TEMPLATE

from pipelines.export import convertible
from pipelines.export.convertible import export_checks
from pipelines.templates import FALLBACK_CHAT_TEMPLATE


def _by_name(rows):
    return {r.name: r for r in rows}


@pytest.mark.slow
def test_a_model_that_exports(spm_llama_dir):
    rows = _by_name(export_checks(spm_llama_dir, FALLBACK_CHAT_TEMPLATE))
    assert list(rows) == ["architecture", "tokenizer", "Modelfile template"]
    assert rows["architecture"].ok is True and "LlamaForCausalLM" in rows["architecture"].detail
    assert rows["tokenizer"].ok is True and "tokenizer model 'llama'" in rows["tokenizer"].detail
    assert rows["Modelfile template"].ok is True and rows["Modelfile template"].detail.startswith("ChatML")


@pytest.mark.slow
def test_an_unknown_pre_tokenizer_and_an_untranslatable_template(tiny_llama_dir):
    """conftest's tiny llama has a byte-level BPE trained here: its pre-tokenizer hash is in no table - exactly
    what the converter stops on at export time."""
    rows = _by_name(export_checks(tiny_llama_dir, TINY_CHAT_TEMPLATE))
    assert rows["architecture"].ok is True
    tok = rows["tokenizer"]
    assert tok.ok is False and "pre-tokenizer" in tok.detail and "hash " in tok.detail and "Choose a base" in tok.detail
    mf = rows["Modelfile template"]
    assert mf.ok is False and "cannot translate" in mf.detail and "For Ollama, choose a base model" in mf.detail


def test_an_unsupported_architecture(tmp_path, spm_llama_dir, monkeypatch):
    odd = tmp_path / "odd"
    shutil.copytree(spm_llama_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(convertible, "_ask_converter", lambda *_a: pytest.fail("no subprocess needed"))
    rows = _by_name(export_checks(odd, FALLBACK_CHAT_TEMPLATE))
    arch = rows["architecture"]
    assert arch.ok is False and "does not support the architecture FrobnicatorForCausalLM" in arch.detail
    assert "choose a base model" in arch.detail and rows["tokenizer"].ok is None


def test_without_the_converter_the_rows_say_so(monkeypatch, spm_llama_dir, tmp_path):
    monkeypatch.setenv("MACTUNER_CONVERTER", str(tmp_path / "nowhere"))
    rows = _by_name(export_checks(spm_llama_dir, FALLBACK_CHAT_TEMPLATE))
    assert rows["architecture"].ok is None and "not checked" in rows["architecture"].detail
    assert "not installed" in rows["architecture"].detail
    assert rows["Modelfile template"].ok is True


def test_the_answer_is_remembered_until_the_files_change(spm_llama_dir, tmp_path, monkeypatch):
    export_checks(spm_llama_dir, None)
    monkeypatch.setattr(convertible.subprocess, "run", lambda *a, **k: pytest.fail("asked the converter again"))
    assert _by_name(export_checks(spm_llama_dir, None))["tokenizer"].ok is True
    model = tmp_path / "m"
    shutil.copytree(spm_llama_dir, model)
    cdir = convertible.converter_dir()
    before = convertible._stamp(model, cdir)
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text() + "\n")
    assert convertible._stamp(model, cdir) != before


def test_the_train_plan_carries_the_checks(workspace, spm_llama_dir):
    from pipelines.training import TrainConfig, plan_training

    d = workspace.datasets / "chat" / "v1"
    d.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
            for i in range(4)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_training(TrainConfig(base_model=str(spm_llama_dir), dataset="chat", dataset_version=1, max_steps=2,
                                     batch_size=2, max_length=64), workspace)
    assert [c.name for c in plan.export] == ["architecture", "tokenizer", "Modelfile template"]
    assert plan.export[0].ok and plan.export[1].ok
