"""Four chat requests at once through the running studio (gradio_client, the chat_send API) on the default GGUF.

Starts `mactuner studio` on a temporary workspace, sends 4 requests concurrently from 4 clients, then the same 4 one
after another from one client (the baseline, in the same run), and prints errors, total tokens, wall time,
throughput and the ratio concurrent / sequential. The model has one lock, so requests queue on it: the point is
that every one completes, and that queuing costs nothing in throughput.

    .venv/bin/python bench/chat_concurrent.py [--port 7880] [--tokens 64]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Name three rivers.", "What is a prime number?", "Write a haiku about rain.", "Explain what a CPU does."]


def ask(client, prompt: str, tokens: int) -> int:
    job = client.submit(prompt, [], None, None, "", 0.7, 0.95, 40, 0.05, 1.1, tokens, "", 7, api_name="/chat_send")
    _history, _box, speed = job.result()
    m = re.search(r"(\d+) tokens", speed)
    return int(m.group(1)) if m else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7880)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from gradio_client import Client

    with tempfile.TemporaryDirectory(prefix="mactuner-bench-chat-") as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "studio", "--root", tmp, "--port",
                                 str(args.port), "--no-prepare-hf"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(300):
                try:
                    import json

                    if json.loads(urllib.request.urlopen(url + "/api/model/current", timeout=1).read())["loaded"]:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            ask(Client(url, verbose=False), "Hello", 8)  # warm-up
            results, errors = [0] * 4, []

            def run(i):
                try:
                    results[i] = ask(Client(url, verbose=False), PROMPTS[i], args.tokens)
                except Exception as e:  # noqa: BLE001 - counted and printed
                    errors.append(repr(e))

            t0 = time.time()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            conc_s, conc_tok = time.time() - t0, sum(results)
            client = Client(url, verbose=False)
            t0 = time.time()
            seq_tok = sum(ask(client, p, args.tokens) for p in PROMPTS)
            seq_s = time.time() - t0
        finally:
            proc.terminate()
            proc.wait(20)
    print("4 chat requests through the running studio (default GGUF, chat_send API)")
    print(f"  concurrent (4 clients)  : {len(errors)} errors, {conc_tok} tokens in {conc_s:.2f} s = {conc_tok / conc_s:.1f} tok/s")
    print(f"  baseline sequential     : {seq_tok} tokens in {seq_s:.2f} s = {seq_tok / seq_s:.1f} tok/s")
    print(f"  ratio concurrent / sequential throughput: {(conc_tok / conc_s) / (seq_tok / seq_s):.2f}x")
    for e in errors:
        print("  error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
