"""Training: `TrainConfig` (one dataclass, YAML in and out), `validate()`, `run_training()` - a plain PyTorch + PEFT
loop that is fast on CPUs - and `main()`, the entry point of the training subprocess.

    python -m pipelines.train CONFIG.yaml [--run-dir DIR] [--resume CHECKPOINT] [--root WORKSPACE]
    torchrun --standalone --nproc_per_node 2 -m pipelines.train CONFIG.yaml --run-dir DIR    # DDP (gloo on CPU)

Why a loop of our own and not TRL's SFTTrainer: SFTTrainer defaults to bf16 autocast, 15-20x slower on CPUs without
native bf16, and computes logits for every position. Here the loss is taken only where a label counts (assistant
tokens by default): the decoder's hidden states are gathered at those positions and the output layer is applied to
them alone, chunk by chunk, inside one autograd function that also computes the gradient (`linear_cross_entropy`),
so the [batch, seq, vocab] logits (262,144 wide for Gemma 3) never exist. Right-padded batches run without an
attention mask (the causal mask alone keeps real tokens from seeing the pads), so SDPA takes its causal fast path.

Run folder (see runs.py): metrics go to the `on_metrics` callback as plain dicts; checkpoints are written to
checkpoints/step-N/ through a temporary folder renamed when complete (with a COMPLETE marker); the final adapter,
tokenizer and chat template go to adapter/. Stopping: the file STOP in the run folder is checked at each step end;
the trainer then saves a checkpoint and returns "stopped". Only torch-free code runs at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .errors import BadInput, MacTunerError, NotFound
from .workspace import Workspace, atomic_dir, write_json

METHODS = ("lora", "dora", "rslora", "qlora")
TARGET_PRESETS = ("all-linear", "attention")
SCHEDULERS = ("linear", "cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STOP_FLAG = "STOP"
COMPLETE_MARKER = "COMPLETE"
IGNORE = -100
# Settings that change the adapter's shape or function: a checkpoint can only be resumed with the same values.
RESUME_KEYS = ("base_model", "method", "rank", "alpha", "target_modules")

MetricsFn = Callable[[dict], None]


class TrainingFailed(MacTunerError):
    """Training could not go on (NaN loss, out of memory, a checkpoint that could not be written...)."""

    status = 500


# ------------------------------------------------------------------------------------------------- config


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
        "lora | dora (weight-decomposed LoRA) | rslora (rank-stabilised scaling) | qlora (4-bit base, CUDA only)."))
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
            from .workspace import atomic_write  # noqa: PLC0415

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
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "TrainConfig":
        """From a YAML file (a path) or YAML text (a string with a ':' or a newline)."""
        import yaml  # noqa: PLC0415

        if isinstance(path_or_text, os.PathLike) or ("\n" not in path_or_text and ":" not in path_or_text):
            p = Path(path_or_text)
            if not p.is_file():
                raise NotFound(f"No config file at {p}.")
            text = p.read_text()
        else:
            text = path_or_text
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise BadInput(f"The config is not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data)

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


# ---------------------------------------------------------------------------------------------- validation


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
    from . import models  # noqa: PLC0415

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
    from . import device as devicemod  # noqa: PLC0415

    prof = device or devicemod.profile()
    if cfg.method not in METHODS:
        raise BadInput(f"method must be one of {', '.join(METHODS)} (got {cfg.method!r}).")
    if cfg.method == "qlora" and not prof.qlora:
        raise BadInput(f"QLoRA is not available here: {prof.qlora_reason} Choose method 'lora' instead "
                       "(same adapter, base model kept in full precision).")
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
    base = resolve_base_model(cfg, ws)
    resolved = replace(cfg, base_model=str(base), dataset_version=version)
    if resume is not None:
        check_resume(resolved, resume)
    return resolved


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
        a, b = old.get(key), getattr(cfg, key)
        if key == "base_model" and a and b and Path(a).resolve() == Path(b).resolve():
            continue
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            what = "base model" if key == "base_model" else key
            raise BadInput(f"Cannot resume: the checkpoint was trained with {what} {a!r}, this config has {b!r}. "
                           "Resume with the checkpoint's settings, or start a new run.")
    return state


# ------------------------------------------------------------------------------------------------ data


def read_rows(path: Path) -> list[dict]:
    """Rows of a dataset split as the Data stage saves them: {"messages": [{"role", "content"}, ...]} or, for plain
    text (continued pre-training), {"text": str}. A missing file is an empty split."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path.name} line {i} is not valid JSON ({e.msg}).") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str) and "messages" not in row:
                out.append({"text": row["text"]})
                continue
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
                raise BadInput(f"{path.name} line {i} has neither a 'messages' list of {{role, content}} objects nor "
                               "a 'text'.")
            out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
    return out


