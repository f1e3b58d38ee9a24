"""The MLX training loop, shaped like the torch one (and like mlx-lm's tuner/trainer.py): `setup(...) -> Session`
(tokenizer, our encoded rows, the model with its adapter, the optimizer, the schedule, the objective, the resume
counters), then `train(session, ...)`: per step the objective's forward/backward over the micro-batches, the
divergence checks, gradient clipping, AdamW (mlx.optimizers, with bias correction as torch's), a metrics row,
the eval, the STOP flag and the checkpoints; at the end the PEFT adapter and the verdict.

Same run folder, metrics.jsonl rows, checkpoints (checkpoints/step-N/: the adapter in PEFT format, the optimizer's
moments and step as optimizer.safetensors, trainer_state.json, COMPLETE) and verdict as the torch backend. The data
order is a permutation seeded by (seed, epoch), and dropout is reseeded by (seed, step): a resumed run repeats the
uninterrupted one without any RNG state in the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ... import device as devicemod
from ...errors import BadInput
from ...workspace import Workspace, write_json
from .. import plan
from ..checkpoints import list_checkpoints, replace_dir, write_checkpoint
from ..common import STOP_FLAG, MetricsFn, TrainResult, adapter_info, check_finite, lr_schedule, peak_rss
from ..config import TrainConfig, TrainingFailed
from ..encode import IGNORE, encode_dataset, ensure_chat_template
from . import peft_io
from .model import LossParts, ModelInfo, build_model
from .objectives import PreferenceObjective, SFTObjective, make_batch

OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class Session:
    cfg: TrainConfig
    run_dir: Path
    ws: Workspace
    tokenizer: Any
    pad_id: int
    train_items: list
    val_items: list
    steps_per_epoch: int
    total_steps: int
    model: Any = None
    info: ModelInfo | None = None
    parts: LossParts | None = None
    optimizer: Any = None
    schedule: Callable[[int], float] | None = None
    objective: Any = None
    dtype: str = "float32"
    log: Callable[[str], None] = print
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    best_eval: float | None = None
    t_start: float = field(default_factory=time.time)


def setup(cfg: TrainConfig, run_dir: Path, ws: Workspace, resume=None, log=print, dtype: str | None = None) -> Session:
    """Everything the loop needs, from a validated config; `resume`: a checkpoint folder of this backend."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    t_start = time.time()
    dtype, why = (dtype, "as asked") if dtype else devicemod.mlx_train_dtype(cfg.dtype)
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    note = ensure_chat_template(tok)
    if note:
        log(note)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_enc, val_enc = encode_dataset(cfg, ws, tok)  # our encoded rows, exactly as the torch trainer gets them
    log(train_enc.note("train", cfg.max_length) + (f"; {val_enc.note('validation', cfg.max_length)}"
                                                   if val_enc.rows else "; no validation split"))
    per_epoch = plan.steps_per_epoch(len(train_enc.items), cfg.batch_size, cfg.grad_accum, 1)
    s = Session(cfg, Path(run_dir), ws, tok, pad_id, train_enc.items, val_enc.items, per_epoch,
                plan.total_steps(cfg, per_epoch), dtype=dtype, log=log, t_start=t_start)
    label_ids = {t for _ids, labels in train_enc.examples for t in labels if t != IGNORE}
    s.model, s.info = build_model(cfg, dtype, label_ids, plan.mlx_base_bits(cfg))
    if s.info.token_rows:
        names = ", ".join(tok.convert_ids_to_tokens(s.info.token_rows[:8]))
        log(f"The base model never learned the target token(s) {names} (their embeddings match its unused "
            "tokens'): their embedding rows are trained too, so the model learns to end its turns.")
    s.parts = LossParts(s.model)
    _check_loss(s)
    s.objective = SFTObjective(s) if cfg.objective == "sft" else PreferenceObjective(s)
    s.schedule = lr_schedule(cfg.scheduler, cfg.warmup_steps, s.total_steps)
    s.optimizer = optim.AdamW(learning_rate=cfg.learning_rate, betas=[0.9, 0.999], eps=1e-8,
                              weight_decay=cfg.weight_decay, bias_correction=True)  # torch.optim.AdamW's update
    s.optimizer.init(s.model.trainable_parameters())
    if resume is not None:
        load_checkpoint(s, Path(resume))
    if s.step >= s.total_steps:
        raise BadInput(f"This checkpoint is already at step {s.step} of {s.total_steps}: nothing left to train.")
    n_trainable = sum(v.size for _k, v in tree_flatten(s.model.trainable_parameters()))
    quant = (f", base quantized to {s.info.bits} bits (group {s.info.group_size}, {s.info.quantized_layers} layers)"
             if s.info.bits else "")
    where = "the Apple GPU" if devicemod.apple_silicon() else "the CPU"
    log(f"Training {cfg.method} r={cfg.rank} with MLX ({n_trainable:,} trainable parameters) on {len(s.train_items)} "
        f"{'rows' if cfg.objective == 'sft' else 'pairs'}, {s.total_steps} steps, batch {cfg.batch_size}x"
        f"{cfg.grad_accum}, {dtype} ({why}) on {where}{quant}.")
    if cfg.objective != "sft":
        log(s.objective.describe())
    return s


