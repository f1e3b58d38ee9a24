"""Training runs on disk, and the one-at-a-time queue that starts them.

A run is a folder `<workspace>/runs/<name>/`, the record of truth that the studio, a second tab and the CLI all read:

    config.yaml      the resolved TrainConfig (written once)
    job.json         {"kind": "train"}: a run folder is a job folder (pipelines.jobs); older runs lack it
    status.json      a RunStatus: the job lifecycle's state (queued, running, stopping, finished, stopped, failed,
                     interrupted), reason, processes, and the run's step, losses, adapter, resume_from, nproc
    metrics.jsonl    one JSON object per optimizer step, appended by the trainer (plus {"event": "resume"} markers)
    log.txt          the trainer's stdout and stderr
    checkpoints/     step-N/ folders (complete ones carry a COMPLETE marker)
    adapter/         the final adapter, tokenizer and chat template
    STOP             present while a stop is requested; the trainer checks it at each step end

The trainer is a job: its supervisor `python -m pipelines.jobs <run folder>` starts the worker (`worker_command`:
under torchrun for nproc > 1), whose ranks land in `run_job` here.

The queue: `advance_queue(ws)` is the one place that starts a trainer - the oldest queued run, when no run of the
workspace is active, under an fcntl lock on runs/.queue.lock (two tabs, a tab and a finishing trainer never both
start one). It runs when a run is queued (`launch`, `resume`), when a trainer ends (its supervisor, `job_ended`) and
when a studio opens the workspace. Reading a run's status (`RunDir.status`, `list_runs`, `follow`) only reads: a
trainer killed or crashed is recorded as failed with its exit code by its supervisor, whoever started it; one whose
supervisor went too (the machine, a restarted Space or an earlier studio stopped) reads as interrupted. Either way
its last complete checkpoint stays for `resume`.
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

from . import follow as follow_mod
from . import jobs, procs
from .errors import BadInput, Conflict, MacTunerError, NotFound
from .training import STOP_FLAG, TrainConfig, check_resume, list_checkpoints, resolve_base_model, run_training, validate
from .workspace import Workspace, atomic_dir, write_json

ACTIVE = jobs.ACTIVE
FINAL = ("stopped", "finished", "failed", "interrupted")  # the ends a run reaches (never "cancelled")
# torchrun's variables: a supervisor started by a finishing trainer must not hand them down (it would think it is DDP)
DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


# --------------------------------------------------------------------------------------------------- RunDir


@dataclass
class RunStatus(jobs.JobStatus):
    """A run's status.json: the job's fields and the run's own."""

    kind: str = "train"
    step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    final_loss: float | None = None
    best_eval_loss: float | None = None
    adapter: str | None = None
    resume_from: str | None = None
    nproc: int = 1  # training processes on this machine (DDP under torchrun when > 1)
    nnodes: int | None = None  # a launch on several machines (pipelines.multinode)
    world_size: int | None = None
    trainer_pid: int | None = None
    checkpoints: list[str] = jobs.derived(list)  # complete checkpoints' names, oldest first
    stop_requested: bool = jobs.derived(False)  # the STOP file is there