def ensure_chat_template(tok) -> str | None:
    """Give a tokenizer without a chat template the Data stage's fallback (ChatML markup), so that training masks
    exactly what the Data tab's preview shows; it is saved with the adapter. Returns a note, or None."""
    if getattr(tok, "chat_template", None):
        return None
    from .data import FALLBACK_CHAT_TEMPLATE  # noqa: PLC0415

    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return "The tokenizer had no chat template: using ChatML turns (<|im_start|>role ... <|im_end|>), saved with the adapter."


def encode_conversation(tok, messages: list[dict], responses_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation rendered with the tokenizer's chat template. With `responses_only`,
    labels are IGNORE except on the tokens of each assistant reply including its end-of-turn markup; otherwise every
    token is a label. The reply spans come from `data.assistant_spans` (the same function as the Data tab's preview:
    rendered prefixes compared in characters) and are mapped to tokens through the offsets."""
    from .data import assistant_spans  # noqa: PLC0415

    full, spans = assistant_spans(tok, messages)
    if getattr(tok, "is_fast", False):
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    else:  # slow tokenizer: token boundaries from encoding the prefixes at the span edges
        ids, offsets = list(tok(full, add_special_tokens=False)["input_ids"]), None
    if not responses_only:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    if offsets is not None:
        for j, (a, _b) in enumerate(offsets):
            if any(s <= a < e for s, e in spans):
                labels[j] = ids[j]
    else:
        for s, e in spans:
            t0 = len(tok(full[:s], add_special_tokens=False)["input_ids"])
            t1 = len(tok(full[:e], add_special_tokens=False)["input_ids"])
            for j in range(t0, min(t1, len(ids))):
                labels[j] = ids[j]
    return ids, labels


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """A plain-text row (continued pre-training): every token is a label, with BOS/EOS around it when the tokenizer
    has them, so the model also learns where a document ends."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    if tok.eos_token_id is not None and ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    return ids, list(ids)


@dataclass
class EncodedSplit:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels), already cut to max_length
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # no label left after masking and truncation
    no_response: int = 0  # no assistant message at all (responses_only)
    unrenderable: int = 0  # the chat template failed on the row, or a reply could not be located in it
    shortest_prompt: int = 0  # tokens before the first label, over rows that lost all labels to truncation
    first_error: str = ""

    def note(self, split: str, max_length: int) -> str:
        parts = [f"{split}: {len(self.examples)} of {self.rows} rows usable"]
        if self.truncated:
            parts.append(f"{self.truncated} cut to {max_length} tokens")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (no trainable token within max_length"
                         + (f"; {self.unrenderable} not renderable: {self.first_error}" if self.unrenderable else "")
                         + ")")
        return ", ".join(parts)


def encode_split(tok, rows: list[dict], max_length: int, responses_only: bool) -> EncodedSplit:
    out = EncodedSplit([], rows=len(rows))
    prompt_lengths = []
    for row in rows:
        if "text" in row:
            ids, labels = encode_text(tok, row["text"]) if row["text"].strip() else ([], [])
        else:
            msgs = row["messages"]
            if not msgs or (responses_only and not any(m["role"] == "assistant" for m in msgs)):
                out.no_response += 1
                out.dropped += 1
                continue
            try:
                ids, labels = encode_conversation(tok, msgs, responses_only)
            except BadInput as e:  # one odd row must not sink the dataset: count it and go on
                out.unrenderable += 1
                out.dropped += 1
                out.first_error = out.first_error or e.message
                continue
        if len(ids) > max_length:
            out.truncated += 1
            first = next((j for j, lab in enumerate(labels) if lab != IGNORE), len(labels))
            ids, labels = ids[:max_length], labels[:max_length]
            if first >= max_length:
                prompt_lengths.append(first)
        # position 0 is never predicted (nothing precedes it): a label there does not count
        if not any(lab != IGNORE for lab in labels[1:]):
            out.dropped += 1
            continue
        out.examples.append((ids, labels))
    out.shortest_prompt = min(prompt_lengths) if prompt_lengths else 0
    return out


