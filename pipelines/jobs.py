"""Jobs: long work (a training run, an export, a knowledge-base ingest) in a child process of its own, recorded in a
folder that is the record of truth - a refreshed page, a second tab or the CLI re-attach by reading it.

A job folder holds:

    job.json      what to do: {"kind": "train" | "export" | "ingest" | "push", ...} (a run folder's config.yaml
                  says "train")
    status.json   {"state", "pid", "create_time", "started", "ended", ...}: read-modify-written under a file lock
                  (.status.lock) by the studio and the job process alike; each kind adds its own fields
    log.txt       the job process's stdout and stderr

One entry point runs every kind: `python -m pipelines.jobs <folder>` (also under torchrun for DDP training). The
studio starts it with `start()`; `JobDir.fail_if_dead` notices a job whose process is gone (kill -9, a crash) and
records it as failed with its exit code, so nothing looks running that is not.

    job = JobDir(folder)
    job.update(state="running", step=3)         # under the lock, atomically written
    job.alive()  job.status()  job.log_tail(20)
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import procs
from .errors import BadInput, Conflict, MacTunerError, NotFound
from .workspace import write_json

# kind -> "module:function" called as function(JobDir) in the job process; imported only there
RUNNERS = {"train": "pipelines.runs:run_job", "export": "pipelines.export.job:run_job",
           "ingest": "pipelines.rag.ingestion:run_job", "push": "pipelines.export.push:run_job"}
_THREAD_LOCK = threading.RLock()  # fcntl locks are per open file: threads of one process need this too


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created if missing): fcntl between processes, a lock between threads."""
    with _THREAD_LOCK, open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def slug(text: str, default: str = "job", max_len: int = 40) -> str:
    """A file-name-safe form of `text` (letters, digits, . _ -)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return s[:max_len] or default


@dataclass(frozen=True)
class JobDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def spec_path(self) -> Path:
        return self.path / "job.json"

    def spec(self) -> dict:
        try:
            return json.loads(self.spec_path.read_text())
        except FileNotFoundError:
            return {"kind": "train"} if (self.path / "config.yaml").is_file() else {}

    def read(self) -> dict | None:
        """status.json as it is (None when there is none); an unreadable one is a failed job."""
        try:
            return json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            return {"state": "failed", "reason": f"status.json cannot be read ({e})",
                    "error": f"status.json cannot be read ({e})"}

    def lock(self):
        """The job's status lock, between processes and between threads."""
        self.path.mkdir(parents=True, exist_ok=True)
        return file_lock(self.path / ".status.lock")

    def write(self, st: dict) -> dict:
        """Write the whole status (the caller holds the lock)."""
        st["updated"] = time.time()
        write_json(self.status_path, st)
        return st

    def update(self, **fields) -> dict:
        """Merge `fields` into status.json under the lock."""
        with self.lock():
            st = self.read() or {}
            st.update(fields)
            return self.write(st)

    def alive(self, st: dict | None = None) -> bool:
        return procs.alive(st if st is not None else (self.read() or {}))

    def fail_if_dead(self, active: tuple[str, ...], failed: Callable[[int | None], dict]) -> bool:
        """A job whose status is in `active` but whose process is gone gets `failed(exit code)`'s fields (its state
        among them). True when that happened."""
        st = self.read() or {}
        if st.get("state") not in active or procs.alive(st):
            return False
        with self.lock():
            st = self.read() or {}  # it may have written its end just now
            if st.get("state") not in active or procs.alive(st):
                return False
            st.update(failed(procs.exit_code(st.get("pid"))), ended=time.time())
            self.write(st)
        return True

    def log_tail(self, lines: int | None = None, max_bytes: int = 20_000) -> str:
        return procs.log_tail(self.log_path, lines, max_bytes)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the job's process group (its children too: torchrun's workers, the converter)."""
        pid = (self.read() or {}).get("pid")
        if isinstance(pid, int) and pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)


def command(job: JobDir) -> list[str]:
    """The argument list that runs `job` (the one entry point)."""
    return [sys.executable, "-m", "pipelines.jobs", str(job.path)]


def start(job: JobDir, cmd: list[str] | None = None, env: dict | None = None, **fields) -> dict:
    """Start the job's process (`cmd`, default `command(job)`) with its output into log.txt; status.json gets
    state "running" (unless `fields` say otherwise), pid and create_time. The status lock is held from before the
    start until they are written, so the job's own first write can never be overwritten. A process that cannot
    start makes the job failed."""
    cmd = cmd or command(job)
    with job.lock(), open(job.log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        st = job.read() or {}
        try:
            pid, create_time = procs.spawn(cmd, log, env)
        except OSError as e:
            st.update(state="failed", reason=f"the job could not be started ({e})",
                      error=f"the job could not be started ({e})", ended=time.time())
            return job.write(st)
        st.update({"state": "running", "started": time.time(), "ended": None, **fields, "pid": pid,
                   "create_time": create_time})
        return job.write(st)


def wait(job: JobDir, refresh: Callable[[], dict], done: Callable[[dict], bool], timeout: float = 600.0,
         poll: float = 0.2) -> Iterator[dict]:
    """Yield `refresh()` every `poll` seconds until `done(status)` or the timeout; the last one yielded is final."""
    deadline = time.time() + timeout
    while True:
        st = refresh()
        yield st
        if done(st) or time.time() > deadline:
            return
        time.sleep(poll)


class JobQueue:
    """The jobs of one kind in one folder (exports/.jobs, rag/.jobs): ids from a time stamp and a label, status with
    dead processes noticed, at most one running at a time (each uses every core), cancel, wait, log tail."""

    FINAL = ("complete", "failed", "cancelled")

    def __init__(self, folder: Path, kind: str, what: str):
        self.folder, self.kind, self.what = Path(folder), kind, what  # what: "export", "ingest" (for messages)

    def job(self, job_id: str) -> JobDir:
        if not job_id or "/" in job_id or "\\" in job_id or job_id.startswith("."):
            raise BadInput(f"'{job_id}' is not an {self.what} job id.")
        return JobDir(self.folder / job_id)

    def status(self, job_id: str) -> dict:
        """The job's status; one whose process is gone while it says running becomes failed (with its log's end)."""
        j = self.job(job_id)
        if j.read() is None:
            raise NotFound(f"There is no {self.what} job '{job_id}'.")

        def failed(code: int | None) -> dict:
            tail = j.log_tail(3, 600).strip().splitlines()
            return {"state": "failed", "error": f"the {self.what} process ended unexpectedly"
                    + (f" (exit code {code})" if code else "") + (": " + " | ".join(tail) if tail else "")}

        j.fail_if_dead(("running",), failed)
        st = j.read() or {}
        st["id"] = job_id
        return st

    def list(self) -> list[dict]:
        """Every job, newest first."""
        if not self.folder.is_dir():
            return []
        out = [self.status(d.name) for d in self.folder.iterdir() if d.is_dir() and (d / "status.json").exists()]
        out.sort(key=lambda s: (s.get("started") or 0, s["id"]), reverse=True)
        return out

    def active(self) -> dict | None:
        return next((j for j in self.list() if j.get("state") == "running"), None)

    def start(self, label: str, spec: dict, id_label: str | None = None, env: dict | None = None, **fields) -> str:
        """Write the job's folder (job.json = `spec` with this queue's kind) and start its process; Conflict while
        another job of the queue runs. `label` (what the job works on) is shown; the id is a time stamp and
        `id_label` (default: the label). `env`: variables added to the process's environment only (a secret such as
        a Hub token, which must not be written into the job folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with file_lock(self.folder / ".lock"):
            running = self.active()
            if running:
                raise Conflict(f"An {self.what} job is running ({running.get('label', '')}, "
                               f"{int(100 * (running.get('fraction') or 0))}%): wait for it or cancel it.")
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{id_label or label}"[:120]
            while (self.folder / job_id).exists():
                job_id += "-2"
            j = JobDir(self.folder / job_id)
            j.path.mkdir(parents=True)
            write_json(j.spec_path, {**spec, "kind": self.kind})
            os.chmod(j.spec_path, 0o600)  # it may hold a document's password until the job has read it
            j.update(label=label, fraction=0.0, message="starting…", error=None, result=None, **fields)
            start(j, env={**procs.child_env(), **env} if env else None)
        return job_id

    def cancel(self, job_id: str) -> dict:
        """End a running job's process group (SIGTERM: the job records itself as cancelled)."""
        st = self.status(job_id)
        if st.get("state") != "running":
            return st
        j = self.job(job_id)
        j.signal(signal.SIGTERM)
        for _ in range(100):  # the job writes its end within a moment
            st = self.status(job_id)
            if st.get("state") != "running":
                return st
            time.sleep(0.1)
        j.signal(signal.SIGKILL)
        return self.status(job_id)

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 0.5) -> Iterator[dict]:
        return wait(self.job(job_id), lambda: self.status(job_id), lambda st: st.get("state") in self.FINAL,
                    timeout, poll)

    def log_tail(self, job_id: str, lines: int | None = None, max_bytes: int = 8000) -> str:
        return self.job(job_id).log_tail(lines, max_bytes)


