"""Chat benchmark: tokens/s and time to first token of `pipelines.chat.stream_chat` against the backends called
directly with the same rendered prompt and settings, in one run.

(a) the embedded default GGUF (Gemma 3 270M Q4_K_M) through stream_chat - the studio's path: the model answers
    from its worker process (pipelines.serving) - vs `Llama.create_completion(stream=True)` of llama-cpp-python
    loaded in this process, on the same prompt token ids: one warm-up each, then 3 measured rounds (order
    alternating, a new prompt each round so that both evaluate it whole), medians reported; then llama.cpp's extra
    buffer types (the repacked kernels) on vs off, called directly, to show what the setting costs on this CPU;
(b) the HF copy of the default model through stream_chat (loaded with models.load_hf, as the studio does) vs a
    plain script's `model.generate` on its main thread (a timing-only streamer records the first token), each in
    its own process: torch's OpenMP keeps a team of threads per calling thread, and teams left over in one
    process (the other side's) slowed the measured side by ~25% on 2 cores. Each process loads, warms up and runs
    up to 3 rounds (90 s at most); the pair runs twice (ours, direct, direct, ours). CPU transformers is slow, so
    fewer tokens.

(c) the tuned model - the quick-start run's adapter - as the Chat tab's Adapter menu and /v1 now serve it: the
    default GGUF in its worker process with the adapter as a LoRA GGUF (its trained <end_of_turn> row included, on
    the copy of the GGUF with its tied output layer written out), vs today's transformers + PEFT on the HF copy; both through stream_chat, greedy, rounds
    alternating after a warm-up each; a `ratio` line. The run is --run, else the workspace's latest finished
    quick-start run, else one is trained first (the Quick start: 39 steps, 75-190 s on 2 idle cores).

Greedy decoding (temperature 0, no repetition penalty) on both sides so they produce the same tokens. The CPU's
features and the llama.cpp settings in force are printed first.

    .venv/bin/python bench/chat.py [--root WORKSPACE] [--gguf FILE] [--hf FOLDER] [--tokens 64] [--hf-tokens 16]
                                   [--run RUN | --skip-tuned]

Without --root a temporary workspace is used (the GGUF is assembled from its package, ~250 MB). The HF part always
runs: on --hf, else on the default model's HF copy - the workspace's, else the one the studio prepared in your own
workspace (MACTUNER_HOME or ~/.mactuner), else prepared now from the GGUF (dequantized, about a minute, once per
workspace: pass --root to keep it).
Targets: stream_chat at >= 0.95x the direct calls' tokens/s; TTFT under 150 ms for the ~20-token GGUF prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import chat, models  # noqa: E402
from pipelines import device as devicemod  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain in two short sentences why the sky is blue."}]


def round_messages(i: int) -> list[dict]:
    """A different prompt each round (same length), so neither side reuses the last round's prompt cache."""
    return [{"role": "user", "content": f"Round {i}. " + MESSAGES[0]["content"]}]


def measure_ours(lm, params, messages=MESSAGES) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    parts, last = [], None
    for last in chat.stream_chat(lm, messages, params):
        parts.append(last.text)
    total = time.perf_counter() - t0
    n = last.n_tokens
    return {"text": "".join(parts), "n": n, "ttft": last.ttft_s, "total": total, "tps": n / total,
            "decode_tps": last.tokens_per_s or 0.0, "cpu": time.process_time() - c0}


def measure_llama_direct(llm, prompt, n_tokens: int) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    first, parts = None, []
    stream = llm.create_completion(prompt=prompt.token_ids, max_tokens=n_tokens, temperature=0.0, repeat_penalty=1.0,
                                   stream=True, seed=0)
    for c in stream:
        text = c["choices"][0]["text"]
        if text and first is None:
            first = time.perf_counter()
        parts.append(text)
    total = time.perf_counter() - t0
    return {"text": "".join(parts), "ttft": (first - t0) if first else None, "total": total,
            "cpu": time.process_time() - c0}


