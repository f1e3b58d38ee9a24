"""Export jobs: the Export stage's long work (a whole export, or one step) in its own process, so it outlives the
browser tab and a page refresh re-attaches to it.

A job is a folder <workspace>/exports/.jobs/<id>/:

    status.json   {"state": running|complete|failed|cancelled, "step", "args", "fraction", "message", "pid",
                   "create_time", "started", "ended", "error", "result"}
    log.txt       the process's output

The process is the CLI, `mactuner export <step> ... --root WS --job <folder>` (argument list, no shell), which
reports progress into status.json through a `Reporter`. One job runs at a time per workspace (a second is refused
while one is alive: each loads a model and uses every core). `cancel` ends the job's process group; the export
writes every file under a temporary name, so a cancelled or killed job leaves nothing that looks finished.

    job = start(ws, "run", {"source": ..., "outtype": ["f16"], "quant": ["Q4_K_M"]})   # keys are the CLI's flags
    status(ws, job)  -> dict (a dead process is reported as failed)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from . import procs
from .errors import BadInput, Conflict, NotFound
from .workspace import Workspace, write_json

STEPS = ("run", "merge", "convert", "quantize", "validate")
FINAL = ("complete", "failed", "cancelled")


def jobs_dir(ws: Workspace) -> Path:
    return ws.exports / ".jobs"


def _cli_args(step: str, args: dict) -> list[str]:
    """The `mactuner export <step>` arguments for a job's args (the same flags a user types)."""
    if step not in STEPS:
        raise BadInput(f"Unknown export step {step!r}; one of {', '.join(STEPS)}.")
    positional = {"run": "source", "merge": "source", "convert": "hf_dir", "quantize": "gguf", "validate": "gguf"}[step]
    if not str(args.get(positional) or "").strip():
        raise BadInput(f"The {step} step needs {positional.replace('_', ' ')}.")
    out = [step, str(args[positional])]
    for key, value in args.items():
        if key == positional or value in (None, "", [], False):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


@contextlib.contextmanager
def _flock(path: Path):
    """An exclusive fcntl lock on `path` (between processes, and between threads: each open is its own lock)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(job_dir: Path) -> dict:
    try:
        return json.loads((job_dir / "status.json").read_text())
    except FileNotFoundError:
        raise NotFound(f"There is no export job '{job_dir.name}'.") from None
    except (OSError, json.JSONDecodeError) as e:
        return {"state": "failed", "error": f"status.json cannot be read ({e})"}


def _merge(job_dir: Path, fields: dict) -> dict:
    st = _read(job_dir) if (job_dir / "status.json").exists() else {}
    st.update(fields, updated=time.time())
    write_json(job_dir / "status.json", st)
    return st


def _update(job_dir: Path, **fields) -> dict:
    """Read-modify-write status.json under the job's lock (the studio and the job process both write it)."""
    with _flock(job_dir / ".status.lock"):
        return _merge(job_dir, fields)


def _job_dir(ws: Workspace, job: str) -> Path:
    if not job or "/" in job or "\\" in job or job.startswith("."):
        raise BadInput(f"'{job}' is not an export job id.")
    return jobs_dir(ws) / job


def status(ws: Workspace, job: str) -> dict:
    """The job's status; a job whose process is gone while it says running becomes failed (with the log's end)."""
    d = _job_dir(ws, job)
    st = _read(d)
    if st.get("state") == "running" and not procs.alive(st):
        with _flock(d / ".status.lock"):
            st = _read(d)  # it may have written its end just now, or its pid is being recorded
            if st.get("state") == "running" and not procs.alive(st):
                code = procs.exit_code(st.get("pid"))
                tail = log_tail(ws, job, 3, 600).strip().splitlines()
                st = _merge(d, {"state": "failed", "ended": time.time(), "error": "the export process ended "
                                "unexpectedly" + (f" (exit code {code})" if code else "")
                                + (": " + " | ".join(tail) if tail else "")})
    st["id"] = job
    return st


def list_jobs(ws: Workspace) -> list[dict]:
    """Every job, newest first."""
    if not jobs_dir(ws).is_dir():
        return []
    out = []
    for d in jobs_dir(ws).iterdir():
        if d.is_dir() and (d / "status.json").exists():
            out.append(status(ws, d.name))
    out.sort(key=lambda s: (s.get("started") or 0, s["id"]), reverse=True)
    return out


