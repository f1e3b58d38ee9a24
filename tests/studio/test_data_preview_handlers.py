"""The Data tab's handlers called directly: when the model's chat template cannot show an example's replies, the EDA
preview note says why and the rest of the panel (charts, stats) still updates; a refused action leaves the page's
panel as it was with one message, and is an error for a script."""

from __future__ import annotations

import copy

import pytest
from chat_families import family_tokenizer

from pipelines import data

NO_REPLIES = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def ctx(workspace):
    from pipelines.serving.registry import ModelRegistry
    from studio.handlers.common import Context

    return Context(workspace, ModelRegistry(), prepare_hf=False)


@pytest.mark.parametrize("template,note", [(None, "tokens trained"),
                                           (NO_REPLIES, "cannot be previewed: Assistant reply 1 could not be located")])
def test_preview_note_says_why_and_the_charts_still_come(ctx, monkeypatch, template, note):
    from studio.handlers import data as hd

    tok = copy.copy(family_tokenizer("mistral_v3"))
    tok.chat_template = template or tok.chat_template
    monkeypatch.setattr(hd, "tokenizer_counter", lambda _ctx: data.TokenCounter(tok))
    handlers = hd.DataHandlers(ctx)
    s = handlers.open_sample(hd.DataSession()).session
    eda = handlers.explore(s, 512, 0)
    assert note in eda.note
    assert eda.lengths is not None and eda.stats is not None and eda.summary is not None
    assert ("mt-trained" in eda.preview) == (template is None)


def test_a_refused_action_keeps_the_page_and_fails_a_script(ctx):
    from types import SimpleNamespace

    import gradio as gr

    from studio.handlers import data as hd

    handlers = hd.DataHandlers(ctx)
    page = SimpleNamespace(headers={}, session_hash="page-1")
    view = handlers.clean_normalize(hd.DataSession(), page)  # nothing loaded yet
    assert view.message == "⚠️ Load a file first (upload one, pick one, or try the sample)."
    assert all(value == gr.skip() for name, value in view._asdict().items() if name != "message")
    script = SimpleNamespace(headers={"x-gradio-user": "api"}, session_hash="script")
    with pytest.raises(gr.Error, match="Load a file first"):
        handlers.clean_normalize(hd.DataSession(), script)
    saved = handlers.save(hd.DataSession(), "name", 0.1, 0, request=page)  # the message is the view's first field
    assert saved.message.startswith("⚠️ Load a file first") and saved.datasets == gr.skip()