def _check_loss(s: Session) -> None:
    """Our loss applies the output layer at label positions only; check it once against the whole model's logits
    on a short sample and fall back to full logits for an unusual head (as the torch trainer does)."""
    if s.parts.full_logits:
        return
    items = s.train_items if s.cfg.objective == "sft" else [p[0] for p in s.train_items]
    probe = next((tuple(x[:64] for x in it) for it in items if any(t != IGNORE for t in it[1][1:64])), items[0])
    b = make_batch([probe], s.pad_id)
    s.model.eval()
    mine = float(s.parts.token_logps(b.ids, b.positions, b.targets).sum())
    s.parts.full_logits = True
    ref = float(s.parts.token_logps(b.ids, b.positions, b.targets).sum())
    s.parts.full_logits = False
    s.model.train()
    if math.isfinite(ref) and not math.isclose(mine, ref, rel_tol=2e-3, abs_tol=2e-3):
        s.parts.full_logits = True
        s.log(f"Note: this model's output layer needs the full-logits loss ({mine:.4f} vs {ref:.4f}); slower.")


def micro_batches(s: Session, step: int) -> list[list]:
    """The items of optimizer step `step` (0-based): the epoch's seeded permutation, cut into batch_size pieces,
    grad_accum of them per step."""
    epoch, k = divmod(step, s.steps_per_epoch)
    order = np.random.default_rng([s.cfg.seed, epoch]).permutation(len(s.train_items)).tolist()
    chunks = [order[i:i + s.cfg.batch_size] for i in range(0, len(order), s.cfg.batch_size)]
    return [[s.train_items[i] for i in c] for c in chunks[k * s.cfg.grad_accum:(k + 1) * s.cfg.grad_accum]]


def trainer_state(s: Session, last_loss) -> dict:
    return {"step": s.step, "total_steps": s.total_steps, "epoch": s.step / s.steps_per_epoch,
            "elapsed": s.elapsed_before + time.time() - s.t_start, "tokens": s.tokens_seen, "loss": last_loss,
            "best_eval_loss": s.best_eval, "config": s.cfg.to_dict(), "world_size": 1, "backend": "mlx",
            "steps_per_epoch": s.steps_per_epoch, "time": time.time()}


def save_checkpoint(s: Session, last_loss) -> Path:
    def write(tmp: Path) -> None:
        peft_io.save_adapter(tmp, s.model, s.cfg, s.info)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(s.optimizer.state)))

    return write_checkpoint(s.run_dir, trainer_state(s, last_loss), write, s.cfg.keep_last)


def load_checkpoint(s: Session, ckpt: Path) -> None:
    """The adapter, the optimizer's moments and step, and the counters of an MLX checkpoint."""
    if not (ckpt / OPTIMIZER_FILE).is_file():
        raise BadInput(f"{ckpt.name} was not written by the MLX trainer (no {OPTIMIZER_FILE}): resume it with backend "
                       "torch.")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    peft_io.load_adapter(ckpt, s.model)
    s.optimizer.state = tree_unflatten(list(mx.load(str(ckpt / OPTIMIZER_FILE)).items()))
    s.step, s.tokens_seen = int(state["step"]), int(state.get("tokens", 0))
    s.elapsed_before, s.best_eval = float(state.get("elapsed", 0.0)), state.get("best_eval_loss")
    s.log(f"Resumed from {ckpt.name} (step {s.step} of {s.total_steps}).")


