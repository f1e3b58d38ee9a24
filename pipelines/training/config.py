"""The training config: `TrainConfig` (one dataclass: the Train form, the YAML, the job and the tests use it alike), its
constants, and `validate()` - every check against the workspace and the device before anything runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import BadInput, MacTunerError, NotFound
from ..workspace import Workspace, atomic_write

METHODS = ("lora", "dora", "rslora", "qlora")


OBJECTIVES = ("sft", "dpo", "orpo")  # what the adapter learns: replies (SFT) or preferences (preference.py)


TARGET_PRESETS = ("all-linear", "attention")


SCHEDULERS = ("linear", "cosine", "constant")


DTYPES = ("auto", "float32", "bfloat16", "float16")


BACKENDS = ("auto", "torch", "mlx")  # who trains: PyTorch (+ PEFT) or Apple's MLX (+ mlx-lm); device.choose_backend


BASE_BITS = (0, 4, 8)  # the frozen base kept as is, or quantized to 4 / 8 bits while training


# Settings that change the adapter's shape or function: a checkpoint can only be resumed with the same values.
COMPLETE_MARKER = "COMPLETE"
RESUME_KEYS = ("base_model", "method", "rank", "alpha", "target_modules", "backend", "base_bits")
RESUME_DEFAULTS = {"backend": "torch", "base_bits": 0}  # what a checkpoint written before these settings existed used


class TrainingFailed(MacTunerError):
    """Training could not go on (NaN loss, out of memory, a checkpoint that could not be written...)."""

    status = 500


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything one training run needs. The UI builds it, the CLI reads it from YAML, tests construct it."""

    base_model: str = field(default="default", metadata=_h(
        "Model folder to fine-tune (HF safetensors): a path, a folder under the workspace's models/, a downloaded Hub "
        "id, or 'default' for the embedded Gemma 3 270M's training copy."))
    dataset: str = field(default="", metadata=_h("Dataset name (a folder under the workspace's datasets/)."))
    dataset_version: int = field(default=0, metadata=_h("Dataset version N (folder vN); 0 means the latest."))
    method: str = field(default="lora", metadata=_h(
        "lora | dora (weight-decomposed LoRA) | rslora (rank-stabilised scaling) | qlora (LoRA on a 4-bit base: "
        "bitsandbytes on CUDA with torch, MLX's own quantization with backend mlx)."))
    backend: str = field(default="auto", metadata=_h(
        "Who trains: auto (MLX on Apple silicon when mlx-lm is installed, else PyTorch) | torch (PyTorch + PEFT: "
        "CUDA, MPS or CPU) | mlx (Apple's MLX + mlx-lm; on Linux it runs on the CPU, slower than torch, only when "
        "chosen). Either way the adapter is saved in PEFT format."))
    base_bits: int = field(default=0, metadata=_h(
        "Quantize the frozen base while training (backend mlx): 0 keeps its precision, 4 or 8 bits cut its memory "
        "about 7x or 4x (QLoRA on a Mac; works with lora, rslora and dora). The adapter still merges into the "
        "full-precision base. With torch only method qlora quantizes (4-bit, CUDA)."))
    objective: str = field(default="sft", metadata=_h(
        "sft (learn the replies) | dpo (Direct Preference Optimization: prefer the chosen over the rejected answer, "
        "relative to the base model) | orpo (odds-ratio preference with SFT on the chosen answers, no reference). "
        "dpo and orpo need a preference dataset (prompt, chosen, rejected)."))
    beta: float = field(default=0.1, metadata=_h(
        "DPO beta: how far the tuned model may move from the base; higher keeps it closer (0.1 is typical)."))
    orpo_lambda: float = field(default=0.1, metadata=_h(
        "ORPO lambda: weight of the odds-ratio (preference) term beside the SFT loss on the chosen answers."))
    rank: int = field(default=16, metadata=_h("LoRA rank r: adapter size; 8-64 is typical."))
    alpha: float = field(default=32.0, metadata=_h("LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) for rslora)."))
    dropout: float = field(default=0.05, metadata=_h("Dropout on the adapter's input, 0 to switch off."))
    target_modules: Any = field(default="all-linear", metadata=_h(
        "Layers that get adapters: 'all-linear', 'attention' (attention projections only) or a list of module names "
        "such as [q_proj, v_proj]."))
    epochs: float = field(default=1.0, metadata=_h("Passes over the training set (fractions allowed); ignored when max_steps > 0."))
    max_steps: int = field(default=0, metadata=_h("Stop after this many optimizer steps (0: use epochs)."))
    learning_rate: float = field(default=2e-4, metadata=_h("Peak learning rate of AdamW."))
    scheduler: str = field(default="cosine", metadata=_h("Learning-rate schedule after warm-up: linear | cosine | constant."))
    warmup_steps: int = field(default=0, metadata=_h("Steps of linear warm-up from 0 to the peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay on the adapter weights."))
    max_grad_norm: float = field(default=1.0, metadata=_h("Clip the gradient norm to this value (0: no clipping)."))
    batch_size: int = field(default=4, metadata=_h("Sequences per forward pass (per process)."))
    grad_accum: int = field(default=1, metadata=_h("Forward passes accumulated into one optimizer step."))
    max_length: int = field(default=512, metadata=_h("Longest sequence in tokens; longer conversations are cut at the end."))
    packing: bool = field(default=False, metadata=_h(
        "Pack several conversations into each max_length sequence (less padding; attention stays within each one)."))
    train_on_responses_only: bool = field(default=True, metadata=_h(
        "Learn only the assistant's replies (the prompt is context, not target)."))
    gradient_checkpointing: bool = field(default=False, metadata=_h(
        "Recompute activations in the backward pass: less memory, about 30% slower."))
    seed: int = field(default=42, metadata=_h("Seed for the adapter's initialisation, data order and dropout."))
    eval_every: int = field(default=0, metadata=_h(
        "Compute the validation loss every N steps (0: only at the end); skipped when there is no validation split."))
    max_eval_rows: int = field(default=256, metadata=_h("Validation rows used for the eval loss (0: all)."))
    save_every: int = field(default=50, metadata=_h("Write a resumable checkpoint every N steps (0: only when stopped)."))
    keep_last: int = field(default=2, metadata=_h("Checkpoints kept (older ones are deleted); 0 keeps all."))
    dtype: str = field(default="auto", metadata=_h(
        "auto (the device profile's choice: float32 on CPUs) | float32 | bfloat16 | float16 (GPU only)."))
    threads: int = field(default=0, metadata=_h("CPU threads for torch (0: the device profile's physical cores)."))
    trust_remote_code: bool = field(default=False, metadata=_h("Run Python code shipped with the model (only if you trust it)."))

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        import yaml  # noqa: PLC0415

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            with atomic_write(path, "w") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise BadInput("A training config must be a mapping of setting: value.")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise BadInput(f"Unknown setting(s) {', '.join(unknown)} (known: {', '.join(known)}).")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, raw in data.items():
            values[name] = _coerce(name, hints[name], raw)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, allow_empty: bool = True) -> "TrainConfig":
        """From a YAML file (a path) or YAML text (a string with a ':' or a newline). An empty one is every default,
        or BadInput with `allow_empty` False (loading it into a filled form would reset the form)."""
        import yaml  # noqa: PLC0415

        if isinstance(path_or_text, os.PathLike) or ("\n" not in path_or_text and ":" not in path_or_text):
            p = Path(path_or_text)
            if not p.is_file():
                raise NotFound(f"No config file at {p}.")
            text = p.read_text()
        else:
            text = path_or_text
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise BadInput(f"The config is not valid YAML: {str(e).splitlines()[0]}") from None
        if data is None and not allow_empty:
            raise BadInput("The config holds no settings (the file is empty or only comments).")
        return cls.from_dict(data if data is not None else {})

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _coerce(name: str, hint, raw):
    """YAML gives '2e-4' as a string and 1 for 1.0: convert each value to its field's type, or say what is wrong."""
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return raw.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise BadInput(f"{name} must be true or false (got {raw!r}).")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise BadInput(f"{name} must be a number (got {raw!r}).")
        try:
            val = float(raw)
        except (TypeError, ValueError):
            raise BadInput(f"{name} must be a number (got {raw!r}).") from None
        if hint is int:
            if not val.is_integer():
                raise BadInput(f"{name} must be a whole number (got {raw!r}).")
            return int(val)
        return val
    if hint is str:
        if raw is None:
            return ""
        if not isinstance(raw, (str, int, float)):
            raise BadInput(f"{name} must be text (got {raw!r}).")
        return str(raw)
    if name == "target_modules":
        if isinstance(raw, (list, tuple)):
            return [str(x) for x in raw]
        return str(raw)
    return raw


