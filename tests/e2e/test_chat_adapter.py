"""Browser test of the fine-tune one click away: with the embedded GGUF loaded, the Chat tab says it is a base model;
the Adapter menu lists every run's adapter and checkpoint; choosing one loads the adapter's base model (the tiny
llama, which was not made from a GGUF, takes it with PEFT) with it attached, says so, and the chat answers with it; the journey bar shows where
the user is; the quick start trains a run (shown in the run history) and opens the chat with its adapter."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio
from tiny_models import make_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_llama_dir):
    from pipelines.training import COMPLETE_MARKER, TrainConfig

    root = tmp_path_factory.mktemp("e2e-chat-adapter") / "ws"
    for name in ("tiny-run", "tiny-run-2"):
        run = root / "runs" / name
        make_adapter(tiny_llama_dir, run / "adapter", seed=len(name))
        if name == "tiny-run":  # a checkpoint too
            ck = make_adapter(tiny_llama_dir, run / "checkpoints" / "step-2", seed=7)
            (ck / COMPLETE_MARKER).write_text("")
            (ck / "trainer_state.json").write_text('{"step": 2}')
        TrainConfig(base_model=str(tiny_llama_dir), dataset="chat").to_yaml(run / "config.yaml")
    # the quick start trains the default model's HF copy: the tiny llama stands in for it
    shutil.copytree(tiny_llama_dir, root / "models" / "default" / "hf")
    proc, url = start_studio(root)
    yield url, root
    stop_studio(proc)


@pytest.fixture(scope="module")
def page(studio, browser):
    pg = new_page(browser, studio[0], "Chat", timeout_ms=90_000, height=1500)
    yield pg
    pg.close()


def test_journey_bar_and_base_model_note(page):
    from playwright.sync_api import expect

    expect(page.locator("#journey")).to_contain_text("1. Model")
    expect(page.locator("#journey")).to_contain_text("5. Export")
    expect(page.locator("#journey")).to_contain_text("Next:")
    expect(page.locator("#quick-start")).to_be_visible()
    expect(page.locator("#chat-model input")).to_have_value(re.compile("gemma-3-270m"))
    expect(page.locator("#chat-model-note")).to_contain_text("is a base model")


def test_choosing_a_run_adapter_loads_its_base_and_answers(page, studio, tmp_path):
    from playwright.sync_api import expect

    page.locator("#chat-adapter input").click()
    options = page.locator("ul[role=listbox] li")
    expect(options.filter(has_text="tiny-run · final adapter")).to_have_count(1)
    expect(options.filter(has_text="tiny-run-2 · final adapter")).to_have_count(1)
    expect(options.filter(has_text="tiny-run · step 2")).to_have_count(1)
    options.filter(has_text="tiny-run-2 · final adapter").click()
    note = page.locator("#chat-model-note")
    expect(note).to_contain_text("Answering with", timeout=120_000)
    expect(note).to_contain_text("tiny-llama")
    expect(note).to_contain_text("loaded")
    expect(page.locator("#chat-model input")).to_have_value(re.compile("tiny-llama"))
    expect(page.locator("#chat-adapter input")).to_have_value(re.compile("tiny-run-2"))
    page.locator("#chat-input textarea").fill("hello there")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text("tokens", timeout=120_000)
    expect(page.locator("#chat-speed")).to_contain_text("tiny-run-2")
    page.screenshot(path=str(tmp_path / "chat-adapter.png"), full_page=True)


def test_quick_start_opens_the_chat_with_its_adapter(page, studio, tmp_path):
    from playwright.sync_api import expect

    from pipelines import quickstart

    page.get_by_role("tab", name="Model").click()
    page.locator("#quick-start").click()
    status = page.locator("#quick-start-status")
    expect(status).to_contain_text("quick-start", timeout=120_000)
    expect(status).to_contain_text("finished", timeout=300_000)
    expect(status).not_to_contain_text("**")  # HTML, not Markdown shown raw
    # the page moved to the Chat tab, with the run's adapter on the default model's HF copy, a question ready
    expect(page.locator("#chat-model-note")).to_contain_text("Fine-tuned", timeout=120_000)
    expect(page.locator("#chat-model input")).to_have_value("gemma-3-270m (HF copy)")
    expect(page.locator("#chat-adapter input")).to_have_value(re.compile("quick-start"))
    expect(page.locator("#chat-input textarea")).to_have_value(quickstart.QUESTION)
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text("gemma-3-270m (HF copy) + quick-start")
    expect(page.locator("#chat-speed")).to_contain_text("seed", timeout=120_000)
    expect(page.locator("#journey")).to_contain_text("1 run(s) finished")
    expect(page.locator("#journey")).to_contain_text("train on your own data")
    page.screenshot(path=str(tmp_path / "quick-start.png"), full_page=True)
    # the run is in the run history like any other
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-history")).to_contain_text("quick-start")
    # and the monitor follows it, not the run this page showed before the quick start
    expect(page.locator("#train-run input")).to_have_value(re.compile("^quick-start"))
    expect(page.locator("#train-status")).to_contain_text("quick-start")
    expect(page.locator("#train-status")).to_contain_text("finished")
