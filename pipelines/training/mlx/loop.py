"""The MLX training loop: `train(session, on_metrics, should_stop)` is the torch trainer's `fit` (training/loop.py)
line for line, on the MLX Session (session.py): per optimizer step the objective's forward/backward over the
micro-batches, the divergence checks, gradient clipping, AdamW, a metrics row (the same keys, plus MLX's allocator
peak), the eval, the STOP flag and the checkpoints; at the end the PEFT adapter and the verdict. Like mlx-lm's
tuner/trainer.py, minus its compiled step: our batches vary in length, and a compiled step would be traced again
for each.

    run_training(cfg, run_dir, on_metrics, ws=..., resume=..., should_stop=..., log=...)
        training.run_training hands a validated config whose backend is mlx here
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ...errors import BadInput
from ...workspace import Workspace
from .. import plan
from ..common import STOP_FLAG, MetricsFn, TrainResult, add_eval_loss, check_finite, metrics_row, train_result
from ..config import TrainConfig, TrainingFailed
from .session import Session, setup


def train(s: Session, on_metrics: MetricsFn | None, should_stop: Callable[[], bool]) -> TrainResult:
    """Train from `s.step` to `s.total_steps`, or until `should_stop()` at a step end: then a checkpoint is saved
    and the result is "stopped"."""
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
        if on_metrics:
            on_metrics(row)
        if s.step < s.total_steps and should_stop():
            last_ckpt = s.save_checkpoint(last_loss)
            return train_result(s, "stopped", f"stopped at step {s.step} of {s.total_steps}; resumable from "
                           f"{last_ckpt.name}", last_loss, last_ckpt)
        if s.cfg.save_every and s.step % s.cfg.save_every == 0 and s.step < s.total_steps:
            last_ckpt = s.save_checkpoint(last_loss)
    adapter = s.save_adapter(last_loss)
    reason = f"finished {s.step} steps in {time.time() - t_train:.0f} s"
    if s.val_items:  # did it help? base vs tuned on the validation split; never fails the run
        s.objective.verdict(s)
    return train_result(s, "finished", reason, last_loss, last_ckpt, adapter)





def run_training(cfg: TrainConfig, run_dir: str | os.PathLike, on_metrics: MetricsFn | None = None, *,
                 ws: Workspace, resume=None, should_stop: Callable[[], bool] | None = None,
                 log: Callable[[str], None] | None = None) -> TrainResult:
    """training.run_training for a validated config whose backend is mlx (it dispatches here)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun on several processes or machines
        from .support import ONE_PROCESS  # noqa: PLC0415

        raise BadInput(ONE_PROCESS)
    run_dir = Path(run_dir)
    log = log or (lambda msg: print(msg, flush=True))
    should_stop = should_stop or (run_dir / STOP_FLAG).exists
    try:
        return train(setup(cfg, run_dir, ws, resume, log), on_metrics, should_stop)
    except (RuntimeError, MemoryError) as e:  # MLX's allocator: "[metal::malloc] ... out of memory" and the like
        if isinstance(e, MemoryError) or "memory" in str(e).lower() or "malloc" in str(e).lower():
            raise TrainingFailed(plan.oom_message(cfg)) from e
        raise
