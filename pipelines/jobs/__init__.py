"""Jobs: long work (a training run, an export, a knowledge-base ingest, a Hub push) in processes of its own, recorded
in a folder that is the record of truth - a refreshed page, a second tab or the CLI re-attach by reading it.

A job folder holds:

    job.json      what to do: {"kind": "train" | "export" | "ingest" | "push", ...}
    status.json   a JobStatus (below): read-modify-written under a file lock (.status.lock) by the studio, the
                  job's supervisor and its worker alike
    log.txt       the job's stdout and stderr

One lifecycle, one vocabulary for every kind (a kind reaches the states that apply to it):

    queued -> running -> (stopping) -> finished | stopped | cancelled | failed | interrupted

    queued       waiting for its turn (training runs: one at a time per workspace, runs.py's queue)
    running      its process works
    stopping     an end was asked for (a run's Stop, a job's Cancel); it ends at its next safe point
    finished     it did everything it was asked
    stopped      it ended early because it was asked to, resumable (a run: from its last checkpoint)
    cancelled    it ended early because it was asked to, and kept nothing half-done
    failed       it ended on an error; `reason` says which (and `exit_code` when its process died)
    interrupted  its process is gone and nobody saw how it ended (the machine, the Space or the studio stopped)

Processes: `start()` runs `python -m pipelines.jobs <folder>`, the job's supervisor: a small process that starts the
worker (`python -m pipelines.jobs --work <folder>`, or the command the kind's module gives, e.g. torchrun), waits
for it, and records how it ended when the worker could not (kill -9, a crash: "failed (exit code N)"); then it lets
the kind's module act on the end (runs.py starts the next queued run there). Whoever starts a supervisor records
its end in turn, should it die. So every end is recorded by the process that saw it - not by whoever happens to
read the status: reading a status only reads (a process that is gone with its end unrecorded reads as
interrupted, or as the end that was asked for while it was stopping).

    status.py    the vocabulary and JobStatus (status.json as a dataclass; earlier versions' keys read too)
    folder.py    JobDir (read, update under the lock, the end of a process nobody saw end), start, wait
    queue.py     JobQueue: exports, ingests, pushes - one at a time per folder, cancel
    process.py   the supervisor and the worker (`python -m pipelines.jobs [--work] FOLDER`), Reporter

    job = JobDir(folder)
    job.update(state="running", step=3)         # under the lock, atomically written
    job.status()  job.log_tail(20)  wait(job)   # pipelines.follow follows one as it changes
"""

from .folder import ASKED_CODES, WHAT, JobDir, command, file_lock, slug, start, wait
from .process import Reporter, run_reported
from .queue import JobQueue
from .status import ACTIVE, FINAL, STATES, JobStatus, derived

__all__ = ["ACTIVE", "ASKED_CODES", "FINAL", "STATES", "WHAT", "JobDir", "JobQueue", "JobStatus", "Reporter", "command",
           "derived", "file_lock", "run_reported", "slug", "start", "wait"]