def save_adapter(s: Session, last_loss) -> Path:
    """runs/<run>/adapter: the PEFT adapter, the tokenizer as trained (with its chat template) and mactuner.json."""
    target = s.run_dir / "adapter"

    def write(tmp: Path) -> None:
        peft_io.save_adapter(tmp, s.model, s.cfg, s.info)
        s.tokenizer.save_pretrained(tmp)
        if not (tmp / "chat_template.jinja").exists() and s.tokenizer.chat_template:
            (tmp / "chat_template.jinja").write_text(s.tokenizer.chat_template)
        info = adapter_info(s.cfg, s.step, last_loss, s.best_eval)
        info.update(backend="mlx", base_bits=s.info.bits, dtype=s.dtype)
        write_json(tmp / "mactuner.json", info)

    replace_dir(target, write)
    return target


def _clip(grads, max_norm: float):
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _k, g in tree_flatten(grads)))
    return grads, norm


def train(s: Session, on_metrics: MetricsFn | None, should_stop: Callable[[], bool]) -> TrainResult:
    """The loop: one optimizer step per iteration until total_steps, a stop request or a divergence."""
    cfg = s.cfg
    last_loss, last_ckpt, state_out, reason, t_train = None, None, "finished", "", time.time()
    while s.step < s.total_steps:
        t0 = time.time()
        mx.random.seed(cfg.seed * 1_000_003 + s.step)  # dropout of this step: the same after a resume
        out = s.objective.step(s, micro_batches(s, s.step))
        check_finite(out.loss, None, s.step + 1, cfg.learning_rate)
        grads, norm = _clip(out.grads, cfg.max_grad_norm)
        grad_norm = float(norm)
        check_finite(out.loss, grad_norm, s.step + 1, cfg.learning_rate)
        lr = cfg.learning_rate * s.schedule(s.step)
        s.optimizer.learning_rate = lr
        s.optimizer.update(s.model, grads)
        mx.eval(s.model.trainable_parameters(), s.optimizer.state)
        s.step, s.tokens_seen, last_loss = s.step + 1, s.tokens_seen + out.tokens, out.loss
        dt = time.time() - t0
        row = {"step": s.step, "total_steps": s.total_steps, "epoch": round(s.step / s.steps_per_epoch, 4),
               "loss": out.loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": out.tokens,
               "tokens_per_s": out.tokens / dt if dt > 0 else 0.0, "peak_memory": peak_rss(),
               "device_peak_memory": int(mx.get_peak_memory()),
               "elapsed": round(s.elapsed_before + time.time() - s.t_start, 3), "step_time": dt, **out.metrics}
        if (cfg.eval_every and s.step % cfg.eval_every == 0) or s.step == s.total_steps:
            ev = s.objective.evaluate(s, row)
            if ev is not None:
                row["eval_loss"] = ev
                s.best_eval = ev if s.best_eval is None else min(s.best_eval, ev)
        if on_metrics:
            on_metrics(row)
        if s.step < s.total_steps and should_stop():
            last_ckpt = save_checkpoint(s, out.loss)
            state_out = "stopped"
            reason = f"stopped at step {s.step} of {s.total_steps}; resumable from {last_ckpt.name}"
            break
        if cfg.save_every and s.step % cfg.save_every == 0 and s.step < s.total_steps:
            last_ckpt = save_checkpoint(s, out.loss)
    adapter = None
    if state_out == "finished":
        adapter = save_adapter(s, last_loss)
        reason = f"finished {s.step} steps in {time.time() - t_train:.0f} s"
        if s.val_items:
            s.objective.verdict(s)
    return TrainResult(state=state_out, step=s.step, total_steps=s.total_steps, reason=reason,
                       adapter=str(adapter) if adapter else None, checkpoint=str(last_ckpt) if last_ckpt else None,
                       final_loss=last_loss, best_eval_loss=s.best_eval,
                       elapsed=s.elapsed_before + time.time() - s.t_start)


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
        session = setup(cfg, run_dir, ws, resume, log)
        return train(session, on_metrics, should_stop)
    except (RuntimeError, MemoryError) as e:  # MLX's allocator: "[metal::malloc] ... out of memory" and the like
        if isinstance(e, MemoryError) or "memory" in str(e).lower() or "malloc" in str(e).lower():
            raise TrainingFailed(plan.oom_message(cfg)) from e
        raise


__all__ = ["Session", "list_checkpoints", "micro_batches", "run_training", "setup", "train"]
