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
from ..common import STOP_FLAG, MetricsFn, TrainResult, check_finite, peak_rss
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
        row = _metrics_row(s, out, lr, grad_norm, time.time() - t0)
        if (s.cfg.eval_every and s.step % s.cfg.eval_every == 0) or s.step == s.total_steps:
            _evaluate(s, row)
        if on_metrics:
            on_metrics(row)
        if s.step < s.total_steps and should_stop():
            last_ckpt = s.save_checkpoint(last_loss)
            return _result(s, "stopped", f"stopped at step {s.step} of {s.total_steps}; resumable from "
                           f"{last_ckpt.name}", last_loss, last_ckpt)
        if s.cfg.save_every and s.step % s.cfg.save_every == 0 and s.step < s.total_steps:
            last_ckpt = s.save_checkpoint(last_loss)
    adapter = s.save_adapter(last_loss)
    reason = f"finished {s.step} steps in {time.time() - t_train:.0f} s"
    if s.val_items:  # did it help? base vs tuned on the validation split; never fails the run
        s.objective.verdict(s)
    return _result(s, "finished", reason, last_loss, last_ckpt, adapter)


def _metrics_row(s: Session, out, lr: float, grad_norm: float, seconds: float) -> dict:
    """One metrics.jsonl row, with the torch trainer's keys."""
    return {"step": s.step, "total_steps": s.total_steps, "epoch": round(s.step / s.steps_per_epoch, 4),
            "loss": out.loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": int(out.tokens),
            "tokens_per_s": out.tokens / seconds if seconds > 0 else 0.0, "peak_memory": peak_rss(),
            "elapsed": round(s.elapsed(), 3), "step_time": seconds, **out.metrics, **s.device_memory()}


def _evaluate(s: Session, row: dict) -> None:
    loss = s.objective.evaluate(s, row)
    if loss is not None:
        row["eval_loss"] = loss
        if s.best_eval is None or loss < s.best_eval:
            s.best_eval = loss


def _result(s: Session, state: str, reason: str, last_loss, checkpoint: Path | None,
            adapter: Path | None = None) -> TrainResult:
    return TrainResult(state=state, step=s.step, total_steps=s.total_steps, reason=reason,
                       adapter=str(adapter) if adapter else None, checkpoint=str(checkpoint) if checkpoint else None,
                       final_loss=last_loss, best_eval_loss=s.best_eval, elapsed=s.elapsed())


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