@dataclass(frozen=True)
class RunDir(jobs.JobDir):
    """A training run's folder (see the module docstring); its status.json under the job lock of pipelines.jobs."""

    status_class = RunStatus

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

    def status(self) -> RunStatus:
        """The run's status as readers see it (jobs.JobDir.status), with its checkpoints and whether a stop is
        requested; a folder without status.json is queued (or failed without its config)."""
        st = super().status()
        if st is None:
            st = RunStatus(state="queued" if self.config_path.exists() else "failed", name=self.name)
        st.checkpoints = [p.name for p in self.checkpoints()]
        st.stop_requested = self.stop_flag.exists()
        return st

    def asked_end(self, st: jobs.JobStatus) -> None:
        ckpts = self.checkpoints()
        st.state = "stopped"
        st.reason = (f"stopped; resumable from {ckpts[-1].name}" if ckpts
                     else "stopped before its first checkpoint; it has to start again")

    def end_note(self, st: jobs.JobStatus) -> str:
        if st.state == "stopped":
            return ""
        ckpts = self.checkpoints()
        return (f"; the last complete checkpoint {ckpts[-1].name} can be resumed" if ckpts
                else "; no checkpoint was written, so it has to start again")

    def record_exit(self, pid: int, code: int) -> None:
        super().record_exit(pid, code)
        if not self.status().active:
            self.stop_flag.unlink(missing_ok=True)

    def mark_running(self, resume: str | None = None) -> RunStatus:
        """Called by the trainer (rank 0) when it starts. Keeps the pid recorded when that process is this one or
        one of its ancestors (torchrun's agent, the supervisor); otherwise records this process."""
        me = psutil.Process()
        with self.lock():
            st = self.read() or RunStatus()
            if not (isinstance(st.pid, int) and (st.pid == me.pid or st.pid in {p.pid for p in me.parents()})):
                st.pid, st.create_time = me.pid, me.create_time()
            st.set(state="running", reason=None, ended=None, trainer_pid=me.pid)
            st.started = st.started or time.time()
            if resume:
                st.resume_from = str(resume)
            return self.write(st)

    def append_metrics(self, row: dict) -> None:
        """One line per call, written with a single write so a reader never sees half of a row as complete."""
        line = (json.dumps(row, default=float) + "\n").encode()
        with open(self.metrics_path, "ab") as fh:
            fh.write(line)
            fh.flush()

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)


FOLDER = RunDir  # what pipelines.jobs makes of a run folder


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
    data, offset = follow_mod.read_new(run.metrics_path, offset)
    return follow_mod.json_lines(data), offset


def follow(run: RunDir, **kw):
    """Follow `run` as it trains: a follow.JobUpdate per change (status, new metric rows, new log), ending with
    it (a queued run is followed through its start)."""
    return follow_mod.follow(run, run.status, metrics=run.metrics_path, **kw)


def list_runs(ws: Workspace) -> list[dict]:
    """Every run of the workspace as a table row, newest first: name, state, reason, dataset, base model, method,
    step, total_steps, best_eval_loss, final_loss, duration (s), checkpoints, created, path."""
    out = []
    for run in all_runs(ws):
        st = run.status()
        try:
            cfg = run.config()
            extra = {"dataset": f"{cfg.dataset} v{cfg.dataset_version}", "base_model": cfg.base_model,
                     "method": cfg.method}
        except Exception:  # noqa: BLE001 - a broken config.yaml still lists the run
            extra = {"dataset": None, "base_model": None, "method": None}
        out.append({"name": run.name, "path": str(run.path), "state": st.state, "reason": st.reason,
                    "step": st.step, "total_steps": st.total_steps, "best_eval_loss": st.best_eval_loss,
                    "final_loss": st.final_loss, "duration": st.duration, "checkpoints": st.checkpoints,
                    "created": st.created, **extra})
    out.sort(key=lambda r: (r.get("created") or 0, r["name"]), reverse=True)
    return out


# --------------------------------------------------------------------------------------------------- queue


def queue_lock(ws: Workspace):
    """The lock under which a run is started or claimed (pipelines.multinode claims one under it too)."""
    ws.runs.mkdir(parents=True, exist_ok=True)
    return jobs.file_lock(ws.runs / ".queue.lock")


def active_run(ws: Workspace) -> RunDir | None:
    """The run whose trainer is alive, if any."""
    return next((run for run in all_runs(ws) if run.status().active), None)


