"""RAG benchmark, each figure against a baseline measured in the same run:

(a) ingest of a multi-page PDF set (generated: --pdfs files of --pages pages) through pipelines.rag.ingest (extract,
    chunk, embed, store, index), against sentence-transformers' `encode` called directly on the same chunks: pages/s,
    chunks/s and the ratio of chunk throughputs (target >= 0.9x);
(b) query latency p50/p95 of rag.search (the query embedded, then searched) at 10k and 100k chunks, vector, keyword
    and hybrid, against encode + faiss search called directly (target p95 < 30 ms); the knowledge bases are filled
    with text and random unit vectors (embedding 100k chunks would take most of an hour here); and the keyword index
    chosen by measurement: bm25s (ours) against SQLite FTS5 on the same texts;
(c) time to first token of a RAG answer (retrieval, fitting, a longer prompt) against the same model answering the
    question without retrieval;
(d) chunking a Markdown file of --headings headings (one per short line) against the same text read as plain text
    (no headings to track): the ratio stays near 1 at any count (it grew with the count while chunking was
    quadratic in the headings; issue 23 measured 11.1 s against 3.8 s at 160k).

    .venv/bin/python bench/rag.py [--pdfs 3] [--pages 40] [--sizes 10000,100000] [--queries 60] [--headings 160000]
                                  [--parts a,b,c,d]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pipelines import rag  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402

WORDS = ("model adapter quantize lighthouse bread volcano glacier honey comet river harbour ferry storm engine "
         "template token chat export train dataset lamp island window garden roof weather news school bakery").split()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_ingest(ws: Workspace, n_pdfs: int, pages: int) -> dict:
    from rag_docs import make_pdf

    from pipelines.rag.embed import embedder

    rng = random.Random(1)
    tmp = Path(ws.root) / "pdfs"
    tmp.mkdir()
    files = []
    for i in range(n_pdfs):  # different documents (identical ones would be skipped as duplicates)
        texts = ["\n\n".join(" ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + "."
                               for _ in range(14)) for _ in range(pages)]
        files.append(make_pdf(tmp / f"set-{i}.pdf", texts))
    emb = embedder()
    emb.encode(["warm-up"])
    rag.create(ws, "ingest")
    t0 = time.perf_counter()
    rep = rag.ingest(ws, "ingest", files)
    ours = time.perf_counter() - t0
    kb = rag.open_kb(ws, "ingest")
    with kb.db() as con:
        texts = [r[0] for r in con.execute("SELECT text FROM chunks ORDER BY id")]
    t0 = time.perf_counter()
    emb.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    direct = time.perf_counter() - t0
    return {"pages": rep.pages, "chunks": rep.chunks, "ours_s": ours, "direct_s": direct}


def fill(ws: Workspace, name: str, n: int, dim: int, rng: random.Random):
    """A knowledge base of `n` chunks of text with random unit vectors, written through the store's tables."""
    import numpy as np

    from pipelines.rag import index

    rag.create(ws, name)
    kb = rag.open_kb(ws, name)
    vecs = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vocab = WORDS + [f"w{i}" for i in range(20_000)]  # a few common words and many rare ones, as in real text
    weights = [50.0] * len(WORDS) + [1.0 / (1 + i) ** 0.5 for i in range(20_000)]
    texts = [" ".join(rng.choices(vocab, weights, k=60)) for _ in range(n)]
    with kb.db() as con:
        con.execute("INSERT INTO sources VALUES ('s', 'synthetic.txt', 'text', 1, 0, 0, 0)")
        con.executemany("INSERT INTO chunks VALUES (?, 's', 1, 0, 0, NULL, ?, 60)", list(enumerate(texts, 1)))
        con.executemany("INSERT INTO vectors VALUES (?, ?)", [(i, vecs[i - 1].tobytes()) for i in range(1, n + 1)])
        kb.bump(con)
    t0 = time.perf_counter()
    vi = index.rebuild(kb)
    return kb, vecs, texts, vi, time.perf_counter() - t0


def bench_queries(ws: Workspace, sizes: list[int], n_queries: int) -> list[dict]:
    import faiss
    import numpy as np

    from pipelines.rag.embed import embedder

    emb = embedder()
    rng = random.Random(0)
    queries = [" ".join(rng.choices(WORDS, k=2) + [f"w{rng.randrange(20_000)}" for _ in range(3)])
               for _ in range(n_queries)]
    out = []
    for n in sizes:
        kb, vecs, texts, vi, build_s = fill(ws, f"q{n}", n, emb.dim, rng)
        row = {"n": n, "index": vi.kind, "build_s": build_s}
        for mode in rag.MODES:
            rag.search(kb, queries[0], 5, mode)  # warm
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                rag.search(kb, q, 5, mode)
                lat.append(time.perf_counter() - t0)
            row[mode] = (statistics.median(lat), pct(lat, 0.95))
        direct = faiss.IndexFlatIP(emb.dim) if n <= 50_000 else faiss.IndexHNSWFlat(emb.dim, 32,
                                                                                      faiss.METRIC_INNER_PRODUCT)
        direct.add(vecs)
        lat = []
        for q in queries:
            t0 = time.perf_counter()
            qv = emb.model.encode([q], normalize_embeddings=True)
            direct.search(np.asarray(qv, dtype=np.float32), 5)
            lat.append(time.perf_counter() - t0)
        row["direct"] = (statistics.median(lat), pct(lat, 0.95))
        from pipelines.rag import index

        lat = []
        for q in queries:
            t0 = time.perf_counter()
            index.keyword_search(vi, q, 5)
            lat.append(time.perf_counter() - t0)
        row["bm25s"] = (statistics.median(lat), pct(lat, 0.95))
        import sqlite3

        con = sqlite3.connect(":memory:")
        con.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        con.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", list(enumerate(texts, 1)))
        lat = []
        for q in queries:
            t0 = time.perf_counter()
            con.execute("SELECT rowid, bm25(t) FROM t WHERE t MATCH ? ORDER BY bm25(t) LIMIT 5",
                        (" OR ".join(f'"{w}"' for w in q.split()),)).fetchall()
            lat.append(time.perf_counter() - t0)
        row["fts5"] = (statistics.median(lat), pct(lat, 0.95))
        out.append(row)
    return out


