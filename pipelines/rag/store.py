"""Knowledge bases on disk: <workspace>/rag/<name>/

    kb.sqlite      the record of truth, changed only in transactions (an interrupted change never shows):
                     meta     embedder, dim, chunk_size, overlap, created, updated, generation
                     sources  sha256, name, kind, pages, chars, bytes, added     (one row per document)
                     chunks   id, sha256, page, start, end, heading, text, tokens  (origin: file, page, char span)
                     vectors  chunk id -> float32 embedding (the vector index is built from these)
    sources/       the documents as uploaded, named by content hash: <sha256>.<ext>
    index.faiss    the FAISS index of the vectors and bm25/ the keyword index (bm25s) of the chunks' text, with
                   index-ids.npy and index.json {"generation", "kind", "count"}: derived data, written under temporary
                   names and renamed, and trusted only when their generation is the database's
    manifest.json  a summary for people and listings (embedder, settings, counts, index kind, dates) and the
                   documents' names by hash: what a rebuild of a damaged database reads

A damaged kb.sqlite (not a database, truncated, its tables gone) is that knowledge base's problem only: listings show
it with `damaged` set to the reason, every use of it is a DamagedKB error (a Conflict naming the way out), and
`prepare_rebuild` sets the database aside (kb.sqlite.damaged) for a fresh one with the same settings, so its kept
documents (sources/) can be ingested again (ingestion.rebuild / start_rebuild).

    kb = create(ws, "manuals")                 # or open_kb(ws, "manuals")
    list_kbs(ws) -> [{"name", "documents", "pages", "chunks", "bytes", ..., "damaged": None or the reason}]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import jobs
from ..errors import BadInput, Conflict, NotFound
from ..workspace import Workspace, dir_size, write_json

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sources (sha256 TEXT PRIMARY KEY, name TEXT, kind TEXT, pages INTEGER, chars INTEGER,
                                    bytes INTEGER, added REAL);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, sha256 TEXT, page INTEGER, start INTEGER, "end" INTEGER,
                                   heading TEXT, text TEXT, tokens INTEGER);
CREATE INDEX IF NOT EXISTS chunks_sha ON chunks(sha256);
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, v BLOB);
"""


# SQLite errors that say the database is busy or the disk is full, not that the file is damaged
_PASSING = ("locked", "busy", "full", "interrupt")


