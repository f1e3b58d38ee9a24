"""Browser test of the Export tab: pick a model from the list, check the plan, export (f16 + Q8_0, validated) in its
own process, reload the page mid-export and see it re-attach, read the validation table and the Modelfile, open the
GGUF in the Chat tab and chat with it; bad input (nothing picked, a name already taken) gets a clear message."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, spm_llama_dir):
    root = tmp_path_factory.mktemp("e2e-export") / "ws"
    shutil.copytree(spm_llama_dir, root / "models" / "tiny-spm")
    proc, url = start_studio(root, args=["--no-default"])
    yield url, root
    stop_studio(proc)


def toast(page, text):
    from playwright.sync_api import expect

    expect(page.locator(".toast-body").filter(has_text=text).first).to_be_visible()


def test_export_then_chat(studio, browser):
    from playwright.sync_api import expect

    url, root = studio
    page = new_page(browser, url, "Export")
    page.locator("#export-start").click()
    toast(page, "Choose what to export")
    page.locator("#export-source input").click()
    page.get_by_role("option", name="HF model · tiny-spm").click()
    page.locator("#export-name textarea").fill("tiny-e2e")
    # Q8_0 is the default quantization (it keeps a small fine-tune; Q4_K_M lost it in bench figures)
    expect(page.locator("#export-quants").get_by_label("Q8_0", exact=True)).to_be_checked()
    expect(page.locator("#export-quants").get_by_label("Q4_K_M", exact=True)).not_to_be_checked()
    page.locator("#export-check").click()
    expect(page.locator("#export-plan")).to_contain_text("Ready to export tiny-e2e")
    expect(page.locator("#export-plan")).to_contain_text("LlamaForCausalLM")
    page.locator("#export-start").click()
    expect(page.locator("#export-plan")).to_contain_text("Started export tiny-e2e")
    expect(page.locator("#export-job")).to_contain_text("run tiny-e2e")
    # a refreshed page finds the job again from the workspace (running, or already done on a fast machine)
    page.reload()
    page.get_by_role("tab", name="Export").click()
    expect(page.locator("#export-job")).to_contain_text("run tiny-e2e")
    # "✅ finished", or "⚠️ done — N check(s) failed: ..." (a random tiny model may well fail the generation check)
    expect(page.locator("#export-job")).to_contain_text(re.compile("finished|⚠️ done"), timeout=300_000)
    expect(page.locator("#export-list")).to_contain_text("tiny-e2e")
    page.locator('#export-list [role="gridcell"]').filter(has_text="tiny-e2e").first.click()
    expect(page.locator("#export-summary")).to_contain_text("tiny-e2e · complete")
    expect(page.locator("#export-table")).to_contain_text("HF (merged)")
    expect(page.locator("#export-table")).to_contain_text("tiny-e2e-Q8_0.gguf")
    expect(page.locator("#export-checks")).to_contain_text("Modelfile template")
    expect(page.locator("#export-checks")).to_contain_text("chat template")
    expect(page.locator("#export-gguf input")).to_have_value(re.compile(r"^tiny-e2e-Q8_0\.gguf"))
    expect(page.locator("#export-modelfile")).to_contain_text("FROM ./tiny-e2e-Q8_0.gguf")
    expect(page.locator("#export-run")).to_contain_text("ollama create tiny-e2e-q8_0")
    assert (root / "exports" / "tiny-e2e" / "export.json").is_file()
    # the same name again is refused before any work
    page.locator("#export-source input").click()
    page.get_by_role("option", name="HF model · tiny-spm").click()
    page.locator("#export-name textarea").fill("tiny-e2e")
    page.locator("#export-start").click()
    toast(page, "already exists")
    # open the exported GGUF in the Chat tab and talk to it
    page.locator("#export-open-chat").click()
    expect(page.locator("#export-chat-msg")).to_contain_text("Loaded tiny-e2e-Q8_0")
    expect(page.locator("#chat-model input")).to_have_value("tiny-e2e-Q8_0")
    page.locator("#chat-max-new input").first.fill("12")
    page.locator("#chat-max-new input").first.press("Enter")
    page.locator("#chat-input textarea").fill("Hello, how are you today?")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text(re.compile(r"tiny-e2e-Q8_0 · \d+ tokens .*(done|length limit)"))
    page.close()
