"""Modelfile templates for the model families people train, on their REAL chat templates (tests/chat_templates):
each family found by what its template renders, translated to Go, and proven by rendering it with Go's
text/template on Ollama's data against the Jinja original - system prompt or not, one to three turns, the default
system prompt a template injects, tool calls where the family has them, Qwen3's and SmolLM3's thinking on and off.
A template that is none of them (Llama 2's) is a failed "Modelfile template" row saying why and what Ollama does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from pipelines import export as ex
from pipelines.export import gotemplate
from pipelines.export.validate import _modelfile_item

TEMPLATES = Path(__file__).resolve().parent.parent / "chat_templates"
INDEX = json.loads((TEMPLATES / "index.json").read_text())

needs_go = pytest.mark.skipif(gotemplate.go_binary() is None,
                              reason="Go is not installed (apt-get install golang-go; scripts/setup.sh test does it)")

# family, words its label must hold, what compare_with_jinja must have covered
EXPECTED = {
    "qwen3": ("chatml", ["tools", "thinking"], ["tool calls", "thinking on/off"]),
    "qwen2_5": ("chatml", ["default system prompt", "tools"], ["tool calls"]),
    "llama3_1": ("llama3", ["system header", "tools"], ["tool calls"]),
    "llama3_2": ("llama3", ["system header", "tools"], ["tool calls"]),
    "gemma2": ("gemma", ["Gemma 2"], ["refuses were left out"]),
    "gemma3": ("gemma", ["folded"], []),
    "mistral_v3": ("mistral", ["v0.3", "tools"], ["tool calls"]),
    "mistral_tekken": ("mistral", ["tekken", "tools"], ["tool calls"]),
    "phi3": ("phi3", ["Phi-3"], []),
    "phi4": ("phi4", ["Phi-4"], []),
    "smollm2": ("chatml", ["default system prompt"], []),
    "smollm3": ("smollm3", ["reasoning"], ["thinking on/off"]),
    "chatml": ("chatml", [], []),
    "llama2": (None, [], []),
}


def _real(name: str) -> tuple[str, str, str]:
    meta = INDEX[name]
    return (TEMPLATES / meta["file"]).read_text(), meta.get("bos_token") or "", meta.get("eos_token") or ""


def test_every_real_template_is_covered():
    assert set(EXPECTED) == set(INDEX)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_family_is_found_by_rendering(name):
    jinja, bos, eos = _real(name)
    family, words, _covered = EXPECTED[name]
    t = ex.translate(jinja, bos, eos)
    assert t.family == family, (t.label, t.reason)
    assert all(w in t.label for w in words), t.label
    assert ex.template_family(jinja) == family
    if family is None:
        assert "none of the formats MacTuner translates" in t.reason and "[INST]" in t.reason
    else:
        assert t.stops and t.template


@needs_go
@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e[0]))
def test_go_renders_each_family_like_its_jinja_original(tmp_path, name):
    """The Modelfile written for the family passes the validation row: Go renders its TEMPLATE exactly like the
    real chat template on every test conversation (tools and thinking included where the template has them)."""
    jinja, bos, eos = _real(name)
    _family, _words, covered = EXPECTED[name]
    g = tmp_path / "m-Q8_0.gguf"
    g.write_bytes(b"GGUF")
    text = ex.modelfile(g, jinja, bos_token=bos, eos_token=eos).read_text()
    t = ex.translate(jinja, bos, eos)
    assert gotemplate.modelfile_template(text) == t.template
    for stop in t.stops:
        assert f"PARAMETER stop {json.dumps(stop)}" in text
    item = _modelfile_item(g, jinja, {"bos_token": bos, "eos_token": eos})
    assert item.ok is True, item.detail
    assert all(c in item.detail for c in covered), item.detail


@needs_go
def test_an_untranslatable_template_is_a_failed_row_never_a_skip(tmp_path):
    jinja, bos, eos = _real("llama2")
    g = tmp_path / "m-f16.gguf"
    g.write_bytes(b"GGUF")
    text = ex.modelfile(g, jinja, bos_token=bos, eos_token=eos).read_text()
    assert 'TEMPLATE """' not in text and "# NOTE: no TEMPLATE" in text
    item = _modelfile_item(g, jinja, {"bos_token": bos, "eos_token": eos})
    assert item.ok is False
    assert "not translated" in item.detail and "Ollama will use a template of its own" in item.detail


@needs_go
def test_the_go_side_matches_transformers_apply_chat_template(tiny_tokenizer_dir):
    """The reference is the tokenizer's own apply_chat_template (tools and enable_thinking passed as a user would),
    for every translated family, on the cases the validation checks."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for name, (family, _w, _c) in EXPECTED.items():
        if family is None:
            continue
        jinja, _bos, _eos = _real(name)
        tok.chat_template = jinja
        t = ex.translate(jinja, tok.bos_token, tok.eos_token)
        cases = gotemplate.default_cases(gotemplate.uses_tools(jinja), gotemplate.uses_thinking(jinja))
        wanted = []
        for c in cases:
            kwargs = ({"tools": c["tools"]} if c["tools"] else {}) | (
                {"enable_thinking": c["think"]} if c["think"] is not None else {})
            try:
                text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=True, **kwargs)
            except Exception:  # noqa: BLE001 - Gemma 2 refuses a system prompt
                continue
            wanted.append((c, text.removeprefix(tok.bos_token) if "bos_token" in jinja else text))
        got = gotemplate.render_go(t.template, [c for c, _w in wanted])
        for (c, want), text in zip(wanted, got):
            assert text == want, (name, c)


def test_found_by_behaviour_not_by_name():
    """A ChatML template with its own default system prompt is ChatML whatever it is called, and the Go template
    writes that prompt; a ChatML template that drops the system prompt is not translated (Ollama would show it)."""
    jinja, _bos, _eos = _real("smollm2")
    own = jinja.replace("You are a helpful AI assistant named SmolLM, trained by Hugging Face", "Be a pirate.")
    t = ex.translate("{# Llama-3 template #}" + own)
    assert t.family == "chatml" and "Be a pirate." in t.template and "SmolLM" not in t.template
    no_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + "
                 "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert ex.translate(no_system).template is None


@needs_go
def test_qwen3_thinking_switch_and_llama32_date():
    """Ollama's `think: false` writes Qwen3's empty think block after the generation prompt (unset and true do
    not); Llama 3.2's header carries today's date, computed when Ollama renders."""
    qwen3 = ex.translate(_real("qwen3")[0]).template
    unset, off, on = gotemplate.render_go(qwen3, [gotemplate.case(gotemplate.CONVERSATIONS[0], think=t)
                                                  for t in (None, False, True)])
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert unset.endswith("<|im_start|>assistant\n") and on == unset
    llama32 = ex.translate(*_real("llama3_2")).template
    (text,) = gotemplate.render_go(llama32, [gotemplate.CONVERSATIONS[0]])
    assert f"Today Date: {datetime.now():%d %b %Y}\n" in text
