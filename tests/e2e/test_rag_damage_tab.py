"""Browser test of a damaged knowledge base (issue 23): the list marks it damaged with the reason while the other
one answers searches; using it says it is damaged; Rebuild makes it again from its kept documents, followed as an
ingest; a document of the other is removed from its dropdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio
from rag_docs import topic_pdf

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from pipelines import rag
    from pipelines.workspace import Workspace

    docs = tmp_path_factory.mktemp("docs")
    notes = docs / "notes.md"
    notes.write_text("# Setup\n\nPlug the router into the wall socket and wait for the green light.\n")
    faq = docs / "faq.md"
    faq.write_text("# Lights\n\nA blinking orange light means the router is updating itself.\n")
    pdf = topic_pdf(docs / "topics.pdf")
    ws = Workspace.open(tmp_path_factory.mktemp("e2e-rag-damage") / "ws")
    for name, files in (("fine", [pdf, notes, faq]), ("broken", [pdf, notes])):
        rag.create(ws, name)
        rag.ingest(ws, name, files)
    (ws.rag / "broken" / "kb.sqlite").write_bytes(b"not a database " * 100)
    proc, url = start_studio(ws.root, args=["--no-default"])
    yield url
    stop_studio(proc)


def pick(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").fill(value)
    page.locator(f"#{elem_id} input").press("Enter")


def test_damaged_kb_is_marked_refused_rebuilt_and_the_other_works(studio, browser, tmp_path):
    from playwright.sync_api import expect

    page = new_page(browser, studio, "RAG", timeout_ms=120_000)
    expect(page.locator("#rag-kbs")).to_contain_text("⚠️ damaged")
    expect(page.locator("#rag-kbs")).to_contain_text("damaged (file is not a database)")
    pick(page, "rag-kb", "fine")
    expect(page.locator("#rag-docs")).to_contain_text("notes.md")
    page.locator("#rag-question textarea").fill("Why does bread rise?")
    page.locator("#rag-search").click()
    expect(page.locator("#rag-passages")).to_contain_text("topics.pdf")
    pick(page, "rag-kb", "broken")
    page.locator("#rag-search").click()
    expect(page.locator(".toast-body").filter(has_text="'broken' is damaged").first).to_be_visible()
    page.get_by_text("Delete or rebuild this knowledge base").click()
    page.locator("#rag-rebuild").click()
    expect(page.locator("#rag-msg")).to_contain_text("Rebuilding broken from the 2 document(s)")
    expect(page.locator("#rag-job")).to_contain_text("finished", timeout=180_000)
    expect(page.locator("#rag-job")).to_contain_text("2 document(s) added")
    expect(page.locator("#rag-kbs")).not_to_contain_text("damaged")
    page.locator("#rag-search").click()
    expect(page.locator("#rag-passages")).to_contain_text("topics.pdf")
    pick(page, "rag-kb", "fine")
    # faq.md is fine's alone: once it shows, the pick's update (which also clears the document picker) has landed
    expect(page.locator("#rag-docs")).to_contain_text("faq.md")
    pick(page, "rag-doc", "notes.md")
    page.locator("#rag-remove").click()
    expect(page.locator("#rag-msg")).to_contain_text("Removed notes.md")
    expect(page.locator("#rag-docs")).not_to_contain_text("notes.md")  # the list follows
    page.screenshot(path=str(tmp_path / "rag-damage.png"), full_page=True)
