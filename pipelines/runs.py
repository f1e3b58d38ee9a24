"""Training runs on disk, and the one-at-a-time queue that starts them.

A run is a folder `<workspace>/runs/<name>/`, the record of truth that the studio, a second tab and the CLI all read:

    config.yaml      the resolved TrainConfig (written once)
    status.json      {"state": queued|running|stopping|stopped|finished|failed|interrupted, "reason", "pid", ...}
    metrics.jsonl    one JSON object per optimizer step, appended by the trainer (plus {"event": "resume"} markers)
    log.txt          the trainer's stdout and stderr
    checkpoints/     step-N/ folders (complete ones carry a COMPLETE marker)
    adapter/         the final adapter, tokenizer and chat template
    STOP             present while a stop is requested; the trainer checks it at each step end

A run folder is a job folder (pipelines.jobs): the trainer is `python -m pipelines.jobs <run folder>` (under torchrun
for DDP), which lands in `run_job` here.

`launch(ws, cfg)` writes the folder with state "queued" and starts the oldest queued run if no run of the workspace
is active. Starting happens under an fcntl lock on runs/.queue.lock, so two studio tabs (or a tab and a finishing
trainer) never both start one. When a trainer ends it starts the next queued run itself; `refresh_status` (any
poll) does the same, and also notices a trainer that died (kill -9, crash): that run becomes "failed" with its last
complete checkpoint intact for `resume` - or "interrupted" when its process was not this one's child (it stopped
with the machine, a restarted Space or an earlier studio, and nobody saw how it ended).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import follow as _follow
from . import jobs, procs
from .errors import BadInput, Conflict, MacTunerError, NotFound
from .training import STOP_FLAG, TrainConfig, check_resume, list_checkpoints, resolve_base_model, run_training, validate
from .workspace import Workspace, atomic_dir, write_json

STATES = ("queued", "running", "stopping", "stopped", "finished", "failed", "interrupted")
ACTIVE = ("running", "stopping")
FINAL = ("stopped", "finished", "failed", "interrupted")
# torchrun's variables: a trainer that starts the next queued run must not hand them down (it would think it is DDP)
_DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


# --------------------------------------------------------------------------------------------------- RunDir


@dataclass(frozen=True)
class RunDir(jobs.JobDir):
    """A training run's folder (see the module docstring); its status.json under the job lock of pipelines.jobs."""

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def stop_flag(self) -> Path:
        return self.path / STOP_FLAG

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.path.resolve().parent.parent)

    def config(self) -> TrainConfig:
        return TrainConfig.from_yaml(self.config_path)

    def status(self) -> dict:
        st = self.read()
        if st is None:
            return {"state": "queued" if self.config_path.exists() else "failed", "reason": None}
        return st

    def update_status(self, **fields) -> dict:
        """Merge `fields` into status.json (read-modify-write under the job lock; atomic write)."""
        return self.update(**fields)

    def mark_running(self, resume: str | None = None) -> dict:
        """Called by the trainer (rank 0) when it starts. Keeps the pid the launcher recorded when that process is
        this one or one of its ancestors (torchrun's agent); otherwise records this process."""
        me = psutil.Process()
        with self.lock():
            st = self.read() or {}
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
            return self.write(st)

    def append_metrics(self, row: dict) -> None:
        """One line per call, written with a single write so a reader never sees half of a row as complete."""
        line = (json.dumps(row, default=float) + "\n").encode()
        with open(self.metrics_path, "ab") as fh:
            fh.write(line)
            fh.flush()

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)


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
    data, offset = _follow.read_new(run.metrics_path, offset)
    return _follow.json_lines(data), offset


def follow(run: RunDir, **kw):
    """Follow `run` as it trains: a follow.RunUpdate per change (status, new metric rows, new log), ending with it."""
    return _follow.follow_run(run, lambda: refresh_status(run), FINAL, **kw)


def _fail_if_dead(run: RunDir) -> bool:
    """A run whose status says running/stopping but whose process is gone becomes failed. True when changed."""

    def failed(code: int | None) -> dict:
        ckpts = run.checkpoints()
        where = (f"; the last complete checkpoint {ckpts[-1].name} can be resumed" if ckpts
                 else "; no checkpoint was written, so it has to start again")
        if code is None:  # not this process's child: it stopped with the machine, the Space or an earlier studio
            return {"state": "interrupted", "reason": "interrupted: the training process stopped without finishing "
                    f"(the machine, the Space or the studio that started it stopped){where}"}
        how = f" (exit code {code})" if code != 0 else ""
        return {"state": "failed", "reason": f"the training process ended unexpectedly{how}{where}"}

    if not run.fail_if_dead(ACTIVE, failed):
        return False
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


