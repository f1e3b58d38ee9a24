"""RAG benchmark, each figure against a baseline measured in the same run:

(a) ingest of a multi-page PDF set (generated: --pdfs files of --pages pages) through pipelines.rag.ingest (extract,
    chunk, embed, store, index), against sentence-transformers' `encode` called directly on the same chunks: pages/s,
    chunks/s and the ratio of chunk throughputs (target >= 0.9x);
(b) query latency p50/p95 of rag.search (the query embedded, then searched) at 10k and 100k chunks, vector, keyword
    and hybrid, against encode + faiss search called directly (target p95 < 30 ms); the knowledge bases are filled
    with text and random unit vectors (embedding 100k chunks would take most of an hour here); and the keyword index
    chosen by measurement: bm25s (ours) against SQLite FTS5 on the same texts;
(c) time to first token of a RAG answer on the default GGUF, split into retrieval, building the prompt, llama.cpp's
    own prompt-evaluation time (reported by the worker) and the rest, beside llama.cpp evaluating the same prompt
    directly (llama-cpp-python in a fresh process of its own, its own timing) and the same question without
    retrieval; a chat question comes between RAG questions (only the worker's prefix cache spares the instructions
    then). Printed last, ending with `ttft ratio: X` = our time to first token / (retrieval + llama.cpp's direct
    prompt evaluation), the median of the rounds' ratios, target <= 1.2;
(d) chunking a Markdown file of --headings headings (one per short line) against the same text read as plain text
    (no headings to track): the ratio stays near 1 at any count (it grew with the count while chunking was
    quadratic in the headings; issue 23 measured 11.1 s against 3.8 s at 160k);
(e) llama.cpp evaluating a --prompt-tokens prompt of the default GGUF with n_batch / n_ubatch / thread settings,
    each against llama-cpp-python's defaults (512 / 512) with the worker's threads.

    .venv/bin/python bench/rag.py [--pdfs 3] [--pages 40] [--sizes 10000,100000] [--queries 60] [--headings 160000]
                                  [--parts a,b,c,d,e] [--rounds 5] [--threads 0] [--prompt-tokens 900]
    smoke run: bench/rag.py --parts c,e --pdfs 1 --pages 6 --rounds 1 --prompt-tokens 200
"""

from __future__ import annotations

import argparse
import contextlib
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


def _first_token(events) -> tuple[float | None, object]:
    """(seconds to the first answer text, the event that brought it) of a RagEvent or ChatChunk stream."""
    t0 = time.perf_counter()
    for ev in events:
        ch = getattr(ev, "chunk", ev)
        if ch is not None and ch.text:
            took = time.perf_counter() - t0
            events.close()
            return took, ev
    return None, None


def _direct_eval(llm, ids: list[int]) -> float:
    """Seconds llama.cpp itself reports for evaluating `ids` from an empty context (its perf counters)."""
    from pipelines.serving import llamacpp

    lib = llamacpp.llama_cpp_module().llama_cpp
    llm.reset()
    lib.llama_perf_context_reset(llm.ctx)
    llm.eval(ids)
    lib.llama_synchronize(llm.ctx)  # the counters are updated when the computation is waited for
    return lib.llama_perf_context(llm.ctx).t_p_eval_ms / 1000


def _direct_server(conn, path: str, n_ctx: int, threads: int, n_batch: int, n_ubatch: int) -> None:
    from pipelines.serving import llamacpp

    llm = llamacpp.open_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_batch,
                              n_ubatch=n_ubatch)
    conn.send(llm.tokenize(conn.recv().encode(), add_bos=True))  # a text to tokenize first (part e's prompt)
    while (ids := conn.recv()) is not None:
        conn.send(_direct_eval(llm, ids))
    llm.close()