def advance_queue(ws: Workspace) -> RunDir | None:
    """The one place that starts a trainer: the oldest queued run, when no run of the workspace is active. Returns
    it (None when nothing started)."""
    with queue_lock(ws):
        if active_run(ws) is not None:
            return None
        queued = [(st.queued_at or 0, r.name, r) for r in all_runs(ws) if (st := r.status()).state == "queued"]
        if not queued:
            return None
        run = min(queued, key=lambda t: (t[0], t[1]))[2]
        run.stop_flag.unlink(missing_ok=True)
        env = procs.child_env(drop=DIST_ENV | {k for k in os.environ if k.startswith("TORCHELASTIC_")})
        jobs.start(run, env=env, reason=None)
        return run


def create_run(ws: Workspace, cfg, name: str | None = None, nproc: int = 1) -> RunDir:
    """Validate `cfg` and write a new run folder in state "queued" (nothing is started)."""
    cfg = validate(cfg, ws)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise BadInput(f"'{name}' is not a usable run name (letters, digits, . _ - ; up to 100).")
    if name is not None and (ws.runs / name).exists():
        raise Conflict(f"A run named '{name}' already exists.")
    if nproc < 1:
        raise BadInput("nproc must be at least 1.")
    if nproc > 1 and cfg.backend == "mlx":
        from .training.mlx.support import ONE_PROCESS  # noqa: PLC0415

        raise BadInput(ONE_PROCESS)
    base = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{jobs.slug(cfg.dataset, 'run')}"
    for i in range(1000):
        target = ws.runs / (base if i == 0 else f"{base}-{i + 1}")
        if target.exists():
            if name is not None:
                raise Conflict(f"A run named '{name}' already exists.")
            continue
        try:
            with atomic_dir(target) as tmp:
                cfg.to_yaml(tmp / "config.yaml")
                write_json(tmp / "job.json", {"kind": "train"})
                now = time.time()
                st = RunStatus(state="queued", created=now, queued_at=now, nproc=nproc, updated=now)
                write_json(tmp / "status.json", st.to_dict(stored=True))
        except Conflict:
            continue
        return RunDir(target)
    raise Conflict("Could not find a free run name.")


def launch(ws: Workspace, cfg, name: str | None = None, nproc: int = 1) -> RunDir:
    """Create a run for `cfg` and start it now if no other run of the workspace is active; otherwise it waits in
    state "queued" and starts when the active one ends. `nproc` > 1 runs it under torchrun (DDP)."""
    run = create_run(ws, cfg, name, nproc)
    advance_queue(ws)
    return run


def stop(run: RunDir) -> RunStatus:
    """Ask a running trainer to stop at its next step end (it saves a checkpoint, then the run is "stopped");
    a queued run is taken off the queue at once."""
    with queue_lock(run.workspace):
        st = run.status()
        if st.state == "queued":
            return run.update(state="stopped", reason="stopped before it started", ended=time.time())
        if st.state == "running":
            run.stop_flag.touch()
            run.update(state="stopping", reason="stop requested; the trainer stops after this step")
    return run.status()


def resume(ws: Workspace, run: RunDir, checkpoint: str | os.PathLike | None = None) -> RunDir:
    """Queue `run` again from `checkpoint` (a path, or a name such as "step-20"; default: its latest complete
    checkpoint). The run continues in the same folder; metrics.jsonl gets a resume marker. Starts at once when
    the workspace is idle."""
    st = run.status()
    if st.active or st.state == "queued":
        raise Conflict(f"Run '{run.name}' is {st.state}; stop it before resuming.")
    ckpt = checkpoint_path(ws, run, checkpoint)
    cfg = validate(run.config(), ws)
    check_resume(cfg, ckpt)
    run.stop_flag.unlink(missing_ok=True)
    if not run.spec_path.exists():  # a run of an earlier version: a job folder like the others from now on
        write_json(run.spec_path, {"kind": "train"})
    run.update(state="queued", reason=None, resume_from=str(ckpt), queued_at=time.time(), ended=None, pid=None,
               create_time=None, supervisor_pid=None, supervisor_create_time=None, exit_code=None, host=None,
               heartbeat=None)  # host: see JobStatus.alive
    advance_queue(ws)
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


