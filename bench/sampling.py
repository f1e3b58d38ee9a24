"""Prompt format and sampling defaults for small models: how often the embedded default model's answer to a plain
question drifts out of the question's language (letters of another script: CJK, Cyrillic, Devanagari, ...), and how
often it runs to the token limit instead of ending, in one run.

The embedded Gemma 3 270M GGUF is a base model: no chat template, and its turn tokens (<start_of_turn>,
<end_of_turn>) were never trained. Each setting - a prompt format (Gemma's turn format, which the studio used for it
before, or what `stream_chat` picks now: the plain 'User: / Assistant:' fallback) and sampling settings - answers
the same plain English questions with the same seeds. The `ratio` line compares the studio now (its format,
ChatParams() defaults) with before (Gemma turns; temperature 0.7, top-p 0.95, top-k 40, min-p 0.05, repetition
penalty 1.1): below 1 is better.

    .venv/bin/python bench/sampling.py [--root WORKSPACE] [--seeds 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import unicodedata
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import chat, models  # noqa: E402
from pipelines.templates import GEMMA_CHAT_TEMPLATE, render_template  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Why do leaves change colour in autumn?", "What is a good name for a small black cat?",
             "How do I make a cup of tea?", "What does a bicycle chain do?",
             "Name three fruits that are red.", "What is the boiling point of water?",
             "Write one sentence about the sea.", "What is 12 plus 7?"]

OLD = chat.ChatParams(temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repetition_penalty=1.1)
LOW = replace(OLD, min_p=0.1, repetition_penalty=1.0)
# (prompt format, settings): "gemma" is Gemma's turn format (what the studio used for the embedded GGUF before),
# "studio" is what stream_chat picks now (the plain fallback for a base model without a chat template).
CANDIDATES = {
    "old: Gemma turns, old defaults": ("gemma", OLD),
    "Gemma turns, min-p .1, no rep. penalty": ("gemma", LOW),
    "studio format, old defaults": ("studio", OLD),
    "studio format, min-p .1, no rep. penalty": ("studio", LOW),
    "studio format, t1.0 k64 p.95 (Gemma's card)": ("studio", replace(OLD, temperature=1.0, top_k=64, min_p=0.0,
                                                                       repetition_penalty=1.0)),
}


def foreign_letters(text: str) -> int:
    """Letters that are not Latin script (the questions are English)."""
    n = 0
    for ch in text:
        if ch.isalpha():
            try:
                if not unicodedata.name(ch).startswith("LATIN"):
                    n += 1
            except ValueError:
                n += 1
    return n


def answer(lm, fmt: str, q: str, p) -> tuple[str, int]:
    msgs = [{"role": "user", "content": q}]
    if fmt == "gemma":
        text = render_template(GEMMA_CHAT_TEMPLATE, msgs, True, bos_token="<bos>")
        chunks = chat.stream_completion(lm, text, replace(p, stop=["<end_of_turn>", "<start_of_turn>"]))
    else:
        chunks = chat.stream_chat(lm, msgs, p)
    last, parts = None, []
    for last in chunks:
        parts.append(last.text)
    return "".join(parts), last.n_tokens if last else 0


def run_setting(lm, setting, seeds: int, tokens: int) -> dict:
    fmt, params = setting
    drift = full = 0
    total = 0
    examples = []
    t0 = time.perf_counter()
    for q in QUESTIONS:
        for s in range(seeds):
            text, n = answer(lm, fmt, q, replace(params, seed=1000 + s, max_new_tokens=tokens))
            total += 1
            if foreign_letters(text) >= 3:
                drift += 1
                if len(examples) < 2:
                    examples.append(text[:80].replace("\n", " "))
            if n >= tokens:
                full += 1
    return {"drift": drift / total, "full": full / total, "n": total, "s": time.perf_counter() - t0,
            "examples": examples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="mt-bench-sampling-"))
    ws = Workspace(root)
    path = models.ensure_default_gguf(ws)
    lm = models.load_gguf(path, name=models.DEFAULT_NAME)
    settings = dict(CANDIDATES)
    settings["current: studio format, ChatParams()"] = ("studio", chat.ChatParams())
    results = {}
    for name, params in settings.items():
        same = next((n for n, p in CANDIDATES.items() if n in results and p == params), None)
        r = results[name] = results[same] if same else run_setting(lm, params, a.seeds, a.tokens)
        print(f"{name:45s} drift {r['drift']:6.1%}  hit max tokens {r['full']:6.1%}  ({r['n']} answers, "
              f"{r['s']:.0f} s)  {r['examples'][:1]}", flush=True)
    old = results[next(iter(CANDIDATES))]["drift"]
    cur = results["current: studio format, ChatParams()"]["drift"]
    ratio = (cur / old) if old else float("nan")
    print(f"ratio current/old, answers drifting to another script: {ratio:.2f} ({cur:.1%} vs {old:.1%}); "
          f"answers that end by themselves {1 - results['current: studio format, ChatParams()']['full']:.0%} vs "
          f"{1 - results[next(iter(CANDIDATES))]['full']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