class DirectLlama:
    """llama-cpp-python called directly - no worker, no studio code - in a fresh process of its own, as the worker
    is: in this process, beside torch (the embedder), llama.cpp evaluated the same prompt several times slower here.

        with DirectLlama(path, n_ctx, threads) as d: d.eval(ids) -> seconds (llama.cpp's own timing)"""

    def __init__(self, path, n_ctx: int, threads: int, n_batch: int = 512, n_ubatch: int = 512, text: str = "x"):
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this process's threads
        self.conn, theirs = spawn.Pipe()
        self.proc = spawn.Process(target=_direct_server, args=(theirs, str(path), n_ctx, threads, n_batch, n_ubatch),
                                  daemon=True)
        self.proc.start()
        self.conn.send(text)
        self.tokens = self.conn.recv()

    def eval(self, ids: list[int]) -> float:
        self.conn.send(list(ids))
        return self.conn.recv()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.conn.send(None)
        self.proc.join(30)


def bench_ttft(ws: Workspace, rounds: int, threads: int) -> dict:
    """Ours (a RAG answer through the studio's path: retrieval, fitting, the GGUF worker) against llama.cpp
    evaluating the same prompt directly (DirectLlama), and against the question without retrieval; a chat
    question comes between RAG questions, as in the studio, so only the worker's prefix cache can spare the
    instructions. Round 0 is a warm-up (embedder and index loads, the first prefix saved)."""
    from dataclasses import replace

    from pipelines import chat, models
    from pipelines import device as devicemod
    from pipelines.rag.answer import system_text

    kb = rag.open_kb(ws, "ingest")
    path = models.ensure_default_gguf(ws)
    lm = models.load_gguf(path, name=models.DEFAULT_NAME, threads=threads)
    stack = contextlib.ExitStack()
    cores = threads or devicemod.cpu_threads()  # as the worker has them; batch sizes llama-cpp-python's defaults
    params = chat.ChatParams(temperature=0.0, max_new_tokens=8)
    rows = []
    try:
        direct = stack.enter_context(DirectLlama(path, lm.backend.worker.info["n_ctx"], cores))
        for i in range(rounds + 1):
            q = f"Why does bread rise, question {i}?"
            ttft, ev = _first_token(rag.stream_answer(lm, kb, q, params, 5, threshold=0.0))
            plain, _ = _first_token(chat.stream_chat(lm, [{"role": "user", "content": q}], params))
            p = replace(params, system_prompt=system_text(params, ev.passages))
            ids = chat.build_prompt(lm, [{"role": "user", "content": q}], p).token_ids  # the same prompt
            assert len(ids) == ev.timings.prompt_tokens
            rows.append({"ttft": ttft, "plain": plain, "direct": direct.eval(ids),
                         "retrieval": ev.timings.retrieval_s, "build": ev.timings.prompt_s,
                         "eval": ev.chunk.prompt_eval_s, "evaluated": ev.chunk.prompt_evaluated,
                         "tokens": ev.timings.prompt_tokens, "fixed": ev.timings.fixed_tokens,
                         "counters": lm.backend.last_prompt().counters})
    finally:
        stack.close()
        lm.backend.close()
    first, rows = rows[0], rows[1:]
    for r in rows:  # per round, so that a load change between rounds does not mix into the split or the ratio
        r["rest"] = r["ttft"] - r["retrieval"] - r["build"] - r["eval"]
        r["ratio"] = r["ttft"] / (r["retrieval"] + r["direct"])
    keys = ("ttft", "plain", "direct", "retrieval", "build", "eval", "rest", "ratio", "evaluated", "tokens", "fixed")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    med["ratios"] = [r["ratio"] for r in rows]
    med["restored"] = rows[-1]["counters"]["restored"]
    med["rounds"] = len(rows)
    med["first"] = first["ttft"]
    return med


