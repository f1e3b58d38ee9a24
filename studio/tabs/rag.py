"""RAG tab: knowledge bases and their documents, the ingest (in its own process, followed live), questions answered
with citations that open the passage they came from, retrieval alone, and retrieval quality measured."""

from __future__ import annotations

import gradio as gr

from pipelines import rag
from pipelines.chat import ChatParams

from .. import fields
from ..handlers.chat import BASE, model_choices, stop
from ..handlers.common import Context, ui_errors
from ..handlers.rag import (DOC_COLUMNS, EVAL_COLUMNS, KB_COLUMNS, PASSAGE_COLUMNS, AnswerView, AskMenus,
                            DocumentsView, EvalView, IngestStarted, IngestView, KBLists, KBView, RagHandlers,
                            Rebuilt, Removed, SampleView, SearchView, chosen_kb, kb_names, kbs_table, show_passage)
from .chat import sampling_widget


def build(ctx: Context) -> dict:
    with gr.Tab("RAG", id="rag") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("#### Knowledge bases")
                with gr.Row():
                    kb = gr.Dropdown(kb_names(ctx), value=None, label="Knowledge base", scale=3, elem_id="rag-kb",
                                     allow_custom_value=True)
                    refresh = gr.Button("↻", scale=0, elem_id="rag-refresh")
                sample_btn = gr.Button("Try the sample guide (a 4-page PDF)", size="sm", elem_id="rag-sample")
                kbs = gr.Dataframe(kbs_table(ctx), headers=KB_COLUMNS, interactive=False, elem_id="rag-kbs")
                with gr.Accordion("New knowledge base", open=not kb_names(ctx)):
                    new_name = gr.Textbox(label="Name", elem_id="rag-new-name")
                    new_emb = gr.Textbox(label="Embedding model (empty: the bundled all-MiniLM-L6-v2; or a local "
                                               "sentence-transformers folder)", elem_id="rag-new-embedder")
                    with gr.Row():
                        size = fields.Slider(32, 254, value=200, step=1, label="Chunk size (tokens)", elem_id="rag-size")
                        overlap = fields.Slider(0, 128, value=40, step=1, label="Overlap (tokens)", elem_id="rag-overlap")
                    create_btn = gr.Button("Create", elem_id="rag-create")
                msg = gr.Markdown(elem_id="rag-msg")
                gr.Markdown("#### Documents")
                files = fields.File(file_count="multiple", file_types=[".pdf", ".txt", ".md"], type="filepath",
                                label="PDF, text or Markdown", elem_id="rag-files")
                password = gr.Textbox(label="PDF password (for encrypted PDFs)", type="password", elem_id="rag-password")
                with gr.Row():
                    add_btn = gr.Button("Add documents", variant="primary", elem_id="rag-add")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="rag-cancel")
                job_md = gr.Markdown(elem_id="rag-job")
                bar = gr.HTML(elem_id="rag-progress")
                docs = gr.Dataframe(headers=DOC_COLUMNS, interactive=False, elem_id="rag-docs")
                with gr.Row():
                    # filled when a knowledge base is picked; a script names the document (checked by the handler)
                    doc = gr.Dropdown([], label="Document", scale=3, elem_id="rag-doc", allow_custom_value=True)
                    remove_btn = gr.Button("Remove it", scale=1, elem_id="rag-remove")
                with gr.Accordion("Delete or rebuild this knowledge base", open=False):
                    confirm = gr.Checkbox(label="yes, delete it", elem_id="rag-confirm")
                    delete_btn = gr.Button("Delete", variant="stop", elem_id="rag-delete")
                    gr.Markdown("A knowledge base marked damaged in the list can be made again from the documents "
                                "it keeps (encrypted PDFs need their password again: add them afterwards).")
                    rebuild_btn = gr.Button("Rebuild from its documents", elem_id="rag-rebuild")
            with gr.Column(scale=3):
                gr.Markdown("#### Ask")
                with gr.Row():
                    model = gr.Dropdown(model_choices(ctx), label="Model", scale=3, elem_id="rag-model",
                                        allow_custom_value=True)
                    adapter = gr.Dropdown([BASE], value=BASE, label="Adapter", scale=2, elem_id="rag-adapter",
                                          allow_custom_value=True)
                with gr.Row():
                    top_k = fields.Slider(1, 20, value=5, step=1, label="Passages (top-k)", elem_id="rag-topk")
                    mode = gr.Radio(list(rag.MODES), value="hybrid", label="Search", elem_id="rag-mode")
                    threshold = fields.Slider(0.0, 1.0, value=rag.THRESHOLD, step=0.01, label="Relevance threshold "
                                          "(cosine similarity)", elem_id="rag-threshold")
                question = gr.Textbox(label="Question", elem_id="rag-question")
                cost = gr.Markdown(elem_id="rag-cost")  # what the question will cost, before it is asked
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="rag-ask")
                    search_btn = gr.Button("Search only", elem_id="rag-search")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="rag-stop")
                answer = gr.Markdown(elem_id="rag-answer")
                speed = gr.Markdown(elem_id="rag-speed")
                cites = gr.Radio([], label="Citations (open one to see its passage)", elem_id="rag-cites")
                passage = gr.Markdown(elem_id="rag-passage")
                passages = gr.Dataframe(headers=PASSAGE_COLUMNS, interactive=False, wrap=True,
                                        label="Retrieved passages", elem_id="rag-passages")
                search_note = gr.Markdown(elem_id="rag-search-note")
                with gr.Accordion("Answer settings", open=False):
                    sampling = [sampling_widget(f, "rag") for f in ChatParams.sampling_fields()]
        with gr.Accordion("Retrieval quality", open=False, elem_id="rag-eval"):
            gr.Markdown("Questions are made from the knowledge base's own passages (most of one of their sentences), "
                        "or come from your CSV (columns `question`, `file`, optional `page`); each search mode is "
                        "scored on finding the source.")
            with gr.Row():
                n_q = fields.Slider(5, 200, value=40, step=5, label="Questions to make", elem_id="rag-eval-n")
                eval_csv = fields.File(file_types=[".csv"], type="filepath", label="Or your CSV", elem_id="rag-eval-csv")
                eval_btn = gr.Button("Evaluate", elem_id="rag-eval-run")
            eval_md = gr.Markdown(elem_id="rag-eval-md")
            with gr.Row():
                eval_table = gr.Dataframe(headers=EVAL_COLUMNS, interactive=False, elem_id="rag-eval-table")
                eval_plot = gr.Plot(elem_id="rag-eval-plot")
        job = gr.Textbox(visible=False, elem_id="rag-job-id")
        seen = gr.State(None)
        shown = gr.State([])
        discover = gr.Timer(5.0)  # finds an ingest started elsewhere (another tab, the API); the monitor streams

    handlers = RagHandlers(ctx)
    kb_view = KBView(kb=kb, table=kbs, message=msg)
    documents = DocumentsView(table=docs, doc=doc)
    create_btn.click(handlers.create, [new_name, new_emb, size, overlap], kb_view, api_name="rag_create")
    kb.change(handlers.documents, kb, documents, api_visibility="private")
    # its first question should not wait for the embedder's load: done while the question is typed
    kb.change(handlers.warm, kb, None, api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    sample_btn.click(handlers.try_sample, None, SampleView(kb=kb, table=kbs, message=msg, job=job),
                     api_name="rag_try_sample")
    refresh.click(handlers.refresh, kb, KBLists(kb=kb, table=kbs, docs=docs, doc=doc), api_visibility="private")
    add_btn.click(handlers.add_documents, [kb, files, password], IngestStarted(message=msg, job=job),
                  api_name="rag_ingest")
    cancel_btn.click(handlers.cancel, job, msg, api_name="rag_cancel")
    # the monitor streams: a generator follows the ingest's folder until it ends (this page's newer one ends it)
    monitor = IngestView(job=job, progress=bar, status=job_md, seen=seen, table=kbs)
    follow = dict(fn=handlers.follow, inputs=[job, seen], outputs=monitor, api_visibility="private",
                  show_progress="hidden", concurrency_limit=None, trigger_mode="multiple")
    job.change(**follow)  # a started ingest (Add, the sample, or one discovered)
    discover.tick(handlers.discover, job, job, api_visibility="private", show_progress="hidden")
    tab.select(**follow)
    seen.change(handlers.documents, kb, documents, api_visibility="private", show_progress="hidden")
    tab.select(handlers.menus, model, AskMenus(model=model, kb=kb), api_visibility="private")
    model.change(handlers.pick_model, model, adapter, api_visibility="private")
    remove_btn.click(handlers.remove, [kb, doc], Removed(message=msg, table=kbs), api_name="rag_remove").success(
        handlers.documents, kb, documents, api_visibility="private")
    delete_btn.click(handlers.delete, [kb, confirm], kb_view, api_name="rag_delete")
    rebuild_btn.click(handlers.rebuild, kb, Rebuilt(message=msg, job=job, table=kbs), api_name="rag_rebuild")
    search_btn.click(handlers.search, [kb, question, top_k, mode], SearchView(passages=passages, note=search_note),
                     api_name="rag_search")
    ask_in = [kb, question, model, adapter, top_k, mode, threshold, *sampling]
    answered = AnswerView(answer=answer, speed=speed, passages=passages, citations=cites, shown=shown)
    estimate = dict(fn=handlers.estimate, inputs=[kb, question, model, top_k, *sampling], outputs=cost,
                    api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    for source in (question, kb, model, top_k, *sampling):
        source.change(**estimate)
    # after an answer the model's reading speed is known and its instructions are kept: the estimate changes
    ask_btn.click(handlers.ask, ask_in, answered, api_name="rag_ask").then(**estimate)
    question.submit(handlers.ask, ask_in, answered, api_visibility="private").then(**estimate)
    stop_btn.click(stop, None, None, api_name="rag_stop")  # the same per-session stop as the Chat tab's
    cites.change(show_passage, [cites, shown], passage, api_visibility="private")
    eval_btn.click(handlers.evaluate, [kb, n_q, eval_csv], EvalView(table=eval_table, plot=eval_plot, message=eval_md),
                   api_name="rag_evaluate")
    return {"tab": tab}


def register_api(ctx: Context) -> None:
    """JSON endpoints for scripts."""

    def rag_list() -> list[dict]:
        """Every knowledge base: documents, pages, chunks, size, embedder, index kind."""
        return rag.list_kbs(ctx.ws)

    def rag_documents(name: str) -> list[dict]:
        """The documents of one knowledge base."""
        return ui_errors(lambda: chosen_kb(ctx, name).sources())()

    def rag_status(job: str = "") -> dict:
        """An ingest job's status (default: the running one, else the newest); {} when there is none."""
        from pipelines.rag.ingestion import queue  # noqa: PLC0415

        def get():
            q = queue(ctx.ws)
            st = q.status(job) if job else (q.active() or next(iter(q.list()), None))
            return st.to_dict() if st else {}

        return ui_errors(get)()

    def rag_retrieve(name: str, query: str, top_k: int = 5, mode: str = "hybrid") -> list[dict]:
        """Ranked passages with scores, file and page (no model)."""
        return ui_errors(lambda: [p.as_dict() for p in rag.search(chosen_kb(ctx, name), query, top_k, mode)])()

    for fn in (rag_list, rag_documents, rag_status, rag_retrieve):
        gr.api(fn, api_name=fn.__name__)
