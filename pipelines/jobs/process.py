"""The job's processes (pipelines.jobs): the supervisor that starts the worker and records how it ended, the worker
that runs the kind's module, and `run_reported` / Reporter, the worker's side of an export, ingest or push.

    python -m pipelines.jobs FOLDER          the supervisor (what `start` runs)
    python -m pipelines.jobs --work FOLDER   the worker (what the supervisor runs; torchrun's ranks for DDP runs)
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from .. import procs
from ..errors import BadInput, MacTunerError
from .folder import JobDir

# kind -> the module that runs it: run_job(JobDir) in the worker; optionally FOLDER (its JobDir class),
# worker_command(JobDir) -> argv and job_ended(JobDir) in the supervisor. Imported only in the job's processes.
RUNNERS = {"train": "pipelines.runs", "export": "pipelines.export.job", "ingest": "pipelines.rag.ingestion",
           "push": "pipelines.export.push"}


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
        self.job.update(state="finished", fraction=1.0, message="done", result=result, ended=time.time())

    def failed(self, reason: str, cancelled: bool = False) -> None:
        self.job.update(state="cancelled" if cancelled else "failed", reason=reason, ended=time.time())


def run_reported(job: JobDir, work: Callable[[Reporter], object]) -> int:
    """Run `work(reporter)` in a job process: its result finishes the job; a cancel, a MacTunerError (its message)
    or a bug (the traceback into the log) ends it with that state."""
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


def _runner(job: JobDir):
    """The module that runs the job's kind (RUNNERS)."""
    kind = job.spec().get("kind")
    if kind not in RUNNERS:
        raise BadInput(f"{job.path} is not a job folder (no job.json with a known kind, no config.yaml).")
    return importlib.import_module(RUNNERS[kind])


def supervise(job: JobDir, runner) -> int:
    """The job's supervisor (`python -m pipelines.jobs <folder>`): start the worker in this process group, record
    it in status.json, wait for it, record its end if it could not, then hand the end to the kind's module
    `runner`."""
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)  # a cancel signals the group: the worker ends, we stay
    cmd = runner.worker_command(job) if hasattr(runner, "worker_command") else \
        [sys.executable, "-m", "pipelines.jobs", "--work", str(job.path)]
    ended, code = threading.Event(), [0]

    def on_exit(pid: int, c: int) -> None:
        code[0] = c
        job.record_exit(pid, c)
        ended.set()

    with open(job.log_path, "ab") as log, job.lock():  # a cancel waits for this, so it signals the worker too
        st = job.read() or job.status_class(kind=job.spec().get("kind", ""))
        if st.state == "stopping":  # asked to end before its worker started: it never starts
            job.asked_end(st)
            job.write(st.set(ended=time.time()))
            ended.set()
        else:
            pid, create_time = procs.spawn(cmd, log, procs.child_env(), on_exit=on_exit, new_session=False)
            job.write(st.set(pid=pid, create_time=create_time))
    ended.wait()
    if hasattr(runner, "job_ended"):
        runner.job_ended(job)
    return code[0] if code[0] >= 0 else 128 - code[0]  # killed by signal N: 128 + N, as a shell says it


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.jobs <folder>`: supervise the job the folder describes; `--work <folder>`: do it."""
    args = sys.argv[1:] if argv is None else argv
    work = bool(args) and args[0] == "--work"
    args = args[1:] if work else args
    if len(args) != 1:
        print("usage: python -m pipelines.jobs [--work] JOB_FOLDER", file=sys.stderr)
        return 2
    path = Path(args[0]).resolve()
    runner = _runner(JobDir(path))
    job = getattr(runner, "FOLDER", JobDir)(path)  # a run's folder is a runs.RunDir
    if not work and not os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun by hand, its agent supervises
        return supervise(job, runner)
    return int(runner.run_job(job) or 0)
