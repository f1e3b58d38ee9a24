"""The torch trainer's setup: `setup(...) -> Session`, everything the loop (loop.py) needs, built once and passed
explicitly - the processes (one, or DDP under torchrun), the tokenizer and the encoded data, the model with its
fresh adapter, the loss and the objective (objectives.py), optimizer and schedule, and the counters a checkpoint
restores (step, tokens_seen, elapsed_before, best_eval). The MLX backend mirrors it in training/mlx/.

    build_model(cfg, dtype, device)  -> (PEFT model, trained token rows)
    s = setup(cfg, run_dir, ws, resume, log, Processes())
    s.micro_batches()  s.clip_gradients()  s.optimizer_step()  s.save_checkpoint(loss)  s.save_adapter(loss)

Imports torch: only the trainer process imports this module (loop.py does so when training starts).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from peft import LoraConfig, get_peft_model
from torch.utils.data import DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import device as devicemod
from ..errors import BadInput
from ..workspace import Workspace
from . import checkpoints, distributed, fused_lora, fused_norm, plan, precision, tokens
from .common import adapter_info, lr_schedule
from .config import TrainConfig
from .encode import IGNORE, collate, cut, encode_dataset, ensure_chat_template, pack_examples
from .loss import CausalLMLoss, reference_loss
from .objectives import make_objective

PROBE_TOKENS = 64  # the sample on which our loss is checked against the model's own


class Processes:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.owned = False
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(distributed.backend())
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over every process (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch_dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def accumulating(self, module, last: bool):
        """The context for one micro-batch's backward: under DDP, gradients are synchronised on the last one only."""
        return module.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def close(self) -> None:
        if self.owned and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of torch, CUDA, MPS or the allocator."""
    if isinstance(exc, (getattr(torch, "OutOfMemoryError", MemoryError), MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


@dataclass
class Session:
    """What the loop works with. The counters (step ... best_eval) move as it trains; the rest stays."""

    cfg: TrainConfig
    run_dir: Path
    ws: Workspace
    log: Callable[[str], None]
    procs: Processes
    device: torch.device
    tokenizer: Any
    pad_id: int
    train_items: list  # encoded examples, packed sequences or (chosen, rejected) pairs
    val_items: list
    sampler: DistributedSampler
    steps_per_epoch: int
    total_steps: int
    model: Any  # the PEFT model
    loss_mod: CausalLMLoss
    objective: Any  # objectives.SFTObjective | preference.PreferenceObjective
    train_module: torch.nn.Module  # the objective's module, wrapped in DDP under torchrun
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    token_rows: list[int] = field(default_factory=list)  # embedding rows trained too (tokens.py)
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # training time of the processes before a resume
    best_eval: float | None = None
    started: float = field(default_factory=time.time)
    _epoch: tuple[int, list] = (-1, [])  # (epoch, its micro-batches of item indices) for this process

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def micro_batches(self) -> list[list]:
        """This process's micro-batches (lists of training items) for the next optimizer step."""
        epoch, k = divmod(self.step, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self.sampler.set_epoch(epoch)
            idx = list(self.sampler)
            self._epoch = (epoch, [idx[i: i + self.cfg.batch_size] for i in range(0, len(idx), self.cfg.batch_size)])
        accum = self.cfg.grad_accum
        return [[self.train_items[i] for i in mb] for mb in self._epoch[1][k * accum: (k + 1) * accum]]

    def clip_gradients(self) -> float:
        """Clip the gradients to cfg.max_grad_norm (0: no clipping); returns their norm before clipping."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def optimizer_step(self) -> float:
        """Apply the gradients, advance the schedule, count the step; returns the learning rate that was used."""
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    def device_memory(self) -> dict:
        """{"device_peak_memory": bytes} on a GPU, else nothing."""
        if self.device.type != "cuda":
            return {}
        return {"device_peak_memory": int(torch.cuda.max_memory_allocated(self.device))}

    def trainer_state(self, last_loss) -> dict:
        """A checkpoint's trainer_state.json (checkpoints.py)."""
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch,
                "elapsed": self.elapsed(), "tokens": self.tokens_seen, "loss": last_loss,
                "best_eval_loss": self.best_eval, "config": self.cfg.to_dict(), "world_size": self.procs.world,
                "steps_per_epoch": self.steps_per_epoch, "time": time.time()}

    def save_checkpoint(self, last_loss) -> Path | None:
        """checkpoints/step-N/ (rank 0 writes it, every process waits); its path on rank 0."""
        path = None
        if self.procs.main:
            path = checkpoints.save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler,
                                               self.trainer_state(last_loss), self.cfg.keep_last)
        self.procs.barrier()
        return path

    def save_adapter(self, last_loss) -> Path | None:
        """The final adapter/ folder (rank 0; None on the others)."""
        if not self.procs.main:
            return None
        return checkpoints.save_adapter(self.run_dir, self.model, self.tokenizer,
                                        adapter_info(self.cfg, self.step, last_loss, self.best_eval))


