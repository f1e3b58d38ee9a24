"""Training on several machines with the launchers made for it (torchrun, accelerate launch): one training process
of such a launch (`run_rank`). The commands for N machines are multinode_commands.py's.

Every machine runs the same `mactuner train` behind its launcher, with the same config, workspace and run name:

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-id RUN \\
        -m pipelines.cli train /shared/mactuner/train.yaml --root /shared/mactuner --name RUN

`mactuner train` (and `mactuner resume RUN`) sees the launcher's variables (`launched()`: TORCHELASTIC_RUN_ID, or
WORLD_SIZE > 1 - accelerate launch starts torchrun too) and runs as one training process:

1. every process checks the config against its own workspace, then they compare what they read: each config setting,
   the dataset's split files (SHA-256), the base model's file names and sizes, the torch / transformers / peft
   versions. A difference, or a machine that cannot read something, stops all of them with one message naming the
   machine (rank, host) - not a hang at the first all-reduce, nor silently different data;
2. rank 0 alone writes the run folder: it creates runs/RUN, or continues it from its latest complete checkpoint (or
   the one given) when RUN exists with the same config and has not finished - on another number of machines when
   the checkpoint's global batch allows it (training/distributed.py). It records its host and a heartbeat each
   minute in status.json, so a studio on another machine of a shared workspace shows the run as running
   (JobStatus.alive), and copies its output into log.txt for the Train tab's log;
3. rank 0 trains through runs.run_job (status.json, metrics.jsonl, checkpoints, adapter, verdict); the others train
   beside it (training.run_training) and write nothing. Stop: the Train tab's Stop (the STOP file), or SIGTERM to
   any machine's processes - all stop at the same step end and rank 0 saves a checkpoint.

The workspace sits on a shared filesystem (NFS, EFS, Filestore, Lustre) mounted at the same path on every machine:
the normal case. Without one, copy the workspace (base model, dataset) to the same path on each machine and use the
static form of the launchers (torchrun --node-rank R --master-addr HEAD, accelerate --machine_rank R): machine 0
gets rank 0 and so the run folder (with c10d any machine may get rank 0); copy a checkpoint to every machine before
continuing from it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from . import runs
from .errors import BadInput, Conflict, MacTunerError
from .training import TrainConfig, check_resume, dataset_dir, resolve_base_model, run_training, validate
from .training import distributed as tdist
from .workspace import Workspace

HEARTBEAT_S = 60.0


def launched() -> bool:
    """True in a process that torchrun or accelerate launch started as one of several (or under torchrun at all)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) or int(os.environ.get("WORLD_SIZE") or 1) > 1


