"""The model card of a Hub push: README.md with the Hub's metadata (base_model, library_name, tags, pipeline_tag,
written with huggingface_hub's ModelCardData) and a body made from the export and its run - the base model, the
dataset (name, version, rows), the training settings, the final losses and the verdict, what the repository holds,
each GGUF's validation (checks and perplexity table), and the Ollama / llama.cpp / transformers / PEFT commands.

Nothing local leaves the machine: paths become their last component, the base model its Hub id when it is known
(`hub_id_of`). The card has no date in it, so pushing an unchanged export again changes nothing.

    info = run_info(ws, manifest)               # what the card says about the training
    text = model_card(repo_id, export, info, parts, ggufs)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MacTunerError
from ..runs import resolve_adapter, run_config
from ..training.common import base_note
from ..workspace import Workspace, human_bytes
from .run import preferred_gguf
from .validate import CHECK_LABELS

# The embedded default model (base_model "default" in a run's config) is Gemma 3 270M, the pretrained one: it has
# no chat template and never learned Gemma's turn tokens (README, Chat).
DEFAULT_BASE_ID = "google/gemma-3-270m"
CARD_SETTINGS = ("method", "backend", "base_bits", "rank", "alpha", "dropout", "target_modules", "epochs", "max_steps", "learning_rate",
                 "scheduler", "warmup_steps", "batch_size", "grad_accum", "max_length", "packing",
                 "train_on_responses_only", "seed")


def hub_id_of(base: str | None, ws: Workspace | None = None) -> str | None:
    """The Hub id a base model came from: a Hub id as typed, an HF cache snapshot's repo, the embedded default's;
    None for a folder of unknown origin."""
    if not base:
        return None
    base = str(base)
    if base == "default" or (ws is not None and Path(base) == (ws.models / "default" / "hf")):
        return DEFAULT_BASE_ID
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base)
    if m:
        return f"{m[1]}/{m[2]}"
    if base.startswith(("/", "~", ".")) or Path(base).exists() or base.count("/") != 1:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # noqa: PLC0415

    try:
        validate_repo_id(base)
    except HFValidationError:
        return None
    return base


def scrub_paths(value):
    """Local paths in a config value reduced to their last component."""
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", value)):
        return Path(value).name
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class RunInfo:
    """What the card says about the training (every field may be missing: an export of a plain HF folder)."""

    adapter: Path | None = None
    run: str | None = None
    base_model: str | None = None  # Hub id, or None
    base_label: str = ""  # what to call it when there is no Hub id
    dataset: str | None = None
    dataset_version: int | None = None
    counts: dict = field(default_factory=dict)  # train / validation / total rows
    settings: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)  # final_loss, best_eval_loss, steps
    verdict: dict | None = None


def run_info(ws: Workspace, manifest: dict) -> RunInfo:
    """The training behind an export: its adapter and run (from export.json's source), the run's config, the
    adapter's mactuner.json (losses), the dataset version's meta.json (rows), the verdict."""
    info = RunInfo()
    source = manifest.get("source")
    try:
        adapter, run_dir = resolve_adapter(source) if source else (None, None)
    except MacTunerError:
        adapter, run_dir = None, None
    base = manifest.get("base_model") or (source if not adapter else None)
    if adapter is None:
        info.base_model, info.base_label = hub_id_of(base, ws), Path(str(base or "?")).name
        return info
    meta = _read_json(adapter / "mactuner.json")
    cfg = run_config(run_dir) or meta.get("config") or {}
    info.adapter, info.run = adapter, run_dir.name if run_dir else adapter.parent.name
    typed = cfg.get("base_model") or meta.get("base_model")
    info.base_model = hub_id_of(typed, ws) or hub_id_of(base, ws)
    info.base_label = Path(str(typed or base or "?")).name
    info.dataset = cfg.get("dataset") or meta.get("dataset")
    version = cfg.get("dataset_version") or meta.get("dataset_version")
    if info.dataset:
        from ..training import dataset_versions  # noqa: PLC0415

        versions = dataset_versions(ws, info.dataset)
        version = int(version or 0) or (versions[-1] if versions else None)
        if version:
            info.counts = _read_json(ws.datasets / info.dataset / f"v{version}" / "meta.json").get("counts") or {}
    info.dataset_version = version
    info.settings = {k: scrub_paths(cfg[k]) for k in CARD_SETTINGS if k in cfg}
    status = _read_json(run_dir / "status.json") if run_dir else {}
    for key in ("final_loss", "best_eval_loss", "steps"):
        val = meta.get(key) if meta.get(key) is not None else status.get("step" if key == "steps" else key)
        if val is not None:
            info.losses[key] = val
    if run_dir:
        from ..training.verdict import read_verdict  # noqa: PLC0415

        info.verdict = read_verdict(run_dir)
    return info


def card_metadata(info: RunInfo, parts: set[str]):
    """huggingface_hub's ModelCardData for what the repository holds."""
    from huggingface_hub import ModelCardData  # noqa: PLC0415

    library = "transformers" if "merged" in parts else "peft" if "adapter" in parts else "gguf"
    tags = ["mactuner"] + (["lora", "peft"] if info.adapter else []) + (["merged"] if "merged" in parts else []) + \
        (["gguf", "llama.cpp", "ollama"] if "gguf" in parts else [])
    return ModelCardData(base_model=info.base_model, library_name=library, tags=tags, pipeline_tag="text-generation")


def _cell(value) -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text[:160] + ("…" if len(text) > 160 else "") or "–"


def _num(x, fmt: str = "{:.4f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def _training_md(info: RunInfo) -> list[str]:
    if info.adapter is None:
        return []
    rows = f"{info.counts['train']:,} training and {info.counts.get('validation', 0):,} validation rows" \
        if info.counts.get("train") is not None else "size unknown"
    lines = ["## Training", "",
             f"- Base model: {f'[{info.base_model}](https://huggingface.co/{info.base_model})' if info.base_model else info.base_label}",
             f"- Dataset: {info.dataset or '?'}" + (f" (version {info.dataset_version})" if info.dataset_version else "")
             + f": {rows}"]
    if info.run:
        lines.append(f"- Run: {info.run}")
    if base_note(info.settings):
        lines.append(f"- {base_note(info.settings)}")
    for key, label in (("steps", "Steps"), ("final_loss", "Final training loss"),
                       ("best_eval_loss", "Best validation loss")):
        if key in info.losses:
            lines.append(f"- {label}: {_num(info.losses[key], '{}' if key == 'steps' else '{:.4f}')}")
    v = info.verdict or {}
    if v.get("verdict"):
        lines.append(f"- Did the fine-tune help? {v['verdict']}")
        if v.get("base") and v.get("tuned"):
            lines.append(f"  (validation loss {_num(v['base'].get('loss'))} → {_num(v['tuned'].get('loss'))}, "
                         f"perplexity {_num(v['base'].get('perplexity'), '{:.2f}')} → "
                         f"{_num(v['tuned'].get('perplexity'), '{:.2f}')})")
    if info.settings:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(json.dumps(val) if isinstance(val, (list, dict)) else val)} |"
                  for k, val in info.settings.items()]
    return lines + [""]


