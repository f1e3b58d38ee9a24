"""The Chat tab's handlers for the fine-tune one click away, called directly: the Adapter menu lists the attached
adapters and every run's adapter and checkpoint; choosing one on disk loads its base model and attaches it; the note
on base models; the template's source shown whole (escaped); the journey bar's text."""

from __future__ import annotations

import pytest
from tiny_models import make_adapter

from pipelines import chat


@pytest.fixture
def ctx(tmp_path, tiny_llama_dir):
    from pipelines.serving.registry import ModelRegistry
    from pipelines.training import COMPLETE_MARKER, TrainConfig
    from pipelines.workspace import Workspace
    from studio.handlers.common import Context

    ws = Workspace.open(tmp_path / "ws")
    run = ws.runs / "tiny-run"
    make_adapter(tiny_llama_dir, run / "adapter", seed=1)
    ck = make_adapter(tiny_llama_dir, run / "checkpoints" / "step-3", seed=2)
    (ck / COMPLETE_MARKER).write_text("")
    (ck / "trainer_state.json").write_text('{"step": 3}')
    TrainConfig(base_model=str(tiny_llama_dir), dataset="chat").to_yaml(run / "config.yaml")
    c = Context(ws, ModelRegistry(), prepare_hf=False)
    yield c
    for n in c.registry.names():
        c.registry.unload(n)


def test_menu_lists_runs_and_choosing_one_loads_its_base(ctx, tiny_llama_dir):
    from studio.handlers import chat as hc

    menu = hc.adapter_menu(ctx, None)
    labels = [label for label, _ in menu]
    assert labels == [hc.BASE, "tiny-run · final adapter", "tiny-run · step 3"]
    value = dict(menu)["tiny-run · final adapter"]
    assert value.startswith(hc.DISK)
    # an adapter not attached yet is refused as a send, with what to do
    with pytest.raises(Exception, match="not attached yet"):
        hc.params_from([None] * 0, value)

    handlers = hc.ChatHandlers(ctx)
    model_up, adapter_up, adapter_b_up, note = handlers.choose_adapter(None, value)
    assert model_up["value"] == "tiny-llama"
    assert "Answering with **tiny-llama** + adapter" in note and "loaded" in note
    attached = adapter_up["value"]
    assert attached in [v for _, v in adapter_up["choices"]]
    assert f"{attached} (attached)" in [label for label, _ in adapter_up["choices"]]
    assert attached in adapter_b_up["choices"]
    lm = ctx.registry.get("tiny-llama")
    assert [a.name for a in chat.list_adapters(lm)] == [attached]
    # the attached adapter is no longer offered a second time from disk
    assert "tiny-run · final adapter" not in [label for label, _ in hc.adapter_menu(ctx, "tiny-llama")]
    # an attached adapter chosen again changes nothing but the note
    again = handlers.choose_adapter("tiny-llama", attached)
    assert again.note == ""  # a fine-tune: no base-model note


def test_base_model_note_and_template_source(ctx, tiny_llama_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from studio.handlers import chat as hc

    lm = ctx.registry.load(str(tiny_llama_dir), ctx.ws)
    assert hc.model_note(ctx, lm.name) == ""  # the tiny llama has a chat template of its own
    # A base model: no chat template, Gemma's turn tokens in its vocabulary (the plain format is used, said why).
    base = tmp_path / "tiny-base"
    shutil.copytree(tiny_llama_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    lm2 = ctx.registry.load(str(base), ctx.ws, replace=False)
    note = hc.model_note(ctx, lm2.name)
    assert "tiny-base is a base model" in note and "Quick start" in note
    assert hc.model_note(ctx, lm2.name, "some-adapter") == ""  # with an adapter: a fine-tune, no note
    source, text = hc.ChatHandlers(ctx).template_info(lm2.name)
    assert "&lt;start_of_turn&gt;, but a base model" in source  # the sentence whole, not cut at a would-be tag
    assert "Assistant:" in text


def test_journey_text(ctx):
    from studio.handlers import journey as hj

    text = hj.journey_md(ctx)
    assert "👉 **1. Model**" in text and "⬜ **5. Export**" in text
    assert "**Next:**" in text
