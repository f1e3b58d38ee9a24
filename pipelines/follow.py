"""Follow a job folder as it is written: generators that yield each change (new metric rows, new log lines, a new
state) within about `interval` seconds, and end with the job.

Files are read from byte offsets: each tick reads only what was appended since the last one (a line still being
written waits for the next tick; a file that shrank was replaced and is read again from its start). The first
update carries what is there already (every metric row, the log's last `log_bytes`), so a refreshed page or a
second tab re-attaches with the whole picture.

    for up in runs.follow(run):                       # a training run: its metric rows too
        print(up.status.state, len(up.rows), up.log, end="")
    for up in follow(queue.job(job_id), queue.job(job_id).status):   # an export, an ingest, a push
        ...

`stop` (a callable) ends a follower early: the studio passes "this browser has started a newer follower".
`idle=True` makes a follower yield None where it would wait `interval` (so an async caller waits on its event loop
and no thread is held while nothing changes).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import NotFound
from .jobs import JobStatus

LOG_BYTES = 20_000  # the first update's log: its last bytes


def read_new(path: Path, offset: int) -> tuple[bytes, int]:
    """The complete lines appended to `path` since byte `offset`, and the offset to pass next time (b"" and 0
    while the file does not exist)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if offset > size:  # replaced by a shorter file: read it again
                offset = 0
            fh.seek(offset)
            data = fh.read(size - offset)
    except FileNotFoundError:
        return b"", 0
    end = data.rfind(b"\n")
    if end < 0:
        return b"", offset
    return data[: end + 1], offset + end + 1


def tail_offset(path: Path, max_bytes: int = LOG_BYTES) -> int:
    """Where to start reading `path` to get at most its last `max_bytes`, at the start of a line."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size <= max_bytes:
                return 0
            fh.seek(size - max_bytes)
            skipped = fh.readline()  # the rest of a cut line
            return size - max_bytes + len(skipped)
    except FileNotFoundError:
        return 0


def json_lines(data: bytes) -> list[dict]:
    """The JSON objects of complete lines (a line that is not JSON is skipped)."""
    rows = []
    for line in data.splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


@dataclass
class JobUpdate:
    """One change of a job: its status, the metric rows (a training run's) and the log text appended since the last
    update (the first update: all rows so far and the log's tail); `final` on the last one."""

    name: str
    status: JobStatus
    rows: list[dict] = field(default_factory=list)
    log: str = ""
    final: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status.to_dict(), "rows": self.rows, "log": self.log,
                "final": self.final}


def _wait(idle: bool, interval: float):
    """A follower's pause between ticks: a None for an async caller to wait on (idle), else a sleep."""
    if idle:
        yield None
    else:
        time.sleep(interval)


def _status_key(st: JobStatus) -> str:
    """What makes a status change worth an update (not the time stamps that move on every write)."""
    d = st.to_dict()
    for k in ("updated", "duration", "heartbeat"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def follow(job, status: Callable[[], JobStatus | None], metrics: Path | None = None, interval: float = 0.5,
           stop: Callable[[], bool] | None = None, log_bytes: int = LOG_BYTES,
           idle: bool = False) -> Iterator[JobUpdate | None]:
    """Yield a JobUpdate whenever job `job` (a pipelines.jobs.JobDir; `status()` is read each tick, `metrics` the
    JSON-lines file of its rows, if any) changes, until it is in a final state (that update is `final`) or
    `stop()` is true. A queued job is followed through its start. NotFound when the job has no status."""
    m_off, l_off, last = 0, tail_offset(job.log_path, log_bytes), None
    while True:
        st = status()
        if st is None:
            raise NotFound(f"There is no job '{job.name}'.")
        data, m_off = read_new(metrics, m_off) if metrics is not None else (b"", 0)
        text, l_off = read_new(job.log_path, l_off)
        key = _status_key(st)
        if data or text or key != last or st.final:
            last = key
            yield JobUpdate(job.name, st, json_lines(data), text.decode("utf-8", "replace"), st.final)
        if st.final or (stop and stop()):
            return
        yield from _wait(idle, interval)
