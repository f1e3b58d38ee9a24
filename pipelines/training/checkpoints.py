"""Checkpoints: the resumable state of a run, and the final adapter folder.

    runs/<run>/checkpoints/step-N/
        adapter_model.safetensors, adapter_config.json   the LoRA weights (PEFT's format)
        optimizer.pt, scheduler.pt, rng.pt                torch state dicts (tensors only; loaded weights_only)
        trainer_state.json                                step, total_steps, epoch, elapsed, tokens, loss,
                                                          best_eval_loss, config, world_size, steps_per_epoch,
                                                          time
        COMPLETE                                          written last: a folder without it is never resumed

    runs/<run>/adapter/                                   the final adapter (PEFT's format), the tokenizer, its
                                                          chat template and mactuner.json: save_adapter

Each is written into a temporary folder renamed when everything is there; `keep_last` prunes older ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from ..errors import BadInput
from ..workspace import atomic_dir, write_json
from .config import COMPLETE_MARKER, TrainingFailed


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those with a COMPLETE marker), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists() and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _rng_state() -> dict:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    py = random.getstate()
    npk, npkeys, nppos, npg, npc = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python_version": py[0], "python_state": torch.tensor(py[1], dtype=torch.int64),
             "python_gauss": -1.0 if py[2] is None else float(py[2]), "numpy_keys": torch.from_numpy(npkeys.astype("int64")),
             "numpy_pos": nppos, "numpy_gauss": [npg, npc]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.set_rng_state(state["torch"])
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     None if gauss == -1.0 else gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), int(state["numpy_pos"]),
                         int(state["numpy_gauss"][0]), float(state["numpy_gauss"][1])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, keep_last: int = 0) -> Path:
    """checkpoints/step-N/: adapter (safetensors), optimizer.pt, scheduler.pt, rng.pt, trainer_state.json and the
    COMPLETE marker, written into a temporary folder renamed when everything is there. Prunes to keep_last."""
    import torch  # noqa: PLC0415

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")

    return write_checkpoint(run_dir, state, write, keep_last)


def write_checkpoint(run_dir: Path, state: dict, write_files: Callable[[Path], None], keep_last: int = 0) -> Path:
    """checkpoints/step-N/ for any backend: `write_files(tmp)` writes the adapter and optimizer state into a
    temporary folder, then trainer_state.json and the COMPLETE marker; renamed when everything is there, pruned to
    keep_last. A complete step-N already there is kept (a stop right after a periodic save at the same step)."""
    target = Path(run_dir) / "checkpoints" / f"step-{state['step']}"
    if target.exists():  # e.g. a stop right after a periodic save at the same step, or a re-run after a resume
        if (target / COMPLETE_MARKER).exists():
            prune_checkpoints(run_dir, keep_last)
            return target
        shutil.rmtree(target)
    try:
        with atomic_dir(target) as tmp:
            write_files(tmp)
            write_json(tmp / "trainer_state.json", state)
            (tmp / COMPLETE_MARKER).write_text(f"{time.time()}\n")
    except OSError as e:
        raise TrainingFailed(f"Could not write checkpoint step-{state['step']} ({e.strerror or e}); earlier "
                             "checkpoints are intact. Free some disk space and resume.") from e
    prune_checkpoints(run_dir, keep_last)
    return target


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    folder = Path(run_dir) / "checkpoints"
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():  # temporary folders of an interrupted write (killed process)
            if p.name.startswith(".step-") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
    valid = list_checkpoints(run_dir)
    if keep_last > 0:
        for p in valid[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint; returns its trainer state."""
    import torch  # noqa: PLC0415
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    state = json.loads((ckpt / "trainer_state.json").read_text())
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise BadInput(f"The checkpoint's adapter does not fit this model ({missing[0]}...).")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True, map_location="cpu"))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True, map_location="cpu"))
    return state


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder through a temporary one; an existing `target` is replaced only once the new one is complete."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    with atomic_dir(target.with_name(f"{target.name}.new")) as tmp:
        write(tmp)
    new = target.with_name(f"{target.name}.new")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(run_dir: Path, model, tokenizer, info: dict) -> Path:
    """run_dir/adapter/: the adapter (safetensors), the tokenizer, its chat template (chat_template.jinja) and
    mactuner.json = `info`; an adapter already there is replaced only once the new one is complete."""
    target = Path(run_dir) / "adapter"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "chat_template.jinja").exists() and tokenizer.chat_template:
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
        write_json(tmp / "mactuner.json", info)

    replace_dir(target, write)
    return target