def dataset_versions(ws: Workspace, name: str) -> list[int]:
    folder = ws.datasets / name
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = re.fullmatch(r"v(\d+)", p.name)
        if m and p.is_dir() and (p / "train.jsonl").exists():
            out.append(int(m.group(1)))
    return sorted(out)


def dataset_dir(ws: Workspace, name: str, version: int) -> Path:
    return ws.datasets / name / f"v{version}"


def resolve_base_model(cfg: TrainConfig, ws: Workspace) -> Path:
    from .. import models  # noqa: PLC0415

    src = (cfg.base_model or "").strip()
    if src in ("", "default"):
        path = models.default_hf_path(ws)
        if not (path / "config.json").exists():
            raise BadInput("The default model's training copy is not prepared yet: use 'Prepare training copy' in the "
                           "Model tab, or run `python -m pipelines.models materialize-default`.")
    else:
        path = models.resolve_source(src, ws)
    if path.is_file() and path.suffix == ".gguf":
        raise BadInput(f"{path.name} is a GGUF file: training needs a Hugging Face folder with safetensors weights "
                       "(for the embedded default, choose 'default').")
    models.inspect_folder(path, cfg.trust_remote_code)
    return path


def _check_targets(targets) -> None:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise BadInput(f"target_modules must be {' or '.join(TARGET_PRESETS)}, or a list of module names (got {targets!r}).")
        return
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise BadInput("target_modules must be a preset or a non-empty list of module names such as [q_proj, v_proj].")


