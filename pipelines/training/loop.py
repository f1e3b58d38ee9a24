"""The torch training loop: a plain PyTorch + PEFT loop that is fast on CPUs, single process or DDP under torchrun.

    run_training(cfg, run_dir, on_metrics)   validate, set up (session.py), `fit`, map an out-of-memory error
    fit(session, on_metrics, should_stop)    the loop: one objective step per optimizer step, metrics, eval,
                                             stop, checkpoints, then the final adapter and the verdict

Why a loop of our own and not TRL's SFTTrainer: SFTTrainer defaults to bf16 autocast, 15-20x slower on CPUs without
native bf16, and computes logits for every position (see loss.py for what is done instead). Right-padded batches
run without an attention mask (the causal mask alone keeps real tokens from seeing the pads), so SDPA takes its
causal fast path. Metrics go to the `on_metrics` callback as plain dicts; stopping: the file STOP in the run folder
is checked at each step end, then a checkpoint is saved and the result is "stopped". What is learned (SFT, DPO,
ORPO) is the objective's (objectives.py); the rest - schedule, checkpoints, stop, resume, DDP - is the same. Only
torch-free code runs at import time: the studio imports this package.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import MacTunerError
from ..workspace import Workspace
from . import plan
from .common import STOP_FLAG, MetricsFn, TrainResult, add_eval_loss, check_finite, metrics_row, train_result
from .config import TrainConfig, TrainingFailed, validate

if TYPE_CHECKING:
    from .session import Session


def run_training(cfg: TrainConfig, run_dir: str | os.PathLike, on_metrics: MetricsFn | None = None, *,
                 ws: Workspace | None = None, resume: str | os.PathLike | None = None,
                 should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] | None = None,
                 validated: bool = False) -> TrainResult:
    """Fine-tune `cfg.base_model` on the dataset; write checkpoints and the final adapter under `run_dir`.

    on_metrics(row) gets one plain dict per optimizer step (rank 0 only): step, total_steps, epoch, loss,
    learning_rate, grad_norm, tokens, tokens_per_s, peak_memory (RSS bytes), elapsed (s), and eval_loss on the
    steps where the validation loss was computed. `should_stop()` (default: the STOP file exists in run_dir) is
    asked at each step end: a checkpoint is written and the result is "stopped". `resume`: a checkpoint folder.
    Raises BadInput for unusable settings/data (before training) and TrainingFailed for NaN loss, OOM, disk errors.
    """
    from .. import device as devicemod  # noqa: PLC0415

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ws = ws or _workspace_for(run_dir)
    log = log or (lambda msg: print(msg, flush=True))
    if not validated:
        cfg = validate(cfg, ws, resume)
    if devicemod.choose_backend(cfg.backend).name == "mlx":  # Apple's MLX trains it (pipelines/training/mlx/)
        from .mlx import run_training as run_mlx  # noqa: PLC0415

        return run_mlx(cfg, run_dir, on_metrics, ws=ws, resume=resume, should_stop=should_stop, log=log)
    from . import session as torch_session  # noqa: PLC0415 - torch is imported when training starts, not before

    should_stop = should_stop or (run_dir / STOP_FLAG).exists
    procs = torch_session.Processes()
    try:
        return fit(torch_session.setup(cfg, run_dir, ws, resume, log, procs), on_metrics, should_stop)
    except MacTunerError:
        raise
    except BaseException as e:
        if torch_session.is_oom(e):
            raise TrainingFailed(plan.oom_message(cfg)) from e
        raise
    finally:
        procs.close()


def _workspace_for(run_dir: Path) -> Workspace:
    if run_dir.resolve().parent.name == "runs":
        return Workspace(run_dir.resolve().parent.parent)
    return Workspace.open()


def fit(s: Session, on_metrics: MetricsFn | None, should_stop: Callable[[], bool]) -> TrainResult:
    """Train from `s.step` to `s.total_steps`, or until `should_stop()` (any process) at a step end: then a
    checkpoint is saved and the result is "stopped"."""
    last_loss, last_ckpt, t_train = None, None, time.time()
    while s.step < s.total_steps:
        t0 = time.time()
        out = s.objective.step(s, s.micro_batches())
        check_finite(out.loss, None, s.step + 1, s.cfg.learning_rate)
        grad_norm = s.clip_gradients()
        check_finite(out.loss, grad_norm, s.step + 1, s.cfg.learning_rate)
        lr = s.optimizer_step()
        s.tokens_seen += int(out.tokens)
        last_loss = out.loss
        row = metrics_row(s, out, lr, grad_norm, time.time() - t0)
        if (s.cfg.eval_every and s.step % s.cfg.eval_every == 0) or s.step == s.total_steps:
            add_eval_loss(s, row)
        if s.procs.main and on_metrics:
            on_metrics(row)
        if s.step < s.total_steps and s.procs.any(bool(should_stop())):
            last_ckpt = s.save_checkpoint(last_loss)
            where = last_ckpt.name if last_ckpt else "its checkpoint"
            return train_result(s, "stopped", f"stopped at step {s.step} of {s.total_steps}; resumable from {where}",
                           last_loss, last_ckpt)
        if s.cfg.save_every and s.step % s.cfg.save_every == 0 and s.step < s.total_steps:
            last_ckpt = s.save_checkpoint(last_loss)
    adapter = s.save_adapter(last_loss)
    reason = f"finished {s.step} steps in {time.time() - t_train:.0f} s"
    s.procs.barrier()
    if adapter is not None and s.val_items:  # did it help? base vs tuned on the validation split; never fails the run
        s.objective.verdict(s)
    return train_result(s, "finished", reason, last_loss, last_ckpt, adapter)



