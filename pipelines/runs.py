"""Training runs on disk, and the one-at-a-time queue that starts them.

A run is a folder `<workspace>/runs/<name>/`, the record of truth that the studio, a second tab and the CLI all read:

    config.yaml      the resolved TrainConfig (written once)
    status.json      {"state": queued|running|stopping|stopped|finished|failed, "reason", "pid", "started", ...}
    metrics.jsonl    one JSON object per optimizer step, appended by the trainer (plus {"event": "resume"} markers)
    log.txt          the trainer's stdout and stderr
    checkpoints/     step-N/ folders (complete ones carry a COMPLETE marker)
    adapter/         the final adapter, tokenizer and chat template
    STOP             present while a stop is requested; the trainer checks it at each step end

`launch(ws, cfg)` writes the folder with state "queued" and starts the oldest queued run if no run of the workspace
is active. Starting happens under an fcntl lock on runs/.queue.lock, so two studio tabs (or a tab and a finishing
trainer) never both start one. When a trainer ends it starts the next queued run itself; `refresh_status` (any
poll) does the same, and also notices a trainer that died (kill -9, crash): that run becomes "failed" with its last
complete checkpoint intact for `resume`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import procs
from .errors import BadInput, Conflict, NotFound
from .workspace import Workspace, atomic_dir, write_json

STATES = ("queued", "running", "stopping", "stopped", "finished", "failed")
ACTIVE = ("running", "stopping")
FINAL = ("stopped", "finished", "failed")
_THREAD_LOCK = threading.RLock()
# torchrun's variables: a trainer that starts the next queued run must not hand them down (it would think it is DDP)
_DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


# --------------------------------------------------------------------------------------------------- RunDir


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def stop_flag(self) -> Path:
        from .train import STOP_FLAG  # noqa: PLC0415

        return self.path / STOP_FLAG

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.path.resolve().parent.parent)

    def config(self):
        from .train import TrainConfig  # noqa: PLC0415

        return TrainConfig.from_yaml(self.config_path)

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return {"state": "queued" if self.config_path.exists() else "failed", "reason": None}
        except (OSError, json.JSONDecodeError) as e:
            return {"state": "failed", "reason": f"status.json cannot be read ({e})"}

    @contextlib.contextmanager
    def _status_lock(self):
        self.path.mkdir(parents=True, exist_ok=True)
        with _THREAD_LOCK, open(self.path / ".status.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def update_status(self, **fields) -> dict:
        """Merge `fields` into status.json (read-modify-write under a file lock; atomic write)."""
        with self._status_lock():
            st = self.status() if self.status_path.exists() else {}
            st.update(fields)
            st["updated"] = time.time()
            write_json(self.status_path, st)
            return st

    def mark_running(self, resume: str | None = None) -> dict:
        """Called by the trainer (rank 0) when it starts. Keeps the pid the launcher recorded when that process is
        this one or one of its ancestors (torchrun's agent); otherwise records this process."""
        me = psutil.Process()
        with self._status_lock():
            st = self.status() if self.status_path.exists() else {}
            pid = st.get("pid")
            keep = False
            if isinstance(pid, int):
                keep = pid == me.pid or pid in {p.pid for p in me.parents()}
            if not keep:
                st.update(pid=me.pid, create_time=me.create_time())
            st.update(state="running", reason=None, ended=None, trainer_pid=me.pid)
            st.setdefault("started", time.time())
            if resume:
                st["resume_from"] = str(resume)
            st["updated"] = time.time()
            write_json(self.status_path, st)
            return st

    def append_metrics(self, row: dict) -> None:
        """One line per call, written with a single write so a reader never sees half of a row as complete."""
        line = (json.dumps(row, default=float) + "\n").encode()
        with open(self.metrics_path, "ab") as fh:
            fh.write(line)
            fh.flush()

    def checkpoints(self) -> list[Path]:
        from .train import list_checkpoints  # noqa: PLC0415

        return list_checkpoints(self.path)

    def log_tail(self, lines: int | None = None, max_bytes: int = 20_000) -> str:
        return procs.log_tail(self.log_path, lines, max_bytes)


def get_run(ws: Workspace, name: str) -> RunDir:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise BadInput(f"'{name}' is not a run name.")
    run = RunDir(ws.runs / name)
    if not run.path.is_dir():
        raise NotFound(f"There is no run '{name}'.")
    return run


def all_runs(ws: Workspace) -> list[RunDir]:
    if not ws.runs.is_dir():
        return []
    return [RunDir(p) for p in sorted(ws.runs.iterdir()) if p.is_dir() and not p.name.startswith(".")
            and (p / "config.yaml").exists()]


# --------------------------------------------------------------------------------------------------- reading


def read_metrics(run: RunDir, offset: int = 0) -> tuple[list[dict], int]:
    """Rows appended to metrics.jsonl since byte `offset`, and the offset to pass next time. Reads only the new
    bytes; a line still being written (no newline yet) is left for the next call. Rows with an "event" key are
    markers ({"event": "resume", "step": N}: rows after it restart from step N+1 and replace later ones)."""
    rows: list[dict] = []
    try:
        with open(run.metrics_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if offset > size:  # the file was replaced: start again
                offset = 0
            fh.seek(offset)
            data = fh.read(size - offset)
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    for line in data[: end + 1].splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows, offset + end + 1


def _fail_if_dead(run: RunDir) -> bool:
    """A run whose status says running/stopping but whose process is gone becomes failed. True when changed."""
    st = run.status()
    if st.get("state") not in ACTIVE or procs.alive(st):
        return False
    with run._status_lock():
        st = run.status()  # the trainer may have written its final state just before exiting
        if st.get("state") not in ACTIVE:
            return False
        code = procs.exit_code(st.get("pid"))
        ckpts = run.checkpoints()
        where = (f"; the last complete checkpoint {ckpts[-1].name} can be resumed" if ckpts
                 else "; no checkpoint was written, so it has to start again")
        how = f" (exit code {code})" if code not in (None, 0) else ""
        st.update(state="failed", reason=f"the training process ended unexpectedly{how}{where}", ended=time.time(),
                  updated=time.time())
        write_json(run.status_path, st)
    run.stop_flag.unlink(missing_ok=True)
    return True


def refresh_status(run: RunDir) -> dict:
    """The run's status, after noticing a dead trainer (→ failed) and starting the next queued run if the
    workspace is idle. Adds "stop_requested", "checkpoints" (names) and "duration" (seconds)."""
    changed = _fail_if_dead(run)
    st = run.status()
    if changed or st.get("state") == "queued":
        start_next(run.workspace)
        st = run.status()
    st = dict(st)
    st["name"] = run.name
    st["stop_requested"] = run.stop_flag.exists()
    st["checkpoints"] = [p.name for p in run.checkpoints()]
    st["duration"] = _duration(st)
    return st


def _duration(st: dict) -> float | None:
    started = st.get("started")
    if not started:
        return None
    if st.get("state") in ACTIVE:
        return time.time() - float(started)
    ended = st.get("ended") or st.get("updated")
    return float(ended) - float(started) if ended else None


def list_runs(ws: Workspace) -> list[dict]:
    """Every run of the workspace, newest first: name, state, reason, dataset, base model, method, step,
    total_steps, best_eval_loss, final_loss, duration (s), checkpoints, path."""
    out = []
    for run in all_runs(ws):
        st = refresh_status(run)
        try:
            cfg = run.config()
            extra = {"dataset": f"{cfg.dataset} v{cfg.dataset_version}", "base_model": cfg.base_model,
                     "method": cfg.method}
        except Exception:  # noqa: BLE001 - a broken config.yaml still lists the run
            extra = {"dataset": None, "base_model": None, "method": None}
        out.append({"name": run.name, "path": str(run.path), "state": st.get("state"), "reason": st.get("reason"),
                    "step": st.get("step"), "total_steps": st.get("total_steps"),
                    "best_eval_loss": st.get("best_eval_loss"), "final_loss": st.get("final_loss"),
                    "duration": st.get("duration"), "checkpoints": st.get("checkpoints"),
                    "created": st.get("created"), **extra})
    out.sort(key=lambda r: (r.get("created") or 0, r["name"]), reverse=True)
    return out


# --------------------------------------------------------------------------------------------------- queue


@contextlib.contextmanager
def _queue_lock(ws: Workspace):
    ws.runs.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(ws.runs / ".queue.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def active_run(ws: Workspace) -> RunDir | None:
    """The run whose trainer is alive, if any (dead ones are marked failed on the way)."""
    for run in all_runs(ws):
        if run.status().get("state") in ACTIVE:
            if not _fail_if_dead(run):
                return run
    return None


def start_next(ws: Workspace) -> RunDir | None:
    """Start the oldest queued run when no run of the workspace is active; returns it (None when nothing started)."""
    with _queue_lock(ws):
        if active_run(ws) is not None:
            return None
        queued = [(r.status().get("queued_at") or 0, r.name, r) for r in all_runs(ws)
                  if r.status().get("state") == "queued"]
        if not queued:
            return None
        run = min(queued, key=lambda t: (t[0], t[1]))[2]
        _spawn(ws, run)
        return run


def _spawn(ws: Workspace, run: RunDir) -> None:
    st = run.status()
    cmd = [sys.executable, "-m", "pipelines.train", str(run.config_path), "--run-dir", str(run.path),
           "--root", str(ws.root)]
    if st.get("resume_from"):
        cmd += ["--resume", str(st["resume_from"])]
    nproc = int(st.get("nproc") or 1)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *cmd[1:]]
    env = procs.child_env(drop=_DIST_ENV | {k for k in os.environ if k.startswith("TORCHELASTIC_")})
    run.stop_flag.unlink(missing_ok=True)
    # Hold the run's status lock from before the start until "running" + pid are written: the trainer's first
    # status write (mark_running, or "failed" if it dies at once) waits for it, so it can never be overwritten.
    with run._status_lock(), open(run.log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        st = run.status()
        try:
            pid, create_time = procs.spawn(cmd, log, env)
        except OSError as e:
            st.update(state="failed", reason=f"the trainer could not be started ({e})", ended=time.time(),
                      updated=time.time())
            write_json(run.status_path, st)
            return
        st.update(state="running", pid=pid, create_time=create_time, started=time.time(), reason=None,
                  ended=None, updated=time.time())
        write_json(run.status_path, st)


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[:40] or "run"


def create_run(ws: Workspace, cfg, name: str | None = None, nproc: int = 1) -> RunDir:
    """Validate `cfg` and write a new run folder in state "queued" (nothing is started)."""
    from .train import validate  # noqa: PLC0415

    cfg = validate(cfg, ws)
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise BadInput(f"'{name}' is not a usable run name (letters, digits, . _ - ; up to 100).")
        if (ws.runs / name).exists():
            raise Conflict(f"A run named '{name}' already exists.")
        base = name
    else:
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(cfg.dataset)}"
    if nproc < 1:
        raise BadInput("nproc must be at least 1.")
    for i in range(1000):
        cand = base if i == 0 else f"{base}-{i + 1}"
        target = ws.runs / cand
        if target.exists():
            if name is not None:
                raise Conflict(f"A run named '{name}' already exists.")
            continue
        try:
            with atomic_dir(target) as tmp:
                cfg.to_yaml(tmp / "config.yaml")
                now = time.time()
                write_json(tmp / "status.json", {"state": "queued", "reason": None, "created": now, "queued_at": now,
                                                 "nproc": nproc, "updated": now})
        except Conflict:
            continue
        return RunDir(target)
    raise Conflict("Could not find a free run name.")


def launch(ws: Workspace, cfg, name: str | None = None, nproc: int = 1) -> RunDir:
    """Create a run for `cfg` and start it now if no other run of the workspace is active; otherwise it waits in
    state "queued" and starts when the active one ends. `nproc` > 1 runs it under torchrun (DDP)."""
    run = create_run(ws, cfg, name, nproc)
    start_next(ws)
    return run


def stop(run: RunDir) -> dict:
    """Ask a running trainer to stop at its next step end (it saves a checkpoint, then the run is "stopped");
    a queued run is taken off the queue at once."""
    with _queue_lock(run.workspace):
        st = run.status()
        state = st.get("state")
        if state == "queued":
            return run.update_status(state="stopped", reason="stopped before it started", ended=time.time())
        if state in ACTIVE and procs.alive(st):
            run.stop_flag.touch()
            return run.update_status(state="stopping", reason="stop requested; the trainer stops after this step")
    return refresh_status(run)


def resume(ws: Workspace, run: RunDir, checkpoint: str | os.PathLike | None = None) -> RunDir:
    """Queue `run` again from `checkpoint` (a path, or a name such as "step-20"; default: its latest complete
    checkpoint). The run continues in the same folder; metrics.jsonl gets a resume marker. Starts at once when
    the workspace is idle."""
    from .train import check_resume, validate  # noqa: PLC0415

    st = refresh_status(run)
    if st.get("state") in ACTIVE or st.get("state") == "queued":
        raise Conflict(f"Run '{run.name}' is {st.get('state')}; stop it before resuming.")
    if checkpoint is None:
        ckpts = run.checkpoints()
        if not ckpts:
            raise BadInput(f"Run '{run.name}' has no complete checkpoint to resume from.")
        ckpt = ckpts[-1]
    else:
        c = Path(checkpoint)
        ckpt = c if c.is_absolute() else (run.checkpoints_dir / c if len(c.parts) == 1 else ws.inside(c))
        ckpt = ckpt.resolve()
        if ws.root not in ckpt.parents:
            raise BadInput(f"{checkpoint} is outside the workspace.")
    cfg = validate(run.config(), ws)
    check_resume(cfg, ckpt)
    run.stop_flag.unlink(missing_ok=True)
    run.update_status(state="queued", reason=None, resume_from=str(ckpt), queued_at=time.time(), ended=None,
                      pid=None, create_time=None)
    start_next(ws)
    return run


def wait(run: RunDir, timeout: float = 600.0, poll: float = 0.2, states=FINAL) -> dict:
    """Poll until the run reaches one of `states` (default: a final state); returns its status."""
    deadline = time.time() + timeout
    while True:
        st = refresh_status(run)
        if st.get("state") in states or time.time() > deadline:
            return st
        time.sleep(poll)
