"""Ingest: documents into a knowledge base - extracted page by page, chunked with the embedder's tokenizer, embedded
in batches, and stored one document per transaction (a document that fails, or the one a cancel interrupts, leaves
the knowledge base as it was); the vector index is rebuilt at the end. The studio runs it as a job (rag/.jobs/<id>,
the same job mechanism as training and export) with progress: documents, pages and chunks done, rate, ETA.

Every document, whatever its kind, is bounded: in size (extract.py: bytes, pages, characters; chunk.py: passages)
and in time (MAX_DOCUMENT_SECONDS for reading, cutting and embedding it; one that is on course to take longer is
stopped as soon as that shows). A document past a bound is refused with the reason; the others still go in.

    report = ingest(ws, "manuals", [Path("guide.pdf")])        # in this process (the CLI, tests)
    job = start(ws, "manuals", [{"path": "...", "name": "guide.pdf", "password": None}])   # the studio
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import jobs
from ..errors import BadInput, Conflict
from ..progress import ProgressFn, no_progress
from ..workspace import Workspace, sha256_file, write_json
from . import index
from .chunk import chunk_document
from .embed import embedder
from .extract import MAX_SECONDS, extract, kind_of
from .store import KB, DamagedKB, ingest_queue, open_kb, prepare_rebuild

BATCH = 512  # chunks per encode call (sentence-transformers sorts each call by length: fewer pads)
MAX_DOCUMENT_SECONDS = 900.0  # reading, cutting and embedding one document


def _too_slow(name: str, what: str, limit: float) -> BadInput:
    return BadInput(f"{name}: reading, cutting and embedding it would take over {limit:.0f} s ({what}); split it "
                    "into smaller documents.")


@dataclass
class IngestReport:
    kb: str
    added: list[dict] = field(default_factory=list)  # name, pages, chunks
    skipped: list[dict] = field(default_factory=list)  # name, reason (a duplicate)
    failed: list[dict] = field(default_factory=list)  # name, error
    warnings: list[str] = field(default_factory=list)
    pages: int = 0
    chunks: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        bits = [f"{len(self.added)} document(s) added ({self.pages} pages, {self.chunks} chunks, {self.seconds:.1f} s)"]
        if self.skipped:
            bits.append(f"{len(self.skipped)} skipped: " + "; ".join(f"{s['name']}: {s['reason']}" for s in self.skipped))
        if self.failed:
            bits.append(f"{len(self.failed)} refused: " + "; ".join(f"{f['error']}" for f in self.failed))
        return ". ".join(bits)


def ingest(ws: Workspace, kb_name: str, files: list, progress: ProgressFn = no_progress, embedder_name: str | None = None,
           passwords: dict | None = None) -> IngestReport:
    """Add `files` (paths, or {"path", "name", "password"} dicts) to the knowledge base. A document that cannot be
    used is reported in `failed` with its reason; one already there (same content) in `skipped`. `embedder_name`,
    when given, must be the knowledge base's own (no mixing of embedders)."""
    t0 = time.time()
    kb = open_kb(ws, kb_name)
    meta = kb.meta()
    if embedder_name and embedder_name.strip() not in ("", meta["embedder"]):
        raise BadInput(f"The knowledge base '{kb.name}' was made with the embedder {meta['embedder']}; documents "
                       f"cannot be added with {embedder_name} (their vectors would not compare). Create another "
                       "knowledge base for it.")
    items = [f if isinstance(f, dict) else {"path": str(f)} for f in files]
    if not items:
        raise BadInput("Choose at least one document (PDF, .txt or .md).")
    emb = embedder(meta["embedder"])
    rep = IngestReport(kb.name)
    known = {s["sha256"]: s["name"] for s in kb.sources()}
    total = len(items)
    rate = _Rate()
    for i, item in enumerate(items):
        path = Path(item["path"])
        name = item.get("name") or path.name
        password = item.get("password") or (passwords or {}).get(name)

        def step(frac: float, what: str, **fields):
            done = (i + frac) / total
            eta = (time.time() - t0) / done * (1 - done) if done > 0.02 else None
            speed = f" · {rate.chunks / rate.seconds:.0f} chunks/s" if rate.seconds > 0 else ""
            progress(done, f"document {i + 1}/{total} ({name}): {what}{speed}"
                     + (f" · ETA {eta:.0f} s" if eta is not None else ""), documents_done=i, documents=total,
                     pages_done=rep.pages, chunks_done=rep.chunks, eta_s=round(eta, 1) if eta is not None else None)

        try:
            kind_of(name)
            if not path.is_file():
                raise BadInput(f"{name}: the file is missing.")
            sha = sha256_file(path)
            if sha in known:
                rep.skipped.append({"name": name, "reason": f"already in the knowledge base (as {known[sha]})"})
                continue
            doc, chunks, vecs = _read_cut_embed(path, name, password, emb, meta, step, rate)
            step(0.95, "storing")
            _store(kb, sha, name, doc, chunks, vecs, path)
        except BadInput as e:
            rep.failed.append({"name": name, "error": e.message})
            continue
        known[sha] = name
        rep.added.append({"name": name, "pages": len(doc.pages), "chunks": len(chunks)})
        rep.warnings += doc.warnings
        rep.pages += len(doc.pages)
        rep.chunks += len(chunks)
    progress(0.99, "building the vector index")
    index.rebuild(kb)
    kb.write_manifest()
    rep.seconds = round(time.time() - t0, 2)
    progress(1.0, rep.summary())
    return rep