def validate(cfg: TrainConfig, ws: Workspace, resume: str | os.PathLike | None = None, device=None) -> TrainConfig:
    """Check `cfg` against the workspace and this device; return a resolved copy (absolute base model path,
    concrete dataset version). Raises BadInput with a message a user can act on. `resume`: a checkpoint folder
    whose settings must be compatible."""
    from .. import device as devicemod  # noqa: PLC0415
    from ..space import training_refusal  # noqa: PLC0415

    refused = training_refusal()  # ZeroGPU hardware: no GPU outside a short call
    if refused:
        raise BadInput(refused)
    prof = device or devicemod.profile()
    if cfg.method not in METHODS:
        raise BadInput(f"method must be one of {', '.join(METHODS)} (got {cfg.method!r}).")
    _check_objective(cfg)
    if cfg.backend not in BACKENDS:
        raise BadInput(f"backend must be one of {', '.join(BACKENDS)} (got {cfg.backend!r}).")
    if cfg.base_bits not in BASE_BITS:
        raise BadInput(f"base_bits must be 0 (no quantization), 4 or 8 (got {cfg.base_bits}).")
    backend = devicemod.choose_backend(cfg.backend, prof)  # BadInput when mlx is asked for and cannot run here
    if backend.name == "torch":
        _check_torch_quantization(cfg, prof)
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise BadInput(f"The learning rate must be a positive number (got {cfg.learning_rate}); 1e-4 to 3e-4 is typical for LoRA.")
    if cfg.rank < 1:
        raise BadInput(f"The LoRA rank must be at least 1 (got {cfg.rank}).")
    if not cfg.alpha > 0:
        raise BadInput(f"LoRA alpha must be positive (got {cfg.alpha}).")
    if not 0 <= cfg.dropout < 1:
        raise BadInput(f"Dropout must be in [0, 1) (got {cfg.dropout}).")
    _check_targets(cfg.target_modules)
    if cfg.max_steps < 0:
        raise BadInput(f"max_steps cannot be negative (got {cfg.max_steps}).")
    if cfg.max_steps == 0 and not cfg.epochs > 0:
        raise BadInput(f"Set epochs > 0 or max_steps > 0 (epochs is {cfg.epochs}).")
    if cfg.scheduler not in SCHEDULERS:
        raise BadInput(f"scheduler must be one of {', '.join(SCHEDULERS)} (got {cfg.scheduler!r}).")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "threads", "max_eval_rows"):
        if getattr(cfg, name) < 0:
            raise BadInput(f"{name} cannot be negative (got {getattr(cfg, name)}).")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise BadInput("weight_decay and max_grad_norm cannot be negative.")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise BadInput(f"batch_size and grad_accum must be at least 1 (got {cfg.batch_size}, {cfg.grad_accum}).")
    if cfg.max_length < 8:
        raise BadInput(f"max_length must be at least 8 tokens (got {cfg.max_length}).")
    if cfg.dtype not in DTYPES:
        raise BadInput(f"dtype must be one of {', '.join(DTYPES)} (got {cfg.dtype!r}).")
    if cfg.dtype == "float16" and prof.kind == "cpu":
        raise BadInput("float16 training needs a GPU; on this CPU use dtype 'auto' (float32).")
    if not cfg.dataset:
        raise BadInput("Choose a dataset to train on.")
    if "/" in cfg.dataset or "\\" in cfg.dataset or cfg.dataset.startswith("."):
        raise BadInput(f"'{cfg.dataset}' is not a dataset name (a folder name under datasets/ is expected).")
    versions = dataset_versions(ws, cfg.dataset)
    if not versions:
        raise BadInput(f"There is no dataset '{cfg.dataset}' in this workspace (save one in the Data tab first).")
    version = cfg.dataset_version or versions[-1]
    if version not in versions:
        raise BadInput(f"Dataset '{cfg.dataset}' has no version {version} (available: "
                       f"{', '.join(f'v{v}' for v in versions)}).")
    check_dataset_kind(cfg, dataset_dir(ws, cfg.dataset, version))
    base = resolve_base_model(cfg, ws)
    resolved = replace(cfg, base_model=str(base), dataset_version=version, backend=backend.name)
    if backend.name == "mlx":  # what MLX cannot take is refused here, with the torch alternative
        from .mlx import refuse  # noqa: PLC0415

        refuse(resolved)
    if resume is not None:
        check_resume(resolved, resume)
    return resolved


