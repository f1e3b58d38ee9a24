"""LoRA adapters on a loaded model, whatever its backend: check an adapter folder against the loaded base
(`inspect_adapter`), attach it (the base stays: adapters are switched per answer), detach it, and `open_adapter` -
load the base an adapter was trained on, if needed, and attach it: on the base's GGUF as a LoRA GGUF (`lora_gguf`,
llama.cpp speed) when the base was made from one (`base_gguf`), else on the HF base with PEFT. The files written
for that go to the workspace's tmp/lora-gguf/, one LoRA GGUF per adapter version (and, for adapters that train
token rows of a tied output layer, one copy per base GGUF with that layer written out); `prune_lora_cache` removes
those of versions that are gone and all but the newest copies. The backend (pipelines.serving) does the loading
(serving/lora.py reads the folder); this module names, checks, chooses and serializes (the model's lock).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from .errors import BadInput, Conflict, NotFound, Unavailable
from .models import LoadedModel
from .serving.lora import AdapterInfo
from .workspace import write_json

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def inspect_adapter(lm: LoadedModel, adapter_dir: str | Path) -> AdapterInfo:
    """Check that `adapter_dir` is a LoRA adapter the loaded model can take (for an HF model: a PEFT folder whose
    layer shapes fit), without loading it. BadInput says why not."""
    lm.ensure_loaded()
    return lm.backend.inspect_adapter(Path(str(adapter_dir)).expanduser())


def attach_adapter(lm: LoadedModel, adapter_dir: str | Path, name: str | None = None,
                   chat_template: str | None = None) -> AdapterInfo:
    """Load a LoRA adapter onto a loaded model, keeping the base; select it per answer with ChatParams.adapter=name
    (None: the base model). An HF model takes a PEFT folder, a GGUF model a LoRA GGUF. `chat_template`: the one the
    adapter was trained with, when the model's own differs (a base GGUF without the template).

    BadInput: not an adapter this model takes, or trained for another base (layer shapes differ). NotFound: the
    folder or file is gone. Conflict: the name is taken (detach_adapter first)."""
    info = inspect_adapter(lm, adapter_dir)
    info.chat_template = chat_template
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


def base_gguf(ws, base: Path) -> Path | None:
    """The GGUF an HF base model folder was made from, when it is still there - the default model's HF copy, whose
    mactuner.json names the GGUF it was dequantized from: a run's adapter then answers on that GGUF through
    llama.cpp, as a LoRA GGUF beside it."""
    from .models import default_hf_path, ensure_default_gguf  # noqa: PLC0415

    if ws is None:  # the LoRA GGUF is written into a workspace
        return None
    try:
        source = json.loads((base / "mactuner.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, str) or not source.endswith(".gguf"):
        return None
    if base == default_hf_path(ws).resolve():
        return ensure_default_gguf(ws)  # assembled again if it was removed or the workspace moved
    return Path(source) if Path(source).is_file() else None


def open_adapter(ws, registry, source: str | Path, current: bool = True,
                 progress=lambda fraction, message: None) -> tuple[LoadedModel, str, str | None]:
    """Make an adapter (a run folder, its adapter/ or a checkpoint) ready to answer with, under `adapter_label`.
    When its base model was made from a GGUF (`base_gguf`), that GGUF answers with the adapter written as a LoRA
    GGUF (once; llama.cpp speed, switched per answer without reloading the base); otherwise - or when llama.cpp
    cannot take this adapter - its HF base model with the PEFT adapter. A model not loaded yet is loaded beside
    the others (`current` makes it the current model). Returns (model, adapter name, a note saying what was done,
    or None)."""
    from .export.common import ExportFailed  # noqa: PLC0415 - the export package is only needed from here
    from .runs import resolve_adapter, resolve_base  # noqa: PLC0415

    adapter_dir, run_dir = resolve_adapter(ws.check_path(source) if ws is not None else source)
    base = resolve_base(ws, adapter_dir, run_dir)
    name = adapter_label(adapter_dir, run_dir)
    gguf = base_gguf(ws, base)
    homes = {base} | ({gguf.resolve()} if gguf else set())
    for lm in _loaded(registry):
        if name in lm.backend.adapters and Path(lm.model_path).resolve() in homes:
            return lm, name, None  # attached before
    why_not = None
    if gguf is not None:
        try:
            return _open_on_gguf(ws, registry, adapter_dir, base, gguf, name, current, progress)
        except (BadInput, Unavailable, ExportFailed) as e:  # ExportFailed: the converter broke on it
            why_not = e.message.splitlines()[0]
    lm, note = _loaded_or_load(ws, registry, base, current)
    attach_adapter(lm, adapter_dir, name)
    if why_not:
        note = (f"{note}; " if note else "") + f"transformers answers: llama.cpp cannot take this adapter ({why_not})"
    return lm, name, note


def _open_on_gguf(ws, registry, adapter_dir: Path, base: Path, gguf: Path, name: str, current: bool,
                  progress) -> tuple[LoadedModel, str, str]:
    """The adapter on the base's GGUF as a LoRA GGUF, rows of the token embeddings it trained outright included.
    When the model's output layer is tied to that embedding (Gemma), the LoRA changes the output layer as its own
    tensor: it then answers on a copy of the base GGUF with its output layer written out (`_untied_base`, one per
    base GGUF, shared by every such adapter and switched per answer like any LoRA)."""
    from .export.adapter import needs_untied_base  # noqa: PLC0415
    from .export.merge import saved_chat_template  # noqa: PLC0415
    from .serving.lora import token_row_count  # noqa: PLC0415

    progress(0.1, "Writing the adapter as a LoRA GGUF for llama.cpp (once per adapter)...")
    cache = _lora_cache(ws, adapter_dir, base)
    _remember(cache, adapter_dir)  # before its files: a prune meanwhile keeps them
    lora = lora_gguf(adapter_dir, base, cache.with_suffix(".gguf"))
    untied = needs_untied_base(adapter_dir, base)
    label = None
    if untied:
        progress(0.4, f"Writing {gguf.name} with its output layer written out, for adapters that train token rows "
                      "(once per base model)...")
        label = f"{_model_label(ws, gguf.resolve()) or gguf.stem} (output layer untied)"
        gguf = _untied_base(ws, gguf)
    progress(0.6, f"Loading {gguf.name}...")
    lm, loaded = _loaded_or_load(ws, registry, gguf.resolve(), current, label)
    if name not in lm.backend.adapters:  # attached to this model before
        attach_adapter(lm, lora, name, chat_template=saved_chat_template(adapter_dir) or saved_chat_template(base))
    prune_lora_cache(ws, _in_use(registry))  # now that this adapter's files are in use
    rows = token_row_count(adapter_dir)
    said = "llama.cpp answers: the base GGUF with the adapter as a LoRA GGUF" + (
        f", its {rows} trained token row(s) included" if rows else "") + (
        " (on a copy of the base GGUF with its output layer untied: the rows change it too)" if untied else "")
    return lm, name, f"{loaded}; {said}" if loaded else said


UNTIED = "untied-"  # tmp/lora-gguf/untied-<key>.gguf: a base GGUF with its output layer written out


def _untied_base(ws, gguf: Path) -> Path:
    """The base GGUF with its output layer written out (serving.lora.untied_gguf), once per version of the file."""
    from .serving.lora import untied_gguf  # noqa: PLC0415

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    target = ws.tmp / "lora-gguf" / f"{UNTIED}{key}.gguf"
    return target if target.is_file() else untied_gguf(gguf, target)


def _lora_cache(ws, adapter_dir: Path, base: Path) -> Path:
    """Where the files written for this version of the adapter go (without a suffix): the workspace's
    tmp/lora-gguf/, a cache keyed by the adapter's folder, weights' size and time, and the base."""
    st = (adapter_dir / "adapter_model.safetensors").stat()
    key = f"{adapter_dir.resolve()}|{st.st_size}|{st.st_mtime_ns}|{base.resolve()}|{LORA_FORMAT}"
    return ws.tmp / "lora-gguf" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _remember(cache: Path, adapter_dir: Path) -> None:
    """<key>.json beside the cached files: the adapter version they were written for (prune_lora_cache reads it)."""

    st = (adapter_dir / "adapter_model.safetensors").stat()
    write_json(cache.with_suffix(".json"), {"adapter": str(adapter_dir.resolve()), "bytes": st.st_size,
                                            "mtime_ns": st.st_mtime_ns, "format": LORA_FORMAT})


# What a cached LoRA GGUF holds; a file written by an earlier version is written again. 2: the trained token rows
# are in the LoRA itself (version 1 left them out, for a copy of the base GGUF that held them).
LORA_FORMAT = 2
STALE_TEMP_S = 6 * 3600  # a temporary file that old was left by a process that died while writing it
KEEP_COPIES = 2  # untied copies of a base GGUF (hundreds of MB each) kept when not in use, newest first


def prune_lora_cache(ws, in_use: set[Path] = frozenset(), keep_copies: int = KEEP_COPIES) -> list[Path]:
    """Remove from tmp/lora-gguf/ the files of adapter versions that are gone (the run deleted, the adapter trained
    again) or unknown (no <key>.json: written before it was kept), temporary files left by a crash, and untied
    copies of a base GGUF beyond the `keep_copies` newest (written again when needed); files a loaded model is using
    (`in_use`) stay. Returns what was removed."""
    folder = ws.tmp / "lora-gguf"
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    keep = {p.stem for p in entries if p.suffix == ".json" and _present(p)}
    copies = [p for p in entries if _is_copy(p) and p.resolve() not in in_use]
    extra = set(sorted(copies, key=_mtime, reverse=True)[keep_copies:])
    removed = []
    for p in entries:
        if p.resolve() in in_use:
            continue
        if p.name.startswith("."):  # being written now, unless it is old
            if time.time() - _mtime(p) < STALE_TEMP_S:
                continue
        elif _is_copy(p):
            if p not in extra:
                continue
        elif p.stem in keep and p.suffix in (".json", ".gguf"):  # <key>.json and its <key>.gguf
            continue
        try:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        except OSError:  # gone meanwhile or not ours to remove: the next prune tries again
            continue
        removed.append(p)
    return removed


def _is_copy(path: Path) -> bool:
    return path.suffix == ".gguf" and path.name.startswith(UNTIED)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _present(record: Path) -> bool:
    """Whether the adapter version a <key>.json names is still on disk, unchanged."""
    try:
        rec = json.loads(record.read_text())
        st = (Path(rec["adapter"]) / "adapter_model.safetensors").stat()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (st.st_size, st.st_mtime_ns, LORA_FORMAT) == (rec.get("bytes"), rec.get("mtime_ns"), rec.get("format"))


def _in_use(registry) -> set[Path]:
    """The files the loaded models read: their own and their attached adapters'."""
    paths = set()
    for lm in _loaded(registry):
        paths.add(Path(lm.model_path).resolve())
        paths.update(Path(a.path).resolve() for a in lm.backend.adapters.values())
    return paths


