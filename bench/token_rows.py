"""Trained token rows (PEFT trainable tokens, pipelines/training/tokens.py) at chat time: tokens/s of the default
model's HF copy with a quick-start adapter (LoRA + the <end_of_turn> rows) through PEFT's own forward (a copy of the
whole 262k-row embedding per call) against our rows-only forward, same prompt, greedy, in one run.

    .venv/bin/python bench/token_rows.py --root WORKSPACE [--run quick-start] [--tokens 48]

The workspace needs the HF copy (models/default/hf) and a finished run whose adapter has trained token rows (the
Quick start makes one). Prints one line per side and a `ratio` line (ours / PEFT's; higher is better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import adapters, chat, models  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402


def rate(lm, name, tokens) -> float:
    p = chat.ChatParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=tokens, adapter=name, stop=["\n\n\n"])
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        last = None
        for last in chat.stream_chat(lm, [{"role": "user", "content": "Tell me about the sea in detail."}], p):
            pass
        best = max(best, last.n_tokens / (time.perf_counter() - t0))
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--run", default="quick-start")
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    ws = Workspace(Path(a.root))
    lm = models.load_hf(models.default_hf_path(ws), name=models.DEFAULT_HF_NAME)
    info = adapters.attach_adapter(lm, ws.runs / a.run / "adapter", "qs")
    layers = [m for m in lm.backend.model.modules() if "forward_adapters" in m.__dict__]
    if not layers:
        print("this adapter has no trained token rows: nothing to compare")
        return 1
    ours = rate(lm, info.name, a.tokens)
    for m in layers:
        del m.forward_adapters  # PEFT's own forward again
    peft = rate(lm, info.name, a.tokens)
    print(f"PEFT trainable tokens forward: {peft:.2f} tok/s")
    print(f"rows-only forward (ours):      {ours:.2f} tok/s")
    print(f"ratio ours/PEFT tok/s: {ours / peft:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