def explain_unusable(enc: EncodedSplit, max_length: int, responses_only: bool) -> str:
    if enc.rows == 0:
        return "The training split has no rows."
    if enc.shortest_prompt:
        return (f"No training row has a reply within max_length={max_length} tokens: every prompt is longer (the "
                f"shortest is {enc.shortest_prompt} tokens). Raise max length above {enc.shortest_prompt + 16} or "
                "shorten the prompts.")
    if enc.unrenderable == enc.rows:
        return f"0 usable rows: the chat template could not render them ({enc.first_error})"
    if responses_only and enc.no_response == enc.rows:
        return ("0 usable rows: no conversation has an assistant message to learn from. Map a response column in "
                "the Data tab, or turn off 'train on responses only'.")
    return (f"0 usable rows out of {enc.rows}: after masking to the assistant replies and cutting to {max_length} "
            "tokens, no row has a token to learn from (empty replies?).")


def encode_dataset(cfg: TrainConfig, ws: Workspace, tok) -> tuple[EncodedSplit, EncodedSplit]:
    """Train and validation splits of a validated config, tokenized as the trainer uses them. Raises BadInput when
    no training row is usable (no reply to learn from, or every prompt longer than max_length)."""
    ddir = dataset_dir(ws, cfg.dataset, cfg.dataset_version)
    train_enc = encode_split(tok, read_rows(ddir / "train.jsonl"), cfg.max_length, cfg.train_on_responses_only)
    if not train_enc.examples:
        raise BadInput(explain_unusable(train_enc, cfg.max_length, cfg.train_on_responses_only))
    val_rows = read_rows(ddir / "validation.jsonl")
    if cfg.max_eval_rows:
        val_rows = val_rows[: cfg.max_eval_rows]
    return train_enc, encode_split(tok, val_rows, cfg.max_length, cfg.train_on_responses_only)


def check_data(cfg: TrainConfig, ws: Workspace) -> dict:
    """Pre-flight for the UI/CLI: validate, tokenize the dataset with the base model's tokenizer and chat template as
    the trainer will, and return counts ({"train_rows", "usable", "truncated", "dropped", "validation_rows",
    "label_tokens", "note"}). Raises BadInput for unusable settings or data, without starting anything."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    cfg = validate(cfg, ws)
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    ensure_chat_template(tok)
    tr, va = encode_dataset(cfg, ws, tok)
    return {"train_rows": tr.rows, "usable": len(tr.examples), "truncated": tr.truncated, "dropped": tr.dropped,
            "validation_rows": len(va.examples),
            "label_tokens": sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in tr.examples),
            "note": tr.note("train", cfg.max_length)}


def pack_examples(examples, max_length: int):
    """Greedy packing in order: whole conversations are appended to a bin until the next would overflow.
    Returns (input_ids, labels, position_ids) per packed sequence; positions restart at 0 for each conversation,
    which makes transformers mask attention per conversation."""
    packed, cur_ids, cur_lab, cur_pos = [], [], [], []
    for ids, labels in examples:
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            packed.append((cur_ids, cur_lab, cur_pos))
            cur_ids, cur_lab, cur_pos = [], [], []
        cur_ids = cur_ids + ids
        cur_lab = cur_lab + [IGNORE] + labels[1:]  # never predict a conversation's first token from the previous one
        cur_pos = cur_pos + list(range(len(ids)))
    if cur_ids:
        packed.append((cur_ids, cur_lab, cur_pos))
    return packed


def collate(items, pad_id: int, packed: bool):
    """Right-pad a list of examples into tensors. Returns a dict with input_ids, labels and (packed) position_ids.
    No attention mask: with right padding the causal mask already keeps real tokens from attending to pads."""
    import torch  # noqa: PLC0415

    n = max(len(it[0]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(items), n), dtype=torch.long) if packed else None
    for i, it in enumerate(items):
        k = len(it[0])
        ids[i, :k] = torch.tensor(it[0])
        labels[i, :k] = torch.tensor(it[1])
        if packed:
            pos[i, :k] = torch.tensor(it[2])
            pos[i, k:] = torch.arange(n - k)  # the padding forms its own "conversation"
    out = {"input_ids": ids, "labels": labels}
    if packed:
        out["position_ids"] = pos
    return out


# ------------------------------------------------------------------------------------------------ loss

_LCE = None


def _linear_ce_function():
    """torch.autograd.Function for sum-reduced cross-entropy of `hidden @ weight.T` (frozen weight), computed in
    chunks of rows; the gradient w.r.t. hidden is computed in the forward pass, so no chunk's logits are kept."""
    global _LCE
    if _LCE is not None:
        return _LCE
    import torch  # noqa: PLC0415

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, target, softcap, chunk):
            need_grad = ctx.needs_input_grad[0]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if need_grad else None
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s: s + chunk], target[s: s + chunk]
                z = (h @ weight.t()).float()
                if softcap:
                    z = torch.tanh(z.div_(softcap)).mul_(softcap)
                lse = torch.logsumexp(z, dim=-1)
                total += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
                if need_grad:
                    factor = (1 - (z / softcap) ** 2) if softcap else None
                    p = z.sub_(lse[:, None]).exp_()  # softmax, in place
                    p.scatter_add_(1, t[:, None], torch.full_like(t[:, None], -1, dtype=p.dtype))
                    if factor is not None:
                        p.mul_(factor)
                    grad[s: s + chunk] = p.to(weight.dtype) @ weight
            ctx.save_for_backward(grad if need_grad else hidden.new_empty(0))
            return total

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g.to(grad.dtype), None, None, None, None

    _LCE = LinearCrossEntropy
    return _LCE


