"""The Data tab's EDA handler called directly: when the model's chat template cannot show an example's replies, the
preview note says why and the rest of the panel (charts, stats) still updates."""

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
    s = hd.open_sample(ctx, hd.DataSession())[0]
    summary, len_fig, stats, turns, roles, preview_html, message = hd.explore(ctx, s, 512, 0)
    assert note in message
    assert len_fig is not None and stats is not None and summary is not None
    assert ("mt-trained" in preview_html) == (template is None)
