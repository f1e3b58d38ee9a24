"""Browser test of the Data tab: open the sample, see the mapping, clean it step by step (and undo), look at the
charts and the template preview, save a version, see it listed; bad files give clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-data") / "ws"
    proc, url = start_studio(root)
    yield url, root
    stop_studio(proc)


@pytest.fixture(scope="module")
def page(studio, browser):
    pg = new_page(browser, studio[0], "Data")
    yield pg
    pg.close()


def toast(page, text):
    from playwright.sync_api import expect

    expect(page.locator(".toast-body").filter(has_text=text).first).to_be_visible()


def test_sample_clean_explore_save(page, studio, tiny_llama_dir, tmp_path):
    from playwright.sync_api import expect

    url, root = studio
    page.locator("#data-sample").click()
    expect(page.locator("#data-info")).to_contain_text("60 rows × 3 columns")
    expect(page.locator("#data-message")).to_contain_text("alpaca")
    expect(page.locator("#data-table")).to_contain_text("instruction")
    # the default model's tokenizer is not prepared in this workspace: the length filter says what to do
    page.locator("#clean-length").click()
    toast(page, "Token counts need a tokenizer")
    page.locator("#clean-missing").click()
    expect(page.locator("#clean-history")).to_contain_text("60 -> 58 rows (2 removed)")
    page.locator("#clean-dups").click()
    expect(page.locator("#clean-history")).to_contain_text("58 -> 54 rows (4 removed)")
    page.locator("#clean-undo").click()
    expect(page.locator("#clean-history")).not_to_contain_text("duplicates")
    expect(page.locator("#data-info")).to_contain_text("58 rows")
    page.locator("#clean-dups").click()
    expect(page.locator("#data-info")).to_contain_text("54 rows")
    # a tokenizer arrives with an HF model: load the tiny llama, then filter by tokens and explore
    r = requests.post(f"{url}/api/model/load", json={"path": str(tiny_llama_dir)}, timeout=120)
    assert r.status_code == 200, r.text
    page.locator("#clean-length").click()
    expect(page.locator("#clean-history")).to_contain_text("token length")
    page.locator("#data-explore").click()
    expect(page.locator("#eda-summary")).to_contain_text("instruction")
    expect(page.locator("#eda-preview-note")).to_contain_text("tokens trained")
    expect(page.locator("#eda-lengths .js-plotly-plot").first).to_be_visible()
    expect(page.locator("#eda-roles .js-plotly-plot").first).to_be_visible()
    expect(page.locator("#eda-preview .mt-trained").first).to_be_visible()
    expect(page.locator("#eda-preview .mt-masked").first).to_be_visible()
    page.screenshot(path=str(tmp_path / "data-tab.png"), full_page=True)
    page.locator("#save-name textarea, #save-name input").first.fill("bad name!")
    page.locator("#save-dataset").click()
    toast(page, "name")
    page.locator("#save-name textarea, #save-name input").first.fill("sample-clean")
    page.locator("#save-dataset").click()
    expect(page.locator("#save-message")).to_contain_text("Saved sample-clean v1")
    expect(page.locator("#datasets-table")).to_contain_text("sample-clean")
    page.locator("#save-dataset").click()
    expect(page.locator("#save-message")).to_contain_text("Saved sample-clean v2")  # never overwrites
    v1 = root / "datasets" / "sample-clean" / "v1"
    assert (v1 / "train.jsonl").exists() and (v1 / "meta.json").exists()
    lines = (v1 / "train.jsonl").read_text().splitlines() + (v1 / "validation.jsonl").read_text().splitlines()
    assert 0 < len(lines) <= 54


def upload(page, path):
    with page.expect_file_chooser() as fc:
        page.locator("#data-upload button.upload-container").click()
    fc.value.set_files(str(path))


def test_bad_files_give_messages_and_keep_work(page, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "table.csv"
    bad.write_bytes(b"\x00\x01\x02PK\x03\x04" * 200)
    upload(page, bad)
    toast(page, "table.csv")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    page.locator("#data-upload button[aria-label='Clear']").click()
    upload(page, empty)
    toast(page, "empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n')
    page.locator("#data-upload button[aria-label='Clear']").click()
    upload(page, broken)
    toast(page, "line 2")
    # the table opened before is still there
    expect(page.locator("#data-info")).to_contain_text("sample_dataset.jsonl")