def bench_gguf(path: Path, n_tokens: int, rounds: int, threads: int | None = None) -> dict:
    from pipelines.serving import llamacpp

    threads = threads or devicemod.cpu_threads()
    lm = models.load_gguf(path, name=models.DEFAULT_NAME, threads=threads)
    llm = llamacpp.open_llama(path, n_ctx=lm.details["n_ctx"], n_threads=threads)  # the direct side, in this process
    params = chat.ChatParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=n_tokens)
    prompt = chat.build_prompt(lm, MESSAGES, params)
    print(f"\n(a) GGUF {path.name}: prompt {len(prompt.token_ids)} tokens, {n_tokens} new tokens, greedy, "
          f"{rounds} rounds after a warm-up, {threads} llama.cpp threads; template: {prompt.template_source}")
    pid, bufts = lm.backend.worker.pid, lm.backend.worker.settings.extra_bufts
    print(f"  worker: pid {pid}, extra buffer types {'on' if bufts else 'off'}")

    import psutil

    worker = psutil.Process(pid)

    def ours(i):  # CPU time: this process's and the worker's, where the model runs
        w0 = sum(worker.cpu_times()[:2])
        r = measure_ours(lm, params, round_messages(i))
        r["cpu"] += sum(worker.cpu_times()[:2]) - w0
        return r

    def direct(i):
        return measure_llama_direct(llm, chat.build_prompt(lm, round_messages(i), params), n_tokens)

    ours(-1), direct(-1)  # warm-up
    o_runs, d_runs = [], []
    for i in range(rounds):
        pair = (ours, direct) if i % 2 == 0 else (direct, ours)
        for f in pair:
            (o_runs if f is ours else d_runs).append(f(i))
    for o, d in zip(o_runs, d_runs):  # same greedy tokens: the count of stream_chat applies
        d["n"] = o["n"]
        d["tps"] = d["n"] / d["total"]
        d["decode_tps"] = (d["n"] - 1) / (d["total"] - d["ttft"]) if d["ttft"] is not None and d["n"] > 1 else 0.0
    same = all(o["text"] == d["text"] for o, d in zip(o_runs, d_runs))
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    res = {"n": o_runs[0]["n"], "same_text": same}
    for k in ("ttft", "tps", "decode_tps", "total", "cpu"):
        res[f"ours_{k}"], res[f"direct_{k}"] = med(o_runs, k), med(d_runs, k)
    res["ours_all_tps"] = [round(r["tps"], 1) for r in o_runs]
    res["direct_all_tps"] = [round(r["tps"], 1) for r in d_runs]
    res["ours_all_ttft"] = [round(r["ttft"] * 1000, 1) for r in o_runs]
    res["direct_all_ttft"] = [round(r["ttft"] * 1000, 1) for r in d_runs]
    llm.close()
    lm.backend.close()
    return res