def linear_cross_entropy(hidden, weight, target, softcap: float | None = None, chunk_bytes: int = 256 * 2**20):
    """Sum over rows of cross-entropy(hidden @ weight.T, target) without materialising all logits at once
    (`chunk_bytes` of fp32 logits at a time). `weight` must be frozen."""
    vocab = weight.shape[0]
    chunk = max(1, min(max(1, hidden.shape[0]), chunk_bytes // (4 * vocab)))
    return _linear_ce_function().apply(hidden, weight, target, float(softcap or 0.0), chunk)


def _loss_module_class():
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    class CausalLMLoss(torch.nn.Module):
        """Wraps the PEFT model: forward(batch) -> (sum of token losses, number of label tokens). The output layer
        runs only on positions with a label. `full_logits=True` uses the model's own forward (fallback)."""

        def __init__(self, model, full_logits: bool = False):
            super().__init__()
            self.model = model
            self.full_logits = full_logits
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            cfg = getattr(base.config, "text_config", None) or base.config
            self.softcap = getattr(cfg, "final_logit_softcapping", None) or None

        def _parts(self):
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            return base.get_decoder(), base.get_output_embeddings()

        def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
            tgt = labels[:, 1:]
            sel = tgt != IGNORE
            n = sel.sum()
            if self.full_logits:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).logits[:, :-1]
                return F.cross_entropy(logits[sel].float(), tgt[sel], reduction="sum"), n
            decoder, head = self._parts()
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
            hs, ts = hidden[:, :-1][sel], tgt[sel]
            if head.weight.requires_grad or getattr(head, "bias", None) is not None or type(head) is not torch.nn.Linear:
                logits = head(hs).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                return F.cross_entropy(logits, ts, reduction="sum"), n
            return linear_cross_entropy(hs, head.weight, ts, self.softcap), n

    return CausalLMLoss


def reference_loss(model, batch) -> float:
    """The model's own mean loss over full logits (transformers' forward with labels): the check for ours."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], labels=batch["labels"],
                           position_ids=batch.get("position_ids"), use_cache=False).loss)


# ------------------------------------------------------------------------------------------------ model


def _attention_targets(model) -> list[str]:
    names = set()
    for name, mod in model.named_modules():
        parts = name.split(".")
        if "Linear" in type(mod).__name__ and any("attn" in p or "attention" in p for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise BadInput("This model has no attention projections that LoRA recognises; use target_modules 'all-linear'.")
    return sorted(names)


def _torch_dtype(cfg: TrainConfig, prof):
    import torch  # noqa: PLC0415

    name = prof.train_dtype if cfg.dtype == "auto" else cfg.dtype
    return getattr(torch, name), name


def build_model(cfg: TrainConfig, dtype, device, local_rank: int = 0):
    """The base model (frozen) with a fresh adapter as configured; returns the PEFT model."""
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
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.method == "dora", use_rslora=cfg.method == "rslora", bias="none",
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise BadInput(f"The adapter cannot be placed: {str(e).splitlines()[0][:300]}") from None
    torch.nn.Module.train(model)
    return model


# ------------------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those with a COMPLETE marker), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists() and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _rng_state() -> dict:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    py = random.getstate()
    npk, npkeys, nppos, npg, npc = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python_version": py[0], "python_state": torch.tensor(py[1], dtype=torch.int64),
             "python_gauss": -1.0 if py[2] is None else float(py[2]), "numpy_keys": torch.from_numpy(npkeys.astype("int64")),
             "numpy_pos": nppos, "numpy_gauss": [npg, npc]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.set_rng_state(state["torch"])
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     None if gauss == -1.0 else gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), int(state["numpy_pos"]),
                         int(state["numpy_gauss"][0]), float(state["numpy_gauss"][1])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, keep_last: int = 0) -> Path:
    """checkpoints/step-N/: adapter (safetensors), optimizer.pt, scheduler.pt, rng.pt, trainer_state.json and the
    COMPLETE marker, written into a temporary folder renamed when everything is there. Prunes to keep_last."""
    import torch  # noqa: PLC0415

    target = Path(run_dir) / "checkpoints" / f"step-{state['step']}"
    if target.exists():  # e.g. a stop right after a periodic save at the same step, or a re-run after a resume
        if (target / COMPLETE_MARKER).exists():
            prune_checkpoints(run_dir, keep_last)
            return target
        shutil.rmtree(target)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            write_json(tmp / "trainer_state.json", state)
            (tmp / COMPLETE_MARKER).write_text(f"{time.time()}\n")
    except OSError as e:
        raise TrainingFailed(f"Could not write checkpoint step-{state['step']} ({e.strerror or e}); earlier "
                             "checkpoints are intact. Free some disk space and resume.") from e
    prune_checkpoints(run_dir, keep_last)
    return target


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    folder = Path(run_dir) / "checkpoints"
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():  # temporary folders of an interrupted write (killed process)
            if p.name.startswith(".step-") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
    valid = list_checkpoints(run_dir)
    if keep_last > 0:
        for p in valid[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint; returns its trainer state."""
    import torch  # noqa: PLC0415
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    state = json.loads((ckpt / "trainer_state.json").read_text())
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise BadInput(f"The checkpoint's adapter does not fit this model ({missing[0]}...).")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True, map_location="cpu"))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True, map_location="cpu"))
    return state