# ------------------------------------------------------------------------------------------------ the model


def _attention_targets(model) -> list[str]:
    names = set()
    for name, mod in model.named_modules():
        parts = name.split(".")
        if "Linear" in type(mod).__name__ and any("attn" in p or "attention" in p for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise BadInput("This model has no attention projections that LoRA recognises; use target_modules 'all-linear'.")
    return sorted(names)


def _load_base(cfg: TrainConfig, dtype, device, local_rank: int):
    """The frozen base model as configured (QLoRA: 4-bit NF4 on this process's GPU), gradient checkpointing on."""
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig  # noqa: PLC0415 - bitsandbytes only where QLoRA runs (CUDA)

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": local_rank}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    if cfg.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415 - with the QLoRA import above

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(cfg: TrainConfig, dtype, device, local_rank: int = 0, label_ids=()) -> tuple[Any, list[int]]:
    """The base model (frozen) with a fresh adapter as configured: (the PEFT model, the ids of the target tokens -
    of `label_ids` - the base never learned, whose embedding rows are trained too: tokens.py)."""
    model = _load_base(cfg, dtype, device, local_rank)
    targets = cfg.target_modules
    if targets == "attention":
        targets = _attention_targets(model)
    elif isinstance(targets, (list, tuple)):
        targets = list(targets)
    rows = tokens.untrained_targets(model, label_ids)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.method == "dora", use_rslora=cfg.method == "rslora", bias="none",
                      task_type="CAUSAL_LM", trainable_token_indices=rows or None)
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise BadInput(f"The adapter cannot be placed: {str(e).splitlines()[0][:300]}") from None
    torch.nn.Module.train(model)
    precision.apply_mixed(model, torch.device(device).type, dtype)
    tokens.fast_token_rows(model)
    fused_lora.fuse_lora(model)
    fused_norm.fuse_rms_norms(model)
    return model, rows


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class _Data:
    tokenizer: Any
    pad_id: int
    examples: list  # one (input_ids, labels) per usable training row (pairs: per answer)
    train_items: list
    val_items: list


def _load_data(cfg: TrainConfig, ws: Workspace, log, procs: Processes) -> _Data:
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    note = ensure_chat_template(tok)
    if note and procs.main:
        log(note)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_enc, val_enc = encode_dataset(cfg, ws, tok)
    if procs.main:
        log(train_enc.note("train", cfg.max_length) + (f"; {val_enc.note('validation', cfg.max_length)}"
                                                       if val_enc.rows else "; no validation split"))
    if cfg.packing:
        train_items = pack_examples(train_enc.examples, cfg.max_length)
        val_items = pack_examples(val_enc.examples, cfg.max_length)
    else:
        train_items, val_items = train_enc.items, val_enc.items  # DPO / ORPO: (chosen, rejected) pairs
    return _Data(tok, pad_id, train_enc.examples, train_items, val_items)


