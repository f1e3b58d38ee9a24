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
    manifest.json  a summary for people and listings (embedder, settings, counts, index kind, dates)

    kb = create(ws, "manuals")                 # or open_kb(ws, "manuals")
    list_kbs(ws) -> [{"name", "documents", "pages", "chunks", "bytes", ...}]
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
        success."""
        con = sqlite3.connect(self.db_path, timeout=30)
        try:
            yield con
            con.commit()
        finally:
            con.close()

    def meta(self) -> dict:
        with self.db() as con:
            return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}

    def sources(self) -> list[dict]:
        with self.db() as con:
            rows = con.execute("SELECT s.sha256, s.name, s.kind, s.pages, s.chars, s.bytes, s.added, COUNT(c.id) "
                               "FROM sources s LEFT JOIN chunks c ON c.sha256 = s.sha256 GROUP BY s.sha256 "
                               "ORDER BY s.added").fetchall()
        return [dict(zip(("sha256", "name", "kind", "pages", "chars", "bytes", "added", "chunks"), r)) for r in rows]

    def summary(self) -> dict:
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
                "updated": m.get("updated"), "generation": m.get("generation", 0)}

    def write_manifest(self) -> dict:
        s = self.summary()
        write_json(self.path / "manifest.json", s)
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
        con = sqlite3.connect(tmp / "kb.sqlite")
        con.execute("PRAGMA journal_mode=WAL")  # persistent: readers never wait for a writer
        con.executescript(SCHEMA)
        now = time.time()
        meta = {"embedder": emb.name if emb.name != DEFAULT else DEFAULT, "dim": emb.dim, "chunk_size": int(chunk_size),
                "overlap": int(overlap), "created": now, "updated": now, "generation": 0}
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.commit()
        con.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kb = KB(path)
    kb.write_manifest()
    return kb


def list_kbs(ws: Workspace) -> list[dict]:
    if not ws.rag.is_dir():
        return []
    return [KB(p).summary() for p in sorted(ws.rag.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "kb.sqlite").is_file()]


def delete(ws: Workspace, name: str) -> None:
    kb = open_kb(ws, name)
    trash = kb.path.with_name(f".{kb.name}.deleted-{time.time_ns()}")
    kb.path.rename(trash)  # gone from listings at once, even if the removal below is interrupted
    shutil.rmtree(trash, ignore_errors=True)


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
