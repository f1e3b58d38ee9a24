"""The studio's side of a GGUF worker: `GGUFWorker` starts `python -m pipelines.serving.worker` for one model, streams
answers from it, and survives it - a worker that dies is reported as `ModelCrashed` (with its signal) to the answer
it was giving and started again at once, so the next request is answered.

The studio keeps only the model's vocabulary (llama.cpp's vocab_only load: no weights, no compute kernels), to
tokenize prompts, read the metadata and render templates without a round trip; the weights live in the worker
alone, and `close()` frees them with the process.

    w = GGUFWorker(path, n_ctx=4096)              # blocks until loaded; BadInput when llama.cpp refuses the file
    for kind, a, b in w.generate(ids, max_tokens=64, ..., halted=ev.is_set):   # ("text", delta, n) / ("end", reason, n)
        ...
    w.load_lora("my-run", "my-run-lora.gguf")     # a LoRA GGUF beside the base (kept across restarts)
    w.generate(ids, ..., adapter="my-run")        # answered with it; adapter=None: the bare base
    w.close()
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterator

from .. import procs
from ..errors import BadInput, Unavailable
from . import llamacpp

NATIVE_CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
LOAD_TIMEOUT = 300.0  # seconds a worker may take to load its model
MAX_RESTARTS = 3  # within RESTART_WINDOW seconds; then the worker is given up
RESTART_WINDOW = 300.0


class ModelCrashed(Unavailable):
    """The model's worker process ended while answering (or will not stay up)."""

    proc = None  # the process that ended


