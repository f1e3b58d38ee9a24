"""Saving datasets: named, versioned folders <workspace>/datasets/<name>/v<N>/{train.jsonl, validation.jsonl,
meta.json}, written into a temporary folder renamed when complete; a save never overwrites, it takes the next
version number.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..errors import BadInput, Conflict, NotFound
from ..workspace import Workspace, atomic_dir
from .clean import Cleaner, jsonable
from .map import Conversion, Mapping
from .read import ProgressFn, ReadResult, no_progress

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class DatasetVersion:
    name: str = field(metadata={"help": "dataset name"})
    version: int = field(metadata={"help": "version number (v<N> folder)"})
    path: Path = field(metadata={"help": "the version folder"})
    train: list[dict] = field(default_factory=list, metadata={"help": "train rows"})
    validation: list[dict] = field(default_factory=list, metadata={"help": "validation rows"})
    meta: dict = field(default_factory=dict, metadata={"help": "meta.json"})


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadInput(f"Dataset name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_'.")
    return name


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))


_ROLES = ("system", "user", "assistant", "tool")


def _msgs_ok(msgs) -> bool:
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in msgs)


def row_kind(r: dict) -> str | None:
    """"text" | "messages" | "preference" for a valid saved row, else None."""
    if not isinstance(r, dict):
        return None
    if isinstance(r.get("text"), str):
        return "text"
    if _msgs_ok(r.get("messages")):
        return "messages"
    if all(_msgs_ok(r.get(k)) for k in ("prompt", "chosen", "rejected")):
        return "preference"
    return None


def _check_rows(rows: Sequence) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, list):
            r = {"messages": r}
        if row_kind(r) is None:
            raise BadInput(f"Row {i + 1} is neither {{\"messages\": [{{role, content}}...]}}, {{\"text\": ...}} nor "
                           "{\"prompt\", \"chosen\", \"rejected\"}.")
        out.append(r)
    return out


def build_meta(read: ReadResult | None = None, mapping: Mapping | None = None, cleaner: Cleaner | None = None,
               conversion: Conversion | None = None, **extra) -> dict:
    """What save_dataset records about where the rows came from (and, from the conversion, which rows were left
    out and why)."""
    return {"source": read.meta() if read else None, "mapping": asdict(mapping) if mapping else None,
            "cleaning": cleaner.history() if cleaner else [], "warnings": read.warnings if read else [],
            "conversion": conversion.report() if conversion else None, **extra}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_dataset(ws: Workspace, name: str, rows: Sequence[dict | list], meta: dict | None = None,
                 val_ratio: float = 0.1, val_count: int | None = None, seed: int = 0,
                 progress: ProgressFn = no_progress) -> DatasetVersion:
    """Write rows as the next version of `name`: train.jsonl / validation.jsonl / meta.json, atomically.

    The split is a seeded shuffle; `val_count` (when given) wins over `val_ratio`. Never overwrites; BadInput for
    no rows or a split that leaves no training rows."""
    check_name(name)
    rows = _check_rows(rows)
    if not rows:
        raise BadInput("Nothing to save: there are no rows left (cleaning removed them all?). Undo a step or "
                       "loosen the filters.")
    n = len(rows)
    if val_count is None:
        if not 0 <= val_ratio < 1:
            raise BadInput(f"Validation ratio must be in [0, 1), got {val_ratio}.")
        k = int(round(n * val_ratio))
    else:
        if val_count < 0:
            raise BadInput(f"Validation count must be >= 0, got {val_count}.")
        k = int(val_count)
    if n - k <= 0:
        raise BadInput(f"A split of {k} validation rows out of {n} leaves no training rows.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val, train = [rows[i] for i in order[:k]], [rows[i] for i in order[k:]]
    folder = ws.datasets / name
    for _attempt in range(5):
        version = (_versions(folder) or [0])[-1] + 1
        try:
            with atomic_dir(folder / f"v{version}") as tmp:
                progress(0.1, f"Writing {len(train):,} train rows...")
                _write_jsonl(tmp / "train.jsonl", train)
                progress(0.7, f"Writing {len(val):,} validation rows...")
                _write_jsonl(tmp / "validation.jsonl", val)
                full_meta = {**(meta or {}), "name": name, "version": version,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "shape": row_kind(train[0]),
                             "kind": (meta or {}).get("kind") or {"text": "text", "preference": "preference"}.get(
                                 row_kind(train[0]), "kto" if "label" in train[0] else "sft"),
                             "counts": {"train": len(train), "validation": len(val), "total": n},
                             "split": {"val_ratio": val_ratio if val_count is None else None,
                                       "val_count": val_count, "seed": seed}}
                with open(tmp / "meta.json", "w", encoding="utf-8") as fh:
                    json.dump(jsonable(full_meta), fh, indent=2, ensure_ascii=False)
            break
        except Conflict:  # another save took this number meanwhile: take the next
            continue
    else:
        raise Conflict(f"Could not find a free version number for dataset '{name}'.")
    progress(1.0, f"Saved {name} v{version}")
    return DatasetVersion(name, version, folder / f"v{version}", train, val, full_meta)


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def list_datasets(ws: Workspace) -> list[dict]:
    """One row per saved version: name, version, train, validation, created, source (sorted by name, version)."""
    out = []
    if not ws.datasets.is_dir():
        return out
    for folder in sorted(p for p in ws.datasets.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
        for v in _versions(folder):
            meta = _read_meta(folder / f"v{v}")
            counts, source = meta.get("counts", {}), meta.get("source") or {}
            out.append({"name": folder.name, "version": v, "kind": meta.get("kind") or "sft",
                        "train": counts.get("train"), "validation": counts.get("validation"),
                        "created": meta.get("created"),
                        "source": source.get("path") if isinstance(source, dict) else source})
    return out


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_dataset_version(ws: Workspace, name: str, version: int | None = None) -> DatasetVersion:
    """Rows and meta of one saved version (the latest when `version` is None); NotFound when missing."""
    check_name(name)
    folder = ws.datasets / name
    versions = _versions(folder)
    if not versions:
        raise NotFound(f"No dataset named '{name}'.")
    version = versions[-1] if version is None else int(version)
    if version not in versions:
        raise NotFound(f"Dataset '{name}' has no version {version} (it has: "
                       f"{', '.join(f'v{v}' for v in versions)}).")
    path = folder / f"v{version}"
    return DatasetVersion(name, version, path, _read_jsonl(path / "train.jsonl"),
                          _read_jsonl(path / "validation.jsonl"), _read_meta(path))