@dataclass
class _Rate:
    """Chunks embedded and the seconds it took, over the whole ingest (the progress line's chunks/s)."""

    chunks: int = 0
    seconds: float = 0.0


def _read_cut_embed(path: Path, name: str, password: str | None, emb, meta: dict, step, rate: _Rate):
    """(document, chunks, vector batches) of one file, within MAX_DOCUMENT_SECONDS; BadInput saying why not."""
    step(0.0, "reading")
    started = time.monotonic()
    doc = extract(path, password, name, max_seconds=min(MAX_SECONDS, MAX_DOCUMENT_SECONDS))
    try:
        chunks = chunk_document(doc, emb, meta["chunk_size"], meta["overlap"],
                                deadline=started + MAX_DOCUMENT_SECONDS)
    except TimeoutError as e:
        raise _too_slow(name, f"stopped while {e}", MAX_DOCUMENT_SECONDS) from None
    vecs, embedding_from = [], time.monotonic()
    for b in range(0, len(chunks), BATCH):
        step(0.1 + 0.8 * b / max(1, len(chunks)), f"embedding {b}/{len(chunks)} chunks")
        t1 = time.time()
        vecs.append(emb.encode([c.text for c in chunks[b: b + BATCH]]))
        rate.seconds += time.time() - t1
        rate.chunks += len(chunks[b: b + BATCH])
        _check_embedding_time(name, started, embedding_from, b + BATCH, len(chunks))
    return doc, chunks, vecs


def _check_embedding_time(name: str, started: float, embedding_from: float, done: int, total: int) -> None:
    """Past MAX_DOCUMENT_SECONDS, or on course for it (the rest projected from two batches on), the document is
    refused."""
    if done >= total:
        return
    now = time.monotonic()
    spent = now - started
    rest = (now - embedding_from) / done * (total - done) if done >= 2 * BATCH else 0.0
    if spent + rest > MAX_DOCUMENT_SECONDS:
        raise _too_slow(name, f"{done:,} of its {total:,} passages embedded in {spent:.0f} s", MAX_DOCUMENT_SECONDS)