def _queue_lock(ws: Workspace):
    ws.runs.mkdir(parents=True, exist_ok=True)
    return jobs.file_lock(ws.runs / ".queue.lock")


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
    cmd = jobs.command(run)
    nproc = int(run.status().get("nproc") or 1)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *cmd[1:]]
    env = procs.child_env(drop=_DIST_ENV | {k for k in os.environ if k.startswith("TORCHELASTIC_")})
    run.stop_flag.unlink(missing_ok=True)
    jobs.start(run, cmd, env, reason=None)


def create_run(ws: Workspace, cfg, name: str | None = None, nproc: int = 1) -> RunDir:
    """Validate `cfg` and write a new run folder in state "queued" (nothing is started)."""
    cfg = validate(cfg, ws)
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise BadInput(f"'{name}' is not a usable run name (letters, digits, . _ - ; up to 100).")
        if (ws.runs / name).exists():
            raise Conflict(f"A run named '{name}' already exists.")
        base = name
    else:
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{jobs.slug(cfg.dataset, 'run')}"
    if nproc < 1:
        raise BadInput("nproc must be at least 1.")
    if nproc > 1 and cfg.backend == "mlx":
        from .training.mlx.support import ONE_PROCESS  # noqa: PLC0415

        raise BadInput(ONE_PROCESS)
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
    st = refresh_status(run)
    if st.get("state") in ACTIVE or st.get("state") == "queued":
        raise Conflict(f"Run '{run.name}' is {st.get('state')}; stop it before resuming.")
    ckpt = checkpoint_path(ws, run, checkpoint)
    cfg = validate(run.config(), ws)
    check_resume(cfg, ckpt)
    run.stop_flag.unlink(missing_ok=True)
    run.update_status(state="queued", reason=None, resume_from=str(ckpt), queued_at=time.time(), ended=None,
                      pid=None, create_time=None, host=None, heartbeat=None)  # host: see procs.alive
    start_next(ws)
    return run


