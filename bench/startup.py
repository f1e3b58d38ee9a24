"""Start-up benchmark: seconds from launching `mactuner studio` to the first HTTP 200 and to "default model ready".

Runs the studio twice on a fresh workspace (cold: the GGUF is assembled from its package; warm: reused), and in the
same run two baselines: a bare one-textbox gradio app (the floor for serving) and a fresh Python process that
imports llama_cpp and loads the same GGUF directly (the floor for a ready model). Prints each figure and the ratios.

    .venv/bin/python bench/startup.py [--port 7870] [--with-hf]

--with-hf also times the one-off HF safetensors copy of the default model (for training), about a minute.
Targets (issue 2): under 8 s to serve; under 3 s to a ready default model on a warm start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _get(url: str, timeout: float = 0.5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except Exception:  # noqa: BLE001 - not up yet
        return None, b""


def _wait(pred, limit: float) -> float | None:
    t0 = time.time()
    while time.time() - t0 < limit:
        if pred():
            return time.time()
        time.sleep(0.05)
    return None


def time_studio(root: Path, port: int, with_hf: bool) -> dict:
    cmd = [PY, "-m", "pipelines.cli", "studio", "--root", str(root), "--port", str(port)]
    if not with_hf:
        cmd.append("--no-prepare-hf")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    logged: dict[str, float] = {}

    def read_stdout():
        for line in proc.stdout:
            if "default model ready" in line:
                logged.setdefault("ready", time.time())

    import threading

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        served = _wait(lambda: _get(base + "/")[0] == 200, 120)

        def ready():
            code, body = _get(base + "/api/model/current")
            return code == 200 and json.loads(body).get("loaded")

        ready_at = _wait(ready, 120)
        out = {"serve_s": served - t0 if served else None, "ready_s": ready_at - t0 if ready_at else None,
               "ready_log_s": logged["ready"] - t0 if "ready" in logged else None}
        if with_hf:
            hf_at = _wait(lambda: json.loads(_get(base + "/api/model/health")[1] or b"{}").get("default_hf") == "ready", 600)
            out["hf_copy_s"] = hf_at - t0 if hf_at else None
        return out
    finally:
        proc.terminate()
        proc.wait(20)


BARE_APP = textwrap.dedent("""
    import os, sys, time
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr
    with gr.Blocks() as demo:
        gr.Textbox()
    demo.launch(server_port=int(sys.argv[1]), prevent_thread_lock=True, quiet=True)
    time.sleep(600)
""")

BARE_LLAMA = textwrap.dedent("""
    import sys, time
    t0 = time.time()
    import llama_cpp
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=4096, verbose=False)
    print(time.time() - t0)
""")


def time_bare_gradio(port: int) -> float | None:
    t0 = time.time()
    proc = subprocess.Popen([PY, "-c", BARE_APP, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        served = _wait(lambda: _get(f"http://127.0.0.1:{port}/")[0] == 200, 120)
        return served - t0 if served else None
    finally:
        proc.terminate()
        proc.wait(20)


def time_bare_llama(gguf: Path) -> float:
    t0 = time.time()
    subprocess.run([PY, "-c", BARE_LLAMA, str(gguf)], check=True, capture_output=True)
    return time.time() - t0


def fmt(x):
    return "n/a" if x is None else f"{x:.2f} s"


def ratio(a, b):
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7870)
    ap.add_argument("--with-hf", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-") as tmp:
        root = Path(tmp) / "ws"
        cold = time_studio(root, args.port, args.with_hf)
        warm = time_studio(root, args.port + 1, False)
        bare_serve = time_bare_gradio(args.port + 2)
        bare_ready = time_bare_llama(root / "models" / "default" / "gemma-3-270m-q4_k_m.gguf")
    print("MacTuner start-up (seconds from launching the process)")
    print("  ('ready' = the process logs 'default model ready'; 'via HTTP' = /api/model/current first says loaded,")
    print("   which can wait for torch's import, started in the background right after serving)")
    print(f"  cold  : first HTTP 200 {fmt(cold['serve_s'])}, default model ready {fmt(cold['ready_log_s'])}"
          f" (via HTTP {fmt(cold['ready_s'])})"
          + (f", HF copy ready {fmt(cold.get('hf_copy_s'))}" if args.with_hf else ""))
    print(f"  warm  : first HTTP 200 {fmt(warm['serve_s'])}, default model ready {fmt(warm['ready_log_s'])}"
          f" (via HTTP {fmt(warm['ready_s'])})")
    print(f"  baseline bare gradio app, first HTTP 200       : {fmt(bare_serve)}")
    print(f"  baseline python + llama_cpp.Llama(same GGUF)   : {fmt(bare_ready)}")
    print(f"  ratio warm serve / bare gradio                 : {ratio(warm['serve_s'], bare_serve)}")
    print(f"  ratio warm ready / bare llama_cpp load         : {ratio(warm['ready_log_s'], bare_ready)}")
    ok = (warm["serve_s"] or 99) < 8 and (warm["ready_log_s"] or 99) < 3 and (cold["serve_s"] or 99) < 8
    print(f"  targets (serve < 8 s, warm ready < 3 s)        : {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