def _replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder through a temporary one; an existing `target` is replaced only once the new one is complete."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    with atomic_dir(target.with_name(f"{target.name}.new")) as tmp:
        write(tmp)
    new = target.with_name(f"{target.name}.new")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the loop


def _schedule(name: str, warmup: int, total: int) -> Callable[[int], float]:
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


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _is_oom(exc: BaseException) -> bool:
    import torch  # noqa: PLC0415

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


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


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""

    def __init__(self):
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.dist = dist
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
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
    import torch  # noqa: PLC0415

    from . import device as devicemod  # noqa: PLC0415

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ws = ws or _workspace_for(run_dir)
    log = log or (lambda msg: print(msg, flush=True))
    if not validated:
        cfg = validate(cfg, ws, resume)
    stop_file = run_dir / STOP_FLAG
    should_stop = should_stop or stop_file.exists
    dist = _Dist()
    try:
        return _train(cfg, run_dir, ws, on_metrics, resume, should_stop, log, dist, devicemod.profile(), torch)
    except MacTunerError:
        raise
    except BaseException as e:
        if _is_oom(e):
            raise TrainingFailed(_oom_message(cfg, devicemod.profile())) from e
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
    dtype, dtype_name = _torch_dtype(cfg, prof)
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
        train_items, val_items = train_enc.examples, val_enc.examples

    sampler = DistributedSampler(train_items, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed)
    micro_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # --- model, optimizer, schedule -----------------------------------------------------------------------
    model = build_model(cfg, dtype, device, dist.local_rank)
    loss_mod = _loss_module_class()(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.scheduler, cfg.warmup_steps, total_steps))

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
    probe = next((_cut(it, 64) for it in train_items if any(x != IGNORE for x in it[1][1:64])), train_items[0])
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

    train_module = loss_mod
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        train_module = DDP(loss_mod, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    if dist.main:
        log(f"Training {cfg.method} r={cfg.rank} ({n_trainable:,} trainable parameters) on {len(train_items)} "
            f"{'packed sequences' if cfg.packing else 'rows'}, {total_steps} steps, batch {cfg.batch_size}x"
            f"{cfg.grad_accum}x{dist.world}, {dtype_name} on {prof.kind}, {threads} threads.")

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
                "best_eval_loss": best_eval, "config": cfg.to_dict(), "world_size": dist.world, "time": time.time()}

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
        batches = [collate([train_items[i] for i in mb], pad_id, cfg.packing) for mb in mbs]
        n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        in_tokens = sum(int((b["input_ids"] != pad_id).sum()) if not cfg.packing else int(b["input_ids"].numel())
                        for b in batches)
        n_global, in_tokens_g = dist.sum([float(n_local), float(in_tokens)])
        scale = dist.world / max(1.0, n_global)  # DDP averages gradients over ranks: undo that, then token-mean
        loss_sum = 0.0
        for j, b in enumerate(batches):
            sync_ctx = train_module.no_sync() if dist.world > 1 and j < len(batches) - 1 else contextlib.nullcontext()
            with sync_ctx:
                ls, _ = train_module(**batch_to(b))
                (ls * scale).backward()
            loss_sum += float(ls.detach())
        loss = dist.sum([loss_sum])[0] / max(1.0, n_global)
        if not math.isfinite(loss):
            raise TrainingFailed(
                f"The loss became {loss} at step {step + 1}: training diverged. Lower the learning rate (it is "
                f"{cfg.learning_rate:g}), check the data, or resume from an earlier checkpoint.")
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingFailed(f"The gradient became {grad_norm} at step {step + 1}: training diverged. Lower the "
                                 f"learning rate (it is {cfg.learning_rate:g}).")
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
               "elapsed": round(elapsed_before + time.time() - t_start, 3), "step_time": dt}
        if device.type == "cuda":
            row["device_peak_memory"] = int(torch.cuda.max_memory_allocated(device))
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            ev = evaluate()
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
            write_json(tmp / "mactuner.json", {"base_model": cfg.base_model, "dataset": cfg.dataset,
                                               "dataset_version": cfg.dataset_version, "method": cfg.method,
                                               "steps": step, "final_loss": last_loss, "best_eval_loss": best_eval,
                                               "config": cfg.to_dict()})

        _replace_dir(adapter, write_adapter)
        reason = f"finished {step} steps in {time.time() - t_train:.0f} s"
    if dist.world > 1:
        dist.dist.barrier()
    return TrainResult(state=state_out, step=step, total_steps=total_steps, reason=reason,
                       adapter=str(adapter) if adapter else None, checkpoint=str(last_ckpt) if last_ckpt else None,
                       final_loss=last_loss, best_eval_loss=best_eval, elapsed=elapsed_before + time.time() - t_start)


