"""The training loop: a plain PyTorch + PEFT loop that is fast on CPUs, single process or DDP under torchrun.

Why a loop of our own and not TRL's SFTTrainer: SFTTrainer defaults to bf16 autocast, 15-20x slower on CPUs without
native bf16, and computes logits for every position (see loss.py for what is done instead). Right-padded batches
run without an attention mask (the causal mask alone keeps real tokens from seeing the pads), so SDPA takes its
causal fast path. Metrics go to the `on_metrics` callback as plain dicts; stopping: the file STOP in the run folder
is checked at each step end, then a checkpoint is saved and the result is "stopped". Only torch-free code runs at
import time. DPO / ORPO (`objective`): the items are (chosen, rejected) pairs and preference.py does the step, the
eval and the verdict; the rest (schedule, checkpoints, stop, resume, DDP) is the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import BadInput, MacTunerError
from ..workspace import Workspace, write_json
from . import distributed, plan, precision
from .checkpoints import _replace_dir, load_checkpoint, save_checkpoint
from .common import STOP_FLAG, MetricsFn, TrainResult, adapter_info, check_finite, lr_schedule, peak_rss
from .config import TrainConfig, TrainingFailed, validate
from .encode import (
    IGNORE,
    _cut,
    collate,
    encode_dataset,
    ensure_chat_template,
    pack_examples,
)
from .loss import _loss_module_class, reference_loss

def _attention_targets(model) -> list[str]:
    names = set()
    for name, mod in model.named_modules():
        parts = name.split(".")
        if "Linear" in type(mod).__name__ and any("attn" in p or "attention" in p for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise BadInput("This model has no attention projections that LoRA recognises; use target_modules 'all-linear'.")
    return sorted(names)


def _torch_dtype(cfg: TrainConfig, prof, ws: Workspace):
    dtype, name, _why = precision.resolve(cfg, prof, ws)
    return dtype, name


def build_model(cfg: TrainConfig, dtype, device, local_rank: int = 0, label_ids=()):
    """The base model (frozen) with a fresh adapter as configured; returns the PEFT model. Target tokens (of
    `label_ids`) the base never learned get their embedding rows trained too (tokens.py); their ids are in
    `model.mactuner_token_rows`."""
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig  # noqa: PLC0415

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": local_rank}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    if cfg.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = cfg.target_modules
    if targets == "attention":
        targets = _attention_targets(model)
    elif isinstance(targets, (list, tuple)):
        targets = list(targets)
    from .tokens import fast_token_rows, untrained_targets  # noqa: PLC0415

    rows = untrained_targets(model, label_ids)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.method == "dora", use_rslora=cfg.method == "rslora", bias="none",
                      task_type="CAUSAL_LM", trainable_token_indices=rows or None)
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise BadInput(f"The adapter cannot be placed: {str(e).splitlines()[0][:300]}") from None
    torch.nn.Module.train(model)
    precision.apply_mixed(model, torch.device(device).type, dtype)
    fast_token_rows(model)
    model.mactuner_token_rows = rows
    return model


def _is_oom(exc: BaseException) -> bool:
    import torch  # noqa: PLC0415

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""

    def __init__(self):
        import torch.distributed as dist  # noqa: PLC0415

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.dist = dist
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(distributed.backend())
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch  # noqa: PLC0415

        t = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def close(self):
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


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
    import torch  # noqa: PLC0415

    stop_file = run_dir / STOP_FLAG
    should_stop = should_stop or stop_file.exists
    dist = _Dist()
    try:
        return _train(cfg, run_dir, ws, on_metrics, resume, should_stop, log, dist, devicemod.profile(), torch)
    except MacTunerError:
        raise
    except BaseException as e:
        if _is_oom(e):
            raise TrainingFailed(plan.oom_message(cfg)) from e
        raise
    finally:
        dist.close()


def _workspace_for(run_dir: Path) -> Workspace:
    if run_dir.resolve().parent.name == "runs":
        return Workspace(run_dir.resolve().parent.parent)
    return Workspace.open()


def _train(cfg, run_dir, ws, on_metrics, resume, should_stop, log, dist, prof, torch) -> TrainResult:
    from torch.utils.data import DistributedSampler  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    t_start = time.time()
    threads = cfg.threads or max(1, prof.threads // max(1, dist.local_world))
    torch.set_num_threads(threads)
    if prof.kind == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(prof.kind)
    dtype, dtype_name = _torch_dtype(cfg, prof, ws)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dist.rank)

    # --- data ---------------------------------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    note = ensure_chat_template(tok)
    if note and dist.main:
        log(note)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_enc, val_enc = encode_dataset(cfg, ws, tok)
    if dist.main:
        log(train_enc.note("train", cfg.max_length) + (f"; {val_enc.note('validation', cfg.max_length)}"
                                                       if val_enc.rows else "; no validation split"))
    if cfg.packing:
        train_items = pack_examples(train_enc.examples, cfg.max_length)
        val_items = pack_examples(val_enc.examples, cfg.max_length)
    else:
        train_items, val_items = train_enc.items, val_enc.items  # DPO / ORPO: (chosen, rejected) pairs

    if resume is not None:  # on another number of processes: keep the checkpoint's global batch, or refuse
        cfg, note = distributed.fit_to_world(cfg, distributed.read_state(resume), dist.world, len(train_items))
        if note and dist.main:
            log(note)
    sampler = DistributedSampler(train_items, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = plan.steps_per_epoch(len(train_items), cfg.batch_size, cfg.grad_accum, dist.world)
    total_steps = plan.total_steps(cfg, steps_per_epoch)

    # --- model, optimizer, schedule -----------------------------------------------------------------------
    label_ids = {t for _ids, labels in train_enc.examples for t in labels if t != IGNORE}
    model = build_model(cfg, dtype, device, dist.local_rank, label_ids)
    if model.mactuner_token_rows and dist.main:
        names = ", ".join(tok.convert_ids_to_tokens(model.mactuner_token_rows[:8]))
        log(f"The base model never learned the target token(s) {names} (their embeddings match its unused "
            "tokens'): their embedding rows are trained too, so the model learns to end its turns.")
    loss_mod = _loss_module_class()(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.scheduler, cfg.warmup_steps, total_steps))

    step, elapsed_before, tokens_seen, best_eval = 0, 0.0, 0, None
    if resume is not None:
        state = load_checkpoint(Path(resume), model, optimizer, scheduler)
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed", 0.0))
        tokens_seen = int(state.get("tokens", 0))
        best_eval = state.get("best_eval_loss")
        if dist.world > 1 and dist.rank:
            torch.manual_seed(cfg.seed + dist.rank + 1000 * step)
        if dist.main:
            log(f"Resumed from {Path(resume).name} (step {step} of {total_steps}).")
    if step >= total_steps:
        raise BadInput(f"This checkpoint is already at step {step} of {total_steps}: nothing left to train.")

    def batch_to(b):
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    # Our loss takes the hidden states and applies the output layer at label positions only; check it once against
    # the model's own full-logits loss on a short sample, and fall back to full logits for an unusual head.
    probe_items = train_items if cfg.objective == "sft" else train_enc.examples
    probe = next((_cut(it, 64) for it in probe_items if any(x != IGNORE for x in it[1][1:64])), probe_items[0])
    sample = collate([probe], pad_id, cfg.packing)
    model.eval()
    with torch.no_grad():
        mine_sum, mine_n = loss_mod(**batch_to(sample))
        mine = float(mine_sum / max(1, int(mine_n)))
    ref = reference_loss(model, batch_to(sample))
    model.train()
    if math.isfinite(ref) and not math.isclose(mine, ref, rel_tol=2e-3, abs_tol=2e-3):
        loss_mod.full_logits = True
        if dist.main:
            log(f"Note: this model's output layer needs the full-logits loss ({mine:.4f} vs {ref:.4f}); slower.")

    pref = None  # DPO / ORPO: the step, eval and verdict of preference.py
    if cfg.objective != "sft":
        from .preference import PreferenceObjective  # noqa: PLC0415

        pref = PreferenceObjective(cfg, loss_mod, pad_id)
        if dist.main:
            log(pref.describe())
    train_module = loss_mod if pref is None else pref.module
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        train_module = DDP(train_module, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    if dist.main:
        log(f"Training {cfg.method} r={cfg.rank} ({n_trainable:,} trainable parameters) on {len(train_items)} "
            f"{'packed sequences' if cfg.packing else 'rows' if pref is None else 'pairs'}, {total_steps} steps, "
            f"batch {cfg.batch_size}x{cfg.grad_accum}x{dist.world}, {precision.describe(dtype_name)} on {prof.kind}, "
            f"{threads} threads.")

    def evaluate() -> float | None:
        if not val_items:
            return None
        model.eval()
        s, n = 0.0, 0
        shard = val_items[dist.rank:: dist.world]
        with torch.no_grad():
            for i in range(0, len(shard), cfg.batch_size):
                ls, ln = loss_mod(**batch_to(collate(shard[i: i + cfg.batch_size], pad_id, cfg.packing)))
                s, n = s + float(ls), n + int(ln)
        model.train()
        s, n = dist.sum([s, float(n)])
        return s / n if n else None

    def micro_batches(epoch: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        idx = list(sampler)
        return [idx[i: i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]

    def trainer_state(step_: int, last_loss) -> dict:
        return {"step": step_, "total_steps": total_steps, "epoch": step_ / steps_per_epoch,
                "elapsed": elapsed_before + time.time() - t_start, "tokens": tokens_seen, "loss": last_loss,
                "best_eval_loss": best_eval, "config": cfg.to_dict(), "world_size": dist.world,
                "steps_per_epoch": steps_per_epoch, "time": time.time()}

    def checkpoint(step_: int, last_loss) -> Path | None:
        path = None
        if dist.main:
            path = save_checkpoint(run_dir, model, optimizer, scheduler, trainer_state(step_, last_loss), cfg.keep_last)
        if dist.world > 1:
            dist.dist.barrier()
        return path

    last_loss, last_ckpt, state_out, reason = None, None, "finished", ""
    epoch_cache: dict[int, list[list[int]]] = {}
    t_train = time.time()
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = micro_batches(epoch)
        mbs = epoch_cache[epoch][k * cfg.grad_accum: (k + 1) * cfg.grad_accum]
        t0 = time.time()
        pref_row: dict = {}
        if pref is not None:
            loss, in_tokens_g, pref_row = pref.step([[train_items[i] for i in mb] for mb in mbs], train_module,
                                                    batch_to, dist)
        else:
            batches = [collate([train_items[i] for i in mb], pad_id, cfg.packing) for mb in mbs]
            n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            in_tokens = sum(int((b["input_ids"] != pad_id).sum()) if not cfg.packing else int(b["input_ids"].numel())
                            for b in batches)
            n_global, in_tokens_g = dist.sum([float(n_local), float(in_tokens)])
            scale = dist.world / max(1.0, n_global)  # DDP averages gradients over ranks: undo that, then token-mean
            loss_sum = 0.0
            for j, b in enumerate(batches):
                last = j == len(batches) - 1
                sync_ctx = train_module.no_sync() if dist.world > 1 and not last else contextlib.nullcontext()
                with sync_ctx:
                    ls, _ = train_module(**batch_to(b))
                    (ls * scale).backward()
                loss_sum += float(ls.detach())
            loss = dist.sum([loss_sum])[0] / max(1.0, n_global)
        check_finite(loss, None, step + 1, cfg.learning_rate)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        check_finite(loss, grad_norm, step + 1, cfg.learning_rate)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(in_tokens_g)
        last_loss = loss
        dt = time.time() - t0
        row = {"step": step, "total_steps": total_steps, "epoch": round(step / steps_per_epoch, 4),
               "loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": int(in_tokens_g),
               "tokens_per_s": in_tokens_g / dt if dt > 0 else 0.0, "peak_memory": peak_rss(),
               "elapsed": round(elapsed_before + time.time() - t_start, 3), "step_time": dt, **pref_row}
        if device.type == "cuda":
            row["device_peak_memory"] = int(torch.cuda.max_memory_allocated(device))
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            ev = evaluate() if pref is None else pref.evaluate(val_items, batch_to, dist, row)
            if ev is not None:
                row["eval_loss"] = ev
                if best_eval is None or ev < best_eval:
                    best_eval = ev
        if dist.main and on_metrics:
            on_metrics(row)
        stop = dist.any(bool(should_stop())) if step < total_steps else False
        if stop:
            last_ckpt = checkpoint(step, loss)
            state_out, reason = "stopped", f"stopped at step {step} of {total_steps}; resumable from {last_ckpt.name if last_ckpt else 'its checkpoint'}"
            break
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            last_ckpt = checkpoint(step, loss)

    adapter = None
    if state_out == "finished" and dist.main:
        adapter = run_dir / "adapter"

        def write_adapter(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if not (tmp / "chat_template.jinja").exists() and tok.chat_template:
                (tmp / "chat_template.jinja").write_text(tok.chat_template)
            write_json(tmp / "mactuner.json", adapter_info(cfg, step, last_loss, best_eval))

        _replace_dir(adapter, write_adapter)
        reason = f"finished {step} steps in {time.time() - t_train:.0f} s"
    if dist.world > 1:
        dist.dist.barrier()
    if adapter is not None and val_items:  # did it help? base vs tuned on the validation split; never fails the run
        from . import verdict  # noqa: PLC0415

        verdict.after_training(run_dir, log, cfg=cfg, ws=ws, model=model, loss_mod=loss_mod, tok=tok,
                               val_items=val_items, collate=lambda its: collate(its, pad_id, cfg.packing),
                               pad_id=pad_id, device=device, compare_fn=pref.compare if pref else None)
    return TrainResult(state=state_out, step=step, total_steps=total_steps, reason=reason,
                       adapter=str(adapter) if adapter else None, checkpoint=str(last_ckpt) if last_ckpt else None,
                       final_loss=last_loss, best_eval_loss=best_eval, elapsed=elapsed_before + time.time() - t_start)
