"""What every tab's handlers share: the `Context` (workspace and model registry), `ui_errors` (a MacTunerError
becomes a toast with its message; anything else one line in the UI and its traceback in the log), named views
(`unchanged`), refusals shown in place on the page (`refused_on_page`, `keep_last_good`), per-browser-session state
released when the page closes, files handed to the browser (`handout_file`, served for any workspace), and small UI
helpers.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import gradio as gr
import pandas as pd

from pipelines.errors import MacTunerError
from pipelines.serving import registry as registrymod
from pipelines.workspace import Workspace

log = logging.getLogger("mactuner.studio")
V = TypeVar("V", bound=tuple)


@dataclass
class Context:
    """What every tab's handlers share: the workspace and the loaded-model registry of this process."""

    ws: Workspace
    registry: registrymod.ModelRegistry = field(default_factory=lambda: registrymod.REGISTRY)
    prepare_hf: bool = True  # prepare the default model's HF copy (for training) when it is loaded


def log_refused(fn_name: str, e: MacTunerError) -> None:
    """An expected user error: one line in the log (tracebacks are for bugs)."""
    log.info("refused in %s (%s): %s", fn_name, type(e).__name__, e.message)


def _as_gr_error(fn_name: str, e: Exception) -> gr.Error:
    if isinstance(e, MacTunerError):
        log_refused(fn_name, e)
        return gr.Error(e.message, print_exception=False)
    log.error("unexpected error in %s", fn_name, exc_info=e)  # a bug: the traceback goes to the log only
    return gr.Error(f"Unexpected error ({type(e).__name__}: {e}). Details are in the studio's log.", print_exception=False)


def ui_errors(fn):
    """MacTunerError -> gr.Error with its message; anything else -> one line in the UI, traceback in the log.
    Works for plain functions and for generators, sync or async (streaming handlers), whose errors arrive while
    iterating."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen_wrapper(*args, **kwargs):
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - translated for the user
                raise _as_gr_error(fn.__name__, e) from None

        return agen_wrapper
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - translated for the user
                raise _as_gr_error(fn.__name__, e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - translated for the user
            raise _as_gr_error(fn.__name__, e) from None

    return wrapper


def from_api(request) -> bool:
    """True for a call through gradio_client (it marks its requests), False for the browser page."""
    headers = getattr(request, "headers", None) or {}
    return str(headers.get("x-gradio-user", "")).lower() in ("api", "mcp")


def unchanged(view: type[V], **values) -> V:
    """A named view (a NamedTuple of a tab's outputs) that changes only the fields given; gr.skip() in the rest."""
    return view(**{name: values.pop(name, gr.skip()) for name in view._fields}, **values)


def refused_on_page(shown):
    """For handlers of the page that take a `request: gr.Request` parameter (Gradio injects it, to tell the page
    from a script): in the browser a MacTunerError becomes a warning toast and `shown(message)` as the outputs (no
    red 'Error' over them); through the API it is an error as with `ui_errors`. Anything unexpected stays an error."""

    def deco(fn):
        strict = ui_errors(fn)
        signature = inspect.signature(fn)
        if "request" not in signature.parameters:
            raise TypeError(f"refused_on_page: {fn.__name__} must take a `request: gr.Request` parameter")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if from_api(signature.bind(*args, **kwargs).arguments.get("request")):
                return strict(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            except MacTunerError as e:
                log_refused(fn.__name__, e)
                gr.Warning(e.message)
                return shown(e.message)
            except Exception as e:  # noqa: BLE001 - translated for the user
                raise _as_gr_error(fn.__name__, e) from None

        return wrapper

    return deco


def keep_last_good(view: type[tuple], message: str = "message"):
    """`refused_on_page` for handlers that fill a whole panel (returning a `view`, a NamedTuple of its outputs): a
    refusal leaves every output as it was (the last good state) and puts the one message in the view's field
    `message`."""
    if message not in view._fields:
        raise TypeError(f"keep_last_good: {view.__name__} has no field {message!r}")
    return refused_on_page(lambda text: unchanged(view, **{message: f"⚠️ {text}"}))


def handout_file(ctx: "Context", kind: str, prefix: str, suffix: str, text: str, max_age: float = 3600) -> str:
    """Write `text` to a new file for the browser to download and return its path: under the workspace's
    tmp/handouts/<kind>/, the folder serve() lists in Gradio's allowed_paths (Gradio hands out only files in the
    current folder, the system temp folder, its cache or allowed_paths, so a workspace elsewhere, ~/.mactuner
    included, needs it). Gradio serves its own copy: files older than `max_age` seconds are removed here."""
    folder = Path(handouts_dir(ctx.ws)) / kind
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}*{suffix}"):
        if time.time() - old.stat().st_mtime > max_age:
            old.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=suffix, prefix=prefix, dir=folder, delete=False,
                                     encoding="utf-8") as f:
        f.write(text)
    return f.name


