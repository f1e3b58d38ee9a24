"""Data-stage benchmark: read + clean + EDA of a generated Alpaca CSV, studio (pipelines.data) vs a plain baseline.

Generates a CSV (default 200k rows, about 100 MB: instruction/input/output with varied text, ~3% exact or near
duplicates, ~1.5% missing values, some non-ASCII and CRLF) in a temp folder, then times, each in a fresh process:

- studio:   data.read_table -> Cleaner: handle_missing, drop_duplicates(near=True), normalize_text,
            filter_token_length (batch tokenization, counts cached by text) -> EDA: column_summary, duplicate_rows,
            token_lengths, token_length_figure, length_stats
- baseline: pd.read_csv, then the same steps as per-row Python loops calling tokenizer(text) once per text per row
            (a script whose EDA step tokenizes again), plotly histograms of the same lengths

and prints seconds per stage, peak RSS (psutil sampling every 10 ms) and the ratio baseline / studio. Tokenizer
loading is timed apart and not counted.

    .venv/bin/python bench/data.py [--rows 200000] [--baseline-rows 20000] [--tokenizer DIR] [--root WS]

--tokenizer defaults to the default model's HF folder in the workspace (--root, default ~/.mactuner or
$MACTUNER_HOME; /tmp/ws1 on the dev machine); without one a byte-level BPE is trained offline on the data and the
output says so. --baseline-rows runs the baseline on the first N rows and extrapolates its time linearly (said in
the output). Target: studio >= 3x faster than the baseline.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------------------------------------ generated data

TOPICS = ["a sourdough starter", "a Python list", "a bicycle chain", "a spreadsheet formula", "a job interview",
          "a tomato plant", "a Git branch", "a budget for a trip", "a cover letter", "a slow laptop", "a SQL join",
          "a birthday party", "a noisy neighbour", "a leaking tap", "a database index", "a Docker image",
          "a morning routine", "a marathon plan", "a school essay", "a team meeting", "a café menu", "a résumé",
          "an electric bill", "an HTTP request", "an unused gym membership", "a garden shed", "a chess opening"]
VERBS = ["fix", "start", "clean", "improve", "explain", "organise", "compare", "plan", "speed up", "describe",
         "choose", "test", "summarise", "document", "maintain", "cancel", "repair", "measure"]
ADJ = ["quick", "careful", "cheap", "simple", "reliable", "friendly", "formal", "short", "detailed", "safe",
       "modern", "traditional", "practical", "surprising", "common", "rare", "noisy", "quiet", "gentle", "strict"]
NOUNS = ["step", "tool", "reason", "mistake", "option", "method", "rule", "habit", "example", "detail", "problem",
         "idea", "schedule", "setting", "result", "question", "risk", "benefit", "change", "pattern", "limit"]
WORDS = ("the a an this that every some most our your their it they we you first then after before because so "
         "but and or if when while usually often never always carefully quickly slowly again later today "
         "water time money code data file team plan list table page window door light paper market city "
         "weather garden kitchen office browser server screen battery engine recipe answer letter report "
         "check open close write read move keep take give make find use try need want learn build turn").split()
INSTRUCTIONS = [
    "How do I {verb} {topic}?", "Explain how to {verb} {topic} in simple terms.",
    "Give me {n} {adj} tips to {verb} {topic}.", "What is the most {adj} way to {verb} {topic}?",
    "Rewrite the following text to sound more {adj}.", "Summarise the text below in one sentence.",
    "Classify the sentiment of this review as positive, negative or neutral.",
    "Translate the sentence into plain English.", "List the main {noun}s mentioned in the text.",
    "Write a {adj} email about {topic}.", "Compare two ways to {verb} {topic}.",
    "Answer the question using the context.", "Correct the grammar in the paragraph.",
]


def _sentence(rng: random.Random, lo: int = 6, hi: int = 18) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    if rng.random() < 0.4:
        words.insert(rng.randrange(len(words)), rng.choice(ADJ) + " " + rng.choice(NOUNS))
    return " ".join(words).capitalize() + rng.choice(".....?!")


def _row(rng: random.Random) -> list[str]:
    topic = rng.choice(TOPICS)
    instr = rng.choice(INSTRUCTIONS).format(verb=rng.choice(VERBS), topic=topic, adj=rng.choice(ADJ),
                                            noun=rng.choice(NOUNS), n=rng.randint(2, 7))
    inp = "" if rng.random() < 0.4 else " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
    parts = [_sentence(rng, 8, 24) for _ in range(rng.randint(2, 7))]
    if rng.random() < 0.3:
        parts = [f"{i}. {p}" for i, p in enumerate(parts, 1)]
        out = "\n".join(parts)
    else:
        out = " ".join(parts)
    if rng.random() < 0.05:
        out = out.replace("\n", "\r\n").replace(" ", "\u00a0", 1) + "  "
    return [instr, inp, out]


def generate_csv(path: Path, rows: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    made: list[list[str]] = []
    dups = missing = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        for i in range(rows):
            r = rng.random()
            if made and r < 0.015:
                row, dups = list(rng.choice(made)), dups + 1
            elif made and r < 0.03:
                row, dups = [c.upper().replace(" ", "  ", 2) for c in rng.choice(made)], dups + 1
            else:
                row = _row(rng)
                if r < 0.045:
                    row[2], missing = " " if r < 0.04 else "", missing + 1
                elif r < 0.05:
                    row[0], missing = "", missing + 1
            if len(made) < 5000:
                made.append(row)
            w.writerow(row)
    return {"rows": rows, "duplicates": dups, "missing": missing, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------------ measuring


class PeakRSS:
    """Peak resident memory of this process, sampled every 10 ms in a thread."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return {"rss_start_mb": self.start / 2**20, "rss_peak_mb": self.peak / 2**20}


