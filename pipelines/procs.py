"""Background processes of the studio (trainers, export jobs): start one with an argument list, and tell later,
from the pid and start time a status file recorded, whether it is still alive (a recycled pid is not).

    pid, create_time = spawn([sys.executable, "-m", "pipelines.cli", ...], log, on_exit=record)  # record(pid, code)
    process_alive(pid, create_time)                    -> bool (a recycled pid is not the process)
    log_tail(log_path, lines=None)                     -> the end of its log (the last `lines` lines)

A process on another machine (a run on several machines, its workspace on a shared filesystem, rank 0 elsewhere:
pipelines.multinode) is alive while its heartbeat is younger than REMOTE_STALE_S (`remote_alive`).

Every child started here is waited on by a small thread of its own as soon as it starts, so a finished job never
lingers as a `<defunct>` zombie of the studio, whether or not anyone polls its status; that thread hands the exit
status to `on_exit` (pipelines.jobs records it in the job's folder: the one who saw the process end says how).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REMOTE_STALE_S = 300.0  # rank 0 of a run on several machines writes its heartbeat every minute


def child_env(drop: set[str] = frozenset()) -> dict:
    """This process's environment for a child that imports `pipelines` (PYTHONPATH) and logs unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(cmd: list[str], log, env: dict | None = None, on_exit: Callable[[int, int], None] | None = None,
          new_session: bool = True) -> tuple[int, float | None]:
    """Start `cmd` (no shell), in a session of its own unless `new_session` is False, with stdout+stderr into the open
    binary file `log`; returns its pid and start time. `on_exit(pid, exit status)` is called (in a thread) when it
    ends. OSError when it cannot start."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=new_session, env=env if env is not None else child_env())
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = None
    threading.Thread(target=_reap, args=(proc, on_exit), name=f"reap-{proc.pid}", daemon=True).start()
    return proc.pid, create_time


def _reap(proc: subprocess.Popen, on_exit: Callable[[int, int], None] | None) -> None:
    """Wait for `proc` to end (which reaps it) and hand its exit status to `on_exit`."""
    code = proc.wait()
    if on_exit is not None:
        try:
            on_exit(proc.pid, code)
        except Exception:  # noqa: BLE001 - a reaper thread must not die silently: say what was lost
            logging.getLogger("mactuner.procs").exception("recording the end of process %s failed", proc.pid)


def remote_alive(heartbeat: float | None, updated: float | None = None) -> bool:
    """A process on another machine: alive while its last sign of life is younger than REMOTE_STALE_S."""
    return time.time() - max(float(heartbeat or 0), float(updated or 0)) < REMOTE_STALE_S


def process_alive(pid, create_time: float | None = None) -> bool:
    """True while process `pid` of this machine runs and is the one started at `create_time` (not a recycled pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - float(create_time)) < 2.0  # a recycled pid: not ours
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def log_tail(path: Path, lines: int | None = None, max_bytes: int = 20_000) -> str:
    """The last `max_bytes` of a log file (only its last `lines` lines when given); "" when there is none yet."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if lines else text
