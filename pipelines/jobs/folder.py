"""A job's folder (pipelines.jobs): JobDir reads and writes its status under a file lock, knows how an end nobody
recorded reads, records one its supervisor or starter saw; `start` runs the job's supervisor, `wait` waits for the
end."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .. import procs
from ..workspace import write_json
from .status import JobStatus

WHAT = {"train": "training", "export": "export", "ingest": "ingest", "push": "upload"}  # "the ... process"
ASKED_CODES = (0, -signal.SIGTERM, -signal.SIGKILL)  # how a process asked to end ends
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


# ------------------------------------------------------------------------------------------------ JobDir


@dataclass(frozen=True)
class JobDir:
    """A job's folder (see the module docstring)."""

    path: Path
    status_class: ClassVar[type[JobStatus]] = JobStatus

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
        except FileNotFoundError:  # a run folder of an earlier version: config.yaml alone
            return {"kind": "train"} if (self.path / "config.yaml").is_file() else {}

    def read(self) -> JobStatus | None:
        """status.json as it is (None when there is none); an unreadable one is a failed job."""
        try:
            data = json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            return self.status_class(state="failed", reason=f"status.json cannot be read ({e})", name=self.name)
        st = self.status_class.from_dict(data if isinstance(data, dict) else {})
        st.name = self.name
        st.kind = st.kind or self.spec().get("kind", "")  # a status.json of an earlier version does not say
        return st

    def status(self) -> JobStatus | None:
        """The status as a reader should see it: a job whose processes are gone while it says running or stopping
        (nobody recorded its end) reads as interrupted - or as the end asked for, when it was stopping. Never
        writes."""
        st = self.read()
        if st is not None and st.active and not st.alive():
            self.unrecorded_end(st, None)
        return st

    def lock(self):
        """The job's status lock, between processes and between threads."""
        self.path.mkdir(parents=True, exist_ok=True)
        return file_lock(self.path / ".status.lock")

    def write(self, st: JobStatus) -> JobStatus:
        """Write the whole status (the caller holds the lock)."""
        st.updated = time.time()
        write_json(self.status_path, st.to_dict(stored=True))
        return st

    def update(self, **fields) -> JobStatus:
        """Merge `fields` into status.json under the lock."""
        with self.lock():
            st = self.read() or self.status_class(kind=self.spec().get("kind", ""))
            return self.write(st.set(**fields))

    def unrecorded_end(self, st: JobStatus, code: int | None) -> None:
        """Set `st`'s end for a process that ended (`code`; None: nobody saw it) without recording it."""
        if st.state == "stopping" and (code is None or code in ASKED_CODES):
            self.asked_end(st)
        elif code is None:
            st.state = "interrupted"
            st.reason = (f"interrupted: the {WHAT.get(st.kind, 'job')} process stopped without finishing (the "
                         "machine, the Space or the studio that started it stopped)")
        else:
            st.state, st.exit_code = "failed", code
            st.reason = f"the {WHAT.get(st.kind, 'job')} process ended unexpectedly" + (
                f" (exit code {code})" if code else " without saying how it ended")
        st.reason = (st.reason or "") + self.end_note(st)

    def asked_end(self, st: JobStatus) -> None:
        """The end of a job asked to stop (a run overrides: stopped, resumable)."""
        st.state, st.reason = "cancelled", "cancelled"

    def end_note(self, st: JobStatus) -> str:
        """What to add to an unrecorded end's reason: the log's last lines (a run: its checkpoint)."""
        if st.state in ("cancelled", "stopped"):
            return ""
        tail = self.log_tail(3, 600).strip().splitlines()
        return (": " + " | ".join(tail)) if tail else ""

    def record_exit(self, pid: int, code: int) -> None:
        """The supervisor's part (or the starter's): its worker (its supervisor) `pid` ended with `code`; when it did
        not record its own end (killed, crashed), record it - unless the job has moved on to other processes since
        (a resumed run)."""
        with self.lock():
            st = self.read()
            if st is None or not st.active or pid not in (st.pid, st.supervisor_pid):
                return
            self.unrecorded_end(st, code)
            st.exit_code, st.ended = code, time.time()
            self.write(st)

    def request_end(self) -> JobStatus | None:
        """Mark an active job "stopping" (before any signal, so an end that follows reads as asked for)."""
        with self.lock():
            st = self.read()
            if st is None or not st.active:
                return st
            st.state = "stopping"
            return self.write(st)

    def log_tail(self, lines: int | None = None, max_bytes: int = 20_000) -> str:
        return procs.log_tail(self.log_path, lines, max_bytes)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the job's process group (its supervisor's; its children too: torchrun's workers, the
        converter), or to its process when it has no supervisor."""
        st = self.read()
        group = st and (st.supervisor_pid or st.pid)
        if isinstance(group, int) and group > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)


def command(job: JobDir) -> list[str]:
    """The argument list of the job's supervisor (the one entry point)."""
    return [sys.executable, "-m", "pipelines.jobs", str(job.path)]


def start(job: JobDir, cmd: list[str] | None = None, env: dict | None = None, **fields) -> JobStatus:
    """Start the job's supervisor (`cmd`, default `command(job)`) with its output into log.txt; status.json gets
    state "running" (unless `fields` say otherwise) and the process. The status lock is held from before the start
    until they are written, so the job's own first write can never be overwritten. A process that cannot start
    makes the job failed; one that ends without a recorded end is recorded when it ends (`record_exit`)."""
    cmd = cmd or command(job)
    with job.lock(), open(job.log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        st = job.read() or job.status_class(kind=job.spec().get("kind", ""))
        try:
            pid, create_time = procs.spawn(cmd, log, env, on_exit=job.record_exit)
        except OSError as e:
            return job.write(st.set(state="failed", reason=f"the job could not be started ({e})", ended=time.time()))
        st.set(**{"state": "running", "started": time.time(), "ended": None, "exit_code": None, **fields})
        st.set(pid=pid, create_time=create_time, supervisor_pid=pid, supervisor_create_time=create_time)
        return job.write(st)


def wait(job: JobDir, timeout: float = 600.0, poll: float = 0.2) -> JobStatus:
    """Poll until the job is in a final state (or the timeout); returns its status."""
    deadline = time.time() + timeout
    while True:
        st = job.status()
        if st is None or st.final or time.time() > deadline:
            return st
        time.sleep(poll)