def bench_ttft(ws: Workspace, rounds: int = 3) -> dict:
    from pipelines import chat, models

    kb = rag.open_kb(ws, "ingest")
    lm = models.load_gguf(models.ensure_default_gguf(ws), name=models.DEFAULT_NAME)
    params = chat.ChatParams(temperature=0.0, max_new_tokens=8)
    try:
        rag_t, plain_t = [], []
        for i in range(rounds + 1):
            q = f"Why does bread rise, question {i}?"
            t0 = time.perf_counter()
            for ev in rag.stream_answer(lm, kb, q, params, 5, threshold=0.0):
                if ev.chunk is not None and ev.chunk.text:
                    rag_t.append(time.perf_counter() - t0)
                    break
            t0 = time.perf_counter()
            for ch in chat.stream_chat(lm, [{"role": "user", "content": q}], params):
                if ch.text:
                    plain_t.append(time.perf_counter() - t0)
                    break
        return {"rag": statistics.median(rag_t[1:]), "plain": statistics.median(plain_t[1:])}
    finally:
        lm.backend.close()


def bench_chunking(headings: int) -> tuple[float, float, int]:
    """(seconds as Markdown, seconds as plain text, chunks) for a text of `headings` heading lines."""
    from pipelines.rag.chunk import chunk_document
    from pipelines.rag.embed import embedder
    from pipelines.rag.extract import Document, Page

    emb = embedder()
    text = "".join(f"## Section {i}\n{WORDS[i % len(WORDS)]} notes.\n" for i in range(headings))
    times = {}
    for kind in ("text", "markdown"):
        t0 = time.perf_counter()
        n = len(chunk_document(Document(f"doc.{kind}", kind, [Page(1, text)], len(text)), emb, 200, 40))
        times[kind] = time.perf_counter() - t0
    return times["markdown"], times["text"], n


def bench_ingest_report(ws: Workspace, a) -> None:
    """(a), printed."""
    ing = bench_ingest(ws, a.pdfs, a.pages)
    ours_cps, direct_cps = ing["chunks"] / ing["ours_s"], ing["chunks"] / ing["direct_s"]
    print(f"\n(a) ingest of {a.pdfs} PDFs, {ing['pages']} pages, {ing['chunks']} chunks")
    print(f"  ours (extract+chunk+embed+store+index): {ing['ours_s']:.2f} s = {ing['pages'] / ing['ours_s']:.1f} "
          f"pages/s, {ours_cps:.1f} chunks/s")
    print(f"  baseline sentence-transformers encode of the same chunks: {ing['direct_s']:.2f} s = "
          f"{direct_cps:.1f} chunks/s")
    print(f"  ratio ours / direct encode chunks/s: {ours_cps / direct_cps:.3f} (target >= 0.9)")


def bench_queries_report(ws: Workspace, a) -> None:
    """(b), printed."""
    print("\n(b) query latency (ms, p50 / p95), the query embedded and searched, top 5")
    for row in bench_queries(ws, [int(x) for x in a.sizes.split(",")], a.queries):
        print(f"  {row['n']:>7,} chunks, index {row['index']} (built in {row['build_s']:.1f} s)")
        for mode in rag.MODES:
            p50, p95 = row[mode]
            print(f"    {mode:8s} {1000 * p50:6.1f} / {1000 * p95:6.1f}   (target p95 < 30: "
                  f"{'met' if p95 < 0.03 else 'MISSED'})")
        d50, d95 = row["direct"]
        print(f"    baseline encode + faiss directly {1000 * d50:.1f} / {1000 * d95:.1f}; ratio vector p95 / "
              f"direct p95: {row['vector'][1] / d95:.2f}")
        b50, b95 = row["bm25s"]
        f50, f95 = row["fts5"]
        print(f"    keyword index alone: bm25s (ours) {1000 * b50:.1f} / {1000 * b95:.1f} vs SQLite FTS5 "
              f"{1000 * f50:.1f} / {1000 * f95:.1f}; ratio bm25s / FTS5 p95: {b95 / f95:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pdfs", type=int, default=3)
    ap.add_argument("--pages", type=int, default=40)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--headings", type=int, default=160_000)
    ap.add_argument("--parts", default="a,b,c,d", help="which figures to measure (a, b, c, d)")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-rag-") as tmp:
        ws = Workspace.open(tmp)
        print("MacTuner RAG benchmark (embedder all-MiniLM-L6-v2)")
        if "d" in parts:
            md_s, txt_s, n = bench_chunking(a.headings)
            print(f"\n(d) chunking {a.headings:,} Markdown headings ({n:,} chunks): {md_s:.2f} s; the same text as "
                  f"plain text {txt_s:.2f} s; ratio markdown / text: {md_s / txt_s:.2f} (target <= 1.3)")
        if "a" in parts:
            bench_ingest_report(ws, a)
        if "b" in parts:
            bench_queries_report(ws, a)
        if "c" in parts:
            tt = bench_ttft(ws)
            print(f"\n(c) time to first token, default GGUF: RAG answer {1000 * tt['rag']:.0f} ms vs the same question "
                  f"without retrieval {1000 * tt['plain']:.0f} ms; ratio {tt['rag'] / tt['plain']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
