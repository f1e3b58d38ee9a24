"""LoRA adapters on a loaded model, whatever its backend: check an adapter folder against the loaded base
(`inspect_adapter`), attach it (the base stays: adapters are switched per answer), detach it, and `open_adapter` -
load the base an adapter was trained on, if needed, and attach it. The backend (pipelines.serving) does the loading
(serving/lora.py reads the folder); this module names, checks and serializes (the model's lock).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BadInput, Conflict, NotFound
from .models import LoadedModel
from .serving.lora import AdapterInfo

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def inspect_adapter(lm: LoadedModel, adapter_dir: str | Path) -> AdapterInfo:
    """Check that `adapter_dir` is a LoRA adapter the loaded model can take (for an HF model: a PEFT folder whose
    layer shapes fit), without loading it. BadInput says why not."""
    lm.ensure_loaded()
    return lm.backend.inspect_adapter(Path(str(adapter_dir)).expanduser())


def attach_adapter(lm: LoadedModel, adapter_dir: str | Path, name: str | None = None) -> AdapterInfo:
    """Load a LoRA adapter onto a loaded model, keeping the base; select it per answer with ChatParams.adapter=name
    (None: the base model).

    BadInput: a model that takes no adapter, not a LoRA/safetensors folder, or trained for another base (layer
    shapes differ). NotFound: the folder is gone. Conflict: the name is taken (detach_adapter first)."""
    info = inspect_adapter(lm, adapter_dir)
    name = (name or "").strip() or re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(info.path).name).lstrip(".-_") or "adapter"
    if not _ADAPTER_NAME.fullmatch(name):
        raise BadInput(f"Adapter name {name!r}: use letters, digits, '.', '_' or '-' (64 at most).")
    info.name = name
    with lm.lock:
        lm.ensure_loaded()  # it may have been unloaded meanwhile
        if name in lm.backend.adapters:
            raise Conflict(f"An adapter named '{name}' is already attached; detach it first or choose another name.")
        lm.backend.attach_adapter(info)
    return info


def adapter_label(adapter_dir: Path, run_dir: Path | None) -> str:
    """A stable adapter name for a run's adapter ("<run>") or checkpoint ("<run>.step-N")."""
    run = run_dir.name if run_dir is not None else adapter_dir.name
    base = re.sub(r"[^A-Za-z0-9_.\-]", "-", run).lstrip(".-_")[:48] or "adapter"
    return base if adapter_dir.name == "adapter" or run_dir is None or adapter_dir == run_dir else \
        f"{base}.{re.sub(r'[^A-Za-z0-9_.-]', '-', adapter_dir.name)[:14]}"


def open_adapter(ws, registry, source: str | Path, current: bool = True) -> tuple[LoadedModel, str, str | None]:
    """Make an adapter (a run folder, its adapter/ or a checkpoint) ready to answer with: its HF base model is
    loaded if no loaded model is that base (beside the others; `current` makes it the current model), then the
    adapter is attached under `adapter_label`. Returns (model, adapter name, a note saying what was loaded or
    None)."""
    from .models import DEFAULT_HF_NAME, default_hf_path  # noqa: PLC0415
    from .runs import resolve_adapter, resolve_base  # noqa: PLC0415

    adapter_dir, run_dir = resolve_adapter(ws.check_path(source) if ws is not None else source)
    base = resolve_base(ws, adapter_dir, run_dir)
    name = adapter_label(adapter_dir, run_dir)
    note = None
    # a GGUF's model_path is its file, never the HF folder `base`
    lm = next((m for m in map(registry.get, registry.names())
               if m is not None and Path(m.model_path).resolve() == base), None)
    if lm is None:
        label = DEFAULT_HF_NAME if base == default_hf_path(ws).resolve() else None
        lm = registry.load(str(base), ws, name=label, replace=False, current=current)
        note = f"loaded {lm.name} (the adapter's base model) to answer with it"
    if name not in {a.name for a in list_adapters(lm)}:
        attach_adapter(lm, adapter_dir, name)
    return lm, name, note


def list_adapters(lm: LoadedModel) -> list[AdapterInfo]:
    """Adapters attached to this model, in the order they were attached."""
    return list(lm.backend.adapters.values()) if lm.backend is not None else []


def detach_adapter(lm: LoadedModel, name: str) -> None:
    """Remove an attached adapter (the base model answers as before it was attached)."""
    with lm.lock:
        lm.ensure_loaded()
        if name not in lm.backend.adapters:
            raise NotFound(f"No adapter named '{name}' is attached to this model.")
        lm.backend.detach_adapter(name)