def handouts_dir(ws: Workspace) -> str:
    """The folder of files handed to the browser (Gradio's allowed_paths)."""
    return str(ws.tmp / "handouts")


# how every monitor shows the one state vocabulary of pipelines.jobs
JOB_BADGES = {"queued": "⏳ queued", "running": "🟢 running", "stopping": "🟠 stopping", "finished": "✅ finished",
              "stopped": "⏹ stopped", "cancelled": "⏹ cancelled", "failed": "❌ failed",
              "interrupted": "⏸ interrupted"}


def progress_bar_html(fraction: float, caption: str) -> str:
    """A progress bar (0..1) with a caption line under it, as the Train and Export monitors show it."""
    frac = max(0.0, min(1.0, float(fraction or 0.0)))
    return (f'<div style="background:#eee;border-radius:6px;height:14px"><div style="width:{100 * frac:.1f}%;'
            f'background:#f97316;height:14px;border-radius:6px"></div></div>'
            f'<div style="font-size:13px">{caption}</div>')


def gr_progress(progress: gr.Progress):
    """A pipelines progress callback (fraction, message) that moves Gradio's progress bar."""
    return lambda frac, msg: progress(frac, desc=msg)


def selected_cell(table: pd.DataFrame, evt: gr.SelectData, column: str) -> str:
    """The `column` value of the table row a click selected."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    return str(table.iloc[int(row)][column])


class SessionState:
    """Values kept per browser session (gradio's session hash; one shared slot for callers without one, such as the
    REST API), released when the page is closed: `forget_session` is wired to the app's unload event."""

    def __init__(self):
        self._values: dict[str, object] = {}
        self._lock = threading.Lock()
        _SESSION_STATES.append(self)

    @staticmethod
    def key(request) -> str:
        return getattr(request, "session_hash", None) or "api"

    def set(self, request, value) -> None:
        with self._lock:
            self._values[self.key(request)] = value

    def get(self, request, default=None):
        with self._lock:
            return self._values.get(self.key(request), default)

    def forget(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)

    def __len__(self) -> int:
        return len(self._values)


_SESSION_STATES: list[SessionState] = []


def forget_session(request: gr.Request) -> None:
    """The page was closed (or reloaded): drop what every SessionState kept for it."""
    for state in _SESSION_STATES:
        state.forget(SessionState.key(request))


_END = object()


async def stream(follower, interval: float = 0.5):
    """Drive a pipelines.follow follower made with idle=True from an async handler: each step in a worker thread
    (file reads), each wait on the event loop, so no thread is held while nothing changes; closing this closes it."""
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, follower, _END)
            if item is _END:
                return
            if item is None:
                await asyncio.sleep(interval)
                continue
            yield item
    finally:
        follower.close()


class Followers:
    """Streaming monitors (generators that follow a job folder): one per browser session and tab. `start(request)`
    returns a predicate that turns true once the same session starts a newer one, or closes the page - the older
    generator then ends at its next tick instead of streaming on. A call without a session is never superseded."""

    def __init__(self):
        self._current = SessionState()
        self._tokens = itertools.count(1)

    def start(self, request):
        if getattr(request, "session_hash", None) is None:
            return lambda: False
        token = next(self._tokens)
        self._current.set(request, token)
        return lambda: self._current.get(request) != token
