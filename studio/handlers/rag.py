"""RAG tab handlers: knowledge bases (create, list, documents, remove, delete), the ingest job (started with the
uploads, followed from its job folder so a refreshed page re-attaches), retrieval alone, answers with citations,
and the retrieval-quality evaluation.

`RagHandlers(ctx)`: the tab wires its bound methods; they return (or stream) named views of the tab's outputs.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from pipelines import rag
from pipelines import follow as pfollow
from pipelines.errors import BadInput, MacTunerError
from pipelines.jobs import JobStatus
from pipelines.rag import cost as rcost
from pipelines.rag import ingestion as ringest
from pipelines.rag.evaluation import figure as eval_figure
from pipelines.rag.extract import kind_of
from pipelines.rag.retrieve import timed_search
from pipelines.workspace import human_bytes

from .. import zerogpu
from .chat import BASE, adapter_choices, loaded_model, model_choices, new_stop, params_from, speed_line
from .common import Context, Followers, progress_bar_html, stream, ui_errors

KB_COLUMNS = ["name", "documents", "pages", "chunks", "size", "embedder", "index"]
DOC_COLUMNS = ["name", "kind", "pages", "chunks", "size"]
PASSAGE_COLUMNS = ["#", "score", "similarity", "file", "page", "passage"]
EVAL_COLUMNS = ["mode", "hit@1", "hit@5", "MRR", "questions"]
SAMPLE = Path(__file__).resolve().parents[2] / "assets" / "sample_guide.pdf"
SAMPLE_KB = "sample-guide"
FOLLOWERS = Followers()
_stream_answer_gpu = zerogpu.gpu(rag.stream_answer)  # an HF model's answer on ZeroGPU hardware


class KBView(NamedTuple):
    """After a knowledge base is created or deleted: the picker, the table of knowledge bases, the message."""

    kb: Any
    table: Any
    message: str


class SampleView(NamedTuple):
    """After "Try the sample": as KBView, and the ingest job started (None when the sample is in already)."""

    kb: Any
    table: Any
    message: str
    job: str | None


class DocumentsView(NamedTuple):
    table: pd.DataFrame  # the documents of the picked knowledge base
    doc: Any  # the document picker


class KBLists(NamedTuple):
    """Everything ↻ reads again: the knowledge bases (picker and table) and the picked one's documents."""

    kb: Any
    table: Any
    docs: pd.DataFrame
    doc: Any


class IngestStarted(NamedTuple):
    message: str
    job: str | None  # the ingest job, which the monitor then follows


class Rebuilt(NamedTuple):
    message: str
    job: str | None  # the rebuild's ingest job (None: nothing to ingest)
    table: pd.DataFrame


class Removed(NamedTuple):
    message: str
    table: pd.DataFrame  # the knowledge bases, with the new counts


class IngestView(NamedTuple):
    """The ingest monitor, one field per component."""

    job: str | None
    progress: str  # html: the bar and its caption
    status: str  # markdown: the job, its state, the report of a finished one
    seen: str | None  # "job:state" shown last (the table is read again when it changes)
    table: Any  # the knowledge bases (gr.update() when nothing changed)


class SearchView(NamedTuple):
    passages: pd.DataFrame
    note: str  # how many passages, how long it took


class AnswerView(NamedTuple):
    """A cited answer as it streams."""

    answer: str
    speed: str  # who answers, tokens, speed, where the time went
    passages: pd.DataFrame  # the retrieved passages
    citations: Any  # the citation radio (its choices once the answer is complete)
    shown: list[dict]  # the passages (gr.State) a citation opens


class EvalView(NamedTuple):
    table: pd.DataFrame  # per search mode: hit@1, hit@5, MRR
    plot: Any
    message: str


class AskMenus(NamedTuple):
    """The RAG tab selected: the model menu (the loaded models) and the knowledge base picker."""

    model: Any
    kb: Any


def kb_names(ctx: Context) -> list[str]:
    return [k["name"] for k in rag.list_kbs(ctx.ws)]


def kbs_table(ctx: Context) -> pd.DataFrame:
    """Every knowledge base; a damaged one says so (and why) in its index column, its counts unknown."""
    rows = [[k["name"], k["documents"], k["pages"], k["chunks"], human_bytes(k["bytes"]), k["embedder"], k["index"]]
            if not k.get("damaged") else  # seen first in the narrow table: the counts' place
            [k["name"], "⚠️ damaged", "–", "–", human_bytes(k["bytes"]), k["embedder"],
             f"damaged ({k['damaged']}): delete or rebuild it"] for k in rag.list_kbs(ctx.ws)]
    return pd.DataFrame(rows, columns=KB_COLUMNS)


