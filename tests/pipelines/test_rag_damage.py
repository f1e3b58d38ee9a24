"""RAG under damage and hostile documents (issue 23): a knowledge base whose kb.sqlite is damaged is listed as
damaged and refused by name while the others keep working, and it can be deleted or rebuilt from the documents it
keeps; a knowledge base cannot be deleted under a running ingest; chunking is linear in the number of Markdown
headings; every document kind is bounded in time and passages; top-k NaN and an encrypted PDF with an empty user
password get a clear answer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from rag_docs import TOPICS, encrypted_pdf, topic_pdf

from pipelines import jobs, rag
from pipelines.errors import BadInput, Conflict
from pipelines.rag import chunk as rchunk
from pipelines.rag import ingestion as ringest
from pipelines.rag.extract import Document, Page, extract

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hardening import within  # noqa: E402 - the hang guard of issue 12's tests


@pytest.fixture(scope="module")
def topics_pdf(tmp_path_factory) -> Path:
    return topic_pdf(tmp_path_factory.mktemp("docs") / "topics.pdf")


@pytest.fixture(scope="module")
def two_kbs_made(tmp_path_factory, topics_pdf) -> Path:
    """A workspace with 'good' and 'bad' (each: topics.pdf and notes.md), made once; tests work on copies."""
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path_factory.mktemp("made") / "ws")
    notes = ws.root.parent / "notes.md"
    notes.write_text("# Setup\n\nPlug the router into the wall socket and wait for the green light.\n")
    for name in ("good", "bad"):
        rag.create(ws, name)
        assert not rag.ingest(ws, name, [topics_pdf, notes]).failed
    return ws.root


@pytest.fixture
def two_kbs(tmp_path, two_kbs_made):
    """A copy of that workspace with bad's kb.sqlite overwritten (its index cached in this process before)."""
    import shutil

    from pipelines.workspace import Workspace

    shutil.copytree(two_kbs_made, tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    rag.search(rag.open_kb(ws, "bad"), "why does bread rise", 1)
    (ws.rag / "bad" / "kb.sqlite").write_bytes(b"this is not a database at all " * 200)
    return ws


@pytest.mark.slow
def test_a_damaged_kb_is_listed_as_damaged_and_the_others_keep_working(two_kbs):
    ws = two_kbs
    listed = {k["name"]: k for k in rag.list_kbs(ws)}
    assert listed["bad"]["damaged"] == "file is not a database" and listed["bad"]["documents"] is None
    assert listed["bad"]["embedder"] == "all-MiniLM-L6-v2"  # its settings, from its manifest
    assert listed["good"]["damaged"] is None and listed["good"]["documents"] == 2
    assert rag.search(rag.open_kb(ws, "good"), "why does bread rise", 1)[0].page == 2
    bad = rag.open_kb(ws, "bad")
    for use in (lambda: rag.search(bad, "bread", 3), bad.sources, lambda: rag.ingest(ws, "bad", [ws.root]),
                lambda: rag.remove_documents(bad, ["notes.md"]),
                lambda: ringest.start(ws, "bad", [{"path": str(ws.root / "x.md"), "name": "x.md"}])):
        with pytest.raises(rag.DamagedKB) as e:
            use()
        assert "'bad' is damaged (kb.sqlite: file is not a database)" in e.value.message
        assert "rebuild" in e.value.message and e.value.status == 409


@pytest.mark.slow
def test_a_damaged_kb_is_rebuilt_from_its_kept_documents(two_kbs):
    ws = two_kbs
    damaged_bytes = (ws.rag / "bad" / "kb.sqlite").read_bytes()
    rep = rag.rebuild(ws, "bad")
    assert sorted(a["name"] for a in rep.added) == ["notes.md", "topics.pdf"] and not rep.failed
    bad = rag.open_kb(ws, "bad")
    assert bad.summary()["damaged"] is None and bad.summary()["documents"] == 2
    best = rag.search(bad, "why does bread rise", 1)[0]  # not the index cached before the damage
    assert (best.file, best.page) == ("topics.pdf", 2)
    assert (ws.rag / "bad" / "kb.sqlite.damaged").read_bytes() == damaged_bytes  # kept, not lost
    with pytest.raises(Conflict, match="not damaged"):
        rag.rebuild(ws, "bad")


@pytest.mark.slow
def test_a_damaged_kb_can_be_deleted_and_made_again(two_kbs):
    ws = two_kbs
    (ws.rag / "good" / "kb.sqlite").write_bytes(b"")  # emptied: no tables at all
    assert {k["name"]: k["damaged"] for k in rag.list_kbs(ws)}["good"].startswith("no such table")
    rag.delete(ws, "bad")
    assert [k["name"] for k in rag.list_kbs(ws)] == ["good"]
    rag.create(ws, "bad")
    assert rag.search(rag.open_kb(ws, "bad"), "bread", 3) == []  # an empty new one, not the old cached index


def test_settings_that_are_not_json_are_damage(tmp_path):
    import sqlite3

    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    kb = rag.create(ws, "kb")
    with sqlite3.connect(kb.db_path) as con:
        con.execute("UPDATE meta SET value='{not json' WHERE key='dim'")
    assert rag.list_kbs(ws)[0]["damaged"] == "its settings (meta) cannot be read"


def _fake_running_ingest(ws, kb_name: str) -> jobs.JobDir:
    """An ingest job folder as one writes it while it runs (a live process of its own, no work done)."""
    q = ringest.queue(ws)
    job = jobs.JobDir(q.folder / f"20990101-000000-{kb_name}")
    job.path.mkdir(parents=True)
    (job.spec_path).write_text(json.dumps({"kind": "ingest", "kb": kb_name, "files": []}))
    job.update(label=kb_name, kb=kb_name, fraction=0.4, message="document 1/1: embedding")
    jobs.start(job, [sys.executable, "-c", "import time; time.sleep(120)"])
    return job


def test_a_kb_is_not_deleted_under_its_running_ingest(tmp_path):
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    rag.create(ws, "busy")
    rag.create(ws, "other")
    job = _fake_running_ingest(ws, "busy")
    try:
        with pytest.raises(Conflict) as e:
            rag.delete(ws, "busy")
        assert "being added to 'busy' (40%" in e.value.message and "cancel that ingest" in e.value.message
        assert rag.open_kb(ws, "busy").summary()["damaged"] is None  # untouched
        rag.delete(ws, "other")  # another knowledge base: deleted
        with pytest.raises(Conflict, match="being added to 'busy'"):
            rag.rebuild(ws, "busy")
        with pytest.raises(Conflict, match="An ingest job is running"):
            ringest.start_rebuild(ws, "busy")
    finally:
        st = ringest.queue(ws).cancel(job.name)
    assert not st.active
    rag.delete(ws, "busy")
    assert rag.list_kbs(ws) == []


# ---------------------------------------------------------------------------------------- bounded documents


class _WordEmbedder:
    """Counts words as tokens: chunking alone, without a model."""

    max_tokens = 254
    tokenizer = None

    @staticmethod
    def count_tokens(texts):
        return [len(t.split()) for t in texts]


def test_chunking_is_linear_in_the_number_of_headings():
    """300k headings, 60k chunks of 5 heading lines: seconds, not hours (it was quadratic: every chunk passed every
    heading)."""
    n = 300_000
    text = "".join(f"# Part {i}\n" for i in range(n))
    doc = Document("many.md", "markdown", [Page(1, text)], len(text))
    box = within(60, rchunk.chunk_document, doc, _WordEmbedder(), 16, 0)
    chunks = box.get("result")
    assert chunks is not None, box
    assert len(chunks) == n // 5 and chunks[-1].heading == f"Part {n - 5}"  # 16 tokens: 5 lines of 3 words
    assert (chunks[0].heading, chunks[1].heading) == ("Part 0", "Part 5") and box["seconds"] < 60


def test_passages_per_document_are_bounded(monkeypatch):
    monkeypatch.setattr(rchunk, "MAX_CHUNKS", 10)
    text = "".join(f"word {i}\n" for i in range(400))
    with pytest.raises(BadInput, match="makes more than 10 passages"):
        rchunk.chunk_document(Document("a.txt", "text", [Page(1, text)], len(text)), _WordEmbedder(), 16, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["notes.md", "notes.txt", "topics.pdf"])
def test_every_document_kind_is_bounded_in_time(tmp_path, topics_pdf, monkeypatch, name):
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    rag.create(ws, "kb")
    path = topics_pdf if name.endswith(".pdf") else tmp_path / name
    if path != topics_pdf:
        path.write_text("# Title\n\n" + "Some words about routers and lights. " * 2000)
    monkeypatch.setattr(ringest, "MAX_DOCUMENT_SECONDS", 0.0)
    rep = rag.ingest(ws, "kb", [path])
    (failed,) = rep.failed
    assert failed["name"] == name and ("took over 0 s" in failed["error"] or "would take over 0 s" in failed["error"])
    assert rag.open_kb(ws, "kb").summary()["documents"] == 0


def test_embedding_on_course_past_the_limit_is_stopped_early(monkeypatch):
    monkeypatch.setattr(ringest.time, "monotonic", lambda: 100.0)  # two batches embedded in 100 s
    monkeypatch.setattr(ringest, "MAX_DOCUMENT_SECONDS", 900.0)
    ringest._check_embedding_time("big.md", 0.0, 0.0, 2 * ringest.BATCH, 4 * ringest.BATCH)  # 200 s in all: on
    with pytest.raises(BadInput, match=r"big.md: .* would take over 900 s \(1,024 of its 10,240 passages"):
        ringest._check_embedding_time("big.md", 0.0, 0.0, 2 * ringest.BATCH, 20 * ringest.BATCH)


# ------------------------------------------------------------------------------------------ inputs named


@pytest.mark.parametrize("top_k", [float("nan"), float("inf"), "many", None, 2.5, 0])
def test_top_k_that_is_no_whole_number_is_a_clear_message(top_k):
    from pipelines.rag.retrieve import check_top_k

    with pytest.raises(BadInput, match="top-k must be a whole number from 1 to 100"):
        check_top_k(top_k)
    assert check_top_k(5.0) == 5 and check_top_k("7") == 7


def test_an_encrypted_pdf_with_an_empty_user_password_opens_without_one(tmp_path, topics_pdf):
    locked = encrypted_pdf(tmp_path / "restricted.pdf", "", topics_pdf)  # only an owner password
    from pypdf import PdfReader

    assert PdfReader(str(locked)).is_encrypted
    assert len(extract(locked).pages) == len(TOPICS)
    assert len(extract(locked, "something typed").pages) == len(TOPICS)
    real = encrypted_pdf(tmp_path / "locked.pdf", "s3cret", topics_pdf)
    with pytest.raises(BadInput, match="is encrypted: give its password"):
        extract(real)
    with pytest.raises(BadInput, match="the password is wrong"):
        extract(real, "nope")


@pytest.mark.slow
def test_the_cli_lists_refuses_rebuilds_and_deletes_a_damaged_kb(two_kbs):
    import subprocess

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "rag", *args, "--root", str(two_kbs.root)],
                           check=False, capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[2])
        assert "Traceback" not in r.stderr, r.stderr
        return r

    r = cli("list")
    assert r.returncode == 0 and {k["name"]: k["damaged"] for k in json.loads(r.stdout)} == {
        "bad": "file is not a database", "good": None}
    r = cli("search", "bad", "bread")
    assert r.returncode == 1 and r.stderr.startswith("mactuner: The knowledge base 'bad' is damaged")
    r = cli("rebuild", "bad")
    assert r.returncode == 0 and len(json.loads(r.stdout)["added"]) == 2
    assert rag.open_kb(two_kbs, "bad").summary()["documents"] == 2  # (searching it: the in-process test)
    assert cli("delete", "bad").returncode == 0 and [k["name"] for k in rag.list_kbs(two_kbs)] == ["good"]