def lora_gguf(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """The PEFT adapter in `adapter_dir` (trained on the HF model in `base_dir`) as a llama.cpp LoRA GGUF at `out`
    (f32: the adapter exactly), written by the export's converter (pipelines.export.adapter) unless it is there
    already. BadInput says why llama.cpp cannot take this adapter."""
    from .export.adapter import adapter_gguf, adapter_problem  # noqa: PLC0415 - the converter, only from here

    if out.is_file():
        return out
    why = adapter_problem(adapter_dir)
    if why:
        raise BadInput(why)
    try:
        return adapter_gguf(adapter_dir, base_dir, out, "f32")
    except Conflict:  # another request wrote it meanwhile
        return out


def _loaded(registry) -> list[LoadedModel]:
    return [m for m in map(registry.get, registry.names()) if m is not None and m.backend is not None]


def _model_label(ws, path: Path) -> str | None:
    """The name the Model tab gives the embedded default model's two copies (None: the file's own name)."""
    from .models import DEFAULT_HF_NAME, DEFAULT_NAME, default_gguf_path, default_hf_path  # noqa: PLC0415

    if ws is None:
        return None
    return {default_hf_path(ws).resolve(): DEFAULT_HF_NAME, default_gguf_path(ws).resolve(): DEFAULT_NAME}.get(path)


def _loaded_or_load(ws, registry, path: Path, current: bool,
                    label: str | None = None) -> tuple[LoadedModel, str | None]:
    """The loaded model whose file or folder is `path`, else `path` loaded beside the others (named `label`); with a
    note saying what was loaded (None when it was loaded already)."""
    lm = next((m for m in _loaded(registry) if Path(m.model_path).resolve() == path), None)
    if lm is not None:
        return lm, None
    lm = registry.load(str(path), ws, name=label or _model_label(ws, path), replace=False, current=current)
    return lm, f"loaded {lm.name} (the adapter's base model) to answer with it"


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
