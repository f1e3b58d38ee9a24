"""RAG with the bundled all-MiniLM-L6-v2 and PDFs made here: extraction and every refusal, chunking that fits the
embedder and keeps to one page, knowledge bases (duplicates, removal, one embedder each, an index cut off by a
crash never used), the three search modes finding the right page, answers fitted to a small model's context with
citations and "nothing relevant", the evaluation, and the ingest job (progress, cancel)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from rag_docs import TOPICS, bomb_pdf, encrypted_pdf, image_only_pdf, make_pdf, topic_pdf, truncated_pdf

from pipelines import follow, models, rag
from pipelines.errors import BadInput, Conflict, NotFound
from pipelines.rag import chunk as rchunk
from pipelines.rag import index as rindex
from pipelines.rag import ingestion as ringest
from pipelines.rag.embed import embedder
from pipelines.rag.extract import extract

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("docs")
    topics = topic_pdf(d / "topics.pdf")
    out = {"topics": topics, "encrypted": encrypted_pdf(d / "locked.pdf", "s3cret", topics),
           "scan": image_only_pdf(d / "scan.pdf"), "broken": truncated_pdf(d / "broken.pdf", topics),
           "bomb": bomb_pdf(d / "bomb.pdf"), "notes": d / "notes.md", "fake": d / "fake.pdf", "empty": d / "empty.txt"}
    out["notes"].write_text("# Setup\n\nPlug the router into the wall socket and wait for the green light.\n\n"
                            "# Reset\n\nHold the reset button for ten seconds until the light blinks red.\n")
    out["fake"].write_text("just some text, not a PDF at all\n")
    out["empty"].write_text("")
    return out


@pytest.fixture(scope="module")
def kb_ws(tmp_path_factory, docs):
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path_factory.mktemp("rag") / "ws")
    rag.create(ws, "topics")
    rep = rag.ingest(ws, "topics", [docs["topics"], docs["notes"]])
    assert [a["name"] for a in rep.added] == ["topics.pdf", "notes.md"] and not rep.failed
    return ws, rag.open_kb(ws, "topics")


# --------------------------------------------------------------------------------------------- extraction


def test_pdf_text_page_by_page(docs):
    doc = extract(docs["topics"])
    assert doc.kind == "pdf" and len(doc.pages) == len(TOPICS)
    for page, (topic, _fact) in zip(doc.pages, TOPICS):
        assert f"the {topic}" in page.text


@pytest.mark.parametrize("key, password, needle", [
    ("encrypted", None, "is encrypted: give its password"),
    ("encrypted", "wrong", "the password is wrong"),
    ("scan", None, "no text layer"),
    ("broken", None, "not a readable PDF"),
    ("fake", None, "is not a PDF"),
    ("empty", None, "is empty"),
    ("bomb", None, "decompression bomb"),
])
def test_unusable_documents_are_refused_clearly(docs, key, password, needle):
    t0 = time.monotonic()
    with pytest.raises(BadInput) as e:
        extract(docs[key], password)
    assert needle in e.value.message and docs[key].name in e.value.message and "\n" not in e.value.message
    assert time.monotonic() - t0 < 30


def test_the_right_password_opens_it_and_limits_hold(docs):
    assert len(extract(docs["encrypted"], "s3cret").pages) == len(TOPICS)
    with pytest.raises(BadInput, match="at most 3"):
        extract(docs["topics"], max_pages=3)
    with pytest.raises(BadInput, match="characters"):
        extract(docs["topics"], max_chars=500)
    with pytest.raises(BadInput, match="unsupported document type"):
        extract(docs["topics"], name="slides.pptx")


# ----------------------------------------------------------------------------------------------- chunking


def test_chunks_fit_the_embedder_and_keep_to_one_page(tmp_path):
    emb = embedder()
    long = "\n\n".join(" ".join(f"Sentence {i} of paragraph {j} says something about the weather." for i in range(9))
                       for j in range(6))
    doc = extract(make_pdf(tmp_path / "long.pdf", [long, "A short last page."]))
    chunks = rchunk.chunk_document(doc, emb, size=64, overlap=16)
    assert len(chunks) > 4 and chunks[-1].page == 2 and chunks[-1].text == "A short last page."
    for c in chunks:
        page = doc.pages[c.page - 1].text
        assert page[c.start:c.end] == c.text  # the exact span of one page's text
        assert emb.count_tokens([c.text])[0] <= 64 + 2
    first, second = chunks[0], chunks[1]
    assert second.start < first.end  # overlapping
    with pytest.raises(BadInput, match="more than the embedding model reads"):
        rchunk.chunk_document(doc, emb, size=400)
    with pytest.raises(BadInput, match="overlap"):
        rchunk.chunk_document(doc, emb, size=64, overlap=64)


def test_markdown_headings_travel_with_their_chunks(kb_ws):
    _ws, kb = kb_ws
    with kb.db() as con:
        rows = con.execute("SELECT c.heading, c.text FROM chunks c JOIN sources s ON s.sha256 = c.sha256 "
                           "WHERE s.name = 'notes.md'").fetchall()
    assert rows and rows[0][0] == "Setup"


# ---------------------------------------------------------------------------------------- knowledge bases


def test_listing_duplicates_removal_and_deletion(tmp_path, docs):
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    rag.create(ws, "kb1", chunk_size=120, overlap=20)
    with pytest.raises(Conflict):
        rag.create(ws, "kb1")
    with pytest.raises(BadInput, match="not a usable knowledge-base name"):
        rag.create(ws, "../up")
    rep = rag.ingest(ws, "kb1", [docs["topics"], docs["topics"], docs["scan"],
                                 {"path": str(docs["encrypted"]), "password": "s3cret"}])
    assert [a["name"] for a in rep.added] == ["topics.pdf", "locked.pdf"]
    assert rep.skipped[0]["reason"].startswith("already in the knowledge base")
    assert "no text layer" in rep.failed[0]["error"]
    (row,) = rag.list_kbs(ws)
    assert (row["documents"], row["pages"], row["chunk_size"]) == (2, 2 * len(TOPICS), 120)
    assert row["chunks"] >= 2 * len(TOPICS) and row["embedder"] == "all-MiniLM-L6-v2" and "exact" in row["index"]
    kb = rag.open_kb(ws, "kb1")
    assert {p.name for p in kb.sources_dir.iterdir()} == {f"{s['sha256']}.pdf" for s in kb.sources()}
    manifest = json.loads((kb.path / "manifest.json").read_text())
    assert manifest["documents"] == 2 and manifest["dim"] == 384
    assert rag.remove_documents(kb, ["locked.pdf"]) == 1
    assert [s["name"] for s in kb.sources()] == ["topics.pdf"]
    assert all(p.file == "topics.pdf" for p in rag.search(kb, "the lighthouse keeper", 10, "vector"))
    with pytest.raises(NotFound):
        rag.remove_documents(kb, ["nope.pdf"])
    with pytest.raises(BadInput, match="made with the embedder"):
        rag.ingest(ws, "kb1", [docs["notes"]], embedder_name="/some/other/model")
    rag.delete(ws, "kb1")
    assert rag.list_kbs(ws) == [] and not kb.path.exists()


def test_an_index_cut_off_by_a_crash_is_never_used(kb_ws):
    _ws, kb = kb_ws
    want = rag.search(kb, "why does bread rise", 1, "vector")[0]
    rindex.forget(kb)
    (kb.path / "index.faiss").write_bytes(b"half of an index")  # a write cut off...
    info = json.loads((kb.path / "index.json").read_text())
    (kb.path / "index.json").write_text(json.dumps({**info, "generation": info["generation"] - 1}))  # ...stale
    got = rag.search(kb, "why does bread rise", 1, "vector")[0]
    assert (got.file, got.page) == (want.file, want.page)
    assert json.loads((kb.path / "index.json").read_text())["generation"] == info["generation"]  # rebuilt


# ------------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("mode", rag.MODES)
def test_each_mode_finds_the_page(kb_ws, mode):
    _ws, kb = kb_ws
    for i, (topic, fact) in enumerate(TOPICS):
        best = rag.search(kb, fact.split(" because ")[0] if " because " in fact else fact[:60], 3, mode)[0]
        assert (best.file, best.page) == ("topics.pdf", i + 1), (mode, topic, best)
        assert best.rank == 1 and best.similarity > 0.3
    with pytest.raises(BadInput, match="top-k"):
        rag.search(kb, "x", 0)
    with pytest.raises(BadInput, match="mode"):
        rag.search(kb, "x", 3, "telepathy")


def test_hnsw_once_large(kb_ws, monkeypatch):
    _ws, kb = kb_ws
    monkeypatch.setattr(rindex, "FLAT_MAX", 2)
    vi = rindex.rebuild(kb)
    assert "HNSW" in vi.kind and type(vi.vectors).__name__ == "IndexHNSWFlat"
    best = rag.search(kb, "honeybees dance to show where the flowers are", 1, "vector")[0]
    assert best.page == 5
    monkeypatch.undo()
    assert "exact" in rindex.rebuild(kb).kind


def test_fusion_rewards_agreement():
    fused = rindex.rrf([[1, 2, 3], [3, 1, 4]])
    assert [i for i, _ in fused][:2] == [1, 3] and dict(fused)[4] < dict(fused)[2] + 1e-9


def test_keyword_queries_are_data(kb_ws):
    _ws, kb = kb_ws
    assert rag.search(kb, 'bread" OR 1=1; DROP TABLE chunks; -- NEAR(', 1, "keyword")[0].page == 2
    assert rag.search(kb, "the of and", 3, "keyword") == []  # only stop words: no keyword match at all
    assert rag.open_kb(kb_ws[0], "topics").summary()["chunks"] >= len(TOPICS)


# ------------------------------------------------------------------------------------------------- answers


@pytest.fixture(scope="module")
def small_lm(tiny_gguf):
    lm = models.load_gguf(tiny_gguf, n_ctx=512, threads=1)
    yield lm
    lm.backend.close()


def test_answer_streams_with_passages_fitted_to_the_context(kb_ws, small_lm):
    from pipelines.chat import ChatParams

    _ws, kb = kb_ws
    events = list(rag.stream_answer(small_lm, kb, "Why does bread rise?", ChatParams(max_new_tokens=16,
                                                                                      temperature=0), top_k=6,
                                    threshold=0.0))
    first, last = events[0], events[-1]
    assert first.chunk is None and len(first.passages) == 1 and first.passages[0].page == 2
    assert first.dropped == 5  # the tiny model's 512 tokens hold one passage, cut to fit (its vocabulary is bytes)
    assert first.passages[0].text.endswith("…") and first.passages[0].text.startswith("Chapter 2: the bread")
    assert last.chunk.finish_reason in ("stop", "length") and last.chunk.n_tokens >= 1
    assert 0 < last.chunk.prompt_tokens <= 512 - 16 and not last.chunk.note  # the answer kept its room


def test_nothing_relevant_is_said_not_answered(kb_ws, small_lm):
    _ws, kb = kb_ws
    (ev,) = rag.stream_answer(small_lm, kb, "zxqv wvut", top_k=3, threshold=0.9)
    assert ev.refused and "relevant enough" in ev.refused and ev.chunk is None


def _first_text(events) -> rag.RagEvent:
    for ev in events:
        if ev.chunk is not None and ev.chunk.text:
            events.close()
            return ev
    raise AssertionError("no answer text")


def test_passages_that_do_not_fit_are_left_out_with_a_note_and_never_read(kb_ws, small_lm):
    from dataclasses import replace

    from pipelines import chat
    from pipelines.chat import ChatParams
    from pipelines.rag.answer import system_text

    _ws, kb = kb_ws
    q, params = "Where does honey come from?", ChatParams(max_new_tokens=16, temperature=0)
    found = [p for p in rag.search(kb, q, 6) if p.similarity >= 0.0]  # those the threshold keeps
    events = rag.stream_answer(small_lm, kb, q, params, top_k=6, threshold=0.0)
    first = next(events)
    assert len(found) >= 3 and first.dropped == len(found) - 1
    assert f"{first.dropped} more retrieved passages did not fit the 512-token context window" in first.note
    ev = _first_text(events)
    # the model read the prompt the fitting built - one passage, cut - and no more (its own count of what it read)
    prompt = chat.build_prompt(small_lm, [{"role": "user", "content": q}],
                               replace(params, system_prompt=system_text(params, first.passages)))
    assert ev.chunk.prompt_tokens == ev.timings.prompt_tokens == len(prompt.token_ids) <= 512 - 16
    assert 1 <= ev.chunk.prompt_evaluated <= ev.timings.prompt_tokens and ev.chunk.prompt_eval_s > 0
    assert not any(p.text[:40] in prompt.text for p in found[1:])


def test_instructions_stay_evaluated_across_questions_of_a_knowledge_base(kb_ws, small_lm, tiny_gguf):
    """The worker keeps the instructions' KV state: a question after another one and a chat question in between
    evaluates only its passages and itself (the worker's own counters), and answers as a fresh model does."""
    from dataclasses import replace

    from pipelines import chat
    from pipelines.chat import ChatParams
    from pipelines.rag.answer import system_text

    _ws, kb = kb_ws
    params = ChatParams(max_new_tokens=8, temperature=0)
    one = _first_text(rag.stream_answer(small_lm, kb, "Why does bread rise?", params, top_k=1, threshold=0.0))
    before = small_lm.backend.last_prompt().counters
    assert one.timings.fixed_tokens > 100 and before["heads"] >= 1  # the instructions, kept after the first question
    chat.chat(small_lm, [{"role": "user", "content": "Something else entirely."}], params)  # the KV holds this now
    q = "What does a lighthouse do?"
    two = list(rag.stream_answer(small_lm, kb, q, params, top_k=1, threshold=0.0))
    after = small_lm.backend.last_prompt().counters
    first_chunk = next(ev.chunk for ev in two if ev.chunk is not None)
    assert after["restored"] == before["restored"] + 1 and after["saved"] == before["saved"]
    assert first_chunk.prompt_evaluated == two[0].timings.prompt_tokens - two[0].timings.fixed_tokens
    assert after["evaluated"] - before["evaluated"] < after["prompt_tokens"] - before["prompt_tokens"]
    # the same prompt, read whole by a fresh worker, gives the same greedy answer
    prompt = chat.build_prompt(small_lm, [{"role": "user", "content": q}],
                               replace(params, system_prompt=system_text(params, two[0].passages)))
    fresh = models.load_gguf(tiny_gguf, n_ctx=512, threads=1)
    try:
        whole = list(chat.stream_rendered(fresh, prompt, params))
        assert whole[-1].prompt_evaluated == len(prompt.token_ids)
        assert "".join(c.text for c in whole) == "".join(ev.chunk.text for ev in two if ev.chunk is not None)
    finally:
        fresh.backend.close()


def test_a_question_costs_what_the_estimate_said(kb_ws, tiny_gguf):
    from pipelines.chat import ChatParams

    _ws, kb = kb_ws
    lm = models.load_gguf(tiny_gguf, n_ctx=4096, threads=1)
    try:
        params = ChatParams(max_new_tokens=8, temperature=0)
        q = "Why does bread rise?"
        est = rag.estimate(lm, kb, q, 3, params)
        assert est.passages == 3 and est.cached == 0 and est.rate is None and est.seconds is None  # nothing asked yet
        ev = _first_text(rag.stream_answer(lm, kb, q, params, top_k=3, threshold=0.0))
        actual = ev.timings.prompt_tokens
        assert est.fixed == ev.timings.fixed_tokens and abs(est.tokens - actual) <= 0.25 * actual
        again = rag.estimate(lm, kb, q, 3, params)  # the model's speed is known now, and it keeps the instructions
        assert again.cached == ev.timings.fixed_tokens and again.rate > 0 and again.seconds > 0
        assert f"≈ {again.tokens:,} prompt tokens" in again.summary() and "s to read at" in again.summary()
        few = rag.estimate(lm, kb, q, 100, ChatParams(max_new_tokens=2048))
        assert few.passages < len(TOPICS) + 2 and "fit the context window" in few.summary()
        with pytest.raises(BadInput, match="top-k"):
            rag.estimate(lm, kb, q, 0, params)
    finally:
        lm.backend.close()


def test_citations_are_the_numbers_the_answer_uses():
    from pipelines.rag.answer import cited

    assert cited("Bread rises [2], see also [1] and [2] and [9].", 3) == [2, 1]


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_auto_and_csv(kb_ws, tmp_path):
    _ws, kb = kb_ws
    qs = rag.auto_questions(kb, 20)
    assert len(qs) >= len(TOPICS) and all(q.chunk_id for q in qs)
    res = rag.evaluate(kb, qs)
    assert set(res) == set(rag.MODES) and all(r["hit@5"] >= 0.8 for r in res.values())
    csv = tmp_path / "eval.csv"
    csv.write_text("question,file,page\n" + "".join(f"{fact},topics.pdf,{i + 1}\n" for i, (_t, fact) in
                                                    enumerate(TOPICS)))
    res = rag.evaluate(kb, rag.questions_from_csv(csv))
    assert res["hybrid"]["hit@1"] >= 0.8 and res["vector"]["mrr"] > 0.8
    bad = tmp_path / "bad.csv"
    bad.write_text("query,doc\nx,y\n")
    with pytest.raises(BadInput, match="'question' column"):
        rag.questions_from_csv(bad)
    bad.write_text("question,file,page\nok,topics.pdf,one\n,topics.pdf,1\n")
    with pytest.raises(BadInput, match="lines 2, 3"):
        rag.questions_from_csv(bad)


# --------------------------------------------------------------------------------------------------- the job


def test_ingest_job_reports_progress_and_a_cancel_leaves_the_kb_as_it_was(tmp_path, docs):
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    rag.create(ws, "jobs")
    q = ringest.queue(ws)
    job = ringest.start(ws, "jobs", [{"path": str(docs["topics"]), "name": "topics.pdf"},
                                     {"path": str(docs["encrypted"]), "name": "locked.pdf", "password": "s3cret"}])
    seen = [up.status for up in follow.follow(q.job(job), lambda: q.status(job), interval=0.1)]
    final = seen[-1]
    assert final.state == "finished", q.job(job).log_tail()
    assert [a["name"] for a in final.result["added"]] == ["topics.pdf", "locked.pdf"]
    assert "s3cret" not in (q.job(job).spec_path).read_text()  # the password left job.json once read
    assert any(0 < (s.fraction or 0) < 1 for s in seen) and final.extra.get("documents") == 2
    # a slow, large document, cancelled mid-way: nothing of it is kept
    big = topic_pdf(tmp_path / "big.pdf", repeat=40)
    before = rag.open_kb(ws, "jobs").summary()
    job = ringest.start(ws, "jobs", [{"path": str(big), "name": "big.pdf"}])
    t0 = time.time()
    while "embedding" not in (q.status(job).message or "") and time.time() - t0 < 120:
        time.sleep(0.05)
    st = q.cancel(job)
    assert st.state == "cancelled"
    after = rag.open_kb(ws, "jobs").summary()
    assert (after["documents"], after["chunks"]) == (before["documents"], before["chunks"])
    with pytest.raises(NotFound):
        ringest.start(ws, "nope", [{"path": str(big), "name": "big.pdf"}])
    with pytest.raises(BadInput, match="unsupported document type"):
        ringest.start(ws, "jobs", [{"path": str(big), "name": "big.docx"}])
