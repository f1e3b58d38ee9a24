"""Follow a job folder as it is written: generators that yield each change (new metric rows, new log lines, a new
state) within about `interval` seconds, and end with the job.

Files are read from byte offsets: each tick reads only what was appended since the last one (a line still being
written waits for the next tick; a file that shrank was replaced and is read again from its start). The first
update carries what is there already (every metric row, the log's last `log_bytes`), so a refreshed page or a
second tab re-attaches with the whole picture.

    for up in runs.follow(run):           # a training run: RunUpdate(status, rows, log, final)
        print(up.status["state"], len(up.rows), up.log, end="")
    for st in follow_job(queue, job_id):  # an export / an ingest: its status dict each time it changes (+ "log")
        ...

`stop` (a callable) ends a follower early: the studio passes "this browser has started a newer follower".
`idle=True` makes a follower yield None where it would wait `interval` (so an async caller waits on its event loop
and no thread is held while nothing changes).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

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
class RunUpdate:
    """One change of a training run: its status, the metric rows and the log text appended since the last update
    (the first update: all rows so far and the log's tail); `final` on the last one."""

    run: str
    status: dict
    rows: list[dict] = field(default_factory=list)
    log: str = ""
    final: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _wait(idle: bool, interval: float):
    """A follower's pause between ticks: a None for an async caller to wait on (idle), else a sleep."""
    if idle:
        yield None
    else:
        time.sleep(interval)


def _status_key(st: dict) -> tuple:
    return (st.get("state"), st.get("reason"), st.get("stop_requested"), tuple(st.get("checkpoints") or ()),
            st.get("total_steps"))


def follow_run(run, status: Callable[[], dict], final_states: tuple[str, ...], interval: float = 0.5,
               stop: Callable[[], bool] | None = None, log_bytes: int = LOG_BYTES,
               idle: bool = False) -> Iterator[RunUpdate | None]:
    """Yield a RunUpdate whenever `run` (a pipelines.runs.RunDir, whose `status()` is read each tick) changes,
    until its state is one of `final_states` (that update is `final`) or `stop()` is true. `runs.follow` fills
    these in; a queued run is followed through its start."""
    m_off, l_off, last = 0, tail_offset(run.log_path, log_bytes), None
    while True:
        st = status()
        data, m_off = read_new(run.metrics_path, m_off)
        text, l_off = read_new(run.log_path, l_off)
        final = st.get("state") in final_states
        key = _status_key(st)
        if data or text or key != last or final:
            last = key
            yield RunUpdate(run.name, st, json_lines(data), text.decode("utf-8", "replace"), final)
        if final or (stop and stop()):
            return
        yield from _wait(idle, interval)


def follow_job(queue, job_id: str, interval: float = 0.5, stop: Callable[[], bool] | None = None,
               log_bytes: int = 8000, idle: bool = False) -> Iterator[dict | None]:
    """Yield the status of job `job_id` of a pipelines.jobs.JobQueue each time it changes (with "log": the log text
    appended since the last one, and "final"), until the job is complete, failed or cancelled, or `stop()`."""
    j = queue.job(job_id)
    l_off, last = tail_offset(j.log_path, log_bytes), None
    while True:
        st = queue.status(job_id)
        text, l_off = read_new(j.log_path, l_off)
        final = st.get("state") in queue.FINAL
        key = json.dumps(st, sort_keys=True, default=str)
        if text or key != last or final:
            last = key
            yield {**st, "log": text.decode("utf-8", "replace"), "final": final}
        if final or (stop and stop()):
            return
        yield from _wait(idle, interval)
