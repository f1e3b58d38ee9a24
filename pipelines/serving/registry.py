"""The loaded models of the studio's process: one registry shared by every browser tab and API caller, with a
*current* model (what the header and the Model tab show) and others loaded beside it (compare, the API). Nothing
that only reads it waits on a slow operation: loads and unloads do their slow part outside its lock.
"""

from __future__ import annotations

import threading
import time

from .. import models
from ..errors import Conflict, NotFound
from ..models import (
    DEFAULT_NAME,
    LoadedModel,
    ProgressFn,
    ensure_default_gguf,
    no_progress,
    process_rss,
    resolve_source,
    single_gguf,
    start_default_hf_materialization,
)
from ..workspace import Workspace
from . import mlx as mlx_serving


class ModelRegistry:
    """The loaded models of this process, shared by every browser tab and API caller; its lock guards the dict and
    the current name only (readers never wait on a load or an unload)."""

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
             name: str | None = None, progress: ProgressFn = no_progress, replace: bool = True,
             current: bool = True, backend: str = "auto") -> LoadedModel:
        """Load a GGUF file or HF folder (or a downloaded Hub id) and make it current. `replace` unloads the
        previous current model (memory is shared); replace=False keeps it loaded beside (to compare two models,
        or for an API caller: then current=False leaves the current model as it is). `backend` for an HF folder:
        auto (MLX on Apple silicon, see serving.mlx.choose) | torch | mlx."""
        path = resolve_source(source, ws)
        if not self._load_lock.acquire(blocking=False):
            raise Conflict(f"Another model ({self._loading}) is being loaded; try again when it is done.")
        try:
            self._loading = path.name
            progress(0.1, f"Loading {path.name}...")
            if path.is_dir() and not (path / "config.json").exists():
                path = single_gguf(path)
            if name is None and ws is not None and path.resolve() == models.default_hf_path(ws).resolve():
                name = models.DEFAULT_HF_NAME  # not "hf", its folder's name
            if path.is_file():
                lm = models.load_gguf(path, name)
            elif mlx_serving.choose(path, backend) == "mlx":  # Apple silicon (or asked for): mlx-lm answers
                lm = mlx_serving.load_mlx(path, name, trust_remote_code)
            else:
                lm = models.load_hf(path, name, trust_remote_code)
            with self._lock:  # the swap only: nothing slow under this lock
                previous = self._current
                gone = [self._models.get(lm.name)] + ([self._models.get(previous)]
                                                      if replace and previous and previous != lm.name else [])
                gone = [m for m in gone if m is not None and m is not lm]
                for m in gone:
                    self._models.pop(m.name, None)
                self._models[lm.name] = lm
                if current or self._current not in self._models:
                    self._current = lm.name
            for m in gone:
                self._free_when_idle(m)
            progress(1.0, f"Loaded {lm.name}")
            return lm
        finally:
            self._loading = None
            self._load_lock.release()

    @staticmethod
    def _free(lm: LoadedModel) -> None:
        """Close the model's backend (a worker process ends; torch weights are dropped). The caller holds lm.lock."""
        backend, lm.backend = lm.backend, None
        if backend is not None:
            backend.close()

    def _free_when_idle(self, lm: LoadedModel, wait: float = 30.0) -> None:
        """Free a model taken out of the registry once no answer runs on it: at once when idle, else when the answer
        in progress ends (in a thread, so the caller does not wait longer than `wait`)."""
        if lm.lock.acquire(timeout=wait):
            try:
                self._free(lm)
            finally:
                lm.lock.release()
            return

        def later():
            with lm.lock:
                self._free(lm)

        threading.Thread(target=later, name=f"free-{lm.name}", daemon=True).start()

    def unload(self, name: str | None = None) -> dict:
        """Unload `name` (default: the current model); report the process memory before and after. Conflict when it
        is still answering after 30 s (the registry stays readable meanwhile)."""
        with self._lock:
            name = name or self._current
            lm = self._models.get(name) if name else None
        if lm is None:
            raise NotFound("No model is loaded.")
        before = process_rss()
        if not lm.lock.acquire(timeout=30):  # never free a model mid-answer
            raise Conflict(f"{name} is answering a chat; stop it (Chat tab) before unloading the model.")
        try:
            with self._lock:
                if self._models.get(name) is lm:
                    self._models.pop(name)
                if self._current == name:
                    self._current = next(iter(self._models), None)
            self._free(lm)
        finally:
            lm.lock.release()
        after = process_rss()
        return {"unloaded": name, "rss_before": before, "rss_after": after, "released": max(0, before - after)}


REGISTRY = ModelRegistry()


def load_default(ws: Workspace, registry: ModelRegistry = REGISTRY, progress: ProgressFn = no_progress) -> LoadedModel:
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