def _validation_md(ggufs: list[dict]) -> list[str]:
    """Per GGUF (export_details' gguf_files rows) its checks, then one perplexity table for all of them."""
    checked = [g for g in ggufs if g.get("validation")]
    if not ggufs:
        return []
    lines = ["## GGUF validation", "",
             "Each GGUF was loaded in llama.cpp and checked by MacTuner against the model it came from."]
    table: list[dict] = []
    for g in ggufs:
        val = g.get("validation")
        lines += ["", f"### {g['file']} ({g['type']}, {g['size']})", ""]
        if not val:
            lines.append("Not validated.")
            continue
        lines += ["| check | result | detail |", "|---|---|---|"]
        for item in val.get("items", []):
            mark = {True: "✅ pass", False: "❌ fail", None: "– skipped"}.get(item.get("ok"), "–")
            lines.append(f"| {CHECK_LABELS.get(item.get('name'), item.get('name'))} | {mark} | "
                         f"{_cell(item.get('detail', ''))} |")
        for r in val.get("table", []):
            if not any(t["type"] == r.get("type") for t in table):
                table.append(r)
    if checked and table:
        table.sort(key=lambda r: r.get("type") != "HF (merged)")
        lines += ["", "Perplexity on a fixed held-out paragraph (lower is better):", "",
                  "| type | size | perplexity | Δ vs HF (%) | tokens/s |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('type')} | {human_bytes(r.get('size'))} | {_num(r.get('perplexity'), '{:.3f}')} | "
                  f"{_num(r.get('delta_pct'), '{:+.2f}')} | {_num(r.get('tokens_per_s'), '{:.0f}')} |" for r in table]
    return lines + [""]