def checkpoint_path(ws: Workspace, run: RunDir, checkpoint: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder for a path or a name such as "step-20" (default: the run's latest complete one)."""
    if checkpoint is None:
        ckpts = run.checkpoints()
        if not ckpts:
            raise BadInput(f"Run '{run.name}' has no complete checkpoint to resume from.")
        return ckpts[-1]
    c = Path(checkpoint)
    ckpt = (c if c.is_absolute() else (run.checkpoints_dir / c if len(c.parts) == 1 else ws.inside(c))).resolve()
    if ws.root not in ckpt.parents:
        raise BadInput(f"{checkpoint} is outside the workspace.")
    return ckpt


def wait(run: RunDir, timeout: float = 600.0, poll: float = 0.2, states=FINAL) -> dict:
    """Poll until the run reaches one of `states` (default: a final state); returns its status."""
    deadline = time.time() + timeout
    while True:
        st = refresh_status(run)
        if st.get("state") in states or time.time() > deadline:
            return st
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------------- adapters


def _find_run_dir(path: Path) -> Path | None:
    for p in [path, *list(path.parents)[:3]]:
        if (p / "config.yaml").is_file():
            return p
    return None


def resolve_adapter(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """(adapter folder, run folder or None) for a run folder, its adapter/ or a checkpoints/step-N/."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise NotFound(f"{path} does not exist.")
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise BadInput(f"{path} holds no adapter (adapter_config.json); pick a finished run or a checkpoint.")
    return path, _find_run_dir(path)


def run_config(run_dir: Path | None) -> dict:
    """A run folder's config.yaml as a plain dict ({} when there is none or it cannot be read)."""
    if run_dir is None:
        return {}
    import yaml  # noqa: PLC0415

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def resolve_base(ws: Workspace, adapter: Path, run_dir: Path | None, base_model: str | None = None) -> Path:
    """The base model folder of an adapter: given, else the run's config.yaml, else mactuner.json /
    adapter_config.json."""
    from . import models  # noqa: PLC0415

    base = base_model or run_config(run_dir).get("base_model")
    if not base and (adapter / "mactuner.json").is_file():
        base = json.loads((adapter / "mactuner.json").read_text()).get("base_model")
    if not base:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise BadInput("The adapter does not say which base model it was trained on: give base_model.")
    if Path(str(base)).expanduser().is_dir():
        return Path(str(base)).expanduser().resolve()
    try:
        return resolve_base_model(TrainConfig(base_model=str(base)), ws)
    except MacTunerError:
        return models.resolve_source(str(base), ws)


def adapter_sources(ws: Workspace) -> list[tuple[str, Path]]:
    """Every adapter on disk, newest run first: (label, folder) for each run's final adapter/ and its complete
    checkpoints."""
    out = []
    for r in sorted(all_runs(ws), key=lambda r: (r.status().get("created") or 0, r.name), reverse=True):
        if (r.adapter_dir / "adapter_config.json").exists():
            out.append((f"run {r.name} · final adapter", r.adapter_dir))
        out += [(f"run {r.name} · checkpoint {p.name}", p) for p in reversed(r.checkpoints())]
    return out


# ------------------------------------------------------------------------------------------- the trainer (a job)


def run_job(job: jobs.JobDir, start_queue: bool = True) -> int:
    """The training process (`python -m pipelines.jobs <run folder>`, also each rank under torchrun): train the
    folder's config.yaml into it, keeping status.json and metrics.jsonl; then start the next queued run (not when
    `start_queue` is False: rank 0 of a run on several machines, pipelines.multinode)."""
    run = RunDir(job.path)
    ws = run.workspace if run.path.resolve().parent.name == "runs" else Workspace.open()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    resume = run.status().get("resume_from") or None
    if rank0:
        run.mark_running(resume=resume)

    def on_term(_sig, _frame):  # SIGTERM (and torchrun forwarding it): stop at the step end, with a checkpoint
        run.stop_flag.touch()

    signal.signal(signal.SIGTERM, on_term)
    rc = 1
    try:
        cfg = validate(run.config(), ws, resume)
        if rank0 and resume:
            state = json.loads((Path(resume) / "trainer_state.json").read_text())
            run.append_metrics({"event": "resume", "step": int(state["step"]), "checkpoint": str(resume),
                                "time": time.time()})
        last_status = [0.0]

        def on_metrics(row: dict) -> None:
            run.append_metrics(row)
            ev = f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            print(f"step {row['step']}/{row['total_steps']} loss {row['loss']:.4f}{ev} lr {row['learning_rate']:.2e} "
                  f"grad {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s", flush=True)
            if ev or time.time() - last_status[0] > 2.0:  # progress for list_runs, at most every 2 s
                fields = {"step": row["step"], "total_steps": row["total_steps"], "last_loss": row["loss"]}
                if ev:
                    fields["best_eval_loss"] = _best(run.status().get("best_eval_loss"), row["eval_loss"])
                run.update_status(**fields)
                last_status[0] = time.time()

        result = run_training(cfg, run.path, on_metrics if rank0 else None, ws=ws, resume=resume, validated=True)
        print(f"{result.state}: {result.reason}", flush=True)  # before the final state: a follower ends on it
        if rank0:
            run.update_status(state=result.state, reason=result.reason, ended=time.time(), step=result.step,
                              total_steps=result.total_steps, final_loss=result.final_loss,
                              best_eval_loss=result.best_eval_loss, adapter=result.adapter)
        rc = 0
    except MacTunerError as e:
        print(f"failed: {e.message}", file=sys.stderr, flush=True)
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        if rank0:
            run.update_status(state="failed", reason=e.message, ended=time.time())
    except KeyboardInterrupt:
        if rank0:
            run.update_status(state="failed", reason="interrupted (Ctrl-C) before a checkpoint was written",
                              ended=time.time())
    except Exception as e:  # noqa: BLE001 - a bug: keep the traceback in log.txt and say so in the status
        traceback.print_exc()
        if rank0:
            run.update_status(state="failed", reason=f"internal error: {type(e).__name__}: {e} (see log.txt)",
                              ended=time.time())
    finally:
        if rank0:
            run.stop_flag.unlink(missing_ok=True)
        if rank0 and start_queue:
            try:
                start_next(ws)  # the queue: start the oldest queued run now that this one is over
            except Exception:  # noqa: BLE001 - the next poll starts it; this run's outcome stands
                traceback.print_exc()
    return rc


def _best(a, b):
    vals = [v for v in (a, b) if isinstance(v, (int, float))]
    return min(vals) if vals else None