def chosen_kb(ctx: Context, name: str | None) -> rag.KB:
    """The knowledge base picked (or named by a script); a clear message when none is."""
    if not (name or "").strip():
        raise BadInput("Choose a knowledge base (or create one).")
    return rag.open_kb(ctx.ws, name)


def _incoming(ctx: Context, files: list) -> list[dict]:
    """Uploads copied into rag/.incoming/ (the job reads them there and removes them)."""
    d = ctx.ws.rag / ".incoming"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files or []:
        src = Path(f if isinstance(f, str) else getattr(f, "name", None) or f["path"])
        dst = d / f"{uuid.uuid4().hex[:12]}-{src.name}"
        shutil.copyfile(src, dst)
        out.append({"path": str(dst), "name": src.name})
    return out


def _pick_job(ctx: Context, job: str | None) -> JobStatus | None:
    """The running ingest, else `job`, else the newest."""
    jobs_ = ringest.queue(ctx.ws).list()
    running = next((j for j in jobs_ if j.active), None)
    return running or next((j for j in jobs_ if j.name == job), None) or (jobs_[0] if jobs_ else None)


def _view(ctx: Context, st: JobStatus, seen: str | None) -> IngestView:
    """The monitor for ingest status `st`; the table is re-read while it runs and when its state changes."""
    caption = f"{100 * (st.fraction or 0):.0f}% · {st.message or ''}"
    md = f"**{st.label}** · {st.state}"
    if st.state == "failed":
        md += f"\n\n❌ {st.reason}"
    elif st.state == "finished" and st.result:
        md += "\n\n" + rag.IngestReport(**st.result).summary()
        md += "".join(f"\n\n⚠️ {w}" for w in st.result.get("warnings", []))
    key = f"{st.name}:{st.state}"
    table = kbs_table(ctx) if key != seen or st.active else gr.update()
    return IngestView(st.name, progress_bar_html(1.0 if st.state == "finished" else st.fraction or 0, caption), md,
                      key, table)


def _passages_table(passages: list[rag.Passage]) -> pd.DataFrame:
    return pd.DataFrame([[p.rank, round(p.score, 4), round(p.similarity, 3), p.file, p.page,
                          p.text[:200] + ("…" if len(p.text) > 200 else "")] for p in passages],
                        columns=PASSAGE_COLUMNS)


def _citation_choices(passages: list[rag.Passage], cited: list[int]) -> list[str]:
    return [f"[{i}] {passages[i - 1].where}" for i in cited] or [f"[{i}] {p.where}" for i, p in enumerate(passages, 1)]


def _answer_status(lm, ev: rag.RagEvent) -> str:
    head = speed_line(ev.chunk, lm.name) if ev.chunk is not None else f"**{lm.name}** · {len(ev.passages)} passages"
    cost = ev.timings.summary(ev.chunk) if ev.timings else ""
    return "\n\n".join(x for x in (head, cost, f"ℹ️ {ev.note}" if ev.note else "") if x)


def show_passage(choice: str | None, passages: list[dict]) -> str:
    """The passage a citation points to, with its origin."""
    if not choice or not passages:
        return ""
    try:
        i = int(choice.split("]")[0].lstrip("[")) - 1
        p = passages[i]
    except (ValueError, IndexError):
        return ""
    head = f"**[{i + 1}] {p['file']}, page {p['page']}**" + (f" · {p['heading']}" if p.get("heading") else "")
    return f"{head} (characters {p['start']}–{p['end']})\n\n> " + p["text"].replace("\n", "\n> ")


