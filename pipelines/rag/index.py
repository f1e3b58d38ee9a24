"""Search indexes of a knowledge base: FAISS over the normalised vectors (exact inner product while the base is small,
HNSW once it is large - chosen by size and shown), BM25 over the chunks' text (bm25s), and reciprocal rank fusion of
the two rankings. bm25s was chosen over SQLite FTS5 by measurement (bench/rag.py): at 100k chunks FTS5 took
~150 ms for a query of common words (it scores every row that holds one), bm25s ~1.5 ms (precomputed sparse
scores); bm25s rebuilds instead of updating in place, which the vector index does anyway.

Both indexes are derived data: built from the database's chunks and vectors for its current generation, written
under temporary names and renamed, and rebuilt whenever their recorded generation is not the database's (so an index
cut off by a crash is never used).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass

import numpy as np

from .. import device as devicemod
from ..workspace import write_json
from .store import KB

FLAT_MAX = 50_000  # chunks searched exactly; above, an HNSW graph
HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 32, 80, 96
RRF_K = 60
STOPWORDS = "en"
_CACHE: dict[str, "Indexes"] = {}
_LOCK = threading.Lock()


def index_kind(n: int) -> str:
    return "exact (flat inner product)" if n <= FLAT_MAX else f"approximate (HNSW, M={HNSW_M})"


@dataclass
class Indexes:
    vectors: object  # faiss.Index
    bm25: object | None  # bm25s.BM25 (None while the base is empty)
    ids: np.ndarray  # position -> chunk id (the same order in both)
    generation: int
    kind: str
    uid: str | None = None  # the database's (a knowledge base made again at the same place has another)


def _faiss():
    import faiss  # noqa: PLC0415

    faiss.omp_set_num_threads(devicemod.cpu_threads())
    return faiss


def _tokens(texts: list[str]):
    import bm25s  # noqa: PLC0415

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


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


def _meta(con) -> dict:
    return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def rebuild(kb: KB) -> Indexes:
    """Build both indexes for the database's current generation and write them (temporary names, then renames;
    index.json, which says which generation they are, last)."""
    import bm25s  # noqa: PLC0415

    faiss = _faiss()
    with kb.db() as con:
        meta = _meta(con)
        rows = con.execute("SELECT c.id, c.text, v.v FROM chunks c JOIN vectors v ON v.id = c.id ORDER BY c.id").fetchall()
    gen, dim = int(meta.get("generation", 0)), int(meta["dim"])
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(-1, dim) if rows else \
        np.zeros((0, dim), np.float32)
    vindex = build(vecs)
    bm25 = None
    tmp = f".tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(kb.path / f"bm25{tmp}", ignore_errors=True)
    if rows:
        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenize([r[1] for r in rows], stopwords=STOPWORDS, show_progress=False),
                   show_progress=False)
        bm25.save(str(kb.path / f"bm25{tmp}"))
    faiss.write_index(vindex, str(kb.path / f"index.faiss{tmp}"))
    np.save(kb.path / f"index-ids{tmp}.npy", ids)
    os.replace(kb.path / f"index-ids{tmp}.npy", kb.path / "index-ids.npy")
    os.replace(kb.path / f"index.faiss{tmp}", kb.path / "index.faiss")
    if bm25 is not None:
        shutil.rmtree(kb.path / "bm25.old", ignore_errors=True)
        if (kb.path / "bm25").exists():
            os.rename(kb.path / "bm25", kb.path / "bm25.old")
        os.rename(kb.path / f"bm25{tmp}", kb.path / "bm25")
        shutil.rmtree(kb.path / "bm25.old", ignore_errors=True)
    write_json(kb.path / "index.json", {"generation": gen, "kind": index_kind(len(ids)), "count": int(len(ids))})
    idx = Indexes(vindex, bm25, ids, gen, index_kind(len(ids)), meta.get("uid"))
    with _LOCK:
        _CACHE[str(kb.path)] = idx
    return idx


def load(kb: KB, generation: int | None = None, uid: str | None = None) -> Indexes:
    """The indexes of the database's current generation (`generation` and `uid` when the caller has read them):
    cached, else read from disk, else rebuilt."""
    if generation is None:
        with kb.db() as con:
            meta = _meta(con)
        generation, uid = int(meta.get("generation", 0)), meta.get("uid")
    with _LOCK:
        idx = _CACHE.get(str(kb.path))
    if idx is not None and idx.generation == generation and idx.uid == uid:
        return idx
    try:
        info = json.loads((kb.path / "index.json").read_text())
        if int(info.get("generation", -1)) == generation:
            ids = np.load(kb.path / "index-ids.npy")
            bm25 = None
            if len(ids):
                import bm25s  # noqa: PLC0415

                bm25 = bm25s.BM25.load(str(kb.path / "bm25"))
            idx = Indexes(_faiss().read_index(str(kb.path / "index.faiss")), bm25, ids, generation,
                          info.get("kind") or "", uid)
            if idx.vectors.ntotal == len(ids):
                with _LOCK:
                    _CACHE[str(kb.path)] = idx
                return idx
    except (OSError, ValueError, RuntimeError, KeyError):
        pass  # missing, half-written or from another generation: rebuilt below
    return rebuild(kb)


def forget(kb: KB) -> None:
    with _LOCK:
        _CACHE.pop(str(kb.path), None)


def vector_search(idx: Indexes, query_vec: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity), best first."""
    if not len(idx.ids) or k <= 0:
        return []
    scores, pos = idx.vectors.search(np.ascontiguousarray(query_vec.reshape(1, -1), dtype=np.float32),
                                     min(k, len(idx.ids)))
    return [(int(idx.ids[p]), float(s)) for s, p in zip(scores[0], pos[0]) if p >= 0]


def keyword_search(idx: Indexes, query: str, k: int) -> list[tuple[int, float]]:
    """(chunk id, BM25 score), best first; only chunks that share a word with the query. The query is split into
    words like the chunks were: nothing in it is syntax."""
    tokens = _tokens([query or ""])
    if idx.bm25 is None or k <= 0 or not tokens[0]:
        return []
    docs, scores = idx.bm25.retrieve(tokens, k=min(k, len(idx.ids)), show_progress=False)
    return [(int(idx.ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: sum of 1 / (k + rank) over the rankings an id appears in, best first."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, 1):
            score[cid] = score.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(score.items(), key=lambda t: -t[1])