def bench_ttft_report(ws: Workspace, a) -> None:
    """(c), printed; its last line is the ttft ratio."""
    from pipelines import device as devicemod

    tt = bench_ttft(ws, a.rounds, a.threads)
    ms = {k: 1000 * tt[k] for k in ("ttft", "plain", "direct", "retrieval", "build", "eval", "rest")}
    print(f"\n(c) time to first token, default GGUF, {a.threads or devicemod.cpu_threads()} threads, medians of "
          f"{tt['rounds']} rounds: prompt {tt['tokens']:.0f} tokens, {tt['fixed']:.0f} of them the instructions")
    print(f"  ours: first token {ms['ttft']:.0f} ms = retrieval {ms['retrieval']:.0f} + building the prompt "
          f"{ms['build']:.0f} + llama.cpp evaluating {tt['evaluated']:.0f} tokens {ms['eval']:.0f} (its own timing) "
          f"+ the rest {ms['rest']:.0f} (the worker's messages, sampling, text held back at a stop string's start)")
    print(f"  the first question (round 0: the knowledge base's indexes loaded, the instructions saved): "
          f"{1000 * tt['first']:.0f} ms")
    print(f"  the worker restored the instructions from its prefix cache {tt['restored']} times "
          f"({tt['rounds']} measured rounds, a chat question between each)")
    print(f"  baseline llama.cpp evaluating the same {tt['tokens']:.0f} tokens directly: {ms['direct']:.0f} ms "
          f"(its own timing); prompt evaluation is {100 * ms['eval'] / ms['ttft']:.0f}% of our time to first token")
    print(f"  the same question without retrieval: {ms['plain']:.0f} ms; ratio RAG / without retrieval "
          f"{ms['ttft'] / ms['plain']:.1f}")
    print(f"  per round, ours / (retrieval + direct): {', '.join(f'{x:.2f}' for x in tt['ratios'])} (each measured "
          "side by side; the median below)")
    print(f"ttft ratio: {tt['ratio']:.2f} (ours / (retrieval + llama.cpp's direct prompt evaluation); target <= 1.2)")


def bench_batches(ws: Workspace, rounds: int, tokens: int) -> list[tuple[str, float]]:
    """(setting, median seconds llama.cpp reports for evaluating a `tokens`-token prompt), the first being
    llama-cpp-python's defaults with the worker's threads; each setting a DirectLlama of its own, rounds
    interleaved."""
    from pipelines import device as devicemod
    from pipelines import models

    path = models.ensure_default_gguf(ws)
    cores = devicemod.cpu_threads()
    settings = {f"n_batch 512, n_ubatch 512, {cores} threads (default)": (512, 512, cores),
                f"n_batch 512, n_ubatch 256, {cores} threads": (512, 256, cores),
                f"n_batch 512, n_ubatch 128, {cores} threads": (512, 128, cores),
                f"n_batch 1024, n_ubatch 1024, {cores} threads": (1024, 1024, cores)}
    if cores > 1:
        settings[f"n_batch 512, n_ubatch 512, {cores // 2} threads"] = (512, 512, cores // 2)
    rng = random.Random(2)
    text = " ".join(rng.choices(WORDS, k=tokens))
    with contextlib.ExitStack() as stack:
        procs = {name: stack.enter_context(DirectLlama(path, 4096, t, b, u, text))
                 for name, (b, u, t) in settings.items()}
        ids = next(iter(procs.values())).tokens[:tokens]
        times: dict[str, list[float]] = {name: [] for name in procs}
        for _ in range(rounds):
            for name, proc in procs.items():
                times[name].append(proc.eval(ids))
    return [(name, statistics.median(v)) for name, v in times.items()]


def bench_batches_report(ws: Workspace, a) -> None:
    """(e), printed."""
    rows = bench_batches(ws, a.rounds, a.prompt_tokens)
    base = rows[0][1]
    print(f"\n(e) llama.cpp evaluating a {a.prompt_tokens}-token prompt of the default GGUF (its own timing, median "
          f"of {a.rounds}), by batch setting and threads")
    for name, secs in rows:
        print(f"  {name:45s} {1000 * secs:7.0f} ms  {a.prompt_tokens / secs:6.0f} tokens/s  ratio / default "
              f"{secs / base:.2f}")


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
    ap.add_argument("--parts", default="a,b,c,d,e", help="which figures to measure (a, b, c, d, e)")
    ap.add_argument("--rounds", type=int, default=5, help="(c), (e): measured rounds (after one warm-up in c)")
    ap.add_argument("--threads", type=int, default=0, help="(c): llama.cpp threads (0: the physical cores)")
    ap.add_argument("--prompt-tokens", type=int, default=900, help="(e): prompt length")
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
        if "e" in parts:
            bench_batches_report(ws, a)
        if "c" in parts:  # last: its last line is the ttft ratio
            if "a" not in parts:
                bench_ingest(ws, a.pdfs, a.pages)  # the knowledge base it asks
            bench_ttft_report(ws, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