def load_tok(path: str | None, csv_path: Path):
    if path:
        from pipelines.data import load_tokenizer

        return load_tokenizer(path), f"{path}"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(csv_path, encoding="utf-8") as fh:
        sample = [next(fh) for _ in range(2000)]
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>"],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"), \
        "FALLBACK: byte-level BPE (vocab 8000) trained here on 2000 rows of the data - no default model tokenizer"


def _stopwatch():
    """(stages, lap): lap(name) records the seconds since the previous lap under `name`."""
    stages, last = {}, [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        stages[name], last[0] = now - last[0], now

    return stages, lap


def run_studio(csv_path: Path, tok, max_len: int) -> dict:
    from pipelines import data

    stages, lap = _stopwatch()

    res = data.read_table(csv_path)
    lap("read")
    m = data.detect_mapping(res.df)
    counter = data.TokenCounter(tok)
    cl = data.Cleaner(res.df)
    cl.apply(data.handle_missing, columns=data.required_columns(m))
    lap("missing")
    cl.apply(data.drop_duplicates, near=True)
    lap("duplicates")
    cl.apply(data.normalize_text)
    lap("normalise")
    cl.apply(data.filter_token_length, counter=counter, mapping=m, min_tokens=4, max_tokens=4 * max_len,
             train_max_length=max_len)
    lap("token filter")
    data.column_summary(cl.df), data.duplicate_rows(cl.df)
    lap("eda summary")
    lengths = data.token_lengths(cl.df, m, counter)
    data.token_length_figure(lengths, max_len), data.length_stats(lengths, max_len)
    lap("eda token lengths")
    return {"stages": stages, "rows_in": res.n_rows, "rows_out": len(cl.df),
            "steps": [s.report.text() for s in cl.steps]}


_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_USP = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")


def _norm(s: str) -> str:
    s = unicodedata.normalize("NFC", s.replace("\r\n", "\n").replace("\r", "\n"))
    s = _USP.sub(" ", _CTRL.sub("", s))
    s = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", s))
    return s.strip()


def run_baseline(csv_path: Path, tok, max_len: int) -> dict:
    import numpy as np
    import pandas as pd
    import plotly.graph_objects as go

    stages, lap = _stopwatch()

    def ntok(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def prompt(r) -> str:
        return r["instruction"] + ("\n\n" + r["input"] if r["input"].strip() else "")

    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    rows_in = len(df)
    lap("read")
    cols = list(df.columns)
    rows = [r for r in df.to_dict("records") if r["instruction"].strip() and r["output"].strip()]
    lap("missing")
    seen, kept = set(), []
    for r in rows:
        key = tuple(" ".join(r[c].lower().split()) for c in cols)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    rows = kept
    lap("duplicates")
    rows = [{c: _norm(r[c]) for c in cols} for r in rows]
    lap("normalise")
    kept = []
    for r in rows:
        total = ntok(prompt(r)) + ntok(r["output"])
        if 4 <= total <= 4 * max_len:
            kept.append(r)
    rows = kept
    lap("token filter")
    out = pd.DataFrame(rows, columns=cols)
    [(out[c].nunique(), out[c].head(3).tolist(), (out[c] != "").sum()) for c in cols], out.duplicated().sum()
    lap("eda summary")
    p = np.array([ntok(prompt(r)) for r in rows])
    o = np.array([ntok(r["output"]) for r in rows])
    fig = go.Figure([go.Histogram(x=x, name=n) for x, n in ((p, "prompt"), (o, "response"), (p + o, "total"))])
    fig.add_vline(x=max_len)
    pd.DataFrame({"p": p, "o": o, "t": p + o}).describe(percentiles=[0.5, 0.9, 0.99])
    lap("eda token lengths")
    return {"stages": stages, "rows_in": rows_in, "rows_out": len(rows)}


def phase(args) -> None:
    t0 = time.perf_counter()
    tok, used = load_tok(args.tokenizer, Path(args.csv))
    load_s = time.perf_counter() - t0
    mem = PeakRSS()
    fn = run_studio if args.phase == "studio" else run_baseline
    cpu0 = time.process_time()
    out = fn(Path(args.csv), tok, args.max_length)
    out.update(mem.stop(), tokenizer=used, tokenizer_load_s=load_s, total_s=sum(out["stages"].values()),
               cpu_s=time.process_time() - cpu0)
    print("RESULT " + json.dumps(out))


def default_tokenizer(root: str | None) -> str | None:
    from pipelines.models import default_hf_path
    from pipelines.workspace import Workspace, default_root

    p = default_hf_path(Workspace(Path(root).expanduser() if root else default_root()))
    return str(p) if (p / "tokenizer.json").exists() else None


def sub(args, which: str, csv_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", which, "--csv", str(csv_path), "--max-length", str(args.max_length)]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{which} phase failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[7:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--baseline-rows", type=int, default=None, help="run the baseline on the first N rows only and "
                    "extrapolate its time linearly")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the default model's, see --root)")
    ap.add_argument("--root", default=None, help="workspace whose default model tokenizer to use")
    ap.add_argument("--max-length", type=int, default=256, help="training max length marked in the EDA")
    ap.add_argument("--phase", choices=["studio", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        return phase(args)
    args.tokenizer = args.tokenizer or default_tokenizer(args.root)
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-data-") as tmp:
        full = Path(tmp) / "bench.csv"
        t0 = time.perf_counter()
        info = generate_csv(full, args.rows)
        print(f"generated {info['rows']:,} rows, {info['bytes'] / 2**20:.1f} MB ({info['duplicates']:,} duplicates, "
              f"{info['missing']:,} rows with a missing value) in {time.perf_counter() - t0:.1f} s")
        base_csv, scale = full, 1.0
        if args.baseline_rows and args.baseline_rows < args.rows:
            base_csv = Path(tmp) / "baseline.csv"
            with open(full, encoding="utf-8", newline="") as src, open(base_csv, "w", encoding="utf-8",
                                                                          newline="") as dst:
                w = csv.writer(dst)
                for i, row in enumerate(csv.reader(src)):
                    if i > args.baseline_rows:
                        break
                    w.writerow(row)
            scale = args.rows / args.baseline_rows
        s = sub(args, "studio", full)
        b = sub(args, "baseline", base_csv)
    print(f"tokenizer: {s['tokenizer']} (loaded in {s['tokenizer_load_s']:.1f} s, not counted)")
    print(f"studio steps: " + " | ".join(s["steps"]))
    note = f" (measured on {args.baseline_rows:,} rows, x{scale:g} linear extrapolation)" if scale != 1 else ""
    print(f"\n{'stage':<20}{'studio s':>10}{'baseline s':>12}{'ratio':>8}")
    for k in s["stages"]:
        bs = b["stages"][k] * scale
        print(f"{k:<20}{s['stages'][k]:>10.2f}{bs:>12.2f}{bs / max(s['stages'][k], 1e-9):>8.1f}")
    bt = b["total_s"] * scale
    print(f"{'TOTAL':<20}{s['total_s']:>10.2f}{bt:>12.2f}{bt / s['total_s']:>8.1f}")
    print(f"\nrows: studio {s['rows_in']:,} -> {s['rows_out']:,}; baseline {b['rows_in']:,} -> {b['rows_out']:,}"
          f"{note}")
    print(f"peak RSS: studio {s['rss_peak_mb']:.0f} MB (start {s['rss_start_mb']:.0f} MB); baseline "
          f"{b['rss_peak_mb']:.0f} MB (start {b['rss_start_mb']:.0f} MB){' - not extrapolated' if note else ''}")
    print(f"baseline{note}: {bt:.1f} s; studio: {s['total_s']:.1f} s; speed-up {bt / s['total_s']:.1f}x "
          f"(target >= 3x)")
    print("note: the studio's EDA reuses the token counts its length filter cached (TokenCounter); the baseline "
          "tokenizes again, as a per-step script does. Without that reuse the ratio would be "
          f"{(bt - b['stages']['eda token lengths'] * scale) / (s['total_s'] - s['stages']['eda token lengths']):.1f}x "
          "(every stage but the EDA token lengths).")
    print(f"CPU seconds (all threads; steadier than wall time on a busy machine): studio {s['cpu_s']:.1f}, baseline "
          f"{b['cpu_s'] * scale:.1f}, ratio {b['cpu_s'] * scale / s['cpu_s']:.1f}x")


if __name__ == "__main__":
    main()