def _optimizer(cfg: TrainConfig, model, total_steps: int):
    """(trained parameters, AdamW - fused where the backend has it, the warm-up + decay schedule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.scheduler, cfg.warmup_steps, total_steps))
    return params, optimizer, scheduler


def _restore(s: Session, resume: Path) -> None:
    """Continue from checkpoint `resume`: weights, optimizer, schedule, RNG and the counters."""
    state = checkpoints.load_checkpoint(resume, s.model, s.optimizer, s.scheduler)
    s.step = int(state["step"])
    s.elapsed_before = float(state.get("elapsed", 0.0))
    s.tokens_seen = int(state.get("tokens", 0))
    s.best_eval = state.get("best_eval_loss")
    if s.procs.world > 1 and s.procs.rank:  # the RNG state saved is rank 0's: the others move away from it
        torch.manual_seed(s.cfg.seed + s.procs.rank + 1000 * s.step)
    if s.procs.main:
        s.log(f"Resumed from {resume.name} (step {s.step} of {s.total_steps}).")


def _check_loss(loss_mod: CausalLMLoss, probe_items: list, data: _Data, cfg: TrainConfig, device, log,
                procs: Processes) -> None:
    """Our loss applies the output layer at label positions only: check it once against the model's own full-logits
    loss on a short sample, and fall back to full logits for an unusual head."""
    probe = next((cut(it, PROBE_TOKENS) for it in probe_items if any(x != IGNORE for x in it[1][1:PROBE_TOKENS])),
                 probe_items[0])
    sample = {k: v.to(device, non_blocking=True) for k, v in collate([probe], data.pad_id, cfg.packing).items()}
    loss_mod.model.eval()
    with torch.no_grad():
        mine_sum, mine_n = loss_mod(**sample)
        mine = float(mine_sum / max(1, int(mine_n)))
    ref = reference_loss(loss_mod.model, sample)
    loss_mod.model.train()
    if math.isfinite(ref) and not math.isclose(mine, ref, rel_tol=2e-3, abs_tol=2e-3):
        loss_mod.full_logits = True
        if procs.main:
            log(f"Note: this model's output layer needs the full-logits loss ({mine:.4f} vs {ref:.4f}); slower.")


def _device(prof, procs: Processes) -> torch.device:
    if prof.kind == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device(prof.kind)


def setup(cfg: TrainConfig, run_dir: Path, ws: Workspace, resume: str | os.PathLike | None, log: Callable[[str], None],
          procs: Processes) -> Session:
    """Everything the loop needs for `cfg` (validated), from the start or from checkpoint `resume`. BadInput when
    the checkpoint has nothing left to train."""
    started = time.time()
    prof = devicemod.profile()
    threads = cfg.threads or max(1, prof.threads // max(1, procs.local_world))
    torch.set_num_threads(threads)
    device = _device(prof, procs)
    dtype, dtype_name, _why = precision.resolve(cfg, prof, ws)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + procs.rank)
    data = _load_data(cfg, ws, log, procs)
    if resume is not None:  # on another number of processes: keep the checkpoint's global batch, or refuse
        cfg, note = distributed.fit_to_world(cfg, distributed.read_state(resume), procs.world, len(data.train_items))
        if note and procs.main:
            log(note)
    sampler = DistributedSampler(data.train_items, num_replicas=procs.world, rank=procs.rank, shuffle=True,
                                 seed=cfg.seed)
    steps_per_epoch = plan.steps_per_epoch(len(data.train_items), cfg.batch_size, cfg.grad_accum, procs.world)
    label_ids = {t for _ids, labels in data.examples for t in labels if t != IGNORE}
    model, token_rows = build_model(cfg, dtype, device, procs.local_rank, label_ids)
    if token_rows and procs.main:
        names = ", ".join(data.tokenizer.convert_ids_to_tokens(token_rows[:8]))
        log(f"The base model never learned the target token(s) {names} (their embeddings match its unused "
            "tokens'): their embedding rows are trained too, so the model learns to end its turns.")
    loss_mod = CausalLMLoss(model)
    total_steps = plan.total_steps(cfg, steps_per_epoch)
    params, optimizer, scheduler = _optimizer(cfg, model, total_steps)
    s = Session(cfg=cfg, run_dir=run_dir, ws=ws, log=log, procs=procs, device=device, tokenizer=data.tokenizer,
                pad_id=data.pad_id, train_items=data.train_items, val_items=data.val_items, sampler=sampler,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps, model=model, loss_mod=loss_mod,
                objective=None, train_module=loss_mod, params=params, optimizer=optimizer, scheduler=scheduler,
                token_rows=token_rows, started=started)
    if resume is not None:
        _restore(s, Path(resume))
    if s.step >= total_steps:
        raise BadInput(f"This checkpoint is already at step {s.step} of {total_steps}: nothing left to train.")
    _check_loss(loss_mod, data.train_items if cfg.objective == "sft" else data.examples, data, cfg, device, log, procs)
    s.objective = make_objective(cfg, loss_mod, data.pad_id)
    s.train_module = s.objective.module
    if procs.world > 1:
        s.train_module = torch.nn.parallel.DistributedDataParallel(
            s.objective.module, device_ids=[procs.local_rank] if device.type == "cuda" else None)
    if procs.main:
        log(s.objective.describe())
        log(f"Training {cfg.method} r={cfg.rank} ({sum(p.numel() for p in params):,} trainable parameters) on "
            f"{len(s.train_items)} {s.objective.items}, {total_steps} steps, batch {cfg.batch_size}x{cfg.grad_accum}x"
            f"{procs.world}, {precision.describe(dtype_name)} on {prof.kind}, {threads} threads.")
    return s
