"""Retrieval quality, measured: hit@1, hit@5 and MRR of vector, keyword and hybrid search side by side, on an
evaluation set built from the knowledge base itself (a question formed from each sampled passage - most of one of
its sentences - with that passage as the answer) or from a user's CSV of question + expected file (+ page).

    qs = auto_questions(kb, n=40)            # or questions_from_csv(Path("eval.csv"))
    res = evaluate(kb, qs)                   # {"vector": {"hit@1", "hit@5", "mrr", "n"}, "keyword": ..., ...}
    fig = figure(res)                        # plotly grouped bars
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from .retrieve import MODES, Passage, search
from .store import KB


@dataclass
class Question:
    question: str
    file: str | None = None  # the expected document (CSV)
    page: int | None = None
    chunk_id: int | None = None  # the source passage (auto)


def auto_questions(kb: KB, n: int = 40, seed: int = 0) -> list[Question]:
    """Up to `n` questions, one per sampled passage: a contiguous 3/4 of its longest sentence (at least 6 words)."""
    with kb.db() as con:
        rows = con.execute("SELECT id, text FROM chunks").fetchall()
    rng = random.Random(seed)
    rng.shuffle(rows)
    out = []
    for cid, text in rows:
        sents = [s.split() for s in re.split(r"(?<=[.!?])\s+|\n", text)]
        sents = [s for s in sents if len(s) >= 6]
        if not sents:
            continue
        words = max(sents, key=len)
        k = max(5, round(len(words) * 0.75))
        a = rng.randrange(0, len(words) - k + 1)
        out.append(Question(" ".join(words[a:a + k]), chunk_id=cid))
        if len(out) >= n:
            break
    if not out:
        raise BadInput(f"'{kb.name}' has no passage with a sentence of six words or more to ask about.")
    return out


def questions_from_csv(path: Path) -> list[Question]:
    """A CSV with a `question` column and the expected `file` (or `source`), optionally `page`."""
    import pandas as pd  # noqa: PLC0415

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise BadInput(f"{Path(path).name} is not a readable CSV ({type(e).__name__}: {str(e)[:120]}).") from None
    cols = {c.strip().lower(): c for c in df.columns}
    fcol = cols.get("file") or cols.get("source")
    if "question" not in cols or fcol is None:
        raise BadInput(f"{Path(path).name} needs a 'question' column and a 'file' (or 'source') column; it has "
                       f"{', '.join(map(str, df.columns)) or 'none'}.")
    out, bad = [], []
    for i, row in df.iterrows():
        q, f = str(row[cols["question"]]).strip(), str(row[fcol]).strip()
        page = str(row[cols["page"]]).strip() if "page" in cols else ""
        if not q or not f or (page and not page.isdigit()):
            bad.append(i + 2)  # the CSV's line number (its header is line 1)
            continue
        out.append(Question(q, file=Path(f).name, page=int(page) if page else None))
    if bad:
        raise BadInput(f"{Path(path).name}: {len(bad)} row(s) lack a question or a file, or have a page that is not "
                       f"a number (lines {', '.join(map(str, bad[:5]))}{'...' if len(bad) > 5 else ''}).")
    if not out:
        raise BadInput(f"{Path(path).name} has no rows (a question, a file and optionally a page each).")
    return out


def _hit(q: Question, p: Passage) -> bool:
    if q.chunk_id is not None:
        return p.chunk_id == q.chunk_id or q.question in p.text  # an overlapping neighbour holds it too
    return p.file.lower() == (q.file or "").lower() and (q.page is None or p.page == q.page)


def evaluate(kb: KB, questions: list[Question], modes=MODES, k: int = 5) -> dict:
    """{mode: {"hit@1", f"hit@{k}", "mrr", "n"}} over `questions` (MRR counted within the top k)."""
    if not questions:
        raise BadInput("No evaluation questions.")
    out = {}
    for mode in modes:
        h1 = hk = rr = 0.0
        for q in questions:
            found = search(kb, q.question, k, mode)
            rank = next((i for i, p in enumerate(found, 1) if _hit(q, p)), None)
            h1 += rank == 1
            hk += rank is not None
            rr += 1.0 / rank if rank else 0.0
        n = len(questions)
        out[mode] = {"hit@1": round(h1 / n, 4), f"hit@{k}": round(hk / n, 4), "mrr": round(rr / n, 4), "n": n}
    return out


def figure(results: dict):
    import plotly.graph_objects as go  # noqa: PLC0415

    fig = go.Figure()
    metrics = [m for m in next(iter(results.values())) if m != "n"]
    for mode, r in results.items():
        fig.add_trace(go.Bar(name=mode, x=metrics, y=[r[m] for m in metrics]))
    fig.update_layout(barmode="group", title="Retrieval quality by search mode", yaxis_range=[0, 1], height=320,
                      margin=dict(l=40, r=10, t=40, b=30))
    return fig
