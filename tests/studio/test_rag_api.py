"""The RAG stage through the Gradio API (gradio_client): create a knowledge base, ingest a PDF as a job and follow
it, list and retrieve, a streamed cited answer from the loaded model, the evaluation, and clear errors."""

from __future__ import annotations

import re
import time

import pytest

from rag_docs import TOPICS, topic_pdf
from studio_helpers import launch, wait_loaded

pytestmark = pytest.mark.slow


def test_rag_through_gradio_client(tmp_path_factory, tmp_path):
    from gradio_client import Client, handle_file

    demo, url, ctx = launch(tmp_path_factory)
    try:
        wait_loaded(url)
        c = Client(url, verbose=False)
        _picker, _table, msg = c.predict("api-kb", "", 200, 40, api_name="/rag_create")
        assert "Created **api-kb**" in msg
        with pytest.raises(Exception, match="already exists"):
            c.predict("api-kb", "", 200, 40, api_name="/rag_create")
        pdf = topic_pdf(tmp_path / "topics.pdf")
        msg, job = c.predict("api-kb", [handle_file(str(pdf))], "", api_name="/rag_ingest")
        assert job and "Adding 1 document" in msg
        t0 = time.time()
        while time.time() - t0 < 180:
            st = c.predict(job, api_name="/rag_status")
            if st["state"] != "running":
                break
            time.sleep(0.5)
        assert st["state"] == "finished", st
        (kb,) = c.predict(api_name="/rag_list")
        assert kb["name"] == "api-kb" and kb["documents"] == 1 and kb["pages"] == len(TOPICS)
        assert [d["name"] for d in c.predict("api-kb", api_name="/rag_documents")] == ["topics.pdf"]
        hits = c.predict("api-kb", "why does bread rise", 3, "hybrid", api_name="/rag_retrieve")
        assert hits[0]["file"] == "topics.pdf" and hits[0]["page"] == 2 and hits[0]["similarity"] > 0.3
        with pytest.raises(Exception, match="no knowledge base 'nope'"):
            c.predict("nope", "x", 3, "hybrid", api_name="/rag_retrieve")
        sampling = ["", 0.0, 1.0, 0, 0.0, 1.0, 12, "", 0]  # ChatParams.sampling_fields() order
        job = c.submit("api-kb", "Why does bread rise?", None, None, 3, "hybrid", 0.25, *sampling,
                       api_name="/rag_ask")
        outs = list(job)
        _answer, speed, passages, _cites = job.result()  # (the gr.State of the passages stays in the page)
        assert len(outs) > 2 and "12 tokens" in speed
        # where the wait went: the prompt's size, what the model read of it (llama.cpp's figures), retrieval
        assert re.search(r"prompt [\d,]+ tokens · .*[\d,]+ read by the model in [\d.]+ s", speed), speed
        assert "retrieval" in speed and "building the prompt" in speed
        # what the next question will cost, as the RAG tab shows it while it is typed
        from studio.handlers.rag import RagHandlers

        handlers = RagHandlers(ctx)
        cost = handlers.estimate("api-kb", "How do volcanoes form?", None, 3, *sampling)
        assert re.search(r"≈ [\d,]+ prompt tokens: instructions \d+, question \d+, 3 passages", cost), cost
        assert "kept evaluated from the last question" in cost and "s to read at" in cost
        assert handlers.estimate("", "x", None, 3, *sampling) == ""  # no knowledge base chosen yet: nothing to say
        assert "top-k" in handlers.estimate("api-kb", "x", None, 0, *sampling)
        handlers.warm("api-kb")  # what picking it in the tab does: its embedder and indexes loaded ahead
        handlers.warm("nope")  # a knowledge base that cannot be opened: nothing to load, and no error yet
        page = passages["headers"].index("page")
        assert passages["data"][0][page] == 2
        _table, _fig, note = c.predict("api-kb", 10, None, api_name="/rag_evaluate")
        assert "search retrieves best here" in note
        _kb, _table, msg = c.predict("api-kb", True, api_name="/rag_delete")
        assert "Deleted" in msg and c.predict(api_name="/rag_list") == []
    finally:
        demo.close()
