"""Planning a run before it starts: how many steps (counted exactly as the trainer counts them), how much memory,
how long, and which batch size fits. `plan_training(cfg, ws, nproc)` serves the Train tab's check, the CLI and the
trainer's out-of-memory message alike.

    plan = plan_training(TrainConfig(dataset="my-set"), ws)
    plan.total_steps, plan.memory.estimate.total, plan.memory.recommended_batch, plan.seconds
    plan.export      # will it export? architecture, tokenizer, Modelfile template (pipelines.export.convertible)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import device as devicemod
from ..workspace import Workspace
from .config import TrainConfig, validate
from .encode import IGNORE, encode_dataset, ensure_chat_template, pack_examples
from .precision import describe


def steps_per_epoch(n_items: int, batch_size: int, grad_accum: int, world: int = 1) -> int:
    """Optimizer steps in one pass over `n_items` training sequences: each of `world` processes takes an equal
    share (DistributedSampler pads the last one), in micro-batches of `batch_size`, `grad_accum` per step."""
    per_process = math.ceil(n_items / max(1, world))
    return max(1, math.ceil(math.ceil(per_process / batch_size) / grad_accum))


def total_steps(cfg: TrainConfig, per_epoch: int) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


@dataclass
class MemoryAdvice:
    mode: str  # "lora" | "qlora" (bitsandbytes) | "lora, 4-bit base" / "lora, 8-bit base" (MLX)
    dtype: str
    estimate: devicemod.MemoryEstimate  # one process
    processes: int
    available: int
    recommended_batch: int  # the largest power-of-two batch that fits; 0 when even 1 does not
    precision: str = ""  # how training computes, and why (dtype "auto": the device's calibrated choice)
    backend: str = "torch"  # who trains: "torch" | "mlx" (device.choose_backend)
    backend_reason: str = ""
    base_bits: int = 0  # MLX: the frozen base quantized to 4 or 8 bits
    pool: str = "memory"  # what `available` is: "unified memory" (Apple silicon), "GPU memory", "RAM"

    @property
    def total(self) -> int:
        return self.estimate.total * self.processes

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def memory_advice(shape: devicemod.ModelShape, cfg: TrainConfig, prof: devicemod.DeviceProfile | None = None,
                  processes: int = 1, available: int | None = None, ws: Workspace | None = None) -> MemoryAdvice:
    """The memory `cfg` needs on this device (each process holds its own copy on a CPU or one GPU) and the largest
    batch that fits; dtype "auto" reads the precision the trainer calibrated in `ws` (float32 figures until then)."""
    prof = prof or devicemod.profile(refresh=True)
    backend = devicemod.choose_backend(cfg.backend, prof)
    if backend.name == "mlx":
        return _mlx_memory_advice(shape, cfg, prof, backend, processes, available)
    mode = "qlora" if cfg.method == "qlora" else "lora"
    cache = ws.root / devicemod.CALIBRATION_FILE if ws is not None else None
    dtype, why = (devicemod.train_dtype(prof, cache, measure=False) if cfg.dtype == "auto"
                  else (cfg.dtype, "set in the config"))
    precision = f"{describe(dtype)} — {why}"
    dtype = dtype if dtype in devicemod.DTYPE_BYTES else "float32"
    avail = prof.available_memory if available is None else available
    per_item = 1 if cfg.objective == "sft" else 2  # DPO / ORPO: a batch of pairs is twice as many sequences
    est = devicemod.estimate_memory(shape, mode, dtype, cfg.max_length, cfg.batch_size * per_item, cfg.rank,
                                    cfg.gradient_checkpointing)
    per_process = avail // max(1, processes)
    rec = devicemod.recommend_batch_size(shape, per_process, mode, dtype, cfg.max_length, cfg.rank,
                                         cfg.gradient_checkpointing) // per_item
    return MemoryAdvice(mode, dtype, est, processes, avail, rec, precision, "torch", backend.reason, 0, _pool(prof))


def _pool(prof) -> str:
    return {"mps": "unified memory", "cuda": "GPU memory", "cpu": "RAM"}.get(prof.kind, "memory")


def mlx_base_bits(cfg: TrainConfig) -> int:
    """Bits of the MLX-quantized base: base_bits, or 4 for method qlora (LoRA on a 4-bit base); 0 for none."""
    return cfg.base_bits or (4 if cfg.method == "qlora" else 0)


def _mlx_memory_advice(shape, cfg: TrainConfig, prof, backend, processes: int, available: int | None) -> MemoryAdvice:
    """The MLX trainer's memory: the base in its compute dtype or quantized to 4 / 8 bits (the embedding too), in
    unified memory on a Mac (the GPU's share of RAM: the profile's total) or RAM on a CPU."""
    dtype, why = devicemod.mlx_train_dtype(cfg.dtype)
    bits = mlx_base_bits(cfg)
    avail = prof.available_memory if available is None else available
    per_item = 1 if cfg.objective == "sft" else 2
    est = devicemod.estimate_memory(shape, "lora", dtype, cfg.max_length, cfg.batch_size * per_item, cfg.rank,
                                    cfg.gradient_checkpointing, base_bits=bits)
    rec = devicemod.recommend_batch_size(shape, avail // max(1, processes), "lora", dtype, cfg.max_length, cfg.rank,
                                         cfg.gradient_checkpointing, base_bits=bits) // per_item
    base = f"base quantized to {bits} bits by MLX, computing in {dtype}" if bits else f"{dtype} base weights"
    precision = f"{base}; adapter, optimizer and loss float32 — {why}"
    mode = f"lora, {bits}-bit base" if bits else "lora"
    return MemoryAdvice(mode, dtype, est, processes, avail, rec, precision, "mlx", backend.reason, bits, _pool(prof))


def batch_advice(cfg: TrainConfig, mem: MemoryAdvice) -> str:
    """What to change when the batch does not fit (for messages)."""
    rec = mem.recommended_batch
    if rec and rec < cfg.batch_size:
        return (f"Try batch size {rec} (with grad_accum {max(1, cfg.batch_size * cfg.grad_accum // rec)} to keep the "
                "effective batch)")
    return "Try batch size 1 with grad_accum to keep the effective batch"


def oom_message(cfg: TrainConfig) -> str:
    """The trainer's out-of-memory message, with the plan's batch advice when the model's config can be read."""
    from transformers import AutoConfig  # noqa: PLC0415

    try:
        shape = devicemod.ModelShape.from_config(AutoConfig.from_pretrained(cfg.base_model,
                                                                            trust_remote_code=cfg.trust_remote_code))
        advice = batch_advice(cfg, memory_advice(shape, cfg))
    except Exception as e:  # noqa: BLE001 - the advice is a bonus; the failure message must still come out
        advice = f"Try a smaller batch size (no estimate: {type(e).__name__})"
    return (f"Out of memory at batch size {cfg.batch_size}, max length {cfg.max_length}. {advice}, a shorter max "
            "length, or gradient checkpointing.")