def bench_extra_bufts(path: Path, n_tokens: int, rounds: int, threads: int) -> dict:
    """Direct llama-cpp-python tokens/s with llama.cpp's extra buffer types (repacked kernels) on and off."""
    from pipelines.serving import llamacpp

    out = {}
    for on in (True, False):
        llm = llamacpp.open_llama(path, llamacpp.LlamaSettings(on, "bench"), n_ctx=1024, n_threads=threads)
        ids = llm.tokenize(b"<start_of_turn>user\nExplain in two short sentences why the sky is blue.<end_of_turn>\n"
                           b"<start_of_turn>model\n", add_bos=True, special=True)
        tps = []
        for i in range(rounds + 1):
            llm.reset()
            t0 = time.perf_counter()
            out_ = llm.create_completion(ids, max_tokens=n_tokens, temperature=0.0, repeat_penalty=1.0, seed=0)
            if i:  # the first is the warm-up
                tps.append(out_["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        llm.close()
        out["on" if on else "off"] = statistics.median(tps)
    return out


def hf_side(kind: str, path: Path, n_tokens: int, rounds: int, time_budget: float = 90.0) -> dict:
    """One side of the HF comparison, in this (fresh) process: "ours" loads the folder as the studio does
    (models.load_hf) and answers through stream_chat; "direct" is a plain script - from_pretrained and generate
    on the main thread. Returns the runs after a warm-up."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    t = time.perf_counter()
    lm = models.load_hf(path)  # the prompt and end tokens come from it on both sides
    load_s = time.perf_counter() - t
    params = chat.ChatParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=n_tokens)
    prompt = chat.build_prompt(lm, MESSAGES, params)
    eos = lm.backend.eos_ids()
    tokenizer = lm.backend.tokenizer
    if kind == "direct":
        from transformers import AutoModelForCausalLM

        dtype = next(lm.backend.model.parameters()).dtype
        lm.backend.close()  # the plain script's own model, loaded and run on the main thread
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # the first put is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def direct(n):
        ids = torch.tensor([prompt.token_ids])
        s = FirstToken()
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, streamer=s)
        total = time.perf_counter() - t0
        new = [i for i in out[0, ids.shape[1]:].tolist() if i not in eos]
        return {"text": tokenizer.decode(new, skip_special_tokens=True), "n": len(new),
                "ttft": s.first - t0, "total": total, "tps": len(new) / total, "cpu": time.process_time() - c0,
                "decode_tps": (len(new) - 1) / (total - (s.first - t0)) if len(new) > 1 else 0.0}

    if kind == "ours":
        chat.chat(lm, MESSAGES, chat.ChatParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=2))
        run = lambda: measure_ours(lm, params)  # noqa: E731
    else:
        direct(2)
        run = lambda: direct(n_tokens)  # noqa: E731
    runs, t_start = [], time.perf_counter()
    for _ in range(rounds):
        runs.append(run())
        if time.perf_counter() - t_start > time_budget:
            break
    return {"runs": runs, "load_s": load_s, "dtype": lm.dtype, "device": lm.device,
            "prompt_tokens": len(prompt.token_ids)}


def bench_hf(path: Path, n_tokens: int, rounds: int = 3) -> dict:
    """stream_chat and a direct generate() script, each in its own process (OpenMP thread teams are per process
    and per calling thread: run in one process, whichever ran first slows the other), alternating twice."""
    import json
    import subprocess

    print(f"\n(b) HF {path}: {n_tokens} new tokens, greedy; each side in its own process (load, warm-up, "
          f"{rounds} rounds), run twice in the order ours, direct, direct, ours; medians over all rounds")
    sides: dict[str, list] = {"ours": [], "direct": []}
    info = {}
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-chat-hf-") as tmp:
        for i, kind in enumerate(("ours", "direct", "direct", "ours")):
            out = Path(tmp) / f"{i}-{kind}.json"
            subprocess.run([sys.executable, __file__, "--hf-side", kind, "--hf", str(path), "--hf-tokens",
                            str(n_tokens), "--hf-rounds", str(rounds), "--hf-json", str(out)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res = json.loads(out.read_text())
            sides[kind] += res["runs"]
            info = res
    print(f"  loaded as {info['dtype']} on {info['device']}; prompt {info['prompt_tokens']} tokens")
    print(f"  per round tokens/s: stream_chat {[round(r['tps'], 1) for r in sides['ours']]}, "
          f"direct {[round(r['tps'], 1) for r in sides['direct']]}")
    med = lambda k, f: statistics.median(r[f] for r in sides[k])  # noqa: E731
    texts = {r["text"] for k in sides for r in sides[k]}
    return {"prompt_tokens": info["prompt_tokens"], "same_text": len(texts) == 1, "n": sides["ours"][0]["n"],
            "n_direct": sides["direct"][0]["n"],
            **{f"ours_{f}": med("ours", f) for f in ("ttft", "tps", "decode_tps", "total", "cpu")},
            **{f"direct_{f}": med("direct", f) for f in ("ttft", "tps", "decode_tps", "total", "cpu")}}


def quick_start_run(ws: Workspace, name: str | None) -> Path:
    """The run whose adapter part (c) serves: `name`, else the latest finished quick-start run, else a new one."""
    from pipelines import jobs, quickstart, runs

    if name:
        return runs.get_run(ws, name).path
    run = quickstart.latest(ws)
    if run is None or run.status().state != "finished":
        print("\n(c) training the quick-start adapter first (39 steps)...", flush=True)
        run = quickstart.start(ws)
        st = jobs.wait(run, timeout=3600)
        if st.state != "finished":
            raise SystemExit(f"the quick-start run ended {st.state}: {st.reason}")
    return run.path


def bench_tuned(ws: Workspace, run_dir: Path, n_tokens: int, rounds: int) -> dict | None:
    """The run's adapter through llama.cpp (base GGUF + LoRA GGUF, as open_adapter serves it) and through
    transformers + PEFT (its HF base), alternating rounds; None when llama.cpp cannot take the adapter."""
    from pipelines import adapters, runs
    from pipelines.serving.registry import ModelRegistry

    reg = ModelRegistry()
    t0 = time.perf_counter()
    lm_g, name, note = adapters.open_adapter(ws, reg, str(run_dir), current=False)
    open_s = time.perf_counter() - t0
    print(f"\n(c) tuned model, run {run_dir.name}: {lm_g.name} + {name} ({note}; {open_s:.1f} s to open)")
    if lm_g.backend_kind != "llama.cpp":
        print("  llama.cpp cannot take this adapter: part (c) skipped")
        return None
    adapter_dir, _ = runs.resolve_adapter(run_dir)
    lm_h = models.load_hf(runs.resolve_base(ws, adapter_dir, run_dir))
    adapters.attach_adapter(lm_h, adapter_dir, "tuned")
    sides = {"llama.cpp": (lm_g, name), "transformers": (lm_h, "tuned")}
    params = {k: chat.ChatParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=n_tokens, adapter=a)
              for k, (_lm, a) in sides.items()}
    out: dict[str, list] = {k: [] for k in sides}
    for k, (lm, _a) in sides.items():
        measure_ours(lm, params[k], round_messages(-1))  # warm-up
    for i in range(rounds):
        for k in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            out[k].append(measure_ours(sides[k][0], params[k], tuned_messages(i)))
    lm_g.backend.close()
    lm_h.backend.close()
    med = lambda k, f: statistics.median(r[f] for r in out[k])  # noqa: E731
    print(f"  tokens per answer: llama.cpp {[r['n'] for r in out['llama.cpp']]}, "
          f"transformers {[r['n'] for r in out['transformers']]}; same text: "
          f"{[a['text'] == b['text'] for a, b in zip(out['llama.cpp'], out['transformers'])]}")
    return {f"{k}_{f}": med(k, f) for k in sides for f in ("tps", "decode_tps", "ttft")}


def tuned_messages(i: int) -> list[dict]:
    from pipelines import quickstart

    return [{"role": "user", "content": f"{quickstart.QUESTION} (question {i + 1})"}]


def default_hf_copy(ws: Workspace) -> Path:
    """The default model's HF copy: this workspace's, else the one the studio prepared in the user's own workspace,
    else prepared now in this workspace (the GGUF dequantized, as the Model tab does)."""
    from pipelines.workspace import default_root

    for where in (ws, Workspace(default_root().resolve())):
        if models.default_hf_status(where)["state"] == "ready":
            print(f"\n(b) the default model's HF copy: {models.default_hf_path(where)}")
            return models.default_hf_path(where)
    print("\n(b) preparing the default model's HF copy from its GGUF (about a minute, once per workspace)...",
          flush=True)
    t0 = time.perf_counter()
    path = models.materialize_default_hf(ws)
    print(f"  ready in {time.perf_counter() - t0:.0f} s: {path}")
    return path


def report_tuned(t: dict | None) -> None:
    if not t:
        return
    print(f"  {'':24s}{'llama.cpp+LoRA':>16s}{'HF+PEFT':>12s}{'ratio':>9s}")
    for label, f in (("tokens/s (whole run)", "tps"), ("tokens/s (decode)", "decode_tps"),
                     ("time to first token ms", "ttft")):
        a, b = t[f"llama.cpp_{f}"], t[f"transformers_{f}"]
        scale = 1000 if f == "ttft" else 1
        print(f"  {label:24s}{a * scale:16.1f}{b * scale:12.1f}{a / b:9.3f}")


def report(label: str, r: dict) -> None:
    print(f"  {label:24s}{'stream_chat':>14s}{'direct':>14s}{'ratio':>9s}")
    print(f"  {'tokens/s (whole run)':24s}{r['ours_tps']:14.1f}{r['direct_tps']:14.1f}"
          f"{r['ours_tps'] / r['direct_tps']:9.3f}")
    print(f"  {'tokens/s (decode)':24s}{r['ours_decode_tps']:14.1f}{r['direct_decode_tps']:14.1f}"
          f"{r['ours_decode_tps'] / r['direct_decode_tps']:9.3f}")
    print(f"  {'time to first token ms':24s}{r['ours_ttft'] * 1000:14.1f}{r['direct_ttft'] * 1000:14.1f}"
          f"{r['ours_ttft'] / r['direct_ttft']:9.3f}")
    print(f"  {'CPU seconds per run':24s}{r['ours_cpu']:14.3f}{r['direct_cpu']:14.3f}"
          f"{r['ours_cpu'] / r['direct_cpu']:9.3f}   (process CPU time: less sensitive to other work)")
    print(f"  tokens: {r['n']}; identical text on both sides: {r['same_text']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="workspace whose models/default/ to use (default: a temporary one)")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded default in the workspace)")
    ap.add_argument("--hf", default=None, help="HF folder (default: models/default/hf in the workspace)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens for the GGUF runs")
    ap.add_argument("--hf-tokens", type=int, default=32, help="new tokens for the HF runs (CPU transformers is slow)")
    ap.add_argument("--hf-rounds", type=int, default=3, help="HF rounds (stopped early after 90 s)")
    ap.add_argument("--rounds", type=int, default=3, help="GGUF rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads for the GGUF part (default: the physical cores, as the studio uses)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--run", default=None, help="run whose adapter part (c) serves (default: the latest quick start)")
    ap.add_argument("--tuned-tokens", type=int, default=64, help="new tokens at most for part (c)")
    ap.add_argument("--skip-tuned", action="store_true")
    ap.add_argument("--hf-side", choices=["ours", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--hf-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_side:
        import json

        res = hf_side(args.hf_side, Path(args.hf), args.hf_tokens, args.hf_rounds)
        Path(args.hf_json).write_text(json.dumps(res))
        return 0

    tmp = None
    if args.root:
        ws = Workspace.open(args.root)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mactuner-bench-chat-")
        ws = Workspace.open(tmp.name)
    cores = os.cpu_count()
    load0 = os.getloadavg()
    print(f"MacTuner chat benchmark - {cores} CPU cores, load average {load0[0]:.2f} at start. Other work running "
          "on this machine at the same time skews every figure; compare the ratios, which are taken side by side.")
    from pipelines.serving import llamacpp

    print(f"  {llamacpp.describe()}")
    gguf = Path(args.gguf) if args.gguf else models.ensure_default_gguf(ws)
    g = bench_gguf(gguf, args.tokens, args.rounds, args.threads)
    report("GGUF", g)
    eb = bench_extra_bufts(gguf, args.tokens, args.rounds, args.threads or devicemod.cpu_threads())
    print(f"  llama.cpp direct, extra buffer types on: {eb['on']:.1f} tok/s, off: {eb['off']:.1f} tok/s; "
          f"ratio off/on {eb['off'] / eb['on']:.3f}")
    print(f"  per round tokens/s: stream_chat {g['ours_all_tps']}, direct {g['direct_all_tps']}; "
          f"TTFT ms: stream_chat {g['ours_all_ttft']}, direct {g['direct_all_ttft']}")
    spread = max(max(v) / max(min(v), 1e-9) for v in (g["ours_all_tps"], g["direct_all_tps"]))
    if spread > 1.5:
        print(f"  NOTE: rounds differ up to {spread:.1f}x - the machine is busy and the medians are unreliable; "
              "rerun, raise --rounds, or use --threads 1 (llama.cpp's spinning thread barriers suffer most)")

    h = None
    if args.skip_hf:
        print("\n(b) HF part skipped (--skip-hf).")
    else:
        hf = Path(args.hf) if args.hf else default_hf_copy(ws)
        if not (hf / "config.json").is_file():
            print(f"error: {hf} is not an HF model folder (it has no config.json)", file=sys.stderr)
            return 2
        h = bench_hf(hf, args.hf_tokens, args.hf_rounds)
        report("HF", h)
        if h["n"] != h["n_direct"]:
            print(f"  (direct generated {h['n_direct']} tokens)")

    t = None
    if args.skip_tuned:
        print("\n(c) tuned-model part skipped (--skip-tuned).")
    else:
        t = bench_tuned(ws, quick_start_run(ws, args.run), args.tuned_tokens, args.rounds)
        report_tuned(t)

    load1 = os.getloadavg()
    print("\nSummary")
    ratio = g["ours_tps"] / g["direct_tps"]
    print(f"  GGUF  stream_chat (worker process)/direct (in process) tokens/s ratio = {ratio:.3f} "
          f"(target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'}); "
          f"TTFT {g['ours_ttft'] * 1000:.0f} ms for a {args.tokens}-token answer to a short prompt "
          f"(target < 150 ms: {'met' if g['ours_ttft'] < 0.15 else 'MISSED'})")
    if h:
        hr = h["ours_tps"] / h["direct_tps"]
        print(f"  HF    stream_chat/direct tokens/s = {hr:.3f} (target >= 0.95: {'met' if hr >= 0.95 else 'MISSED'}); "
              f"TTFT {h['ours_ttft'] * 1000:.0f} ms vs {h['direct_ttft'] * 1000:.0f} ms direct")
    if t:
        print(f"  tuned model (quick-start adapter) llama.cpp base GGUF + LoRA GGUF / transformers + PEFT tokens/s "
              f"ratio = {t['llama.cpp_tps'] / t['transformers_tps']:.2f}")
    print(f"  load average {load0[0]:.2f} -> {load1[0]:.2f} on {cores} cores during the run")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
