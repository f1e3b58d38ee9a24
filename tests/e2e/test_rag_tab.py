"""Browser test of the RAG tab: create a knowledge base, upload two PDFs, watch the ingest's progress, reload the page
mid-ingest (it re-attaches), see what a question will cost, ask it, watch the answer stream and where its wait went,
open a citation on the right page's passage;
a scanned PDF is refused with its reason and nothing else is lost."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio
from rag_docs import image_only_pdf, topic_pdf

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    proc, url = start_studio(tmp_path_factory.mktemp("e2e-rag") / "ws")
    yield url
    stop_studio(proc)


def pick(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").fill(value)
    page.locator(f"#{elem_id} input").press("Enter")


def test_knowledge_base_ingest_reload_ask_and_cite(studio, browser, tmp_path):
    from playwright.sync_api import expect

    a = topic_pdf(tmp_path / "topics-a.pdf", repeat=40)  # 240 pages: long enough to reload while it runs
    b = topic_pdf(tmp_path / "topics-b.pdf", repeat=8)
    page = new_page(browser, studio, "RAG", timeout_ms=120_000)
    page.locator("#rag-new-name textarea, #rag-new-name input").first.fill("docs-kb")
    page.locator("#rag-create").click()
    expect(page.locator("#rag-msg")).to_contain_text("Created docs-kb")
    page.locator("#rag-files input[type=file]").set_input_files([str(a), str(b)])
    page.locator("#rag-add").click()
    expect(page.locator("#rag-msg")).to_contain_text("Adding 2 document(s)")
    expect(page.locator("#rag-progress")).to_contain_text(re.compile(r"embedding \d+/\d+ chunks"))
    page.reload()
    page.get_by_role("tab", name="RAG").click()
    expect(page.locator("#rag-job")).to_contain_text("running")  # re-attached to the job from its folder
    expect(page.locator("#rag-job")).to_contain_text("finished", timeout=300_000)
    expect(page.locator("#rag-job")).to_contain_text("2 document(s) added (288 pages")
    expect(page.locator("#rag-kbs")).to_contain_text("docs-kb")
    pick(page, "rag-kb", "docs-kb")
    expect(page.locator("#rag-docs")).to_contain_text("topics-b.pdf")
    page.locator("#rag-question textarea").fill("Why does bread rise?")
    # what the question will cost shows before it is asked
    expect(page.locator("#rag-cost")).to_contain_text(re.compile(r"≈ [\d,]+ prompt tokens: instructions \d+"))
    page.locator("#rag-ask").click()
    expect(page.locator("#rag-speed")).to_contain_text("tok/s")
    expect(page.locator("#rag-speed")).to_contain_text(re.compile("done|length limit"))
    expect(page.locator("#rag-speed")).to_contain_text(re.compile(r"prompt [\d,]+ tokens · .*read by the model"))
    # once answered, the model's reading speed is known: the estimate says how long the next question takes
    expect(page.locator("#rag-cost")).to_contain_text(re.compile(r"≈ [\d.]+ s to read at \d+ tokens/s"))
    expect(page.locator("#rag-passages")).to_contain_text("topics-")
    page.locator("#rag-cites label").first.click()
    expect(page.locator("#rag-passage")).to_contain_text(re.compile(r"topics-[ab]\.pdf, page \d+"))
    expect(page.locator("#rag-passage")).to_contain_text("Bread rises")
    page.screenshot(path=str(tmp_path / "rag-tab.png"), full_page=True)


def test_a_scanned_pdf_is_refused_with_its_reason(studio, browser, tmp_path):
    from playwright.sync_api import expect

    scan = image_only_pdf(tmp_path / "scanned.pdf")
    page = new_page(browser, studio, "RAG", timeout_ms=120_000)
    pick(page, "rag-kb", "docs-kb")
    page.locator("#rag-files input[type=file]").set_input_files([str(scan)])
    page.locator("#rag-add").click()
    expect(page.locator("#rag-job")).to_contain_text("finished", timeout=120_000)
    expect(page.locator("#rag-job")).to_contain_text("no text layer")
    expect(page.locator("#rag-kbs")).to_contain_text("docs-kb")
    expect(page.locator("#rag-docs")).not_to_contain_text("scanned.pdf")
    page.locator("#rag-question textarea").fill("   ")
    page.locator("#rag-search").click()
    expect(page.locator(".toast-body").filter(has_text="Type a question").first).to_be_visible()
