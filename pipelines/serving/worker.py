"""The GGUF worker process: loads one model with llama.cpp and answers the studio over an inherited socket.

    python -m pipelines.serving.worker --fd N --model PATH [--n-ctx 4096] [--threads T] [--extra-bufts auto|on|off]
                                       [--lora NAME=PATH ...]

Started by `client.GGUFWorker` (never by hand: `--fd` is one end of a socket pair the studio made). Messages are
tuples sent with multiprocessing's Connection (the studio is the only peer). The worker speaks first:

    -> ("ready", info)                    loaded: {"pid", "n_ctx", "n_tokens_max", "n_params", "offload", "settings",
                                          "load_seconds"}
    -> ("error", message)                 the file could not be loaded (then it exits 1)
    <- ("generate", {"prompt": [ids], "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                     "frequency_penalty", "presence_penalty", "seed", "adapter": NAME or None})
    -> ("text", delta, n_tokens) ...      as tokens are sampled
    -> ("end", finish_reason, n_tokens)   "stop" (end of generation), "length" (max_tokens) or "stopped"
    -> ("failed", message)                instead of "end" when llama.cpp raised
    <- ("halt",)                          at any time: the running answer ends after the current token
    <- ("lora_load", NAME, PATH)          load a LoRA GGUF on the model (the base stays loaded; `--lora` at start)
    -> ("lora_loaded", NAME)              or ("failed", message)
    <- ("lora_free", NAME)                -> ("lora_freed", NAME)
    <- ("close",)                         exit

A generate request names the adapter it answers with (None: the bare base); switching sets the adapters on the
context (llama_set_adapters_lora) and drops the cached prompt, which was evaluated with other weights.

Why not llama_cpp.server: measured on this 2-core CPU with the default model, its streaming endpoint gave about 0.6x
the tokens/s of llama-cpp-python called directly (each token is produced on whichever thread of the server's pool
is free, and every new thread that computes gets a fresh OpenMP team), 0.84x with its pool cut to one thread; this
loop, which generates on its main thread, gives 0.98x. It also takes our token ids as the prompt (no second
tokenization with its own BOS rule) and counts tokens exactly.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from .. import device as devicemod
from . import llamacpp
from .backend import PENALTY_WINDOW


def _settings(choice: str) -> llamacpp.LlamaSettings:
    if choice == "on":
        return llamacpp.LlamaSettings(True, "asked for")
    if choice == "off":
        return llamacpp.LlamaSettings(False, "asked for")
    return llamacpp.choose()


class Loras:
    """The LoRA adapters loaded on this process's model (name -> llama.cpp handle) and the one in use."""

    def __init__(self, llm):
        self.llm, self.loaded, self.active = llm, {}, None

    def load(self, name: str, path: str) -> None:
        if name in self.loaded:
            return
        llama_cpp = llamacpp.llama_cpp_module()
        handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode("utf-8"))
        if not handle:  # a NULL pointer: llama.cpp logged why (another architecture, tensors that do not fit)
            raise ValueError(f"{Path(path).name} is no LoRA adapter llama.cpp can apply to this model")
        self.loaded[name] = handle

    def use(self, name: str | None) -> None:
        if name == self.active:
            return
        if name is not None and name not in self.loaded:
            raise KeyError(f"no adapter named {name!r} is loaded in the model process")
        llama_cpp = llamacpp.llama_cpp_module()
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.loaded[name])
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        if rc:
            raise RuntimeError(f"llama.cpp could not switch to adapter {name!r} (code {rc})")
        self.llm.reset()  # the cached prompt was evaluated with the other weights: evaluate it again
        self.active = name

    def free(self, name: str) -> None:
        if self.active == name:
            self.use(None)
        handle = self.loaded.pop(name, None)
        if handle:
            llamacpp.llama_cpp_module().llama_adapter_lora_free(handle)


def _generate(conn: Connection, llm, req: dict, loras: Loras) -> bool:
    """Stream one answer; True when a "close" arrived meanwhile."""
    llama_cpp = llamacpp.llama_cpp_module()
    loras.use(req.get("adapter"))
    prompt = list(req["prompt"])
    n_prompt = len(prompt)
    state = {"n": 0, "halted": False, "close": False}

    def criterion(input_ids, _logits) -> bool:
        # input_ids: the prompt and every answer token but the one just sampled
        state["n"] = len(input_ids) - n_prompt + 1
        if not state["halted"] and conn.poll():
            kind = conn.recv()[0]
            state["halted"], state["close"] = kind in ("halt", "close"), kind == "close"
        return state["halted"]

    finish = None
    stream = llm.create_completion(
        prompt=prompt, max_tokens=int(req["max_tokens"]), temperature=float(req["temperature"]),
        top_p=float(req["top_p"]), top_k=int(req["top_k"]), min_p=float(req["min_p"]),
        repeat_penalty=float(req["repeat_penalty"]), frequency_penalty=float(req.get("frequency_penalty", 0.0)),
        presence_penalty=float(req.get("presence_penalty", 0.0)), seed=int(req["seed"]), stream=True,
        stopping_criteria=llama_cpp.StoppingCriteriaList([criterion]))
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            if choice["text"]:
                conn.send(("text", choice["text"], state["n"]))
            if state["halted"]:
                break
    finally:
        stream.close()
    n = state["n"]
    if state["halted"]:
        finish = "stopped"
    elif finish == "stop":
        n = max(0, n - 1)  # the end-of-generation token was counted but is not part of the answer
    conn.send(("end", finish or "length", n))
    return state["close"]


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def serve(conn: Connection, llm, loras: Loras) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the studio went away
        kind = msg[0]
        if kind == "close":
            return
        try:
            if kind == "generate" and _generate(conn, llm, msg[1], loras):
                return
            if kind == "lora_load":
                loras.load(msg[1], msg[2])
                conn.send(("lora_loaded", msg[1]))
            elif kind == "lora_free":
                loras.free(msg[1])
                conn.send(("lora_freed", msg[1]))
        except (EOFError, OSError):
            return  # the studio went away mid-answer
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            conn.send(("failed", _error_text(e)))
        # a "halt" that arrives after its answer ended has nothing to stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.serving.worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--extra-bufts", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA GGUF to load at start")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the studio's terminal is the studio's to handle
    conn = Connection(args.fd)
    t0 = time.time()
    settings = _settings(args.extra_bufts)
    llama_cpp = llamacpp.llama_cpp_module()
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    try:
        llm = llamacpp.open_llama(args.model, settings, n_ctx=args.n_ctx, last_n_tokens_size=PENALTY_WINDOW,
                                  n_threads=args.threads or devicemod.cpu_threads(),
                                  n_gpu_layers=-1 if offload else 0)
        loras = Loras(llm)
        for spec in args.lora:  # the adapters a restarted worker had
            name, _, path = spec.partition("=")
            loras.load(name, path)
    except (ValueError, RuntimeError, OSError) as e:
        conn.send(("error", str(e).splitlines()[0][:300] if str(e) else type(e).__name__))
        return 1
    conn.send(("ready", {
        "pid": os.getpid(), "n_ctx": int(llm.n_ctx()), "n_tokens_max": len(llm.input_ids),
        "n_params": int(llama_cpp.llama_model_n_params(llm.model)), "offload": offload,
        "settings": settings.as_dict(), "load_seconds": round(time.time() - t0, 3)}))
    serve(conn, llm, loras)
    for name in list(loras.loaded):
        loras.free(name)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
