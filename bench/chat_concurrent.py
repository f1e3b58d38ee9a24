"""Eight chat streams at once through the running studio, on the default GGUF: through the OpenAI-compatible
`/v1/chat/completions` (the official `openai` client, stream=True) and through the Gradio API (`gradio_client`,
chat_send), each against the same 8 requests one after another (the baseline, in the same run).

Starts `mactuner studio` on a temporary workspace. Every request is greedy, with its own prompt, so each answer is
known from the sequential run: "mixed up" counts concurrent answers that differ from their sequential twin.
Prints errors, mix-ups, tokens, wall time, aggregate tokens/s and the ratio concurrent / sequential. The model
answers one request at a time (they queue on its lock): the point is that every one completes, unmixed, and that
queuing costs nothing in throughput.

    .venv/bin/python bench/chat_concurrent.py [--port 7880] [--tokens 48] [--streams 8]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["rivers", "primes", "rain", "processors", "moons", "bread", "volcanoes", "chess", "owls", "glass",
          "trains", "honey"]


def prompts(n: int) -> list[str]:
    """Prompts that differ from their first word: llama.cpp reuses the KV cache of the longest prefix shared with the
    previous request, and a reused prefix of another length changes the numerics (and so, now and then, a greedy
    token); with these, every request shares exactly the template's header with any other, in any order."""
    return [f"{TOPICS[i % len(TOPICS)].capitalize()}: write two sentences about them." for i in range(n)]


def ask_v1(url: str, prompt: str, tokens: int) -> tuple[str, int]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    text, n = "", 0
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return text, n


def ask_gradio(url: str, prompt: str, tokens: int) -> tuple[str, int]:
    from gradio_client import Client

    job = Client(url, verbose=False).submit(prompt, [], None, None, "", 0.0, 1.0, 0, 0.0, 1.0, tokens, "", 0,
                                            api_name="/chat_send")
    history, _box, speed = job.result()
    m = re.search(r"(\d+) tokens", speed)
    content = history[-1]["content"]
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content, int(m.group(1)) if m else 0


def run_pair(name: str, ask, url: str, ps: list[str], tokens: int) -> dict:
    t0 = time.time()
    seq = [ask(url, p, tokens) for p in ps]
    seq_s = time.time() - t0
    results, errors = [None] * len(ps), []

    def one(i):
        try:
            results[i] = ask(url, ps[i], tokens)
        except Exception as e:  # noqa: BLE001 - counted and printed
            errors.append(f"{ps[i]!r}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ps))]
    t0 = time.time()
    [t.start() for t in threads]
    [t.join() for t in threads]
    conc_s = time.time() - t0
    mixed = sum(1 for r, s in zip(results, seq) if r is not None and r[0] != s[0])
    conc_tok, seq_tok = sum(r[1] for r in results if r), sum(s[1] for s in seq)
    print(f"\n{name}: {len(ps)} streams")
    print(f"  concurrent : {len(errors)} errors, {mixed} mixed up, {conc_tok} tokens in {conc_s:.2f} s = "
          f"{conc_tok / conc_s:.1f} tok/s")
    print(f"  sequential : {seq_tok} tokens in {seq_s:.2f} s = {seq_tok / seq_s:.1f} tok/s (baseline)")
    print(f"  ratio concurrent / sequential throughput: {(conc_tok / conc_s) / (seq_tok / seq_s):.2f}x")
    for e in errors:
        print("  error:", e)
    for p, r, q in zip(ps, results, seq):
        if r is not None and r[0] != q[0]:
            print(f"  differs for {p!r}:\n    concurrent {r[0]!r}\n    sequential {q[0]!r}")
    return {"errors": len(errors), "mixed": mixed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7880)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--streams", type=int, default=8)
    args = ap.parse_args()
    ps = prompts(args.streams)
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-chat-") as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "studio", "--root", tmp, "--port",
                                 str(args.port), "--no-prepare-hf"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(300):
                try:
                    if json.loads(urllib.request.urlopen(url + "/api/model/current", timeout=1).read())["loaded"]:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            ask_v1(url, "Hello", 4)  # warm-up
            v1 = run_pair("/v1/chat/completions (openai client, stream=True)", ask_v1, url, ps, args.tokens)
            gr_ = run_pair("Gradio API (gradio_client, /chat_send)", ask_gradio, url, ps, args.tokens)
        finally:
            proc.terminate()
            proc.wait(20)
    bad = v1["errors"] + v1["mixed"] + gr_["errors"] + gr_["mixed"]
    print(f"\nall answered and none mixed up: {'yes' if not bad else 'NO'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
