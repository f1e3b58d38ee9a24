"""RAG tab handlers: knowledge bases (create, list, documents, remove, delete), the ingest job (started with the
uploads, followed from its job folder so a refreshed page re-attaches), retrieval alone, answers with citations,
and the retrieval-quality evaluation.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd

from pipelines import chat, rag
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
from .chat import BASE, loaded_model, new_stop, params_from, speed_line
from .common import Context, Followers, progress_bar_html, stream, ui_errors

KB_COLUMNS = ["name", "documents", "pages", "chunks", "size", "embedder", "index"]
DOC_COLUMNS = ["name", "kind", "pages", "chunks", "size"]
PASSAGE_COLUMNS = ["#", "score", "similarity", "file", "page", "passage"]
EVAL_COLUMNS = ["mode", "hit@1", "hit@5", "MRR", "questions"]
_stream_answer_gpu = zerogpu.gpu(rag.stream_answer)  # an HF model's answer on ZeroGPU hardware


def kb_names(ctx: Context) -> list[str]:
    return [k["name"] for k in rag.list_kbs(ctx.ws)]


def kbs_table(ctx: Context) -> pd.DataFrame:
    """Every knowledge base; a damaged one says so (and why) in its index column, its counts unknown."""
    rows = [[k["name"], k["documents"], k["pages"], k["chunks"], human_bytes(k["bytes"]), k["embedder"], k["index"]]
            if not k.get("damaged") else  # seen first in the narrow table: the counts' place
            [k["name"], "⚠️ damaged", "–", "–", human_bytes(k["bytes"]), k["embedder"],
             f"damaged ({k['damaged']}): delete or rebuild it"] for k in rag.list_kbs(ctx.ws)]
    return pd.DataFrame(rows, columns=KB_COLUMNS)


def _kb(ctx: Context, name: str | None) -> rag.KB:
    if not (name or "").strip():
        raise BadInput("Choose a knowledge base (or create one).")
    return rag.open_kb(ctx.ws, name)


@ui_errors
def create(ctx: Context, name: str, embedder: str, chunk_size: int, overlap: int):
    kb = rag.create(ctx.ws, (name or "").strip(), (embedder or "").strip() or None, int(chunk_size), int(overlap))
    return (gr.update(choices=kb_names(ctx), value=kb.name), kbs_table(ctx),
            f"Created **{kb.name}** (embedder {kb.meta()['embedder']}, chunks of {int(chunk_size)} tokens). Add "
            "documents to it.")


SAMPLE = Path(__file__).resolve().parents[2] / "assets" / "sample_guide.pdf"
SAMPLE_KB = "sample-guide"


@ui_errors
def try_sample(ctx: Context):
    """The bundled sample PDF into a knowledge base of its own (created once): returns (picker, table, message,
    job id)."""
    if SAMPLE_KB not in kb_names(ctx):
        rag.create(ctx.ws, SAMPLE_KB)
    if any(s["name"] == SAMPLE.name for s in rag.open_kb(ctx.ws, SAMPLE_KB).sources()):
        return (gr.update(choices=kb_names(ctx), value=SAMPLE_KB), kbs_table(ctx),
                f"**{SAMPLE_KB}** holds the sample already: ask it something, e.g. *What does Q4_K_M keep?*", None)
    job = ringest.start(ctx.ws, SAMPLE_KB, _incoming(ctx, [str(SAMPLE)]))
    return (gr.update(choices=kb_names(ctx), value=SAMPLE_KB), kbs_table(ctx),
            f"Adding the sample guide (4 pages) to **{SAMPLE_KB}**; then ask it, e.g. *What does Q4_K_M keep?*", job)


def warm(ctx: Context, name: str | None) -> None:
    """Load the picked knowledge base's embedder and indexes now, so that its first question does not wait for
    them; a knowledge base that cannot be opened says so when it is used."""
    if not (name or "").strip():
        return
    try:
        rag.warm(_kb(ctx, name))
    except MacTunerError:
        return  # deleted meanwhile, damaged, or its embedder folder gone: asking says which, clearly


def documents(ctx: Context, name: str | None):
    """(documents table, document picker) of a knowledge base."""
    if not name:
        return pd.DataFrame(columns=DOC_COLUMNS), gr.update(choices=[], value=None)
    try:
        srcs = _kb(ctx, name).sources()
    except Exception:  # noqa: BLE001 - a knowledge base deleted meanwhile: nothing to show
        return pd.DataFrame(columns=DOC_COLUMNS), gr.update(choices=[], value=None)
    rows = [[s["name"], s["kind"], s["pages"], s["chunks"], human_bytes(s["bytes"])] for s in srcs]
    return pd.DataFrame(rows, columns=DOC_COLUMNS), gr.update(choices=[s["name"] for s in srcs], value=None)


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


@ui_errors
def add_documents(ctx: Context, name: str, files: list, password: str):
    """Start the ingest job for the uploaded files. Returns (message, job id)."""
    kb = _kb(ctx, name)
    if not files:
        raise BadInput("Choose one or more documents (PDF, .txt or .md) to add.")
    for f in files:  # refuse an unsupported type before anything is copied
        kind_of(Path(f if isinstance(f, str) else f["path"]).name)
    items = _incoming(ctx, files)
    if (password or "").strip():
        for it in items:
            it["password"] = password
    job = ringest.start(ctx.ws, kb.name, items)
    return f"Adding {len(items)} document(s) to **{kb.name}** (job `{job}`); it runs in its own process.", job


@ui_errors
def cancel(ctx: Context, job: str | None) -> str:
    active = ringest.queue(ctx.ws).active()
    job = job or (active.name if active else None)
    if not job:
        raise BadInput("No ingest is running.")
    st = ringest.queue(ctx.ws).cancel(job)
    return f"Ingest `{job}`: {st.state}"


def _pick_job(ctx: Context, job: str | None) -> JobStatus | None:
    """The running ingest, else `job`, else the newest."""
    jobs_ = ringest.queue(ctx.ws).list()
    running = next((j for j in jobs_ if j.active), None)
    return running or next((j for j in jobs_ if j.name == job), None) or (jobs_[0] if jobs_ else None)


def _view(ctx: Context, st: JobStatus, seen: str | None):
    """(job, progress, status, seen key, kb table) for ingest status `st`; the table is re-read while it runs and
    when its state changes."""
    caption = f"{100 * (st.fraction or 0):.0f}% · {st.message or ''}"
    md = f"**{st.label}** · {st.state}"
    if st.state == "failed":
        md += f"\n\n❌ {st.reason}"
    elif st.state == "finished" and st.result:
        md += "\n\n" + rag.IngestReport(**st.result).summary()
        md += "".join(f"\n\n⚠️ {w}" for w in st.result.get("warnings", []))
    key = f"{st.name}:{st.state}"
    table = kbs_table(ctx) if key != seen or st.active else gr.update()
    return st.name, progress_bar_html(1.0 if st.state == "finished" else st.fraction or 0, caption), md, key, table


NO_INGEST = (None, "", "No documents have been added yet.")


FOLLOWERS = Followers()


@ui_errors
async def follow(ctx: Context, job: str | None, seen: str | None, request: gr.Request = None):
    """Stream the ingest monitor: the job `poll` would show, followed from its folder with an update per change,
    ending with the job; this page's newer follower ends it."""
    stop = FOLLOWERS.start(request)
    st = _pick_job(ctx, job)
    if st is None:
        yield (*NO_INGEST, seen, gr.update())
        return
    q = ringest.queue(ctx.ws)
    async for up in stream(pfollow.follow(q.job(st.name), lambda: q.status(st.name), stop=stop, idle=True)):
        out = _view(ctx, up.status, seen)
        seen = out[3]
        yield out