def _usage_md(repo_id: str, parts: set[str], ggufs: list[dict], adapter_dir: str, base: str) -> list[str]:
    lines = ["## Use it", ""]
    if ggufs:
        pick = preferred_gguf(ggufs)  # the smallest one whose validation failed nothing
        tag = pick["type"]
        stem = pick["file"][: -len(".gguf")]
        lines += ["Ollama (straight from the Hub):", "", "```sh", f"ollama run hf.co/{repo_id}:{tag}", "```", "",
                  "Ollama with MacTuner's Modelfile (its chat template and stop words):", "", "```sh",
                  f"hf download {repo_id} {pick['file']} {stem}.Modelfile --local-dir .",
                  f"ollama create {stem.lower()} -f {stem}.Modelfile && ollama run {stem.lower()}", "```", "",
                  "llama.cpp:", "", "```sh", f"llama-cli -hf {repo_id}:{tag} -cnv",
                  f"llama-server -hf {repo_id}:{tag}", "```", "",
                  "From a private repository, Ollama needs its public key added to your Hugging Face account "
                  "(https://huggingface.co/settings/keys) and llama.cpp an access token in HF_TOKEN.", ""]
    if "merged" in parts:
        lines += ["transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", ""]
    if "adapter" in parts:
        sub = f', subfolder="{adapter_dir}"' if adapter_dir else ""
        lines += ["PEFT (the LoRA adapter on its base):", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub})', "```", ""]
    return lines


def model_card(repo_id: str, export: str, info: RunInfo, parts: set[str], ggufs: list[dict],
               files: list[dict], adapter_dir: str = "") -> str:
    """README.md for the repository: metadata front matter, then the body (see the module docstring). `parts`:
    what the repository holds (adapter, merged, gguf); `ggufs`: export_details rows of the GGUFs it holds; `files`:
    {path, bytes} of every file in it."""
    from huggingface_hub import ModelCard  # noqa: PLC0415

    data = card_metadata(info, parts)
    what = {"merged": "the LoRA fine-tune merged into its base (safetensors)", "adapter": "the LoRA adapter",
            "gguf": "GGUF files for llama.cpp, Ollama and LM Studio"}
    base = info.base_model or info.base_label or "the base model"
    link = f"[{base}](https://huggingface.co/{base})" if info.base_model else base
    lines = [f"# {repo_id.split('/')[-1]}", "",
             (f"A fine-tune of {link}" if info.adapter else f"A GGUF export of {link}") +
             f", exported with MacTuner (export `{export}`).", "",
             "This repository holds " + "; ".join(what[p] for p in ("merged", "adapter", "gguf") if p in parts) + ".",
             ""]
    lines += ["| file | size |", "|---|---|"]
    lines += [f"| `{f['path']}` | {human_bytes(f['bytes'])} |" for f in sorted(files, key=lambda f: f["path"])
              if f["path"] != "README.md" and not f["path"].startswith(".")]
    lines.append("")
    lines += _training_md(info)
    lines += _validation_md(ggufs)
    lines += _usage_md(repo_id, parts, ggufs, adapter_dir, info.base_model or info.base_label)
    body = "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