def worker_command(run: RunDir) -> list[str]:
    """The trainer's argument list (its supervisor starts it): under torchrun when the run has several processes."""
    cmd = [sys.executable, "-m", "pipelines.jobs", "--work", str(run.path)]
    nproc = int((run.read() or RunStatus()).nproc or 1)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    return cmd


def job_ended(run: RunDir) -> None:
    """The supervisor's part once the trainer ended (its end recorded): the queue moves on."""
    try:
        advance_queue(run.workspace)
    except Exception:  # noqa: BLE001 - this run's outcome stands; the next launch, resume or studio start retries
        traceback.print_exc()


def run_job(job: jobs.JobDir) -> int:
    """The training process (`python -m pipelines.jobs --work <run folder>`, also each rank under torchrun): train
    the folder's config.yaml into it, keeping status.json and metrics.jsonl. Rank 0 records the outcome."""
    run = RunDir(job.path)
    ws = run.workspace if run.path.resolve().parent.name == "runs" else Workspace.open()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    resume = (run.read() or RunStatus()).resume_from or None
    if rank0:
        run.mark_running(resume=resume)
    # SIGTERM (and torchrun forwarding it): stop at the step end, with a checkpoint
    signal.signal(signal.SIGTERM, lambda _sig, _frame: run.stop_flag.touch())
    outcome: dict = {"state": "failed", "reason": "internal error (see log.txt)"}
    rc = 1
    try:
        cfg = validate(run.config(), ws, resume)
        if rank0 and resume:
            state = json.loads((Path(resume) / "trainer_state.json").read_text())
            run.append_metrics({"event": "resume", "step": int(state["step"]), "checkpoint": str(resume),
                                "time": time.time()})
        result = run_training(cfg, run.path, _MetricsWriter(run) if rank0 else None, ws=ws, resume=resume,
                              validated=True)
        print(f"{result.state}: {result.reason}", flush=True)  # before the final state: a follower ends on it
        outcome = {"state": result.state, "reason": result.reason, "step": result.step,
                   "total_steps": result.total_steps, "final_loss": result.final_loss,
                   "best_eval_loss": result.best_eval_loss, "adapter": result.adapter}
        rc = 0
    except MacTunerError as e:
        print(f"failed: {e.message}", file=sys.stderr, flush=True)
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        outcome = {"state": "failed", "reason": e.message}
    except KeyboardInterrupt:
        outcome = {"state": "failed", "reason": "interrupted (Ctrl-C) before a checkpoint was written"}
    except Exception as e:  # noqa: BLE001 - a bug: keep the traceback in log.txt and say so in the status
        traceback.print_exc()
        outcome = {"state": "failed", "reason": f"internal error: {type(e).__name__}: {e} (see log.txt)"}
    finally:
        if rank0:
            run.update(**outcome, ended=time.time())
            run.stop_flag.unlink(missing_ok=True)
    return rc


class _MetricsWriter:
    """The trainer's on_metrics on rank 0: each row into metrics.jsonl and the log; the step and losses into
    status.json (for list_runs) at most every 2 s, and at each eval."""

    def __init__(self, run: RunDir):
        self.run, self.last = run, 0.0

    def __call__(self, row: dict) -> None:
        self.run.append_metrics(row)
        ev = f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""
        print(f"step {row['step']}/{row['total_steps']} loss {row['loss']:.4f}{ev} lr {row['learning_rate']:.2e} "
              f"grad {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s", flush=True)
        if ev or time.time() - self.last > 2.0:
            fields = {"step": row["step"], "total_steps": row["total_steps"], "last_loss": row["loss"]}
            if ev:
                best = [v for v in ((self.run.read() or RunStatus()).best_eval_loss, row["eval_loss"])
                        if isinstance(v, (int, float))]
                fields["best_eval_loss"] = min(best) if best else None
            self.run.update(**fields)
            self.last = time.time()
