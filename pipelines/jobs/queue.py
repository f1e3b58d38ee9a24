"""JobQueue: the jobs of one kind in one folder, one running at a time (exports, ingests, pushes; training runs have
runs.py's queue)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .. import procs
from ..errors import BadInput, Conflict, NotFound
from ..workspace import write_json
from .folder import JobDir, file_lock, start, wait
from .status import JobStatus

# ------------------------------------------------------------------------------------------------ JobQueue


class JobQueue:
    """The jobs of one kind in one folder (exports/.jobs, rag/.jobs, exports/.pushes): ids from a time stamp and a
    label, at most one running at a time (each uses every core), cancel."""

    def __init__(self, folder: Path, kind: str, what: str):
        self.folder, self.kind, self.what = Path(folder), kind, what  # what: "export", "ingest" (for messages)

    def job(self, job_id: str) -> JobDir:
        if not job_id or "/" in job_id or "\\" in job_id or job_id.startswith("."):
            raise BadInput(f"'{job_id}' is not an {self.what} job id.")
        return JobDir(self.folder / job_id)

    def status(self, job_id: str) -> JobStatus:
        st = self.job(job_id).status()
        if st is None:
            raise NotFound(f"There is no {self.what} job '{job_id}'.")
        return st

    def list(self) -> list[JobStatus]:
        """Every job, newest first."""
        if not self.folder.is_dir():
            return []
        out = [st for d in self.folder.iterdir() if d.is_dir() and (st := JobDir(d).status()) is not None]
        out.sort(key=lambda s: (s.started or 0, s.name), reverse=True)
        return out

    def active(self) -> JobStatus | None:
        return next((j for j in self.list() if j.active), None)

    def start(self, label: str, spec: dict, id_label: str | None = None, env: dict | None = None, **fields) -> str:
        """Write the job's folder (job.json = `spec` with this queue's kind) and start its process; Conflict while
        another job of the queue runs. `label` (what the job works on) is shown; the id is a time stamp and
        `id_label` (default: the label). `env`: variables added to the process's environment only (a secret such as
        a Hub token, which must not be written into the job folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with file_lock(self.folder / ".lock"):
            running = self.active()
            if running:
                raise Conflict(f"An {self.what} job is running ({running.label}, "
                               f"{int(100 * (running.fraction or 0))}%): wait for it or cancel it.")
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{id_label or label}"[:120]
            while (self.folder / job_id).exists():
                job_id += "-2"
            j = JobDir(self.folder / job_id)
            j.path.mkdir(parents=True)
            write_json(j.spec_path, {**spec, "kind": self.kind})
            os.chmod(j.spec_path, 0o600)  # it may hold a document's password until the job has read it
            j.update(kind=self.kind, label=label, fraction=0.0, message="starting…", reason=None, result=None,
                     created=time.time(), **fields)
            start(j, env={**procs.child_env(), **env} if env else None)
        return job_id

    def cancel(self, job_id: str) -> JobStatus:
        """End a running job: it is marked stopping, then its process group gets SIGTERM (the job records itself
        as cancelled; a process that dies of it is recorded so too), SIGKILL if it is still there after 10 s."""
        j = self.job(job_id)
        if not self.status(job_id).active:
            return self.status(job_id)
        j.request_end()
        j.signal(signal.SIGTERM)
        for _ in range(100):  # the job writes its end within a moment
            st = self.status(job_id)
            if not st.active:
                return st
            time.sleep(0.1)
        j.signal(signal.SIGKILL)
        return wait(j, timeout=10.0, poll=0.1)


