"""Everything the MLX loop needs, as the torch trainer's session.py has it: `setup(...) -> Session` (tokenizer, our
encoded rows, the model with its adapter, AdamW, the schedule, the objective, the resume counters) and the Session's
steps, named as the torch Session names them: micro_batches(), clip_gradients(), optimizer_step(), device_memory(),
trainer_state(), save_checkpoint(), save_adapter(), elapsed().

MLX computes gradients as values: the objective's step leaves them in `session.grads`, where torch leaves them on
the parameters. AdamW is mlx.optimizers.AdamW with bias correction (torch.optim.AdamW's update); the learning rate
is set per step from common.lr_schedule. The data order is a permutation seeded by (seed, epoch) and dropout is
reseeded by (seed, step), so a resumed run repeats the uninterrupted one with no RNG state in the checkpoint:
checkpoints/step-N/ holds the PEFT adapter, the optimizer's moments and step (optimizer.safetensors),
trainer_state.json and COMPLETE.
"""

from __future__ import annotations

import json
import math
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
from ..checkpoints import replace_dir, write_checkpoint
from ..common import adapter_info, lr_schedule
from ..config import TrainConfig
from ..encode import IGNORE, encode_dataset, ensure_chat_template
from . import peft_io
from .model import LossParts, ModelInfo, build_model
from .objectives import PreferenceObjective, SFTObjective, make_batch

OPTIMIZER_FILE = "optimizer.safetensors"


class OneProcess:
    """The torch Session's `procs` for a trainer that runs in one process (MLX has no DDP here)."""

    main, world, rank = True, 1, 0

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass


@dataclass
class Session:
    cfg: TrainConfig
    run_dir: Path
    ws: Workspace
    log: Callable[[str], None]
    tokenizer: Any
    pad_id: int
    train_items: list  # encoded examples or (chosen, rejected) pairs
    val_items: list
    steps_per_epoch: int
    total_steps: int
    dtype: str = "float32"
    procs: OneProcess = field(default_factory=OneProcess)
    model: Any = None
    info: ModelInfo | None = None
    parts: LossParts | None = None
    objective: Any = None  # objectives.SFTObjective | objectives.PreferenceObjective
    optimizer: Any = None
    schedule: Callable[[int], float] | None = None
    grads: dict | None = None  # the objective's step puts the step's mean gradients here
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    best_eval: float | None = None
    started: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def seed_step(self) -> None:
        """Dropout of the coming step from (seed, step): the same masks after a resume."""
        mx.random.seed(self.cfg.seed * 1_000_003 + self.step)

    def micro_batches(self) -> list[list]:
        """The micro-batches (lists of training items) of the next optimizer step: the epoch's seeded permutation,
        cut into batch_size pieces, grad_accum of them per step."""
        epoch, k = divmod(self.step, self.steps_per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_items)).tolist()
        size, accum = self.cfg.batch_size, self.cfg.grad_accum
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        return [[self.train_items[i] for i in c] for c in chunks[k * accum:(k + 1) * accum]]

    def clip_gradients(self) -> float:
        """Clip `grads` to cfg.max_grad_norm (0: no clipping); returns their norm before clipping."""
        if self.cfg.max_grad_norm > 0:
            self.grads, norm = optim.clip_grad_norm(self.grads, self.cfg.max_grad_norm)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _k, g in tree_flatten(self.grads)))
        return float(norm)

    def optimizer_step(self) -> float:
        """Apply the gradients at this step's learning rate, count the step; returns the learning rate used."""
        lr = self.cfg.learning_rate * self.schedule(self.step)
        self.optimizer.learning_rate = lr
        self.optimizer.update(self.model, self.grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.grads, self.step = None, self.step + 1
        self.seed_step()
        return lr

    def device_memory(self) -> dict:
        """MLX's allocator peak (on a Mac its Metal buffers live outside RSS)."""
        return {"device_peak_memory": int(mx.get_peak_memory())}

    def trainer_state(self, last_loss) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch,
                "elapsed": self.elapsed(), "tokens": self.tokens_seen, "loss": last_loss,
                "best_eval_loss": self.best_eval, "config": self.cfg.to_dict(), "world_size": 1, "backend": "mlx",
                "steps_per_epoch": self.steps_per_epoch, "time": time.time()}

    def save_checkpoint(self, last_loss) -> Path:
        def write(tmp: Path) -> None:
            peft_io.save_adapter(tmp, self.model, self.cfg, self.info)
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))

        return write_checkpoint(self.run_dir, self.trainer_state(last_loss), write, self.cfg.keep_last)

    def load_checkpoint(self, ckpt: Path) -> None:
        """The adapter, the optimizer's moments and step, and the counters of an MLX checkpoint."""
        if not (ckpt / OPTIMIZER_FILE).is_file():
            raise BadInput(f"{ckpt.name} was not written by the MLX trainer (no {OPTIMIZER_FILE}): resume it with "
                           "backend torch.")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        peft_io.load_adapter(ckpt, self.model)
        self.optimizer.state = tree_unflatten(list(mx.load(str(ckpt / OPTIMIZER_FILE)).items()))
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens", 0))
        self.elapsed_before, self.best_eval = float(state.get("elapsed", 0.0)), state.get("best_eval_loss")
        self.log(f"Resumed from {ckpt.name} (step {self.step} of {self.total_steps}).")

    def save_adapter(self, last_loss) -> Path:
        """runs/<run>/adapter: the PEFT adapter, the tokenizer as trained (with its chat template), mactuner.json."""
        target = self.run_dir / "adapter"

        def write(tmp: Path) -> None:
            peft_io.save_adapter(tmp, self.model, self.cfg, self.info)
            self.tokenizer.save_pretrained(tmp)
            if not (tmp / "chat_template.jinja").exists() and self.tokenizer.chat_template:
                (tmp / "chat_template.jinja").write_text(self.tokenizer.chat_template)
            info = adapter_info(self.cfg, self.step, last_loss, self.best_eval)
            info.update(backend="mlx", base_bits=self.info.bits, dtype=self.dtype)
            write_json(tmp / "mactuner.json", info)

        replace_dir(target, write)
        return target


