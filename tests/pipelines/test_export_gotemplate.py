"""The Ollama Modelfile templates, rendered by Go's own text/template (pipelines.export.gotemplate, the data shape
Ollama gives a template that uses .Messages) and compared with the Jinja chat template they translate, on the same
conversations: system prompt or not, one turn or several. Needs `go` (Debian's golang-go, installed by
`scripts/setup.sh test`); skipped with that reason without it.
"""

from __future__ import annotations

import pytest

from pipelines import export as ex
from pipelines.export import gotemplate
from pipelines.templates import FALLBACK_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE, render_template

needs_go = pytest.mark.skipif(gotemplate.go_binary() is None,
                              reason="Go is not installed (apt-get install golang-go; scripts/setup.sh test does it)")

# Gemma 3's own chat template shape (system folded into the first turn, roles checked, content trimmed), written
# here so that the test does not depend on a downloaded tokenizer.
GEMMA3_STYLE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('roles must alternate') }}"
    "{%- endif -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

FAMILIES = [("gemma", GEMMA_CHAT_TEMPLATE), ("gemma", GEMMA3_STYLE), ("chatml", FALLBACK_CHAT_TEMPLATE),
            ("plain", PLAIN_CHAT_TEMPLATE)]

# The Gemma TEMPLATE as it was before issue 11: the user header hangs on `or $.System (ne $i 0)`.
OLD_GEMMA = ('{{- if .System }}<start_of_turn>user\n{{ .System }}\n\n{{ end }}'
             '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
             '{{- if eq .Role "user" }}{{ if or $.System (ne $i 0) }}<start_of_turn>user\n{{ end }}{{ .Content }}'
             '<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
             '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
             '{{ if not $last }}<end_of_turn>\n{{ end }}{{- end }}{{- end }}')


def test_modelfile_template_is_extracted(tmp_path):
    g = tmp_path / "m-Q8_0.gguf"
    g.write_bytes(b"GGUF")
    text = ex.modelfile(g, GEMMA_CHAT_TEMPLATE, system="Be brief.").read_text()
    assert gotemplate.modelfile_template(text) == ex.translate(GEMMA_CHAT_TEMPLATE).template
    assert gotemplate.modelfile_template("FROM ./x.gguf\n") is None


def test_family_needs_the_system_prompt_handled_alike():
    # a ChatML-looking template that drops the system message is not translated (Ollama would show it)
    no_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + "
                 "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert ex.template_family(FALLBACK_CHAT_TEMPLATE) == "chatml"
    assert ex.template_family(no_system) is None
    assert ex.template_family(GEMMA3_STYLE) == "gemma"


@needs_go
@pytest.mark.parametrize("family,jinja", FAMILIES, ids=["gemma", "gemma3-style", "chatml", "plain"])
def test_go_renders_every_modelfile_template_like_jinja(tmp_path, family, jinja):
    assert ex.template_family(jinja) == family
    g = tmp_path / "m-f16.gguf"
    g.write_bytes(b"GGUF")
    go_tpl = gotemplate.modelfile_template(ex.modelfile(g, jinja).read_text())
    go_texts = gotemplate.render_go(go_tpl, gotemplate.CONVERSATIONS)
    for msgs, got in zip(gotemplate.CONVERSATIONS, go_texts):
        want = render_template(jinja, msgs, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
        assert got == want.removeprefix("<bos>"), msgs
    ok, detail = gotemplate.compare_with_jinja(go_tpl, jinja, bos_token="<bos>")
    assert ok is True, detail


@needs_go
def test_go_matches_the_tokenizers_own_rendering(tiny_tokenizer_dir):
    """The reference is the tokenizer's chat_template as transformers renders it (apply_chat_template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for jinja in (GEMMA3_STYLE, FALLBACK_CHAT_TEMPLATE):
        tok.chat_template = jinja
        family = ex.template_family(jinja)
        assert family in ("gemma", "chatml")
        go_texts = gotemplate.render_go(ex.translate(jinja).template, gotemplate.CONVERSATIONS)
        for msgs, got in zip(gotemplate.CONVERSATIONS, go_texts):
            want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            if tok.bos_token:
                want = want.removeprefix(tok.bos_token)
            assert got == want


@needs_go
def test_the_old_gemma_template_bug_is_caught():
    """No system prompt: the first user turn had no header; with one: two headers. The comparison says so."""
    no_sys, with_sys = gotemplate.render_go(OLD_GEMMA, gotemplate.CONVERSATIONS[:2])
    assert not no_sys.startswith("<start_of_turn>user\n")
    assert with_sys.count("<start_of_turn>user\n") == 2
    ok, detail = gotemplate.compare_with_jinja(OLD_GEMMA, GEMMA_CHAT_TEMPLATE, bos_token="<bos>")
    assert ok is False and "conversation 1 (without a system prompt, 1 user turn(s)) differs" in detail


@needs_go
def test_go_errors_are_reported():
    with pytest.raises(Exception, match="does not parse"):
        gotemplate.render_go("{{ if }}", [[{"role": "user", "content": "x"}]])
    ok, detail = gotemplate.compare_with_jinja("{{ index .Messages 9 }}", GEMMA_CHAT_TEMPLATE)
    assert ok is False and "Go cannot render" in detail


def test_without_go_the_check_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setenv("MACTUNER_GO", "/nonexistent/go")
    ok, detail = gotemplate.compare_with_jinja(ex.translate(GEMMA_CHAT_TEMPLATE).template, GEMMA_CHAT_TEMPLATE)
    assert ok is None and "golang-go" in detail


@needs_go
def test_validation_row_modelfile_template(tmp_path):
    """The export validation's "Modelfile template" row: pass for a generated Modelfile, fail for the old Gemma one,
    fail (with the reason and what Ollama does instead) when the template could not be translated."""
    from pipelines.export.validate import _modelfile_item

    g = tmp_path / "m-Q4_K_M.gguf"
    g.write_bytes(b"GGUF")
    specials = {"bos_token": "<bos>", "eos_token": "<eos>"}
    assert _modelfile_item(g, GEMMA_CHAT_TEMPLATE, specials).ok is None  # no Modelfile yet
    ex.modelfile(g, GEMMA_CHAT_TEMPLATE)
    item = _modelfile_item(g, GEMMA_CHAT_TEMPLATE, specials)
    assert item.name == "modelfile_template" and item.ok is True, item.detail
    mf = g.with_name("m-Q4_K_M.Modelfile")
    mf.write_text(f'FROM ./m-Q4_K_M.gguf\nTEMPLATE """{OLD_GEMMA}"""\n')
    item = _modelfile_item(g, GEMMA_CHAT_TEMPLATE, specials)
    assert item.ok is False and "differs" in item.detail
    ex.modelfile(g.with_name("n-Q4_K_M.gguf"), "{{ messages[0]['content'] }}")
    item = _modelfile_item(g.with_name("n-Q4_K_M.gguf"), "{{ messages[0]['content'] }}", specials)
    assert item.ok is False and "not translated: its turns" in item.detail and "Ollama will use" in item.detail
