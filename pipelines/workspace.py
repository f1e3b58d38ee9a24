"""Where things live: one folder (default ~/.mactuner, or --root; /data/mactuner on a Space with persistent storage)
with models/, datasets/, runs/, rag/, exports/.

A workspace opened `confined` (the studio reachable from other machines: a non-loopback host, a share link, a Space)
takes paths a user typed only inside itself and the HF cache (`check_path`), so a remote user cannot read or load
arbitrary files of the host.

Also the two helpers every stage uses to write safely: `atomic_write` (file) and `atomic_dir` (folder) write
under a temporary name beside the target and rename when complete, so nothing looks finished before it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, Conflict

SUBDIRS = ("models", "datasets", "runs", "rag", "exports")


def default_root() -> Path:
    return Path(os.environ.get("MACTUNER_HOME", Path.home() / ".mactuner")).expanduser()


def hf_cache() -> Path:
    """The HF hub cache (downloads), as huggingface_hub sees it."""
    from huggingface_hub import constants  # noqa: PLC0415

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


@dataclass(frozen=True)
class Workspace:
    root: Path
    confined: bool = field(default=False, compare=False)  # user paths only inside it and the HF cache

    @classmethod
    def open(cls, root: str | os.PathLike | None = None, confined: bool = False) -> "Workspace":
        ws = cls(Path(root).expanduser().resolve() if root else default_root().resolve(), confined)
        if ws.root.exists() and not ws.root.is_dir():
            raise BadInput(f"The workspace {ws.root} is a file, not a folder: give a folder (or a new name) as --root.")
        try:
            for sub in SUBDIRS:
                (ws.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"The workspace {ws.root} cannot be created or used: {e.strerror or e}.") from None
        return ws

    @property
    def tmp(self) -> Path:
        """Scratch files of the studio (Gradio's cache, files handed to the browser); created when needed."""
        return self.root / "tmp"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def rag(self) -> Path:
        return self.root / "rag"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def inside(self, relative: str | os.PathLike) -> Path:
        """Resolve a relative path inside the workspace; refuse anything that escapes it."""
        target = (self.root / relative).resolve()
        if target != self.root and self.root not in target.parents:
            raise BadInput(f"'{relative}' points outside the workspace ({self.root}).")
        return target

    def check_path(self, path: str | os.PathLike) -> Path:
        """A path a user typed. Unconfined: as typed (~ expanded). Confined: resolved (relative to the workspace)
        and refused unless inside the workspace or the HF cache - before anything looks at it, so the answer never
        says whether a file outside exists."""
        p = Path(str(path).strip()).expanduser()
        if not self.confined:
            return p
        target = (p if p.is_absolute() else self.root / p).resolve()
        for allowed in (self.root, hf_cache()):
            if target == allowed or allowed in target.parents:
                return target
        raise BadInput(f"'{path}' is outside the workspace: this studio is reachable from other machines, so it "
                       f"opens only files under its workspace ({self.root}) or the Hugging Face cache. Put the model "
                       "or file under the workspace's models/ (or download it from the Hub) and use that path.")


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, mode: str = "wb", overwrite: bool = True):
    """Open a temporary file beside `target`; rename it over `target` only when the block succeeds."""
    target = Path(target)
    if not overwrite and target.exists():
        raise Conflict(f"{target} already exists; not overwriting it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(target: str | os.PathLike, data) -> None:
    with atomic_write(target, "w") as fh:
        json.dump(data, fh, indent=2, default=str)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary folder beside `target`; rename it to `target` when the block succeeds.

    An existing `target` is never replaced (Conflict)."""
    target = Path(target)
    if target.exists():
        raise Conflict(f"{target} already exists; not overwriting it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) + sum(
        p.resolve().stat().st_size for p in path.rglob("*") if p.is_symlink() and p.resolve().is_file()
    )


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