class DamagedKB(Conflict):
    """A knowledge base whose database cannot be read: the message names it, the reason and the way out."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"The knowledge base '{name}' is damaged (kb.sqlite: {reason}). Delete it, or rebuild it "
                         "from the documents it keeps (Rebuild in the RAG tab, /rag_rebuild, `mactuner rag rebuild "
                         f"{name}`).")


def _damage(e: sqlite3.Error) -> str | None:
    """The reason `e` shows the database file is damaged; None for a passing or programming error."""
    if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return None
    text = str(e).strip() or type(e).__name__
    if isinstance(e, sqlite3.OperationalError) and any(w in text.lower() for w in _PASSING):
        return None
    return text


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.fullmatch(name):
        raise BadInput(f"'{name}' is not a usable knowledge-base name (letters, digits, . _ - ; up to 64; starting "
                       "with a letter or digit).")
    return name


@dataclass(frozen=True)
class KB:
    """One knowledge base's folder."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def db_path(self) -> Path:
        return self.path / "kb.sqlite"

    @property
    def sources_dir(self) -> Path:
        return self.path / "sources"

    @contextlib.contextmanager
    def db(self):
        """A connection (the database is in WAL mode: the studio reads while an ingest job writes); commits on
        success. A database that turns out damaged is a DamagedKB error."""
        con = None
        try:
            con = sqlite3.connect(self.db_path, timeout=30)
            yield con
            con.commit()
        except sqlite3.DatabaseError as e:
            reason = _damage(e)
            if reason is None:
                raise
            raise DamagedKB(self.name, reason) from None
        finally:
            if con is not None:
                con.close()

    def damage(self) -> str | None:
        """Why the database cannot be read, or None when it can (its tables are there and readable)."""
        try:
            with self.db() as con:
                for table in ("meta", "sources", "chunks", "vectors"):
                    con.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()  # noqa: S608 - fixed names
                con.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()
        except DamagedKB as e:
            return e.reason
        return None

    def meta(self) -> dict:
        with self.db() as con:
            rows = con.execute("SELECT key, value FROM meta").fetchall()
        try:
            return {k: json.loads(v) for k, v in rows}
        except (TypeError, ValueError):
            raise DamagedKB(self.name, "its settings (meta) cannot be read") from None

    def sources(self) -> list[dict]:
        with self.db() as con:
            rows = con.execute("SELECT s.sha256, s.name, s.kind, s.pages, s.chars, s.bytes, s.added, COUNT(c.id) "
                               "FROM sources s LEFT JOIN chunks c ON c.sha256 = s.sha256 GROUP BY s.sha256 "
                               "ORDER BY s.added").fetchall()
        return [dict(zip(("sha256", "name", "kind", "pages", "chars", "bytes", "added", "chunks"), r)) for r in rows]

    def summary(self) -> dict:
        """Counts, settings and index of the knowledge base; a damaged one has its last manifest's settings, no
        counts, and `damaged` set to the reason."""
        try:
            return self._summary()
        except DamagedKB as e:
            kept = self.manifest()
            return {"name": self.name, "documents": None, "pages": None, "chunks": None, "bytes": dir_size(self.path),
                    **{k: kept.get(k) for k in ("embedder", "dim", "chunk_size", "overlap", "created", "updated")},
                    "index": "damaged", "generation": None, "damaged": e.reason}

    def manifest(self) -> dict:
        """manifest.json as last written ({} when it is missing or unreadable)."""
        try:
            data = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _summary(self) -> dict:
        m = self.meta()
        with self.db() as con:
            docs, pages = con.execute("SELECT COUNT(*), COALESCE(SUM(pages), 0) FROM sources").fetchone()
            chunks = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        try:  # the vector index as built (index.py writes index.json)
            kind = json.loads((self.path / "index.json").read_text()).get("kind")
        except (OSError, ValueError):
            kind = None
        return {"name": self.name, "documents": docs, "pages": pages, "chunks": chunks, "bytes": dir_size(self.path),
                "embedder": m.get("embedder"), "dim": m.get("dim"), "chunk_size": m.get("chunk_size"),
                "overlap": m.get("overlap"), "index": kind or "not built yet", "created": m.get("created"),
                "updated": m.get("updated"), "generation": m.get("generation", 0), "damaged": None}

    def write_manifest(self) -> dict:
        """manifest.json: the summary, and the kept documents' names by hash (what a rebuild needs; a kept document
        not in the database, such as one a rebuild could not add again, keeps its earlier name)."""
        s = self._summary()
        earlier = self.manifest().get("files")
        stems = {f.stem for f in _kept(self)}
        names = {sha: n for sha, n in (earlier.items() if isinstance(earlier, dict) else ()) if sha in stems}
        names.update({d["sha256"]: d["name"] for d in self.sources()})
        write_json(self.path / "manifest.json", {**s, "files": names})
        return s

    def bump(self, con: sqlite3.Connection) -> int:
        """A change was made in this transaction: the next generation (the vector index is rebuilt for it)."""
        gen = int(json.loads((con.execute("SELECT value FROM meta WHERE key='generation'").fetchone() or ["0"])[0]))
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [("generation", json.dumps(gen + 1)), ("updated", json.dumps(time.time()))])
        return gen + 1


def kb_path(ws: Workspace, name: str) -> Path:
    return ws.rag / check_name(name)


def open_kb(ws: Workspace, name: str) -> KB:
    kb = KB(kb_path(ws, name))
    if not kb.db_path.is_file():
        raise NotFound(f"There is no knowledge base '{name}' (create it first).")
    return kb