def _store(kb: KB, sha: str, name: str, doc, chunks, vecs, path: Path) -> None:
    """One document in one transaction, its file copied in first (named by content hash, temp name + rename)."""
    import numpy as np  # noqa: PLC0415

    src = kb.sources_dir / f"{sha}{Path(name).suffix.lower()}"
    if not src.exists():
        tmp = src.with_name(f".{src.name}.tmp-{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, src)
    allv = np.concatenate(vecs) if vecs else np.zeros((0, 1), np.float32)
    with kb.db() as con:
        con.execute("INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (sha, name, doc.kind, len(doc.pages), doc.chars, doc.bytes, time.time()))
        first = (con.execute("SELECT COALESCE(MAX(id), 0) FROM chunks").fetchone()[0] or 0) + 1
        ids = range(first, first + len(chunks))
        con.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(cid, sha, c.page, c.start, c.end, c.heading, c.text, c.tokens) for cid, c in zip(ids, chunks)])
        con.executemany("INSERT INTO vectors VALUES (?, ?)", [(cid, allv[j].tobytes()) for j, cid in enumerate(ids)])
        kb.bump(con)


# ------------------------------------------------------------------------------------------------ as a job


def queue(ws: Workspace) -> jobs.JobQueue:
    return ingest_queue(ws)


def start(ws: Workspace, kb_name: str, files: list[dict], embedder_name: str | None = None) -> str:
    """Start an ingest job; `files` are {"path", "name", "password"?} of files inside the workspace (the studio
    copies uploads into rag/.incoming/). Conflict while another ingest runs."""
    kb = open_kb(ws, kb_name)
    if not files:
        raise BadInput("Choose at least one document (PDF, .txt or .md).")
    reason = kb.damage()
    if reason is not None:
        raise DamagedKB(kb.name, reason)
    for f in files:
        kind_of(f.get("name") or f["path"])
    return queue(ws).start(kb.name, {"kb": kb.name, "files": files, "embedder": embedder_name, "root": str(ws.root)},
                           kb=kb.name, documents=len(files), documents_done=0, pages_done=0, chunks_done=0)


def rebuild(ws: Workspace, kb_name: str, progress: ProgressFn = no_progress) -> IngestReport:
    """Make a knowledge base again from the documents it keeps (store.prepare_rebuild), in this process (the CLI)."""
    kb, docs = prepare_rebuild(ws, kb_name)
    if docs:
        return ingest(ws, kb.name, docs, progress)
    kb.write_manifest()  # a damaged one that kept no documents: empty again, and usable
    return IngestReport(kb.name)


def start_rebuild(ws: Workspace, kb_name: str) -> tuple[str | None, int]:
    """The same as a job: (job id, documents to add again); (None, 0) when there were none to add. Conflict while
    another ingest runs (checked before anything is changed)."""
    running = queue(ws).active()
    if running:
        raise Conflict(f"An ingest job is running ({running.label}, "
                       f"{int(100 * (running.fraction or 0))}%): wait for it or cancel it.")
    kb, docs = prepare_rebuild(ws, kb_name)
    if not docs:
        kb.write_manifest()
        return None, 0
    return start(ws, kb.name, docs), len(docs)


def run_job(job: jobs.JobDir) -> int:
    """The ingest job's worker (`python -m pipelines.jobs --work rag/.jobs/<id>`). Passwords are dropped from job.json
    as soon as they are read; uploaded copies in rag/.incoming are removed at the end."""
    spec = job.spec()
    clean = {**spec, "files": [{k: v for k, v in f.items() if k != "password"} for f in spec["files"]]}
    write_json(job.spec_path, clean)
    ws = Workspace.open(spec["root"])

    def work(rep: jobs.Reporter):
        try:
            return ingest(ws, spec["kb"], spec["files"], rep.progress, spec.get("embedder")).as_dict()
        finally:
            for f in spec["files"]:
                p = Path(f["path"])
                if (ws.rag / ".incoming") in p.parents:
                    p.unlink(missing_ok=True)

    return jobs.run_reported(job, work)
