"""The one status of every job (pipelines.jobs): the state vocabulary and JobStatus, status.json as a dataclass - what
this version writes, and what earlier versions wrote read in today's words."""

from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .. import procs

STATES = ("queued", "running", "stopping", "finished", "stopped", "cancelled", "failed", "interrupted")
ACTIVE = ("running", "stopping")
FINAL = ("finished", "stopped", "cancelled", "failed", "interrupted")
LEGACY_STATES = {"complete": "finished"}  # status.json written by earlier versions


# ---------------------------------------------------------------------------------------------- JobStatus


def derived(default: Any = None, **kw):
    """A status field computed when the folder is read (checkpoints, the STOP flag): never written."""
    if callable(default):
        return field(default_factory=default, metadata={"derived": True}, **kw)
    return field(default=default, metadata={"derived": True}, **kw)


@dataclass
class JobStatus:
    """status.json of any job. Fields a kind adds without declaring them (an export's step and args, an ingest's
    counts) live in `extra`; runs.RunStatus declares a run's."""

    kind: str = ""
    state: str = "queued"
    reason: str | None = None  # why it ended as it did, or why it waits
    # the process doing the work (liveness: pid + create_time; on another host, the heartbeat) and its supervisor
    pid: int | None = None
    create_time: float | None = None
    supervisor_pid: int | None = None  # also the job's process group, which a cancel signals
    supervisor_create_time: float | None = None
    exit_code: int | None = None
    host: str | None = None
    heartbeat: float | None = None
    # times (seconds since the epoch)
    created: float | None = None
    queued_at: float | None = None
    started: float | None = None
    ended: float | None = None
    updated: float | None = None
    # progress
    label: str = ""
    fraction: float | None = None
    message: str | None = None
    result: Any = None
    extra: dict = field(default_factory=dict)
    name: str = derived("")  # the folder's name: a run's name, a job's id

    @classmethod
    def from_dict(cls, d: dict) -> "JobStatus":
        """A status as stored, this version's or an earlier one's ("complete", "error")."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        d = dict(d)
        d["state"] = LEGACY_STATES.get(d.get("state"), d.get("state") or "queued")
        legacy_error = d.pop("error", None)
        if d.get("reason") is None and legacy_error:
            d["reason"] = legacy_error
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**{k: v for k, v in d.items() if k in known}, extra=extra)

    def to_dict(self, stored: bool = False) -> dict:
        """A plain dict (`stored`: what status.json holds, without the fields computed on reading)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and not (stored and f.metadata.get("derived"))}
        if not stored:
            out["duration"] = self.duration
        return {**self.extra, **out}

    def set(self, **fields) -> "JobStatus":
        """Set declared fields, and the others into `extra`."""
        names = {f.name for f in dataclasses.fields(self)}
        for k, v in fields.items():
            if k in names and k != "extra":
                setattr(self, k, v)
            else:
                self.extra[k] = v
        return self

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def alive(self) -> bool:
        """Its worker or its supervisor still runs (on another host: its heartbeat is fresh)."""
        if self.host and self.host != socket.gethostname():
            return procs.remote_alive(self.heartbeat, self.updated)
        return (procs.process_alive(self.pid, self.create_time)
                or procs.process_alive(self.supervisor_pid, self.supervisor_create_time))

    @property
    def duration(self) -> float | None:
        """Seconds from start to end (to now while active)."""
        if not self.started:
            return None
        if self.active:
            return time.time() - float(self.started)
        end = self.ended or self.updated
        return float(end) - float(self.started) if end else None