def create(ws: Workspace, name: str, embedder: str | None = None, chunk_size: int = 200, overlap: int = 40) -> KB:
    """A new, empty knowledge base; its settings (embedder, chunking) are fixed for its life."""
    from .embed import DEFAULT  # noqa: PLC0415
    from .embed import embedder as get_embedder

    path = kb_path(ws, name)
    if path.exists():
        raise Conflict(f"A knowledge base named '{name}' already exists.")
    if embedder and embedder.strip() not in ("", DEFAULT):
        embedder = str(ws.check_path(embedder)) if ws.confined else embedder  # a folder: inside, when confined
    emb = get_embedder(embedder)
    if not 16 <= int(chunk_size) <= emb.max_tokens:
        raise BadInput(f"The chunk size must be between 16 and {emb.max_tokens} tokens (what {emb.name} reads), "
                       f"not {chunk_size}.")
    if not 0 <= int(overlap) < int(chunk_size):
        raise BadInput(f"The overlap must be at least 0 and below the chunk size (got {overlap}).")
    tmp = path.with_name(f".{path.name}.tmp-{time.time_ns()}")
    (tmp / "sources").mkdir(parents=True)
    try:
        _new_db(tmp / "kb.sqlite", emb.name if emb.name != DEFAULT else DEFAULT, emb.dim, int(chunk_size),
                int(overlap))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kb = KB(path)
    kb.write_manifest()
    return kb


def _new_db(path: Path, embedder: str, dim: int, chunk_size: int, overlap: int, created: float | None = None) -> None:
    """An empty database with these settings. `uid` tells this database from an earlier one at the same place (a
    knowledge base deleted and made again, a rebuilt one): the in-memory index cache checks it."""
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")  # persistent: readers never wait for a writer
        con.executescript(SCHEMA)
        now = time.time()
        meta = {"embedder": embedder, "dim": dim, "chunk_size": chunk_size, "overlap": overlap,
                "created": created or now, "updated": now, "generation": 0, "uid": uuid.uuid4().hex}
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.commit()
    finally:
        con.close()


def list_kbs(ws: Workspace) -> list[dict]:
    if not ws.rag.is_dir():
        return []
    return [KB(p).summary() for p in sorted(ws.rag.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "kb.sqlite").is_file()]


def ingest_queue(ws: Workspace) -> jobs.JobQueue:
    """The ingest jobs (rag/.jobs): one runs at a time."""
    return jobs.JobQueue(ws.rag / ".jobs", "ingest", "ingest")


def refuse_while_ingesting(ws: Workspace, name: str, doing: str) -> None:
    """Conflict while an ingest into `name` runs (it writes the database and the sources `doing` would change)."""
    running = ingest_queue(ws).active()
    if running and running.extra.get("kb") == name:
        raise Conflict(f"Documents are being added to '{name}' ({int(100 * (running.fraction or 0))}%, job "
                       f"{running.name}): cancel that ingest or wait for it to finish, then {doing} it.")


def delete(ws: Workspace, name: str) -> None:
    """Delete a knowledge base (a damaged one too); Conflict while an ingest into it runs. The ingest queue's lock is
    held meanwhile, so no ingest into it starts between the check and the removal."""
    path = kb_path(ws, name)
    if not (path / "kb.sqlite").is_file():
        raise NotFound(f"There is no knowledge base '{name}' (create it first).")
    q = ingest_queue(ws)
    q.folder.mkdir(parents=True, exist_ok=True)
    with jobs.file_lock(q.folder / ".lock"):
        refuse_while_ingesting(ws, path.name, "delete")
        trash = path.with_name(f".{path.name}.deleted-{time.time_ns()}")
        path.rename(trash)  # gone from listings at once, even if the removal below is interrupted
    shutil.rmtree(trash, ignore_errors=True)  # its cached index is never used again: a new database has a new uid