def _cut(item, n: int):
    return tuple(list(x[:n]) for x in item)


def _oom_message(cfg: TrainConfig, prof) -> str:
    from transformers import AutoConfig  # noqa: PLC0415

    from . import device as devicemod  # noqa: PLC0415

    advice = ""
    try:
        shape = devicemod.ModelShape.from_config(AutoConfig.from_pretrained(cfg.base_model,
                                                                            trust_remote_code=cfg.trust_remote_code))
        avail = devicemod.profile(refresh=True).available_memory
        dtype = prof.train_dtype if cfg.dtype == "auto" else cfg.dtype
        rec = devicemod.recommend_batch_size(shape, avail, "qlora" if cfg.method == "qlora" else "lora",
                                             dtype if dtype in devicemod.DTYPE_BYTES else "float32", cfg.max_length,
                                             cfg.rank, cfg.gradient_checkpointing)
        if rec and rec < cfg.batch_size:
            advice = f" Try batch size {rec} (with grad_accum {max(1, cfg.batch_size * cfg.grad_accum // rec)} to keep the effective batch)"
        else:
            advice = " Try batch size 1 with grad_accum to keep the effective batch"
    except Exception as e:  # noqa: BLE001 - the advice is a bonus; the failure message must still come out
        advice = f" Try a smaller batch size (no estimate: {type(e).__name__})"
    return (f"Out of memory at batch size {cfg.batch_size}, max length {cfg.max_length}.{advice}, a shorter max "
            "length, or gradient checkpointing.")


