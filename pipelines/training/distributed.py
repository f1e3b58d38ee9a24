"""Several processes, several machines: what a checkpoint allows when their number changes, and what every process
must agree on before the first step. Torch-free at import; the trainer (loop.py) and pipelines/multinode.py use it.

Why a checkpoint can move to another number of processes: the data order depends only on the seed and the global
batch (batch_size x grad_accum x processes). DistributedSampler shuffles the same permutation whatever the number of
processes, rank r takes every world-th item, so step k of an epoch covers the k-th slice of `global batch` items of
that permutation on 1, 2 or 8 processes alike; the loss is a token mean over the whole global batch. Keep the global
batch and the run goes on as if nothing changed: `fit_to_world` recomputes grad_accum (and batch_size only when it
must) so that batch' x grad_accum' x processes' equals the checkpoint's; an epoch then keeps its ceil(items / global
batch) steps. It refuses, with the reason, a global batch the new number of processes cannot share evenly (and, as a
guard, a checkpoint that counted another number of steps per epoch or in all: its items were not these).

    cfg, note = fit_to_world(cfg, trainer_state, world=2, n_items=len(train_items))
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

from ..errors import BadInput
from ..workspace import sha256_file
from . import plan
from .config import TrainConfig


def backend() -> str:
    """The torch.distributed backend: NCCL for CUDA tensors and gloo for the CPU ones (the loss and token sums each
    step, the checks before training); gloo alone without CUDA."""
    import torch  # noqa: PLC0415

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def read_state(checkpoint: str | os.PathLike) -> dict:
    """A checkpoint's trainer_state.json."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"The checkpoint's trainer_state.json cannot be read ({e}).") from None


def global_batch(state: dict) -> tuple[int, str]:
    """The checkpoint's global batch and how it was made ("2 x grad_accum 1 x 2 processes")."""
    old = state.get("config") or {}
    b, a, w = int(old.get("batch_size") or 1), int(old.get("grad_accum") or 1), int(state.get("world_size") or 1)
    return b * a * w, f"batch_size {b} x grad_accum {a} x {_procs(w)}"


def _procs(n: int) -> str:
    return f"{n} process{'' if n == 1 else 'es'}"


def _steps_per_epoch(state: dict) -> int | None:
    if state.get("steps_per_epoch"):
        return int(state["steps_per_epoch"])
    step, epoch = state.get("step"), state.get("epoch")  # older checkpoints: epoch = step / steps_per_epoch
    if isinstance(step, (int, float)) and isinstance(epoch, (int, float)) and epoch > 0:
        return max(1, round(step / epoch))
    return None


def fit_to_world(cfg: TrainConfig, state: dict, world: int, n_items: int) -> tuple[TrainConfig, str]:
    """`cfg` with batch_size / grad_accum that keep the checkpoint's global batch on `world` processes, and a note
    saying what changed ("" when nothing did). BadInput with the reason when the math does not allow it."""
    g, made = global_batch(state)
    old_world = int(state.get("world_size") or 1)
    share, rem = divmod(g, max(1, world))
    if rem or share == 0:
        fits = [str(d) for d in range(1, g + 1) if g % d == 0][:8]
        where = "1 process" if g == 1 else f"{', '.join(fits[:-1])} or {fits[-1]} processes in all (they divide {g})"
        raise BadInput(f"Cannot resume on {_procs(world)}: the checkpoint was trained with a global batch of {g} "
                       f"({made}), which {world} processes cannot share evenly. Resume on {where}, or start a new "
                       "run.")
    b = cfg.batch_size if share % cfg.batch_size == 0 else max(
        d for d in range(1, min(cfg.batch_size, share) + 1) if share % d == 0)
    new = replace(cfg, batch_size=b, grad_accum=share // b)
    spe = plan.steps_per_epoch(n_items, new.batch_size, new.grad_accum, world)
    old_spe = _steps_per_epoch(state)
    if old_spe is not None and spe != old_spe:
        raise BadInput(f"Cannot resume on {_procs(world)}: an epoch of {n_items} items would take {spe} steps "
                       f"instead of the checkpoint's {old_spe} ({made}), so the data order would not continue where "
                       f"it stopped. Resume on {_procs(old_world)}, or start a new run.")
    total = plan.total_steps(new, spe)
    if state.get("total_steps") and int(state["total_steps"]) != total:
        raise BadInput(f"Cannot resume on {_procs(world)}: the run would last {total} steps instead of the "
                       f"checkpoint's {state['total_steps']}. Resume on {_procs(old_world)}, or start a new run.")
    if world == old_world and (new.batch_size, new.grad_accum) == (cfg.batch_size, cfg.grad_accum):
        return new, ""
    return new, (f"Resuming on {_procs(world)} (the checkpoint: {made}): batch_size {new.batch_size} x grad_accum "
                 f"{new.grad_accum} x {_procs(world)} keeps the global batch of {g}, so the run goes on unchanged.")


# ----------------------------------------------------------------------------------------------- agreement


def digest(value) -> str:
    """A short stable fingerprint of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_facts(path: str | os.PathLike | None) -> list:
    """A model or dataset folder's files with their sizes (cheap: no file is read)."""
    if path is None:
        return []
    root = Path(path)
    if root.is_file():
        return [[root.name, root.stat().st_size]]
    return sorted([str(p.relative_to(root)), p.stat().st_size] for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def dataset_facts(version_dir: Path) -> dict:
    """What a dataset version holds: the SHA-256 of its split files (the rows every process trains on)."""

    return {p.name: sha256_file(p) for p in sorted(version_dir.glob("*.jsonl"))}


def software_facts() -> dict:
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def disagreements(facts: list[dict]) -> list[str]:
    """For the facts each process reported (index = rank; each a dict of name -> fingerprint, "host" beside them),
    a line for every name on which a process differs from rank 0."""
    lines, first = [], facts[0]
    for rank, mine in enumerate(facts[1:], start=1):
        diff = [k for k in sorted(set(first) | set(mine)) if k != "host" and first.get(k) != mine.get(k)]
        if diff:
            lines.append(f"rank {rank} on {mine.get('host', '?')} has a different {', '.join(diff)} than rank 0 on "
                         f"{first.get('host', '?')}")
    return lines
