"""What every training backend shares (torch in loop.py; MLX beside it): the stop flag's name, the metrics callback
type, the learning-rate schedule, the divergence checks, the result of a run, the adapter's mactuner.json, the
preference metrics' names and verdict, the peak-memory reading, and the shape of an objective (`Objective`:
describe / step / evaluate, a step returning a `StepOutput`). Nothing here imports torch or mlx.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import TrainConfig, TrainingFailed

STOP_FLAG = "STOP"  # a file of this name in the run folder asks the trainer to stop at the next step end


MetricsFn = Callable[[dict], None]


def lr_schedule(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """The factor applied to the peak learning rate at optimizer step `step` (0-based): linear warm-up, then
    linear / cosine decay to 0 or constant."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(1.0, max(0.0, progress))
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def check_finite(loss: float, grad_norm: float | None, step: int, learning_rate: float) -> None:
    """TrainingFailed with what to do when the loss or the gradient norm of step `step` (1-based) is NaN or inf."""
    if not math.isfinite(loss):
        raise TrainingFailed(
            f"The loss became {loss} at step {step}: training diverged. Lower the learning rate (it is "
            f"{learning_rate:g}), check the data, or resume from an earlier checkpoint.")
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise TrainingFailed(f"The gradient became {grad_norm} at step {step}: training diverged. Lower the "
                             f"learning rate (it is {learning_rate:g}).")


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def adapter_info(cfg: TrainConfig, steps: int, final_loss, best_eval_loss) -> dict:
    """The adapter folder's mactuner.json: where it came from, read by export, chat and the Hub card."""
    return {"base_model": cfg.base_model, "dataset": cfg.dataset, "dataset_version": cfg.dataset_version,
            "method": cfg.method, "steps": steps, "final_loss": final_loss, "best_eval_loss": best_eval_loss,
            "config": cfg.to_dict()}


def preference_metrics(kind: str, sums: list[float], pairs: float, nll: float, prefix: str) -> dict:
    """A DPO / ORPO metrics row's part, named as TRL logs them: `sums` = [rewards chosen, rewards rejected, margins,
    correct pairs, log odds] summed over `pairs` pairs; ORPO adds nll_loss and log_odds_chosen."""
    p = max(1.0, pairs)
    out = {f"{prefix}rewards/chosen": sums[0] / p, f"{prefix}rewards/rejected": sums[1] / p,
           f"{prefix}rewards/margins": sums[2] / p, f"{prefix}rewards/accuracies": sums[3] / p}
    if kind == "orpo":
        out[f"{prefix}nll_loss"] = nll
        out[f"{prefix}log_odds_chosen"] = sums[4] / p
    return out


def preference_verdict(kind: str, base: list[float], tuned: list[float], t0: float) -> dict:
    """The verdict of a preference run from each validation pair's log-prob margin (chosen minus rejected; summed
    for DPO, per answer token for ORPO) under the base and the tuned model; `t0` when the comparison began."""
    figs = {name: {"accuracy": sum(m > 0 for m in ms) / len(ms), "margin": sum(ms) / len(ms)}
            for name, ms in (("base", base), ("tuned", tuned))}
    b, t = figs["base"], figs["tuned"]
    better = t["accuracy"] > b["accuracy"] or (t["accuracy"] == b["accuracy"] and t["margin"] > b["margin"] + 1e-3)
    unit = "per answer token" if kind == "orpo" else "summed over the answer"
    nums = (f"preference accuracy {b['accuracy']:.0%} → {t['accuracy']:.0%}, mean log-prob margin "
            f"{b['margin']:+.3f} → {t['margin']:+.3f} (chosen minus rejected, {unit})")
    line = (f"the tuned model prefers the chosen answers more than the base: {nums}" if better
            else f"the tuned model prefers the chosen answers no more than the base: {nums}")
    return {"kind": "preference", "objective": kind, "verdict": line, "better": better,
            "examples": len(base), **figs, "seconds": round(time.time() - t0, 2), "time": time.time()}


def base_note(cfg: dict) -> str | None:
    """How the base was held while training, for model cards (a run's config as a dict): MLX, and a base quantized
    while training (the adapter then applies to, and merges into, the full-precision base). None for the plain
    torch path."""
    bits = cfg.get("base_bits") or (4 if cfg.get("method") == "qlora" else 0)
    if cfg.get("backend") == "mlx":
        return "Trained with Apple's MLX (mlx-lm)" + (
            f" on a {bits}-bit MLX-quantized copy of the base; the adapter applies to the full-precision base, which "
            "is what merged exports hold." if bits else ".")
    if bits:
        return ("Trained on a 4-bit (bitsandbytes NF4) copy of the base; the adapter applies to the full-precision "
                "base, which is what merged exports hold.")
    return None


@dataclass
class TrainResult:
    state: str  # "finished" | "stopped"
    step: int
    total_steps: int
    reason: str = ""
    adapter: str | None = None
    checkpoint: str | None = None
    final_loss: float | None = None
    best_eval_loss: float | None = None
    elapsed: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepOutput:
    """What an objective's step reports: the step's loss (a mean over the whole global batch), the input tokens it
    read (all processes), and extra metric columns (the preference rewards)."""

    loss: float
    tokens: float
    metrics: dict = field(default_factory=dict)


class Objective(Protocol):
    """What the adapter learns (SFT replies, DPO / ORPO preferences), as the loop sees it. `session` is the
    backend's Session: its model, data, processes and counters."""

    def describe(self) -> str:
        """One line for the log: what is optimised."""

    def step(self, session: Any, micro_batches: list[list]) -> StepOutput:
        """Forward and backward over one optimizer step's micro-batches (lists of training items); the gradients
        are left in place for the optimizer."""

    def evaluate(self, session: Any, row: dict) -> float | None:
        """The validation loss (None without a validation split); extra eval columns go into the metrics `row`."""


# --- what both backends' loops (loop.py, mlx/loop.py) write per step and at the end; `s` is the backend's Session


def metrics_row(s: Any, out: StepOutput, lr: float, grad_norm: float, seconds: float) -> dict:
    """One metrics.jsonl row (the keys the monitor, the CLI and the benches read)."""
    return {"step": s.step, "total_steps": s.total_steps, "epoch": round(s.step / s.steps_per_epoch, 4),
            "loss": out.loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": int(out.tokens),
            "tokens_per_s": out.tokens / seconds if seconds > 0 else 0.0, "peak_memory": peak_rss(),
            "elapsed": round(s.elapsed(), 3), "step_time": seconds, **out.metrics, **s.device_memory()}


def add_eval_loss(s: Any, row: dict) -> None:
    """The validation loss into `row` (and the best one so far into the session)."""
    loss = s.objective.evaluate(s, row)
    if loss is not None:
        row["eval_loss"] = loss
        if s.best_eval is None or loss < s.best_eval:
            s.best_eval = loss


def train_result(s: Any, state: str, reason: str, last_loss, checkpoint: Path | None,
                 adapter: Path | None = None) -> TrainResult:
    return TrainResult(state=state, step=s.step, total_steps=s.total_steps, reason=reason,
                       adapter=str(adapter) if adapter else None, checkpoint=str(checkpoint) if checkpoint else None,
                       final_loss=last_loss, best_eval_loss=s.best_eval, elapsed=s.elapsed())
