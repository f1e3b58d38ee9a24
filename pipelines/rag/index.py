"""Search indexes of a knowledge base: FAISS over the normalised vectors (exact inner product while the base is small,
HNSW once it is large - chosen by size and shown), SQLite FTS5 for keywords (BM25), and reciprocal rank fusion of
the two rankings. SQLite's FTS5 was chosen over bm25s by measurement (bench/rag.py): both answer in a few
milliseconds at 100k chunks, and FTS5 updates in place inside the knowledge base's transactions, with no extra
package.

The FAISS index is derived data: built from the vectors table for the database's current generation, written under
a temporary name and renamed, and rebuilt whenever its recorded generation is not the database's (so an index cut
off by a crash is never used).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass

import numpy as np

from .. import device as devicemod
from ..workspace import write_json
from .store import KB

FLAT_MAX = 50_000  # chunks searched exactly; above, an HNSW graph
HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 32, 80, 96
RRF_K = 60
_CACHE: dict[str, "VectorIndex"] = {}
_LOCK = threading.Lock()


def index_kind(n: int) -> str:
    return "exact (flat inner product)" if n <= FLAT_MAX else f"approximate (HNSW, M={HNSW_M})"


@dataclass
class VectorIndex:
    index: object  # faiss.Index
    ids: np.ndarray  # position -> chunk id
    generation: int
    kind: str


def _faiss():
    import faiss  # noqa: PLC0415

    faiss.omp_set_num_threads(devicemod.cpu_threads())
    return faiss


def build(vectors: np.ndarray):
    """A FAISS index over unit-length vectors: flat inner product, or HNSW (inner product) when there are many."""
    faiss = _faiss()
    dim = vectors.shape[1]
    if len(vectors) <= FLAT_MAX:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_BUILD
        index.hnsw.efSearch = HNSW_EF_SEARCH
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _generation(kb: KB) -> int:
    return int(kb.meta().get("generation", 0))


def rebuild(kb: KB) -> VectorIndex:
    """Build the vector index for the database's current generation and write it (temp name, then rename)."""
    faiss = _faiss()
    with kb.db() as con:
        gen = int(json.loads(con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]))
        dim = int(json.loads(con.execute("SELECT value FROM meta WHERE key='dim'").fetchone()[0]))
        rows = con.execute("SELECT id, v FROM vectors ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim) if rows else \
        np.zeros((0, dim), np.float32)
    index = build(vecs)
    tmp = kb.path / f".index.faiss.tmp-{os.getpid()}"
    faiss.write_index(index, str(tmp))
    np.save(kb.path / ".index-ids.npy.tmp.npy", ids)
    os.replace(kb.path / ".index-ids.npy.tmp.npy", kb.path / "index-ids.npy")
    os.replace(tmp, kb.path / "index.faiss")
    write_json(kb.path / "index.json", {"generation": gen, "kind": index_kind(len(ids)), "count": int(len(ids))})
    vi = VectorIndex(index, ids, gen, index_kind(len(ids)))
    with _LOCK:
        _CACHE[str(kb.path)] = vi
    return vi


def load(kb: KB) -> VectorIndex:
    """The vector index of the database's current generation: cached, else read from disk, else rebuilt."""
    gen = _generation(kb)
    with _LOCK:
        vi = _CACHE.get(str(kb.path))
    if vi is not None and vi.generation == gen:
        return vi
    try:
        info = json.loads((kb.path / "index.json").read_text())
        if int(info.get("generation", -1)) == gen:
            vi = VectorIndex(_faiss().read_index(str(kb.path / "index.faiss")), np.load(kb.path / "index-ids.npy"),
                             gen, info.get("kind") or "")
            if vi.index.ntotal == len(vi.ids):
                with _LOCK:
                    _CACHE[str(kb.path)] = vi
                return vi
    except (OSError, ValueError, RuntimeError):
        pass  # missing, half-written or from another generation: rebuilt below
    return rebuild(kb)


def forget(kb: KB) -> None:
    with _LOCK:
        _CACHE.pop(str(kb.path), None)


def vector_search(kb: KB, query_vec: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity), best first."""
    vi = load(kb)
    if not len(vi.ids) or k <= 0:
        return []
    scores, pos = vi.index.search(np.ascontiguousarray(query_vec.reshape(1, -1), dtype=np.float32),
                                  min(k, len(vi.ids)))
    return [(int(vi.ids[p]), float(s)) for s, p in zip(scores[0], pos[0]) if p >= 0]


def fts_query(text: str) -> str:
    """A user's words as an FTS5 query: each word quoted (no operator or syntax of theirs is run), OR-ed."""
    words = re.findall(r"\w+", text or "")
    return " OR ".join('"' + w.replace('"', "") + '"' for w in words[:64])


def keyword_search(kb: KB, query: str, k: int) -> list[tuple[int, float]]:
    """(chunk id, BM25 score - higher is better), best first."""
    q = fts_query(query)
    if not q or k <= 0:
        return []
    with kb.db() as con:
        rows = con.execute("SELECT rowid, bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY bm25(fts) LIMIT ?",
                           (q, int(k))).fetchall()
    return [(int(r), -float(s)) for r, s in rows]


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: sum of 1 / (k + rank) over the rankings an id appears in, best first."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, 1):
            score[cid] = score.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(score.items(), key=lambda t: -t[1])
