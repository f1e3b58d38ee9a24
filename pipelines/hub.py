"""The Hugging Face Hub: everything it says about a model without downloading it (`hub_info`), and `download` of the
files a model needs into the HF cache with a progress callback; Hub and network errors become messages a user can
act on. The endpoint is HF_ENDPOINT when set (the tests' local stand-in), else the Hub.

Every HTTP call huggingface_hub makes here has a connect and a read timeout (`use_timeouts`): it leaves many
without one, so a Hub that accepts the connection and never answers would hang a push or a download for ever.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BadInput, MacTunerError, NotFound, Unauthorized, Unavailable
from .models import weight_format
from .progress import ProgressFn, no_progress
from .workspace import human_bytes


def hub_endpoint() -> str:
    from huggingface_hub import constants  # noqa: PLC0415

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


CONNECT_SECONDS = 10.0


def read_seconds() -> float:
    """Seconds a Hub call may wait for the next bytes of an answer: MACTUNER_HUB_TIMEOUT, default 60 (a commit of
    many files takes the Hub a while)."""
    try:
        return max(1.0, float(os.environ.get("MACTUNER_HUB_TIMEOUT") or 60.0))
    except ValueError:
        return 60.0


def _fill_timeouts(request) -> None:
    """A request hook: each timeout huggingface_hub left unset (None waits for ever) gets ours."""
    timeouts = dict(request.extensions.get("timeout") or {})
    read = read_seconds()
    for key, value in (("connect", CONNECT_SECONDS), ("read", read), ("write", read), ("pool", CONNECT_SECONDS)):
        if timeouts.get(key) is None:
            timeouts[key] = value
    request.extensions = {**request.extensions, "timeout": timeouts}


_TIMEOUTS_LOCK = threading.Lock()
_timeouts_on = False


def use_timeouts() -> None:
    """From now on in this process, huggingface_hub's shared HTTP client is made with the timeout hook after its
    own hooks (offline mode, request ids), through its documented client factory; once is enough."""
    global _timeouts_on
    from huggingface_hub import get_session, set_client_factory  # noqa: PLC0415

    with _TIMEOUTS_LOCK:
        if _timeouts_on:
            return
        base = get_session()  # huggingface_hub's own client: its class and hooks are copied
        hooks = {kind: list(base.event_hooks.get(kind, [])) for kind in ("request", "response")}
        hooks["request"].append(_fill_timeouts)

        def client():  # timeout=None as huggingface_hub's own: the hook then fills every unset one
            return type(base)(event_hooks=hooks, follow_redirects=base.follow_redirects, timeout=None)

        set_client_factory(client)
        _timeouts_on = True


def is_timeout(exc: BaseException) -> bool:
    """True for a connect / read / write timeout of the HTTP client (httpx's TimeoutException) or of a socket."""
    return isinstance(exc, TimeoutError) or any(k.__name__ == "TimeoutException" for k in type(exc).__mro__)


def timeout_words(exc: BaseException) -> str:
    """'did not answer within N s (ReadTimeout)' for a timeout `exc` of a call that had our timeouts."""
    seconds = CONNECT_SECONDS if "Connect" in type(exc).__name__ else read_seconds()
    return f"did not answer within {seconds:.0f} s ({type(exc).__name__})"


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
    if is_timeout(exc):
        return Unavailable(f"The Hub at {hub_endpoint()} did not answer in time about '{model_id}' "
                           f"({type(exc).__name__}). Check the network and try again; local models still work.")
    return Unavailable(
        f"Cannot reach the Hub at {hub_endpoint()} ({type(exc).__name__}). Check the network; local models still work."
    )


def transport_errors() -> tuple[type[BaseException], ...]:
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
                            *transport_errors()))


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


def hub_info(model_id: str, token: str | None = None) -> HubInfo:
    """Everything the Hub says about a model, without downloading it."""
    model_id = validate_model_id(model_id)
    from huggingface_hub import HfApi  # noqa: PLC0415

    use_timeouts()
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
    fmt = weight_format(names)
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
    fmt = weight_format(names)
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


def download(model_id: str, token: str | None = None, progress: ProgressFn = no_progress, gguf_file: str | None = None,
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