@dataclass
class TrainingPlan:
    config: TrainConfig  # validated: the base model's path, the dataset's version
    train_rows: int
    usable: int
    truncated: int
    dropped: int
    validation_rows: int
    label_tokens: int  # trained tokens per epoch
    note: str
    items: int  # training sequences: usable rows, or packed sequences
    processes: int
    steps_per_epoch: int
    total_steps: int
    memory: MemoryAdvice
    seconds: float | None  # time estimate for torch on a CPU (None on a GPU or with MLX: the live ETA tells)
    export: list = field(default_factory=list)  # export.convertible.ExportCheck rows: will the fine-tune export?

    @property
    def backend(self) -> str:
        return self.memory.backend

    @property
    def backend_reason(self) -> str:
        return self.memory.backend_reason


def _item_tokens(cfg: TrainConfig, item) -> float:
    """Tokens one training item costs: a sequence, or for DPO / ORPO both of a pair (DPO: plus the reference's
    forward pass, about a third of a training pass)."""
    if cfg.objective == "sft":
        return len(item[0])
    return (len(item[0][0]) + len(item[1][0])) * (4 / 3 if cfg.objective == "dpo" else 1.0)


def plan_training(cfg: TrainConfig, ws: Workspace, nproc: int = 1) -> TrainingPlan:
    """Validate `cfg`, tokenize its data as the trainer will and plan the run: BadInput for unusable settings or data,
    without starting anything. `nproc`: training processes (DDP)."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

    from ..export.convertible import export_checks  # noqa: PLC0415 - export imports runs, which imports training

    cfg = validate(cfg, ws)
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    ensure_chat_template(tok)
    tr, va = encode_dataset(cfg, ws, tok)
    items = pack_examples(tr.examples, cfg.max_length) if cfg.packing else tr.items
    per_epoch = steps_per_epoch(len(items), cfg.batch_size, cfg.grad_accum, nproc)
    steps = total_steps(cfg, per_epoch)
    shape = devicemod.ModelShape.from_config(AutoConfig.from_pretrained(cfg.base_model,
                                                                        trust_remote_code=cfg.trust_remote_code))
    prof = devicemod.profile(refresh=True)
    seconds = None
    if prof.kind == "cpu" and cfg.backend == "torch":  # the probe measures torch's matmuls
        mean_len = sum(_item_tokens(cfg, it) for it in items) / len(items)
        tokens = steps * cfg.batch_size * cfg.grad_accum * nproc * mean_len
        seconds = 6 * shape.n_params * tokens / (0.5 * devicemod.matmul_flops())  # ~50% of peak, fwd + bwd
    return TrainingPlan(
        config=cfg, train_rows=tr.rows, usable=len(tr.items), truncated=tr.truncated, dropped=tr.dropped,
        validation_rows=len(va.items), label_tokens=sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in tr.examples),
        note=tr.note("train", cfg.max_length), items=len(items), processes=nproc, steps_per_epoch=per_epoch,
        total_steps=steps, memory=memory_advice(shape, cfg, prof, nproc, ws=ws), seconds=seconds,
        export=export_checks(cfg.base_model, tok.chat_template, tok.bos_token or "", tok.eos_token or ""))