def exit_description(code: int | None) -> str:
    """'signal 11 (SIGSEGV)', 'exit code 3', ..."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class GGUFWorker:
    """One GGUF model served by a worker process; restarted when it dies unexpectedly."""

    def __init__(self, path: str | Path, n_ctx: int = 4096, threads: int = 0,
                 settings: llamacpp.LlamaSettings | None = None, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.n_ctx, self.threads = n_ctx, threads
        self.settings = settings or llamacpp.choose()
        self.info: dict = {}
        self.loras: dict[str, str] = {}  # name -> LoRA GGUF path, loaded again by a restarted worker
        self.crashes: list[dict] = []  # {"time", "how"} of each unexpected end
        self.state = "starting"  # starting | ready | restarting | failed | closed
        self._ready = threading.Event()
        self._io = threading.Lock()  # one request on the connection at a time
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        proc, conn = self._spawn()  # the worker loads the weights while this process reads the vocabulary
        llama_cpp = llamacpp.llama_cpp_module()
        try:  # the vocabulary only, in this process (see the module docstring)
            self.vocab = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, n_ctx=16, n_batch=16,
                                         verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            proc.kill()
            proc.wait(10)
            conn.close()
            raise BadInput(f"llama.cpp could not load {self.path.name}: {str(e).splitlines()[0][:200]}") from None
        try:
            self._await_ready(proc, conn)
        except BaseException:
            self.vocab.close()
            raise

    # ------------------------------------------------------------------------------------------ the process

    def _start(self) -> None:
        """Start a worker and wait until its model is loaded. BadInput when llama.cpp refuses the file."""
        self._await_ready(*self._spawn())

    def _spawn(self) -> tuple[subprocess.Popen, Connection]:
        mine, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "pipelines.serving.worker", "--fd", str(theirs.fileno()), "--model",
               str(self.path), "--n-ctx", str(self.n_ctx), "--threads", str(self.threads),
               "--extra-bufts", "on" if self.settings.extra_bufts else "off"]
        cmd += [arg for name, path in self.loras.items() for arg in ("--lora", f"{name}={path}")]
        try:
            proc = subprocess.Popen(cmd, cwd=procs.PROJECT_ROOT, env=procs.child_env(), stdin=subprocess.DEVNULL,
                                    pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
        return proc, Connection(mine.detach())

    def _await_ready(self, proc: subprocess.Popen, conn: Connection) -> None:
        deadline = time.time() + LOAD_TIMEOUT
        msg = None
        while time.time() < deadline:
            if conn.poll(0.05):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = None
                break
            if proc.poll() is not None:
                break
        if msg is None or msg[0] != "ready":
            if proc.poll() is None:
                proc.kill()
            code = proc.wait(10)
            conn.close()
            if msg is not None and msg[0] == "error":
                raise BadInput(f"llama.cpp could not load {self.path.name}: {msg[1]}")
            why = "it took too long" if code == -signal.SIGKILL else f"its process ended ({exit_description(code)})"
            raise BadInput(f"llama.cpp could not load {self.path.name}: {why}.")
        self._proc, self._conn, self.info = proc, conn, msg[1]
        self.state = "ready"
        self._ready.set()
        threading.Thread(target=self._watch, args=(proc,), name=f"watch-{self.name}", daemon=True).start()

    def _watch(self, proc: subprocess.Popen) -> None:
        """Wait for this worker process to end; an end nobody asked for is recorded and the worker restarted."""
        code = proc.wait()
        if self.state == "closed" or proc is not self._proc:
            return
        self._ready.clear()
        how = exit_description(code)
        self.crashes.append({"time": time.time(), "how": how})
        recent = [c for c in self.crashes if c["time"] > time.time() - RESTART_WINDOW]
        if len(recent) > MAX_RESTARTS:
            self.state = "failed"
            self._ready.set()
            return
        if code is not None and -code in NATIVE_CRASHES and self.settings.extra_bufts:
            self.settings = llamacpp.SAFE  # the likeliest cause on x86 (see llamacpp); slower, but it stays up
        self.state = "restarting"
        with self._io:
            if self._conn is not None:
                self._conn.close()
            try:
                self._start()
            except Exception as e:  # noqa: BLE001 - recorded for the next request to report
                self.crashes[-1]["restart_error"] = str(e)
                self.state = "failed"
                self._ready.set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> dict:
        """For the UI and /api: state, pid, settings, restarts, the last crash."""
        return {"state": self.state, "pid": self.pid, "extra_bufts": self.settings.extra_bufts,
                "settings_reason": self.settings.reason, "restarts": len(self.crashes),
                "last_crash": self.crashes[-1] if self.crashes else None}

    def crash_message(self, code: int | None) -> str:
        again = ("it is being reloaded" + (" with llama.cpp's extra buffer types off" if not self.settings.extra_bufts
                                           and code is not None and -code in NATIVE_CRASHES else "")
                 + "; send your message again")
        return f"The model process crashed: {exit_description(code)} — {again}."

    def wait_ready(self, timeout: float = LOAD_TIMEOUT) -> None:
        if self.state == "closed":
            raise Unavailable(f"{self.name} was unloaded.")
        if not self._ready.wait(timeout):
            raise Unavailable(f"{self.name} is still reloading after a crash; try again in a moment.")
        if self.state == "failed":
            last = self.crashes[-1] if self.crashes else {}
            raise ModelCrashed(f"The model process of {self.name} keeps crashing (last: {last.get('how', '?')}"
                               + (f"; restart failed: {last['restart_error']}" if last.get("restart_error") else "")
                               + "). Unload it and load it again, or try another model.")

    # ------------------------------------------------------------------------------------------ requests

    def generate(self, prompt: list[int], *, max_tokens: int, temperature: float, top_p: float, top_k: int,
                 min_p: float, repeat_penalty: float, seed: int, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, adapter: str | None = None,
                 halted: Callable[[], bool] = lambda: False) -> Iterator[tuple]:
        """Stream one answer: ("text", delta, n_tokens) items, then ("end", finish_reason, n_tokens).
        `halted()` is polled: once true the worker is told to stop (finish_reason "stopped"). Leaving the loop
        early also stops it. ModelCrashed when the worker dies after the answer began; a worker that died before
        it gave anything (killed while idle, or crashing on the first token) is waited for and asked once more,
        and a ("note", message, 0) item says so."""
        req = dict(prompt=list(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   min_p=min_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                   presence_penalty=presence_penalty, seed=seed, adapter=adapter)
        for attempt in (1, 2):
            self.wait_ready()
            got = []
            try:
                yield from self._attempt(req, halted, got)
                return
            except ModelCrashed as e:
                if got or attempt == 2:
                    raise
                self._await_restart(e.proc)
                yield ("note", e.message.replace("; send your message again", ", and answered after the reload"), 0)

    def _attempt(self, req: dict, halted: Callable[[], bool], got: list) -> Iterator[tuple]:
        with self._io:
            conn, proc = self._conn, self._proc
            ended = halt_sent = False
            try:
                conn.send(("generate", req))
                while True:
                    if not halt_sent and halted():
                        conn.send(("halt",))
                        halt_sent = True
                    if not conn.poll(0.05):
                        continue
                    msg = conn.recv()
                    got.append(msg[0])
                    if msg[0] == "failed":
                        ended = True
                        raise BadInput(f"llama.cpp failed while answering: {msg[1]}")
                    if msg[0] == "end":
                        ended = True
                    yield msg
                    if ended:
                        return
            except (EOFError, OSError):
                ended = True
                err = ModelCrashed(self.crash_message(self._exit_code(proc)))
                err.proc = proc
                raise err from None
            finally:
                if not ended:  # the consumer left early: stop the worker and read up to its end
                    self._drain(conn, proc, halt_sent)

    def _await_restart(self, old: subprocess.Popen, timeout: float = LOAD_TIMEOUT) -> None:
        """Wait until the watcher has replaced the process `old` (or given up)."""
        deadline = time.time() + timeout
        while self._proc is old and self.state not in ("failed", "closed") and time.time() < deadline:
            time.sleep(0.05)

    def _exit_code(self, proc: subprocess.Popen) -> int | None:
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            return None

    @staticmethod
    def _drain(conn: Connection, proc: subprocess.Popen, halt_sent: bool) -> None:
        try:
            if not halt_sent:
                conn.send(("halt",))
            while proc.poll() is None:
                if conn.poll(0.05) and conn.recv()[0] in ("end", "failed"):
                    return
        except (EOFError, OSError):
            return  # it died meanwhile: the watcher restarts it

    def load_lora(self, name: str, path: str | Path) -> None:
        """Load a LoRA GGUF on the worker's model under `name` (the base stays loaded). BadInput when llama.cpp
        cannot apply it to this model."""
        self._ask(("lora_load", name, str(path)), "lora_loaded", f"llama.cpp could not load the adapter {name}")
        self.loras[name] = str(path)

    def free_lora(self, name: str) -> None:
        self.loras.pop(name, None)
        self._ask(("lora_free", name), "lora_freed", f"llama.cpp could not free the adapter {name}")

    def _ask(self, msg: tuple, reply: str, failure: str, timeout: float = 120.0) -> None:
        """One request/reply exchange with the worker (between answers: the connection is taken)."""
        self.wait_ready()
        with self._io:
            conn, proc = self._conn, self._proc
            try:
                conn.send(msg)
                if not conn.poll(timeout):
                    raise Unavailable(f"{failure}: the model process did not answer in {timeout:.0f} s.")
                got = conn.recv()
            except (EOFError, OSError):
                raise ModelCrashed(self.crash_message(self._exit_code(proc))) from None
        if got[0] == "failed":
            raise BadInput(f"{failure}: {got[1]}")
        if got[0] != reply:
            raise Unavailable(f"{failure}: the model process answered {got[0]!r}.")

    # ------------------------------------------------------------------------------- vocabulary, in this process

    @property
    def metadata(self) -> dict:
        return self.vocab.metadata

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.vocab.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: list[int], special: bool = False) -> bytes:
        return self.vocab.detokenize(ids, special=special)

    def token_bos(self) -> int:
        return self.vocab.token_bos()

    def token_eos(self) -> int:
        return self.vocab.token_eos()

    def n_vocab(self) -> int:
        return self.vocab.n_vocab()

    def context_window(self) -> int:
        """Tokens that fit: llama.cpp may round n_ctx up (128 -> 256) while llama-cpp-python's token buffer keeps
        the size asked for; the smaller of the two is what fits."""
        return min(int(self.info["n_ctx"]), int(self.info["n_tokens_max"]))

    # ------------------------------------------------------------------------------------------ the end

    def close(self) -> None:
        """Stop the worker (its memory goes with it) and drop the vocabulary."""
        if self.state == "closed":
            return
        self.state = "closed"
        self._ready.set()
        proc, conn = self._proc, self._conn
        if conn is not None:
            try:
                conn.send(("close",))
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if conn is not None:
            conn.close()
        self.vocab.close()
