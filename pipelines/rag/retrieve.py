"""Retrieval: a query to ranked passages of a knowledge base, with their scores and origin (file, page, span).

    search(kb, "how do I reset it?", top_k=5, mode="hybrid")   # -> [Passage(rank, score, file, page, text, ...)]

Modes: "vector" (cosine similarity of the embeddings), "keyword" (BM25) and "hybrid" (the two
rankings fused by reciprocal rank). Every passage also carries its cosine similarity (`similarity`), which the
answer stage compares with its threshold to tell "nothing relevant" from a weak match.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import BadInput
from . import index
from .embed import embedder
from .store import KB

MODES = ("hybrid", "vector", "keyword")
CANDIDATES = 50  # per ranking, before fusion


@dataclass
class Passage:
    rank: int
    chunk_id: int
    score: float  # the mode's own score (similarity, BM25 or fused)
    similarity: float  # cosine similarity of the query and the passage
    file: str
    page: int
    start: int
    end: int
    heading: str | None
    text: str

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def where(self) -> str:
        return f"{self.file}, page {self.page}"


def _rows(con, ids: list[int]) -> dict[int, tuple]:
    if not ids:
        return {}
    q = ",".join("?" * len(ids))
    rows = con.execute(f"SELECT c.id, s.name, c.page, c.start, c.\"end\", c.heading, c.text FROM chunks c "  # noqa: S608
                       f"JOIN sources s ON s.sha256 = c.sha256 WHERE c.id IN ({q})", ids).fetchall()  # placeholders only
    return {r[0]: r[1:] for r in rows}


def _similarities(con, ids: list[int], qvec: np.ndarray) -> dict[int, float]:
    if not ids:
        return {}
    q = ",".join("?" * len(ids))
    rows = con.execute(f"SELECT id, v FROM vectors WHERE id IN ({q})", ids).fetchall()  # noqa: S608
    return {i: float(np.frombuffer(v, dtype=np.float32) @ qvec) for i, v in rows}


def check_top_k(top_k) -> int:
    """top-k as a whole number from 1 to 100 (a slider's float, a script's string); BadInput otherwise (NaN and
    infinity included)."""
    try:
        number = float(top_k)
        whole = int(number)
    except (TypeError, ValueError, OverflowError):  # None, "abc", NaN, infinity
        raise BadInput(f"top-k must be a whole number from 1 to 100, not {top_k!r}.") from None
    if number != whole or not 1 <= whole <= 100:
        raise BadInput(f"top-k must be a whole number from 1 to 100, not {top_k!r}.")
    return whole


def search(kb: KB, query: str, top_k: int = 5, mode: str = "hybrid") -> list[Passage]:
    """The `top_k` best passages for `query`, best first."""
    query = (query or "").strip()
    if not query:
        raise BadInput("Type a question or a query to search for.")
    if mode not in MODES:
        raise BadInput(f"mode must be one of {', '.join(MODES)} (got {mode!r}).")
    top_k = check_top_k(top_k)
    with kb.db() as con:  # one connection for the whole query
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta WHERE key IN "
                                                          "('embedder', 'generation', 'uid')")}
        idx = index.load(kb, int(meta.get("generation", 0)), meta.get("uid"))
        qvec = embedder(meta.get("embedder")).encode([query])[0]
        n = max(top_k, CANDIDATES)
        vec = index.vector_search(idx, qvec, n) if mode != "keyword" else []
        kw = index.keyword_search(idx, query, n) if mode != "vector" else []
        ranked = vec if mode == "vector" else kw if mode == "keyword" else index.rrf([[i for i, _ in vec],
                                                                                     [i for i, _ in kw]])
        ranked = ranked[:top_k]
        ids = [i for i, _ in ranked]
        rows, sims = _rows(con, ids), dict(vec)
        sims.update(_similarities(con, [i for i in ids if i not in sims], qvec))
    out = []
    for rank, (cid, score) in enumerate(ranked, 1):
        if cid in rows:
            name, page, start, end, heading, text = rows[cid]
            out.append(Passage(rank, cid, round(score, 6), round(sims.get(cid, 0.0), 6), name, page, start, end,
                               heading, text))
    return out


def timed_search(kb: KB, query: str, top_k: int = 5, mode: str = "hybrid") -> tuple[list[Passage], float]:
    t0 = time.perf_counter()
    res = search(kb, query, top_k, mode)
    return res, time.perf_counter() - t0