def _check_torch_quantization(cfg: TrainConfig, prof) -> None:
    """The torch backend quantizes the base only as method qlora (bitsandbytes 4-bit, CUDA)."""
    if cfg.base_bits not in (0, 4) or (cfg.base_bits == 4 and cfg.method != "qlora"):
        raise BadInput(f"base_bits {cfg.base_bits} is for the MLX backend: with torch the base is quantized only by "
                       "method qlora (4-bit, CUDA). Choose backend mlx, or set base_bits 0.")
    if cfg.method == "qlora" and not prof.qlora:
        raise BadInput(f"QLoRA is not available here: {prof.qlora_reason} Choose method 'lora' instead "
                       "(same adapter, base model kept in full precision), or backend mlx for a 4-bit base.")


def _check_objective(cfg: TrainConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise BadInput(f"objective must be one of {', '.join(OBJECTIVES)} (got {cfg.objective!r}).")
    if cfg.objective == "sft":
        return
    name = cfg.objective.upper()
    for key in ("beta",) if cfg.objective == "dpo" else ("orpo_lambda",):
        val = getattr(cfg, key)
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise BadInput(f"{key} must be a positive number for {name} (got {val}); 0.1 is typical.")
    if cfg.packing:
        raise BadInput(f"Packing is for SFT: {name} compares whole prompt + answer sequences pair by pair. Untick "
                       "packing.")


def check_dataset_kind(cfg: TrainConfig, version_dir: Path) -> None:
    """BadInput when the objective and the dataset's rows do not go together: DPO / ORPO need preference pairs
    (prompt, chosen, rejected); the first row of train.jsonl tells what the dataset holds."""
    if cfg.objective == "sft":
        return
    first = None
    try:
        with open(version_dir / "train.jsonl", encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), None)
        row = json.loads(first) if first else None
    except (OSError, json.JSONDecodeError):
        return  # reading the rows says what is wrong with them, with the line number
    if isinstance(row, dict) and all(k in row for k in ("prompt", "chosen", "rejected")):
        return
    has = "plain text" if isinstance(row, dict) and "text" in row else "conversations"
    raise BadInput(f"{cfg.objective.upper()} trains on preference pairs, but dataset '{cfg.dataset}' "
                   f"v{version_dir.name.lstrip('v')} holds {has} without rejected answers (no 'chosen' / 'rejected'). "
                   "Save a preference dataset in the Data tab (map its chosen and rejected columns), or choose "
                   "objective 'sft'.")


def check_resume(cfg: TrainConfig, checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's trainer state, after checking it is complete and was trained with compatible settings."""
    ckpt = Path(checkpoint)
    if not ckpt.is_dir() or not (ckpt / COMPLETE_MARKER).exists():
        raise BadInput(f"{ckpt} is not a complete checkpoint (it has no {COMPLETE_MARKER} marker); choose another one.")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"The checkpoint's trainer_state.json cannot be read ({e}).") from None
    old = state.get("config", {})
    for key in RESUME_KEYS:
        a, b = old.get(key, RESUME_DEFAULTS.get(key)), getattr(cfg, key)
        if key == "base_model" and a and b and Path(a).resolve() == Path(b).resolve():
            continue
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            what = "base model" if key == "base_model" else key
            raise BadInput(f"Cannot resume: the checkpoint was trained with {what} {a!r}, this config has {b!r}. "
                           "Resume with the checkpoint's settings, or start a new run.")
    return state
