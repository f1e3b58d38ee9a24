"""Browser test: `mactuner studio` in a subprocess, driven by headless Debian Chromium through Playwright.

Opens the studio, checks that the embedded default model is loaded and described, unloads and reloads it, reads
the memory estimate, tries bad input, and picks a local model from the table. A screenshot of the Model tab is
left in the test's tmp folder (and written to assets/screenshot.png when MACTUNER_UPDATE_SCREENSHOT=1).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from e2e_helpers import CHROMIUM, ROOT, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (scripts/setup.sh test installs it)")]


@pytest.fixture(scope="module")
def hub(tiny_llama_dir):
    """A local stand-in for the Hub serving the tiny llama as tiny/llama (see tests/fakehub.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fakehub import FakeHub

    with FakeHub() as h:
        h.add_repo("tiny/llama", {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()},
                   downloads=42, likes=5, license="mit")
        yield h


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory, hub):
    root = tmp_path_factory.mktemp("e2e") / "ws"
    proc, url = start_studio(root, {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    yield url
    stop_studio(proc)


@pytest.fixture(scope="module")
def page(studio_url, browser):
    pg = new_page(browser, studio_url)
    yield pg
    pg.close()


def test_model_tab_shows_default_model(page, tmp_path):
    from playwright.sync_api import expect

    current = page.locator("#current-model")
    expect(current).to_contain_text("gemma-3-270m (embedded default)")
    expect(current).to_contain_text("gemma3")
    expect(current).to_contain_text("Q4_K_M")
    expect(current).to_contain_text("llama.cpp")
    expect(page.locator("#header")).to_contain_text("gemma-3-270m")
    expect(page.locator("#header")).to_contain_text("memory")
    expect(page.locator("#device-profile")).to_contain_text("Training dtype")
    expect(page.locator("#estimate-table")).to_contain_text("Inference (GGUF Q4_K_M)")
    expect(page.locator("#estimate-advice")).to_contain_text("recommended batch size")
    expect(page.locator("#local-models")).to_contain_text("embedded default")
    shot = tmp_path / "model-tab.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MACTUNER_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "assets" / "screenshot.png")


def test_unload_and_reload(page):
    from playwright.sync_api import expect

    page.locator("#unload").click()
    expect(page.locator("#model-status")).to_contain_text("Unloaded")
    expect(page.locator("#current-model")).to_contain_text("No model is loaded")
    page.locator("#load-default").click()
    expect(page.locator("#model-status")).to_contain_text("Loaded")
    expect(page.locator("#current-model")).to_contain_text("Q4_K_M")


def test_bad_inputs_give_clear_messages(page):
    from playwright.sync_api import expect

    page.locator("#local-path textarea, #local-path input").first.fill("/no/such/model")
    page.locator("#local-load").click()
    expect(page.locator(".toast-body").filter(has_text="no such file or folder").first).to_be_visible()
    page.locator("#hub-id textarea, #hub-id input").first.fill("not a valid id!")
    page.locator("#hub-info-btn").click()
    expect(page.locator(".toast-body").filter(has_text="not a valid Hub model id").first).to_be_visible()
    # the model loaded before is still the current one
    expect(page.locator("#current-model")).to_contain_text("Q4_K_M")


def test_pick_local_model_from_table(page):
    from playwright.sync_api import expect

    page.locator('#local-models [role="gridcell"]').filter(has_text="embedded default").first.click()
    box = page.locator("#local-path textarea, #local-path input").first
    expect(box).to_have_value(__import__("re").compile(r".*gemma-3-270m-q4_k_m\.gguf$"))


def test_hub_info_then_download_and_load(page, hub):
    from playwright.sync_api import expect

    page.locator("#hub-id textarea, #hub-id input").first.fill("tiny/llama")
    page.locator("#hub-info-btn").click()
    info = page.locator("#hub-info")
    expect(info).to_contain_text("tiny/llama")
    expect(info).to_contain_text("mit")
    expect(info).to_contain_text("safetensors")
    expect(page.locator("#hub-files")).to_contain_text("model.safetensors")
    assert not hub.downloaded("tiny/llama")  # info downloads nothing
    page.locator("#hub-download-btn").click()
    expect(page.locator("#model-status")).to_contain_text("Downloaded", timeout=120_000)
    expect(page.locator("#current-model")).to_contain_text("LlamaForCausalLM")
    expect(page.locator("#local-models")).to_contain_text("hf-cache")
    assert "model.safetensors" in hub.downloaded("tiny/llama")
    page.locator("#load-default").click()
    expect(page.locator("#current-model")).to_contain_text("Q4_K_M")