class Reporter:
    """A job process's side: `progress(fraction, message, **fields)` into status.json (at most every 0.3 s, always
    when the message changes), then `done(result)` or `failed(error)`. SIGTERM becomes KeyboardInterrupt, which
    `run_reported` records as cancelled."""

    def __init__(self, job: JobDir):
        self.job = job
        self._last = (0.0, None)
        signal.signal(signal.SIGTERM, self._term)

    @staticmethod
    def _term(_sig, _frame):
        raise KeyboardInterrupt("cancelled")

    def progress(self, fraction: float, message: str, **fields) -> None:
        now = time.time()
        if message != self._last[1] or now - self._last[0] > 0.3:
            self._last = (now, message)
            self.job.update(fraction=round(max(0.0, min(1.0, float(fraction))), 4), message=message, **fields)

    def done(self, result) -> None:
        self.job.update(state="complete", fraction=1.0, message="done", result=result, ended=time.time())

    def failed(self, error: str, cancelled: bool = False) -> None:
        self.job.update(state="cancelled" if cancelled else "failed", error=error, ended=time.time())


def run_reported(job: JobDir, work: Callable[[Reporter], object]) -> int:
    """Run `work(reporter)` in a job process: its result completes the job; a cancel, a MacTunerError (its message)
    or a bug (the traceback into the log) ends it with that state."""
    import traceback  # noqa: PLC0415

    rep = Reporter(job)
    try:
        rep.done(work(rep))
    except KeyboardInterrupt:
        rep.failed("cancelled", cancelled=True)
        return 130
    except MacTunerError as e:
        print(f"failed: {e.message}", flush=True)
        rep.failed(e.message)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: the traceback goes to the job's log, the status says so
        traceback.print_exc()
        rep.failed(f"unexpected error ({type(e).__name__}: {e}); the job's log has the details")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.jobs <folder>`: run the job the folder describes."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.jobs JOB_FOLDER", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    kind = job.spec().get("kind")
    if kind not in RUNNERS:
        raise BadInput(f"{job.path} is not a job folder (no job.json with a known kind, no config.yaml).")
    module, func = RUNNERS[kind].split(":")
    return int(getattr(importlib.import_module(module), func)(job) or 0)


if __name__ == "__main__":
    sys.exit(main())