def discover(ctx: Context, job: str | None):
    """An ingest started elsewhere (another tab, the API): its id, so this page follows it; else no change."""
    running = ringest.queue(ctx.ws).active()
    return running.name if running and running.name != job else gr.skip()


@ui_errors
def remove(ctx: Context, name: str, doc: str):
    if not doc:
        raise BadInput("Pick a document to remove.")
    n = rag.remove_documents(_kb(ctx, name), [doc])
    return f"Removed {doc} ({n} document) from **{name}**.", kbs_table(ctx)


@ui_errors
def delete(ctx: Context, name: str, confirm: bool):
    if not confirm:
        raise BadInput("Tick 'yes, delete it' first: deleting a knowledge base removes its documents and index.")
    rag.delete(ctx.ws, _kb(ctx, name).name)
    return gr.update(choices=kb_names(ctx), value=None), kbs_table(ctx), f"Deleted **{name}**."


@ui_errors
def rebuild(ctx: Context, name: str):
    """Make a damaged knowledge base again from the documents it keeps, as an ingest job. Returns (message, job
    id, kb table)."""
    kb = _kb(ctx, name)
    job, n = ringest.start_rebuild(ctx.ws, kb.name)
    if job is None:
        return (f"**{kb.name}** kept no documents: it is empty and usable again (the damaged database is kept as "
                "kb.sqlite.damaged).", None, kbs_table(ctx))
    return (f"Rebuilding **{kb.name}** from the {n} document(s) it keeps (job `{job}`); the damaged database is "
            "kept as kb.sqlite.damaged.", job, kbs_table(ctx))


