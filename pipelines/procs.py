"""Background processes of the studio (trainers, export jobs): start one with an argument list, and tell later,
from the pid and start time a status file recorded, whether it is still alive (a recycled pid is not).

    pid, create_time = spawn([sys.executable, "-m", "pipelines.cli", ...], log_path)
    alive({"pid": pid, "create_time": create_time})  -> bool
    exit_code(pid)                                     -> the exit status of a child this process started, or None
    log_tail(log_path, lines=None)                     -> the end of its log (the last `lines` lines)

A status with a "host" other than this machine's (a run on several machines, its workspace on a shared filesystem,
rank 0 elsewhere: pipelines.multinode) is alive while its "heartbeat" is younger than REMOTE_STALE_S.

Every child started here is waited on by a small thread of its own as soon as it starts, so a finished job never
lingers as a `<defunct>` zombie of the studio, whether or not anyone polls its status; its exit status is kept
(the last few hundred) for `exit_code`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started here and still running (their reaper waits)
_EXITED: dict[int, int] = {}  # pid -> exit status of children that ended, until exit_code asks (bounded)
_MAX_EXITED = 256
_LOCK = threading.Lock()
REMOTE_STALE_S = 300.0  # rank 0 of a run on several machines writes its heartbeat every minute


def child_env(drop: set[str] = frozenset()) -> dict:
    """This process's environment for a child that imports `pipelines` (PYTHONPATH) and logs unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(cmd: list[str], log, env: dict | None = None) -> tuple[int, float | None]:
    """Start `cmd` (no shell) in its own session with stdout+stderr into the open binary file `log`; returns its
    pid and start time. OSError when it cannot start."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env if env is not None else child_env())
    with _LOCK:
        _CHILDREN[proc.pid] = proc
        _EXITED.pop(proc.pid, None)  # an earlier child's status under a recycled pid
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = None
    threading.Thread(target=_reap, args=(proc,), name=f"reap-{proc.pid}", daemon=True).start()
    return proc.pid, create_time


def _reap(proc: subprocess.Popen) -> None:
    """Wait for `proc` to end (which reaps it) and keep its exit status for `exit_code`."""
    code = proc.wait()
    with _LOCK:
        _CHILDREN.pop(proc.pid, None)
        _EXITED[proc.pid] = code
        while len(_EXITED) > _MAX_EXITED:
            _EXITED.pop(next(iter(_EXITED)))


def alive(st: dict) -> bool:
    """True while the process recorded in `st` ("pid", optional "create_time") runs (on another "host": while its
    heartbeat is fresh)."""
    host = st.get("host")
    if host and host != socket.gethostname():
        beat = max(float(st.get("heartbeat") or 0), float(st.get("updated") or 0))
        return time.time() - beat < REMOTE_STALE_S
    pid = st.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        ct = st.get("create_time")
        return ct is None or abs(p.create_time() - float(ct)) < 2.0  # a recycled pid is not our process
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def exit_code(pid) -> int | None:
    """The exit status of a finished child started by this process (forgotten afterwards), else None. A child that
    has just ended gets a moment for its reaper to record it."""
    if not isinstance(pid, int):
        return None
    with _LOCK:
        child = _CHILDREN.get(pid)
    if child is not None:
        try:
            child.wait(timeout=2.0)  # returns once the reaper thread has reaped it
        except subprocess.TimeoutExpired:
            return None
    with _LOCK:
        return _EXITED.pop(pid, None)


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