@dataclass(frozen=True)
class Rank:
    """This process in the launch: its rank, the number of processes, machines, and this machine's name."""

    rank: int
    world: int
    local_world: int
    nnodes: int
    host: str

    @classmethod
    def from_env(cls) -> "Rank":
        world = int(os.environ.get("WORLD_SIZE") or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
        nnodes = int(os.environ.get("GROUP_WORLD_SIZE") or max(1, world // max(1, local)))
        return cls(int(os.environ.get("RANK") or 0), world, local, nnodes, socket.gethostname())


class _Group:
    """torch.distributed for the checks before training: the default group (initialised here unless the launcher's
    process already did) and a gloo group for the small messages."""

    def __init__(self, me: Rank):
        self.me, self.owned, self.group = me, False, None
        if me.world == 1:
            return
        import torch.distributed as dist  # noqa: PLC0415

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(tdist.backend(), timeout=timedelta(minutes=30))
            self.owned = True
        self.group = dist.new_group(backend="gloo")

    def exchange(self, value=None, error: str | None = None) -> list:
        """Every process's `value` (index = rank). When any process has an `error`, all raise it, naming the machine."""
        mine = (self.me.host, value, error)
        if self.me.world == 1:
            out = [mine]
        else:
            out = [None] * self.me.world
            self.dist.all_gather_object(out, mine, group=self.group)
        for rank, (host, _v, err) in enumerate(out):
            if err:
                where = f" (on {host}, rank {rank} of {self.me.world})" if self.me.world > 1 else ""
                raise BadInput(f"{err}{where}")
        return [v for _h, v, _e in out]

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _try(fn, *args):
    """(fn(*args), None), or (None, the message): every process reports before anyone raises (a process that raised
    alone would leave the others waiting at the next exchange)."""
    try:
        return fn(*args), None
    except MacTunerError as e:
        return None, e.message
    except Exception as e:  # noqa: BLE001 - an unreadable file, a bug: said the same way on every process
        return None, f"{type(e).__name__}: {e}"


def run_rank(ws: Workspace, cfg: TrainConfig | str | os.PathLike | None, name: str | None = None,
             checkpoint: str | None = None) -> int:
    """One training process of a launch on several machines (see the module docstring). `cfg`: a TrainConfig or
    its YAML file; None: continue the existing run `name` with the config in its folder. Returns the exit code;
    MacTunerError for a launch that cannot start (the same on every process)."""
    me = Rank.from_env()
    group = _Group(me)
    try:
        cfg, err = _try(_read_config, ws, cfg, name)
        facts, err2 = _try(_facts, ws, cfg) if cfg is not None else (None, None)
        lines = tdist.disagreements(group.exchange({"host": me.host, **(facts or {})}, err or err2))
        if lines:
            raise BadInput("The machines disagree about this run: " + "; ".join(lines) + ". Give every machine the "
                           "same config, workspace and software (a shared filesystem does that).")
        plan, err = _try(_decide, ws, cfg, name, checkpoint) if me.rank == 0 else (None, None)
        name, resume = group.exchange(plan, err)[0]
        missing = None
        if resume and not (Path(resume) / "trainer_state.json").is_file():
            missing = (f"The checkpoint {resume} is not on this machine: keep the workspace on a shared filesystem, "
                       "or copy the checkpoint to the same path on every machine")
        group.exchange(None, missing)
        run_path, err = _try(_claim, ws, cfg, name, resume, me) if me.rank == 0 else (None, None)
        run = runs.RunDir(Path(group.exchange(run_path, err)[0]))
        if me.rank == 0:
            print(f"run {run.name}: {'continuing from ' + Path(resume).name if resume else 'started'} on "
                  f"{me.nnodes} machine(s), {me.world} process(es) ({run.path})", flush=True)
            return _rank0(run)
        return _other(ws, cfg, run, resume)
    finally:
        group.close()


def _read_config(ws: Workspace, cfg, name: str | None) -> TrainConfig:
    if isinstance(cfg, (str, os.PathLike)):
        cfg = TrainConfig.from_yaml(Path(cfg))
    elif cfg is None:
        if not name:
            raise BadInput("Give the run to continue (mactuner resume RUN).")
        cfg = runs.get_run(ws, name).config()
    return validate(cfg, ws)


def _facts(ws: Workspace, cfg: TrainConfig) -> dict:
    """Fingerprints of what this process read: each config setting, the dataset, the base model, the software."""
    out = {f"setting {k}": tdist.digest(v) for k, v in cfg.to_dict().items()}
    out["dataset"] = tdist.digest(tdist.dataset_facts(dataset_dir(ws, cfg.dataset, cfg.dataset_version)))
    out["base model"] = tdist.digest(tdist.folder_facts(resolve_base_model(cfg, ws)))
    out["torch / transformers / peft"] = tdist.digest(tdist.software_facts())
    from . import device as devicemod  # noqa: PLC0415
    from .training import precision  # noqa: PLC0415

    # dtype "auto" is decided per machine (a calibration): every process must train in the same precision
    out["training precision"] = precision.resolve(cfg, devicemod.profile(), ws)[1]
    return out


def _decide(ws: Workspace, cfg: TrainConfig, name: str | None, checkpoint: str | None) -> tuple:
    """Rank 0, reading only: (run name, checkpoint to continue from or None) for a new run or an existing one."""
    if not name or not (ws.runs / name).exists():
        if checkpoint:
            raise BadInput(f"There is no run '{name}' to continue from {checkpoint}.")
        return name, None
    run = runs.get_run(ws, name)
    st = run.status()
    if st.active:
        raise Conflict(f"Run '{name}' is {st.state} already; stop it first, or give another --name.")
    if st.state == "finished" and not checkpoint:
        raise Conflict(f"Run '{name}' has finished; give another --name for a new run (or --checkpoint to redo "
                       "its end from a checkpoint).")
    old = validate(run.config(), ws).to_dict()
    diff = [k for k, v in cfg.to_dict().items() if old.get(k) != v]
    if diff:
        raise Conflict(f"Run '{name}' exists with other settings ({', '.join(diff[:6])}); give another --name, or "
                       "its own config.")
    if not checkpoint and not run.checkpoints():
        raise BadInput(f"Run '{name}' has no complete checkpoint to continue from; give another --name to train "
                       "from the start.")
    ckpt = runs.checkpoint_path(ws, run, checkpoint)
    check_resume(cfg, ckpt)
    return name, str(ckpt)


def _claim(ws: Workspace, cfg: TrainConfig, name: str | None, resume: str | None, me: Rank) -> str:
    """Rank 0: create the run (or take the existing one) as running here, under the queue lock so that no studio
    starts it as well; returns its folder."""
    import psutil  # noqa: PLC0415

    with runs.queue_lock(ws):
        if resume is None:
            run = runs.create_run(ws, cfg, name, nproc=me.local_world)
        else:
            run = runs.get_run(ws, name)
            st = run.status()
            if st.active:
                raise Conflict(f"Run '{run.name}' was started meanwhile ({st.state}).")
            run.stop_flag.unlink(missing_ok=True)
        p = psutil.Process()
        run.update(state="running", reason=None, pid=p.pid, create_time=p.create_time(), supervisor_pid=None,
                   supervisor_create_time=None, exit_code=None, host=me.host, heartbeat=time.time(),
                   nnodes=me.nnodes, world_size=me.world, nproc=me.local_world, resume_from=resume, ended=None)
    return str(run.path)


class _Tee:
    """This process's output also appended to the run's log.txt (the Train tab shows its tail)."""

    def __init__(self, stream, fh):
        self.stream, self.fh = stream, fh

    def write(self, text):
        self.fh.write(text)
        self.fh.flush()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _rank0(run: runs.RunDir) -> int:
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_S):
            try:
                run.update(heartbeat=time.time())
            except OSError as e:  # a shared filesystem's hiccup: the next beat tries again
                print(f"heartbeat not written: {e}", file=sys.stderr, flush=True)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    out, err = sys.stdout, sys.stderr
    with open(run.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} rank 0 of a launch on several machines\n")
        sys.stdout, sys.stderr = _Tee(out, fh), _Tee(err, fh)
        try:
            return runs.run_job(run)  # no queue to advance: the launcher, not a supervisor, runs this one
        finally:
            sys.stdout, sys.stderr = out, err
            done.set()


def _other(ws: Workspace, cfg: TrainConfig, run: runs.RunDir, resume: str | None) -> int:
    """A process of rank > 0: trains beside rank 0 and writes nothing (its output goes to its launcher)."""
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: term.set())
    try:
        result = run_training(cfg, run.path, None, ws=ws, resume=resume, validated=True,
                              should_stop=lambda: term.is_set() or run.stop_flag.exists())
    except MacTunerError as e:
        print(f"failed: {e.message}", file=sys.stderr, flush=True)
        return 1
    print(f"{result.state}: {result.reason or 'done'}", flush=True)
    return 0