class RagHandlers:
    """The RAG tab's events, for one workspace and model registry (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    # -------------------------------------------------------------------------------- knowledge bases

    @ui_errors
    def create(self, name: str, embedder: str, chunk_size: int, overlap: int) -> KBView:
        ctx = self.ctx
        kb = rag.create(ctx.ws, (name or "").strip(), (embedder or "").strip() or None, int(chunk_size), int(overlap))
        return KBView(gr.update(choices=kb_names(ctx), value=kb.name), kbs_table(ctx),
                      f"Created **{kb.name}** (embedder {kb.meta()['embedder']}, chunks of {int(chunk_size)} tokens). "
                      "Add documents to it.")

    @ui_errors
    def try_sample(self) -> SampleView:
        """The bundled sample PDF into a knowledge base of its own (created once): returns SampleView (picker, table,
        message, job id)."""
        ctx = self.ctx
        if SAMPLE_KB not in kb_names(ctx):
            rag.create(ctx.ws, SAMPLE_KB)
        picker = gr.update(choices=kb_names(ctx), value=SAMPLE_KB)
        if any(s["name"] == SAMPLE.name for s in rag.open_kb(ctx.ws, SAMPLE_KB).sources()):
            return SampleView(picker, kbs_table(ctx), f"**{SAMPLE_KB}** holds the sample already: ask it something, "
                              "e.g. *What does Q4_K_M keep?*", None)
        job = ringest.start(ctx.ws, SAMPLE_KB, _incoming(ctx, [str(SAMPLE)]))
        return SampleView(picker, kbs_table(ctx), f"Adding the sample guide (4 pages) to **{SAMPLE_KB}**; then ask "
                          "it, e.g. *What does Q4_K_M keep?*", job)

    def warm(self, name: str | None) -> None:
        """Load the picked knowledge base's embedder and indexes now, so that its first question does not wait for
        them; a knowledge base that cannot be opened says so when it is used."""
        if not (name or "").strip():
            return
        try:
            rag.warm(chosen_kb(self.ctx, name))
        except MacTunerError:
            return  # deleted meanwhile, damaged, or its embedder folder gone: asking says which, clearly

    def documents(self, name: str | None) -> DocumentsView:
        """The documents of a knowledge base, as a table and in the document picker."""
        if not name:
            return DocumentsView(pd.DataFrame(columns=DOC_COLUMNS), gr.update(choices=[], value=None))
        try:
            srcs = chosen_kb(self.ctx, name).sources()
        except Exception:  # noqa: BLE001 - a knowledge base deleted meanwhile: nothing to show
            return DocumentsView(pd.DataFrame(columns=DOC_COLUMNS), gr.update(choices=[], value=None))
        rows = [[s["name"], s["kind"], s["pages"], s["chunks"], human_bytes(s["bytes"])] for s in srcs]
        return DocumentsView(pd.DataFrame(rows, columns=DOC_COLUMNS),
                             gr.update(choices=[s["name"] for s in srcs], value=None))

    def refresh(self, name: str | None) -> KBLists:
        """↻: the knowledge bases and the picked one's documents, read again."""
        docs = self.documents(name)
        return KBLists(gr.update(choices=kb_names(self.ctx)), kbs_table(self.ctx), docs.table, docs.doc)

    @ui_errors
    def remove(self, name: str, doc: str) -> Removed:
        if not doc:
            raise BadInput("Pick a document to remove.")
        n = rag.remove_documents(chosen_kb(self.ctx, name), [doc])
        return Removed(f"Removed {doc} ({n} document) from **{name}**.", kbs_table(self.ctx))

    @ui_errors
    def delete(self, name: str, confirm: bool) -> KBView:
        if not confirm:
            raise BadInput("Tick 'yes, delete it' first: deleting a knowledge base removes its documents and index.")
        rag.delete(self.ctx.ws, chosen_kb(self.ctx, name).name)
        return KBView(gr.update(choices=kb_names(self.ctx), value=None), kbs_table(self.ctx), f"Deleted **{name}**.")

    @ui_errors
    def rebuild(self, name: str) -> Rebuilt:
        """Make a damaged knowledge base again from the documents it keeps, as an ingest job. Returns Rebuilt
        (message, job id, kb table)."""
        ctx = self.ctx
        kb = chosen_kb(ctx, name)
        job, n = ringest.start_rebuild(ctx.ws, kb.name)
        if job is None:
            return Rebuilt(f"**{kb.name}** kept no documents: it is empty and usable again (the damaged database is "
                           "kept as kb.sqlite.damaged).", None, kbs_table(ctx))
        return Rebuilt(f"Rebuilding **{kb.name}** from the {n} document(s) it keeps (job `{job}`); the damaged "
                       "database is kept as kb.sqlite.damaged.", job, kbs_table(ctx))

    # -------------------------------------------------------------------------------- the ingest job

    @ui_errors
    def add_documents(self, name: str, files: list, password: str) -> IngestStarted:
        """Start the ingest job for the uploaded files. Returns IngestStarted (message, job id)."""
        kb = chosen_kb(self.ctx, name)
        if not files:
            raise BadInput("Choose one or more documents (PDF, .txt or .md) to add.")
        for f in files:  # refuse an unsupported type before anything is copied
            kind_of(Path(f if isinstance(f, str) else f["path"]).name)
        items = _incoming(self.ctx, files)
        if (password or "").strip():
            for it in items:
                it["password"] = password
        job = ringest.start(self.ctx.ws, kb.name, items)
        return IngestStarted(f"Adding {len(items)} document(s) to **{kb.name}** (job `{job}`); it runs in its own "
                             "process.", job)

    @ui_errors
    def cancel(self, job: str | None) -> str:
        queue = ringest.queue(self.ctx.ws)
        active = queue.active()
        job = job or (active.name if active else None)
        if not job:
            raise BadInput("No ingest is running.")
        return f"Ingest `{job}`: {queue.cancel(job).state}"

    @ui_errors
    async def follow(self, job: str | None, seen: str | None, request: gr.Request = None):
        """Stream the ingest monitor (IngestView): the running ingest, else `job`, else the newest, followed from its
        folder with an update per change, ending with the job; this page's newer follower ends it."""
        stop = FOLLOWERS.start(request)
        st = _pick_job(self.ctx, job)
        if st is None:
            yield IngestView(None, "", "No documents have been added yet.", seen, gr.update())
            return
        q = ringest.queue(self.ctx.ws)
        async for up in stream(pfollow.follow(q.job(st.name), lambda: q.status(st.name), stop=stop, idle=True)):
            view = _view(self.ctx, up.status, seen)
            seen = view.seen
            yield view

    def discover(self, job: str | None):
        """An ingest started elsewhere (another tab, the API): its id, so this page follows it; else no change."""
        running = ringest.queue(self.ctx.ws).active()
        return running.name if running and running.name != job else gr.skip()

    # -------------------------------------------------------------------------------- asking

    def menus(self, model_name: str | None) -> AskMenus:
        """The tab selected: the loaded models (the one chosen kept, else the current one) and the knowledge
        bases."""
        names = model_choices(self.ctx)
        current = self.ctx.registry.current()
        value = model_name if model_name in names else (current.name if current else None)
        return AskMenus(gr.update(choices=names, value=value), gr.update(choices=kb_names(self.ctx)))

    def pick_model(self, model_name: str | None):
        """A model chosen: the Adapter menu of the adapters attached to it, on the base model."""
        return gr.update(choices=adapter_choices(self.ctx, model_name), value=BASE)

    @ui_errors
    def search(self, name: str, query: str, top_k: int, mode: str) -> SearchView:
        passages, secs = timed_search(chosen_kb(self.ctx, name), query, top_k, mode)
        note = f"{len(passages)} passage(s) in {1000 * secs:.0f} ms ({mode})" if passages else "No passage matched."
        return SearchView(_passages_table(passages), note)

    @ui_errors
    def ask(self, request: gr.Request, name: str, question: str, model_name: str, adapter: str, top_k: int,
            mode: str, threshold: float, *sampling):
        """Stream a cited answer: yields AnswerView (answer markdown, speed line, passages table, citation choices,
        passages)."""
        kb = chosen_kb(self.ctx, name)
        lm = loaded_model(self.ctx, model_name)
        params = params_from(sampling, adapter)
        answer = ""
        answer_stream = zerogpu.for_model(lm, rag.stream_answer, _stream_answer_gpu)
        for ev in answer_stream(lm, kb, question, params, top_k, mode, threshold, new_stop(request)):
            table = _passages_table(ev.passages)
            if ev.refused:
                yield AnswerView(f"ℹ️ {ev.refused}", "", table, gr.update(choices=[], value=None), [])
                return
            shown = [p.as_dict() for p in ev.passages]
            if ev.chunk is None:
                yield AnswerView("", _answer_status(lm, ev), table, gr.update(), shown)
                continue
            answer += ev.chunk.text
            cites = gr.update(choices=_citation_choices(ev.passages, ev.citations), value=None) \
                if ev.chunk.finish_reason else gr.update()
            yield AnswerView(answer, _answer_status(lm, ev), table, cites, shown)

    @ui_errors
    def estimate(self, name: str | None, question: str, model_name: str | None, top_k: int, *sampling) -> str:
        """What asking would cost (prompt tokens, and the time to read them once the model's speed is known), shown
        while the question is typed; a line saying what is missing instead of an error (nothing was asked yet)."""
        if not (name or "").strip():
            return ""
        try:
            lm = loaded_model(self.ctx, model_name)
            est = rcost.estimate(lm, chosen_kb(self.ctx, name), question, top_k, params_from(sampling, None))
        except MacTunerError as e:
            return f"Cost of a question: {e.message}" if not isinstance(e, rag.DamagedKB) else ""
        return f"Cost of this question: {est.summary()}"

    @ui_errors
    def evaluate(self, name: str, n_questions: int, csv_file: str | None) -> EvalView:
        kb = chosen_kb(self.ctx, name)
        qs = rag.questions_from_csv(Path(csv_file)) if csv_file else rag.auto_questions(kb, int(n_questions))
        res = rag.evaluate(kb, qs)
        rows = [[m, r["hit@1"], r["hit@5"], r["mrr"], r["n"]] for m, r in res.items()]
        src = f"your CSV ({len(qs)} questions)" if csv_file else \
            f"{len(qs)} questions made from the knowledge base's passages"
        best = max(res, key=lambda m: (res[m]["mrr"], res[m]["hit@1"]))
        return EvalView(pd.DataFrame(rows, columns=EVAL_COLUMNS), eval_figure(res),
                        f"Evaluated on {src}: **{best}** search retrieves best here (MRR {res[best]['mrr']:.3f}).")
