"""Merge a LoRA adapter into its base model (PEFT `merge_and_unload`): exports/<name>/merged/ with safetensors, the
tokenizer as trained, its chat template and a model card.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from ..errors import Conflict
from ..progress import ProgressFn, no_progress
from ..runs import resolve_adapter, resolve_base
from ..runs import run_config as _run_config
from ..training.common import base_note
from ..workspace import Workspace, atomic_dir, write_json
from .common import file_slug


def weights_dtype(hf_dir: Path):
    import torch  # noqa: PLC0415

    cfg = json.loads((hf_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _model_card(base: Path, adapter: Path, run_dir: Path | None, dtype: str) -> str:
    cfg = _run_config(run_dir)
    meta = {}
    if (adapter / "mactuner.json").is_file():
        meta = json.loads((adapter / "mactuner.json").read_text())
    status = {}
    if run_dir and (run_dir / "status.json").is_file():
        try:
            status = json.loads((run_dir / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            status = {}
    lines = ["---", "library_name: transformers", "tags: [mactuner, lora, merged]", "---", "",
             f"# {run_dir.name if run_dir else adapter.name} (merged)", "",
             "A LoRA fine-tune merged into its base model with PEFT `merge_and_unload`, exported by MacTuner.", "",
             f"- Base model: `{cfg.get('base_model') or meta.get('base_model') or base}` ({base})",
             f"- Adapter: `{adapter}`",
             f"- Dataset: {cfg.get('dataset') or meta.get('dataset') or '?'} "
             f"(version {cfg.get('dataset_version', meta.get('dataset_version', '?'))})",
             f"- Merged in: {dtype}"]
    note = base_note(cfg or meta.get("config") or {})
    if note:
        lines.append(f"- {note}")
    for key in ("final_loss", "best_eval_loss", "steps"):
        if meta.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {meta[key]}")
    if status.get("reason"):
        lines.append(f"- Run: {status.get('state')} - {status['reason']}")
    if run_dir:
        from ..training.verdict import read_verdict  # noqa: PLC0415

        v = read_verdict(run_dir)
        if v and v.get("verdict"):
            lines.append(f"- Did the fine-tune help? {v['verdict']}")
    if cfg:
        import yaml  # noqa: PLC0415

        lines += ["", "## Training configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def saved_chat_template(hf_dir: Path) -> str | None:
    """The chat template a saved tokenizer carries (chat_template.jinja, else tokenizer_config.json), read from the
    files: loading the tokenizer for it takes seconds on a large vocabulary."""
    f = Path(hf_dir) / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    try:
        tpl = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return tpl if isinstance(tpl, str) else None


def special_tokens(hf_dir: Path) -> tuple[str, str]:
    """(bos, eos) text of a saved tokenizer (tokenizer_config.json; "" when unset), read from the file."""
    try:
        cfg = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "", ""

    def text(value) -> str:
        return (value.get("content") if isinstance(value, dict) else value) or ""

    return text(cfg.get("bos_token")), text(cfg.get("eos_token"))


def merge(ws: Workspace, adapter_dir: str | os.PathLike, base_model: str | None = None, name: str | None = None,
          progress: ProgressFn = no_progress) -> Path:
    """Merge an adapter (a run, its adapter/ or a checkpoint) into its base; save exports/<name>/merged/ (HF)."""
    adapter, run_dir = resolve_adapter(adapter_dir)
    base = resolve_base(ws, adapter, run_dir, base_model)
    name = file_slug(name or f"{run_dir.name if run_dir else adapter.parent.name}-{datetime.now():%Y%m%d-%H%M%S}")
    target = ws.exports / name / "merged"
    if target.exists():
        raise Conflict(f"{target} already exists; choose another export name.")
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    dtype = weights_dtype(base)
    progress(0.05, f"Loading the base model {base.name} ({str(dtype).removeprefix('torch.')})...")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    progress(0.4, "Applying the adapter and merging (merge_and_unload)...")
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else (
        run_dir / "adapter" if run_dir and (run_dir / "adapter" / "tokenizer_config.json").is_file() else base)
    progress(0.6, "Writing the merged model (safetensors)...")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        # The tokenizer as trained, file for file (loading and saving Gemma's 262k-token tokenizer costs ~5 s); the
        # SentencePiece model from the base when the adapter has none (the converter prefers it); the adapter's own
        # chat template over any other.
        for f in TOKENIZER_FILES:
            src = next((d for d in (tok_src, base) if (d / f).is_file()), None) if f == "tokenizer.model" else \
                (tok_src if (tok_src / f).is_file() else None)
            if src is not None:
                shutil.copy2(src / f, tmp / f)
        if (adapter / "chat_template.jinja").is_file():
            shutil.copy2(adapter / "chat_template.jinja", tmp / "chat_template.jinja")
        (tmp / "README.md").write_text(_model_card(base, adapter, run_dir, str(dtype).removeprefix("torch.")))
        write_json(tmp / "mactuner.json", {"base_model": str(base), "adapter": str(adapter),
                                           "run": str(run_dir) if run_dir else None, "merged": time.time()})
    del model
    progress(1.0, f"Merged model written to {target}")
    return target