def setup(cfg: TrainConfig, run_dir: Path, ws: Workspace, resume=None, log=print) -> Session:
    """The Session of a validated config; `resume`: a checkpoint folder of this backend."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    started = time.time()
    dtype, why = devicemod.mlx_train_dtype(cfg.dtype)
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    note = ensure_chat_template(tok)
    if note:
        log(note)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_enc, val_enc = encode_dataset(cfg, ws, tok)  # our encoded rows, exactly as the torch trainer gets them
    log(train_enc.note("train", cfg.max_length) + (f"; {val_enc.note('validation', cfg.max_length)}"
                                                   if val_enc.rows else "; no validation split"))
    per_epoch = plan.steps_per_epoch(len(train_enc.items), cfg.batch_size, cfg.grad_accum, 1)
    s = Session(cfg, Path(run_dir), ws, log, tok, pad_id, train_enc.items, val_enc.items, per_epoch,
                plan.total_steps(cfg, per_epoch), dtype=dtype, started=started)
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
        s.load_checkpoint(Path(resume))
    if s.step >= s.total_steps:
        raise BadInput(f"This checkpoint is already at step {s.step} of {s.total_steps}: nothing left to train.")
    s.seed_step()
    _describe(s, why)
    return s


def _describe(s: Session, why: str) -> None:
    cfg = s.cfg
    n_trainable = sum(v.size for _k, v in tree_flatten(s.model.trainable_parameters()))
    quant = (f", base quantized to {s.info.bits} bits (group {s.info.group_size}, {s.info.quantized_layers} layers)"
             if s.info.bits else "")
    where = "the Apple GPU" if devicemod.apple_silicon() else "the CPU"
    s.log(f"Training {cfg.method} r={cfg.rank} with MLX ({n_trainable:,} trainable parameters) on "
          f"{len(s.train_items)} {'rows' if cfg.objective == 'sft' else 'pairs'}, {s.total_steps} steps, batch "
          f"{cfg.batch_size}x{cfg.grad_accum}, {s.dtype} ({why}) on {where}{quant}.")
    if cfg.objective != "sft":
        s.log(s.objective.describe())


def _check_loss(s: Session) -> None:
    """Our loss applies the output layer at label positions only; check it once against the whole model's logits
    on a short sample and fall back to full logits for an unusual head (as the torch trainer does)."""
    if s.parts.full_logits:
        return
    items = s.train_items if s.cfg.objective == "sft" else [p[0] for p in s.train_items]
    item = next((it for it in items if any(t != IGNORE for t in it[1][1:64])), items[0])
    first = next((j for j, t in enumerate(item[1]) if j and t != IGNORE), 1)
    # up to a few labels past the prompt: the full-logits side costs the whole vocabulary at every position (Gemma:
    # 262k wide), which MLX's reference-BLAS CPU build computes at ~2 GFLOP/s
    b = make_batch([tuple(x[:min(64, first + 8)] for x in item)], s.pad_id)
    s.model.eval()
    mine = float(s.parts.token_logps(b.ids, b.positions, b.targets).sum())
    s.parts.full_logits = True
    ref = float(s.parts.token_logps(b.ids, b.positions, b.targets).sum())
    s.parts.full_logits = False
    s.model.train()
    if math.isfinite(ref) and not math.isclose(mine, ref, rel_tol=2e-3, abs_tol=2e-3):
        s.parts.full_logits = True
        s.log(f"Note: this model's output layer needs the full-logits loss ({mine:.4f} vs {ref:.4f}); slower.")
