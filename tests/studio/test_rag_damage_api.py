"""RAG through the Gradio API under damage (issue 23), the way a script calls it: a damaged knowledge base is listed
as damaged and refused by name while another keeps working, then rebuilt (/rag_rebuild) or deleted; /rag_remove
removes a document named by the script (its dropdown is filled by page events only); top-k NaN is a clear message;
a knowledge base is not deleted under its running ingest."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from rag_docs import topic_pdf
from studio_helpers import launch

from pipelines import rag

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from test_rag_damage import _fake_running_ingest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from gradio_client import Client

    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    docs = tmp_path_factory.mktemp("docs")
    notes = docs / "notes.md"
    notes.write_text("# Setup\n\nPlug the router into the wall socket and wait for the green light.\n")
    pdf = topic_pdf(docs / "topics.pdf")
    for name in ("good", "bad"):
        rag.create(ctx.ws, name)
        rag.ingest(ctx.ws, name, [pdf, notes])
    (ctx.ws.rag / "bad" / "kb.sqlite").write_bytes(b"not a database " * 100)
    yield Client(url, verbose=False), ctx
    demo.close()


def _wait(c, job, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = c.predict(job, api_name="/rag_status")
        if st["state"] != "running":
            return st
        time.sleep(0.3)
    raise AssertionError(st)


def test_a_damaged_kb_is_listed_and_refused_by_name_the_other_works(studio):
    c, _ctx = studio
    listed = {k["name"]: k for k in c.predict(api_name="/rag_list")}
    assert listed["bad"]["damaged"] == "file is not a database" and listed["good"]["documents"] == 2
    for args, api in ((("bad",), "/rag_documents"), (("bad", "bread", 3, "hybrid"), "/rag_retrieve"),
                      (("bad", "bread", 3, "hybrid"), "/rag_search"), (("bad", "notes.md"), "/rag_remove")):
        with pytest.raises(Exception, match="'bad' is damaged \\(kb.sqlite: file is not a database\\)"):
            c.predict(*args, api_name=api)
    hits = c.predict("good", "why does bread rise", 1, "hybrid", api_name="/rag_retrieve")
    assert hits[0]["page"] == 2
    _picker, table, _msg = c.predict("good-2", "", 200, 40, api_name="/rag_create")  # creating still works
    row = {r[0]: r for r in table["data"]}["bad"]
    assert "damaged (file is not a database)" in row[-1]


def test_a_damaged_kb_is_rebuilt_from_a_script(studio):
    c, ctx = studio
    msg, job, _table = c.predict("bad", api_name="/rag_rebuild")
    assert "Rebuilding **bad** from the 2 document(s)" in msg and job
    assert _wait(c, job)["state"] == "finished"
    assert sorted(d["name"] for d in c.predict("bad", api_name="/rag_documents")) == ["notes.md", "topics.pdf"]
    assert c.predict("bad", "why does bread rise", 1, "hybrid", api_name="/rag_retrieve")[0]["page"] == 2
    with pytest.raises(Exception, match="not damaged"):
        c.predict("bad", api_name="/rag_rebuild")


def test_rag_remove_from_a_script(studio):
    c, _ctx = studio
    msg, _table = c.predict("good", "notes.md", api_name="/rag_remove")
    assert msg.startswith("Removed notes.md")
    assert [d["name"] for d in c.predict("good", api_name="/rag_documents")] == ["topics.pdf"]
    with pytest.raises(Exception, match="not in the knowledge base 'good'"):
        c.predict("good", "notes.md", api_name="/rag_remove")


def _call_raw(url: str, api: str, body: str) -> str:
    """Gradio's HTTP API with a JSON body as written (gradio_client refuses to send NaN; a script with its own JSON
    writer, or Python's json module, does send it): the event stream's text."""
    import requests

    r = requests.post(f"{url}/gradio_api/call{api}", data=body, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 200, r.text
    return requests.get(f"{url}/gradio_api/call{api}/{r.json()['event_id']}", timeout=60).text


@pytest.mark.parametrize("api", ["/rag_retrieve", "/rag_search"])
@pytest.mark.parametrize("top_k", ["NaN", "Infinity"])
def test_top_k_nan_is_a_clear_message(studio, api, top_k):
    c, _ctx = studio
    text = _call_raw(c.src.rstrip("/"), api, '{"data": ["good", "bread", %s, "hybrid"]}' % top_k)
    assert "event: error" in text and "Unexpected error" not in text, text
    # the slider of /rag_search refuses infinity itself ("greater than maximum value 20"); NaN passes its range check
    assert "top-k must be a whole number from 1 to 100" in text or "maximum value 20" in text, text


def test_no_delete_under_a_running_ingest(studio):
    c, ctx = studio
    job = _fake_running_ingest(ctx.ws, "good")
    try:
        with pytest.raises(Exception, match="Documents are being added to 'good'"):
            c.predict("good", True, api_name="/rag_delete")
        assert "good" in [k["name"] for k in c.predict(api_name="/rag_list")]
        msg = c.predict(job.name, api_name="/rag_cancel")
        assert msg.startswith(f"Ingest `{job.name}`: ") and "running" not in msg
    finally:
        rag.ingestion.queue(ctx.ws).cancel(job.name)
    _kb, _table, msg = c.predict("good", True, api_name="/rag_delete")
    assert msg == "Deleted **good**."