def prepare_rebuild(ws: Workspace, name: str) -> tuple[KB, list[dict]]:
    """Get a knowledge base ready to be made again from the documents it keeps (sources/): a damaged database is set
    aside (kb.sqlite.damaged, kept) for an empty one with the same settings (its manifest's). Returns it and the kept
    documents its database lacks, [{"path", "name"}] (names from the manifest), to ingest. Conflict when an ingest
    into it runs, or when it is sound and lacks none of them."""
    path = kb_path(ws, name)
    kb = KB(path)
    if not kb.db_path.is_file():
        raise NotFound(f"There is no knowledge base '{name}' (create it first).")
    refuse_while_ingesting(ws, kb.name, "rebuild")
    reason = kb.damage()
    if reason is not None:
        _set_aside(kb)
    have = {s["sha256"] for s in kb.sources()}
    names = kb.manifest().get("files")
    names = names if isinstance(names, dict) else {}
    docs = [{"path": str(f), "name": names.get(f.stem) or f"{f.stem[:12]}{f.suffix}"} for f in _kept(kb)
            if f.stem not in have]
    if reason is None and not docs:
        raise Conflict(f"The knowledge base '{kb.name}' is not damaged and holds every document it keeps: nothing "
                       "to rebuild.")
    return kb, docs


def _kept(kb: KB) -> list[Path]:
    """The documents kept in sources/ (<sha256>.<ext>; not the temporary copies being written)."""
    if not kb.sources_dir.is_dir():
        return []
    return sorted(f for f in kb.sources_dir.iterdir() if f.is_file() and not f.name.startswith("."))


def _set_aside(kb: KB) -> None:
    """Replace a damaged database by an empty one with its settings; the damaged file stays as kb.sqlite.damaged."""
    kept = kb.manifest()
    from .embed import DEFAULT  # noqa: PLC0415
    from .embed import embedder as get_embedder  # noqa: PLC0415

    emb = get_embedder(kept.get("embedder") or DEFAULT)  # refused here when its folder is gone
    tmp = kb.path / f".kb.sqlite.tmp-{time.time_ns()}"
    try:
        _new_db(tmp, kept.get("embedder") or DEFAULT, emb.dim, int(kept.get("chunk_size") or 200),
                int(kept.get("overlap") if kept.get("overlap") is not None else 40), kept.get("created"))
        for suffix in ("-wal", "-shm"):  # a stale -wal beside the new file would be replayed into it
            if Path(f"{kb.db_path}{suffix}").exists():
                os.replace(f"{kb.db_path}{suffix}", f"{kb.db_path}.damaged{suffix}")
        kept_as = Path(f"{kb.db_path}.damaged")
        kept_as.unlink(missing_ok=True)
        try:
            os.link(kb.db_path, kept_as)  # a second name for the damaged file, then one atomic swap:
        except OSError:  # (a filesystem without hard links: a copy)
            shutil.copy2(kb.db_path, kept_as)
        os.replace(tmp, kb.db_path)  # kb.sqlite is never missing, even if this is interrupted
    finally:
        tmp.unlink(missing_ok=True)
    for derived in ("index.json", "index.faiss", "index-ids.npy"):  # the cached one: the new database's uid differs
        (kb.path / derived).unlink(missing_ok=True)


def remove_documents(kb: KB, names_or_shas: list[str]) -> int:
    """Remove documents (by file name or sha256) and their chunks, in one transaction; returns how many."""
    with kb.db() as con:
        rows = con.execute("SELECT sha256, name FROM sources").fetchall()
        wanted = {x.strip() for x in names_or_shas if x and x.strip()}
        shas = [sha for sha, name in rows if sha in wanted or name in wanted]
        missing = wanted - {sha for sha, _ in rows} - {name for _, name in rows}
        if missing:
            raise NotFound(f"{', '.join(sorted(missing))}: not in the knowledge base '{kb.name}'.")
        for sha in shas:
            ids = [r[0] for r in con.execute("SELECT id FROM chunks WHERE sha256=?", (sha,))]
            con.executemany("DELETE FROM vectors WHERE id=?", [(i,) for i in ids])
            con.execute("DELETE FROM chunks WHERE sha256=?", (sha,))
            con.execute("DELETE FROM sources WHERE sha256=?", (sha,))
        if shas:
            kb.bump(con)
    for sha in shas:
        for f in kb.sources_dir.glob(f"{sha}.*"):
            f.unlink(missing_ok=True)
    kb.write_manifest()
    return len(shas)