def _passages_table(passages: list[rag.Passage]) -> pd.DataFrame:
    return pd.DataFrame([[p.rank, round(p.score, 4), round(p.similarity, 3), p.file, p.page,
                          p.text[:200] + ("…" if len(p.text) > 200 else "")] for p in passages],
                        columns=PASSAGE_COLUMNS)


@ui_errors
def search(ctx: Context, name: str, query: str, top_k: int, mode: str):
    passages, secs = timed_search(_kb(ctx, name), query, top_k, mode)
    note = f"{len(passages)} passage(s) in {1000 * secs:.0f} ms ({mode})" if passages else "No passage matched."
    return _passages_table(passages), note


def _citation_choices(passages: list[rag.Passage], cited: list[int]) -> list[str]:
    return [f"[{i}] {passages[i - 1].where}" for i in cited] or [f"[{i}] {p.where}" for i, p in enumerate(passages, 1)]


def _answer_status(lm, ev: rag.RagEvent) -> str:
    head = speed_line(ev.chunk, lm.name) if ev.chunk is not None else f"**{lm.name}** · {len(ev.passages)} passages"
    cost = ev.timings.summary(ev.chunk) if ev.timings else ""
    return "\n\n".join(x for x in (head, cost, f"ℹ️ {ev.note}" if ev.note else "") if x)


@ui_errors
def ask(ctx: Context, request: gr.Request, name: str, question: str, model_name: str, adapter: str, top_k: int,
        mode: str, threshold: float, *sampling):
    """Stream a cited answer: yields (answer markdown, speed line, passages table, citation choices, passages)."""
    kb = _kb(ctx, name)
    lm = loaded_model(ctx, model_name)
    params = params_from(sampling, adapter)
    answer, passages = "", []
    answer_stream = zerogpu.for_model(lm, rag.stream_answer, _stream_answer_gpu)
    for ev in answer_stream(lm, kb, question, params, top_k, mode, threshold, new_stop(request)):
        passages = ev.passages
        table = _passages_table(passages)
        if ev.refused:
            yield f"ℹ️ {ev.refused}", "", table, gr.update(choices=[], value=None), []
            return
        if ev.chunk is None:
            yield "", _answer_status(lm, ev), table, gr.update(), [p.as_dict() for p in passages]
            continue
        answer += ev.chunk.text
        cites = gr.update(choices=_citation_choices(passages, ev.citations), value=None) \
            if ev.chunk.finish_reason else gr.update()
        yield answer, _answer_status(lm, ev), table, cites, [p.as_dict() for p in passages]


@ui_errors
def estimate(ctx: Context, name: str | None, question: str, model_name: str | None, top_k: int, *sampling) -> str:
    """What asking would cost (prompt tokens, and the time to read them once the model's speed is known), shown
    while the question is typed; a line saying what is missing instead of an error (nothing was asked yet)."""
    if not (name or "").strip():
        return ""
    try:
        lm = loaded_model(ctx, model_name)
        est = rcost.estimate(lm, _kb(ctx, name), question, top_k, params_from(sampling, None))
    except MacTunerError as e:
        return f"Cost of a question: {e.message}" if not isinstance(e, rag.DamagedKB) else ""
    return f"Cost of this question: {est.summary()}"


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


@ui_errors
def evaluate(ctx: Context, name: str, n_questions: int, csv_file: str | None):
    kb = _kb(ctx, name)
    qs = rag.questions_from_csv(Path(csv_file)) if csv_file else rag.auto_questions(kb, int(n_questions))
    res = rag.evaluate(kb, qs)
    rows = [[m, r["hit@1"], r["hit@5"], r["mrr"], r["n"]] for m, r in res.items()]
    src = f"your CSV ({len(qs)} questions)" if csv_file else f"{len(qs)} questions made from the knowledge base's passages"
    best = max(res, key=lambda m: (res[m]["mrr"], res[m]["hit@1"]))
    return (pd.DataFrame(rows, columns=EVAL_COLUMNS), eval_figure(res),
            f"Evaluated on {src}: **{best}** search retrieves best here (MRR {res[best]['mrr']:.3f}).")


def model_choices(ctx: Context) -> list[str]:
    return ctx.registry.names()


def adapter_choices(ctx: Context, name: str | None) -> list[str]:
    lm = ctx.registry.get(name) if name else ctx.registry.current()
    return [BASE] + ([a.name for a in chat.list_adapters(lm)] if lm is not None else [])