# ------------------------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    """The training subprocess: read the config, train into the run folder, keep status.json and metrics.jsonl."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description="Fine-tune with LoRA into a run folder.")
    ap.add_argument("config", help="TrainConfig as YAML")
    ap.add_argument("--run-dir", default=None, help="run folder (default: the config file's folder)")
    ap.add_argument("--resume", default=None, metavar="CHECKPOINT", help="a checkpoints/step-N folder to resume from")
    ap.add_argument("--root", default=None, help="workspace (default: the run folder's, else ~/.mactuner)")
    args = ap.parse_args(argv)

    from .runs import RunDir, start_next  # noqa: PLC0415

    run_dir = Path(args.run_dir or Path(args.config).resolve().parent).resolve()
    ws = Workspace.open(args.root) if args.root else _workspace_for(run_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    run = RunDir(run_dir)
    if rank0:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.config_path.exists():
            shutil.copyfile(args.config, run.config_path)
        run.mark_running(resume=args.resume)

    def on_term(_sig, _frame):  # SIGTERM (and torchrun forwarding it): stop at the step end, with a checkpoint
        run.stop_flag.touch()

    signal.signal(signal.SIGTERM, on_term)
    rc = 1
    try:
        cfg = TrainConfig.from_yaml(Path(args.config))
        cfg = validate(cfg, ws, args.resume)
        if rank0 and args.resume:
            state = json.loads((Path(args.resume) / "trainer_state.json").read_text())
            run.append_metrics({"event": "resume", "step": int(state["step"]), "checkpoint": str(args.resume),
                                "time": time.time()})

        last_status = [0.0]

        def on_metrics(row: dict) -> None:
            run.append_metrics(row)
            ev = f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            print(f"step {row['step']}/{row['total_steps']} loss {row['loss']:.4f}{ev} lr {row['learning_rate']:.2e} "
                  f"grad {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s", flush=True)
            if ev or time.time() - last_status[0] > 2.0:  # progress for list_runs, at most every 2 s
                fields = {"step": row["step"], "total_steps": row["total_steps"], "last_loss": row["loss"]}
                if ev:
                    fields["best_eval_loss"] = _best(run.status().get("best_eval_loss"), row["eval_loss"])
                run.update_status(**fields)
                last_status[0] = time.time()

        result = run_training(cfg, run_dir, on_metrics if rank0 else None, ws=ws, resume=args.resume, validated=True)
        if rank0:
            run.update_status(state=result.state, reason=result.reason, ended=time.time(), step=result.step,
                              total_steps=result.total_steps, final_loss=result.final_loss,
                              best_eval_loss=result.best_eval_loss, adapter=result.adapter)
        print(f"{result.state}: {result.reason}", flush=True)
        rc = 0
    except MacTunerError as e:
        print(f"failed: {e.message}", file=sys.stderr, flush=True)
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        if rank0:
            run.update_status(state="failed", reason=e.message, ended=time.time())
    except KeyboardInterrupt:
        if rank0:
            run.update_status(state="failed", reason="interrupted (Ctrl-C) before a checkpoint was written", ended=time.time())
    except Exception as e:  # noqa: BLE001 - a bug: keep the traceback in log.txt and say so in the status
        traceback.print_exc()
        if rank0:
            run.update_status(state="failed", reason=f"internal error: {type(e).__name__}: {e} (see log.txt)",
                              ended=time.time())
    finally:
        if rank0:
            run.stop_flag.unlink(missing_ok=True)
            try:
                start_next(ws)  # the queue: start the oldest queued run now that this one is over
            except Exception:  # noqa: BLE001 - the next poll starts it; this run's outcome stands
                traceback.print_exc()
    return rc


def _best(a, b):
    vals = [v for v in (a, b) if isinstance(v, (int, float))]
    return min(vals) if vals else None


if __name__ == "__main__":
    sys.exit(main())
