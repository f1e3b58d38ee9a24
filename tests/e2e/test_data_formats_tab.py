"""Browser test of the Data tab on other tools' dataset shapes (tests/data_fixtures.py): each refused kind gives one
clear message, leaves the page as it was and saves nothing; preference data is named as such and can be kept as
SFT; rows left out are counted before saving; a Korean cp949 CSV reads as Korean, with the encoding shown and
overridable; placeholders can be filled; the picker of a fresh page lists earlier uploads, kept once each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import data_fixtures as fx
from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-formats") / "ws"
    proc, url = start_studio(root)
    yield url, root
    stop_studio(proc)


@pytest.fixture(scope="module")
def page(studio, browser):
    pg = new_page(browser, studio[0], "Data")
    yield pg
    pg.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixtures")
    return {w.__name__: w(d) for w in fx.EXPECTED}


def upload(page, path):
    if page.locator("#data-upload button[aria-label='Clear']").count():
        page.locator("#data-upload button[aria-label='Clear']").click()
    with page.expect_file_chooser() as fc:
        page.locator("#data-upload button.upload-container").click()
    fc.value.set_files(str(path))


def error_pills(page) -> int:
    return page.locator(".error").filter(has_text="Error").count()


def saved(root: Path) -> list[str]:
    d = root / "datasets"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []


def test_refused_kinds_keep_the_page_and_save_nothing(page, studio, files):
    from playwright.sync_api import expect

    _url, root = studio
    page.locator("#data-sample").click()
    expect(page.locator("#data-info")).to_contain_text("sample_dataset.jsonl")
    for name in ("images", "image_parts"):
        upload(page, files[name])
        expect(page.locator("#data-message")).to_contain_text("text models")
        expect(page.locator("#data-info")).to_contain_text("sample_dataset.jsonl")  # the last good state
        assert error_pills(page) == 0
    page.locator("#save-name textarea, #save-name input").first.fill("should-not-exist")
    assert saved(root) == []


def test_preference_data_is_named_and_kept_as_sft(page, studio, files):
    from playwright.sync_api import expect

    _url, root = studio
    upload(page, files["sharegpt_preference"])
    expect(page.locator("#data-check")).to_contain_text("300 rows → 300 usable (preference pairs")
    expect(page.locator("#data-check")).to_contain_text("preference data")
    expect(page.locator("#save-as")).to_be_visible()
    page.locator("#save-as label").filter(has_text="chosen answers as SFT").click()
    page.locator("#save-name textarea, #save-name input").first.fill("dpo-as-sft")
    page.locator("#save-dataset").click()
    expect(page.locator("#save-message")).to_contain_text("Saved dpo-as-sft v1")
    meta = json.loads((root / "datasets" / "dpo-as-sft" / "v1" / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["counts"]["total"] == 300 and meta["conversion"]["kind"] == "preference"
    expect(page.locator("#datasets-table")).to_contain_text("dpo-as-sft")


def test_rows_left_out_are_counted_before_saving(page, files):
    from playwright.sync_api import expect

    upload(page, files["sharegpt_tools"])
    check = page.locator("#data-check")
    expect(check).to_contain_text("7 rows → 6 usable")
    expect(check).to_contain_text("1 have a function_call that is not JSON with a name (row 6)")
    expect(check).to_contain_text("tool calls")
    page.locator("#map-format input").fill("alpaca")  # a mapping that does not fit is refused, the page kept
    page.locator("#map-format input").press("Enter")
    page.locator("#map-apply").click()
    expect(page.locator("#data-message")).to_contain_text("needs a column")
    expect(check).to_contain_text("7 rows → 6 usable")
    assert error_pills(page) == 0


def test_korean_csv_encoding_shown_and_overridable(page, files):
    from playwright.sync_api import expect

    upload(page, files["korean_cp949"])
    expect(page.locator("#data-info")).to_contain_text("encoding cp949")
    expect(page.locator("#data-table")).to_contain_text(fx.KOREAN[0][1])
    page.locator("#data-encoding input").fill("latin-1")
    page.locator("#data-encoding input").press("Enter")
    page.locator("#data-open").click()
    expect(page.locator("#data-info")).to_contain_text("encoding latin-1")
    expect(page.locator("#data-table")).not_to_contain_text(fx.KOREAN[0][1])


def test_placeholders_filled_before_saving(page, studio, files):
    from playwright.sync_api import expect

    _url, root = studio
    page.locator("#data-encoding input").fill("auto")
    page.locator("#data-encoding input").press("Enter")
    upload(page, files["identity"])
    expect(page.locator("#data-check")).to_contain_text("{{name}}")
    box = page.locator("#save-placeholders textarea, #save-placeholders input").first
    expect(box).to_be_visible()
    box.fill("name=Lumen, author=the MacTuner team")
    page.locator("#save-name textarea, #save-name input").first.fill("identity")
    page.locator("#save-dataset").click()
    expect(page.locator("#save-message")).to_contain_text("Saved identity v1")
    v1 = root / "datasets" / "identity" / "v1"
    text = (v1 / "train.jsonl").read_text() + (v1 / "validation.jsonl").read_text()
    assert "I am Lumen, an assistant made by the MacTuner team." in text and "{{" not in text


def test_fresh_page_lists_earlier_uploads_once(studio, browser, files):
    from playwright.sync_api import expect

    url, root = studio
    pg = new_page(browser, url, "Data")
    upload(pg, files["kto"])
    expect(pg.locator("#data-check")).to_contain_text("labelled undesirable")
    upload(pg, files["kto"])  # the same file again: reused, not copied
    expect(pg.locator("#data-info")).to_contain_text("kto_labels.jsonl")
    pg.close()
    uploads = sorted(p.name for p in (root / "datasets" / ".uploads").iterdir())
    assert uploads.count("kto_labels.jsonl") == 1 and not any(n.startswith("kto_labels-") for n in uploads)
    pg = new_page(browser, url, "Data")
    pg.locator("#data-pick input").click()
    expect(pg.locator("ul[role='listbox']")).to_contain_text("kto_labels.jsonl")
    pg.close()