def active(ws: Workspace) -> dict | None:
    """The running job, if any."""
    return next((j for j in list_jobs(ws) if j.get("state") == "running"), None)


def start(ws: Workspace, step: str, args: dict) -> str:
    """Start `mactuner export <step>` for `args` in its own process; returns the job id. Conflict while another
    job runs."""
    cli = _cli_args(step, args)
    if step in ("quantize", "validate"):  # they write beside the GGUF: only inside the workspace
        gguf = Path(str(args["gguf"])).expanduser().resolve()
        if ws.root not in gguf.parents:
            raise BadInput(f"{gguf} is outside the workspace ({ws.root}); {step} writes beside the GGUF, so pick one "
                           "under exports/ or models/.")
    jobs_dir(ws).mkdir(parents=True, exist_ok=True)
    with _flock(jobs_dir(ws) / ".lock"):
        running = active(ws)
        if running:
            raise Conflict(f"An export job is running ({running.get('step')} {running.get('label', '')}, "
                           f"{int(100 * (running.get('fraction') or 0))}%): wait for it or cancel it.")
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(args.get("name") or cli[1])).name).strip("-.") or step
        job = f"{time.strftime('%Y%m%d-%H%M%S')}-{step}-{label}"[:120]
        while (jobs_dir(ws) / job).exists():
            job += "-2"
        d = jobs_dir(ws) / job
        d.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pipelines.cli", "export", *cli, "--root", str(ws.root), "--job", str(d)]
        # the job's lock is held until its pid is recorded: its first progress write waits for that
        with _flock(d / ".status.lock"), open(d / "log.txt", "ab") as log:
            _merge(d, {"state": "running", "step": step, "args": args, "label": label, "fraction": 0.0,
                       "message": "starting…", "started": time.time(), "ended": None, "error": None, "result": None})
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                pid, create_time = procs.spawn(cmd, log)
            except OSError as e:
                _merge(d, {"state": "failed", "error": f"the export process could not be started ({e})",
                           "ended": time.time()})
                return job
            _merge(d, {"pid": pid, "create_time": create_time})
    return job


def cancel(ws: Workspace, job: str) -> dict:
    """End a running job's process group (SIGTERM: the job records itself as cancelled)."""
    st = status(ws, job)
    if st.get("state") != "running":
        return st
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(st["pid"]), signal.SIGTERM)
    for _ in range(100):  # the job writes its end within a moment
        st = status(ws, job)
        if st.get("state") != "running":
            return st
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(st["pid"]), signal.SIGKILL)
    return status(ws, job)


def wait(ws: Workspace, job: str, timeout: float = 3600.0, poll: float = 0.5):
    """Yield the job's status every `poll` seconds until it ends (the last one yielded is final)."""
    deadline = time.time() + timeout
    while True:
        st = status(ws, job)
        yield st
        if st.get("state") in FINAL or time.time() > deadline:
            return
        time.sleep(poll)


def log_tail(ws: Workspace, job: str, lines: int | None = None, max_bytes: int = 8000) -> str:
    return procs.log_tail(_job_dir(ws, job) / "log.txt", lines, max_bytes)


# ------------------------------------------------------------------------------------------------ inside the job


class Reporter:
    """The job process's side: `progress(fraction, message)` into status.json (at most every 0.3 s, always when the
    message changes), then `done(result)` or `failed(error)`. SIGTERM becomes KeyboardInterrupt (→ cancelled)."""

    def __init__(self, job_dir: str | os.PathLike):
        self.dir = Path(job_dir)
        self._last = (0.0, None)
        signal.signal(signal.SIGTERM, self._term)

    @staticmethod
    def _term(_sig, _frame):
        raise KeyboardInterrupt("cancelled")

    def progress(self, fraction: float, message: str) -> None:
        now = time.time()
        if message != self._last[1] or now - self._last[0] > 0.3:
            self._last = (now, message)
            _update(self.dir, fraction=round(max(0.0, min(1.0, float(fraction))), 4), message=message)

    def done(self, result) -> None:
        _update(self.dir, state="complete", fraction=1.0, message="done", result=result, ended=time.time())

    def failed(self, error: str, cancelled: bool = False) -> None:
        _update(self.dir, state="cancelled" if cancelled else "failed", error=error, ended=time.time())
