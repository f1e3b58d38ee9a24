"""The LoRA adapter as a GGUF of its own: what `llama-cli -m BASE.gguf --lora ADAPTER.gguf`, llama-cpp-python's
`Llama(model_path=BASE, lora_path=ADAPTER)` and an Ollama Modelfile's `ADAPTER` line load on top of the base model's
GGUF - a few MB instead of a second copy of the model.

    from pipelines.export.adapter import adapter_gguf, adapter_problem
    adapter_problem(run_dir / "adapter")          # None, or why llama.cpp cannot apply it (DoRA, whole modules...)
    adapter_gguf(run_dir / "adapter", base_dir, out_dir / "my-run-lora.gguf")   # -> the file, written atomically

The tensors are named by llama.cpp's own converter (lora_child.py runs in a subprocess with the converter on its
path, like convert.py), so the file fits the base GGUF that converter writes: general.type = adapter,
adapter.type = lora, adapter.lora.alpha, <tensor>.lora_a / .lora_b. Rows of the token embedding the adapter trained
outright (PEFT's trainable tokens) go in as a token_embd pair, and when the model's output layer is tied to the
embedding (Gemma) as an output.weight pair too, which needs the base GGUF with its output layer written out
(`needs_untied_base`; serving.lora.untied_gguf). An export writes the file with the base's GGUF (untied when needed)
and a Modelfile in exports/<name>/lora-gguf/ and validates it on that base (validate.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import BadInput, Conflict, NotFound
from ..progress import ProgressFn, no_progress
from ..workspace import human_bytes
from .common import ExportFailed, is_gguf, last_lines
from .convert import converter_dir, converter_env
from .lora_child import tied_head

LORA_FOLDER = "lora-gguf"  # exports/<name>/lora-gguf/: the base GGUF, the LoRA GGUF, its Modelfile and validation
OUTTYPES = ("f32", "f16")
CHILD = Path(__file__).with_name("lora_child.py")
REFUSAL = "This adapter cannot be written as a llama.cpp LoRA GGUF: "


def adapter_problem(adapter_dir: str | os.PathLike) -> str | None:
    """Why this PEFT adapter cannot become a llama.cpp LoRA (read from adapter_config.json, nothing loaded), or None
    when it can as far as its config tells (the tensors are checked when the file is written)."""
    adapter_dir = Path(adapter_dir)
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        return f"its adapter_config.json cannot be read ({e})"
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return f"it is a {cfg.get('peft_type')} adapter; llama.cpp applies LoRA adapters only"
    if cfg.get("use_dora"):
        return "it is a DoRA adapter: llama.cpp's LoRA has no magnitude vector, so only the merged GGUF carries it"
    if cfg.get("alpha_pattern"):
        return "its alpha differs from module to module (alpha_pattern); a llama.cpp LoRA has one alpha"
    if cfg.get("modules_to_save"):
        return (f"it also trains whole modules ({', '.join(cfg['modules_to_save'])}), which a llama.cpp LoRA cannot "
                "hold; only the merged GGUF carries them")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        return "it has no adapter_model.safetensors (a pickled adapter_model.bin is never loaded)"
    return None


def needs_untied_base(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike) -> bool:
    """Whether the adapter's LoRA GGUF holds an output.weight pair (trained token rows of a model whose output layer
    is tied to its embedding), which llama.cpp applies only on the base GGUF with its output layer written out."""
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("trainable_token_indices")) and tied_head(Path(base_dir))


def adapter_gguf(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, out_path: str | os.PathLike,
                 outtype: str = "f32", name: str | None = None, progress: ProgressFn = no_progress,
                 timeout: float = 1800.0) -> Path:
    """Write the PEFT adapter in `adapter_dir` (trained on the HF model in `base_dir`) as a llama.cpp LoRA GGUF at
    `out_path` (temp name + rename; an existing file is never overwritten). f32 keeps the adapter exactly; f16
    halves it. BadInput with the reason when llama.cpp cannot apply this adapter; ExportFailed when the converter
    breaks."""
    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise BadInput(f"A LoRA GGUF is written as {' or '.join(OUTTYPES)}, not {outtype!r}.")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise NotFound(f"{adapter_dir} holds no PEFT adapter (adapter_config.json).")
    if not (base_dir / "config.json").is_file():
        raise NotFound(f"{base_dir} is not the adapter's base model folder (no config.json).")
    why = adapter_problem(adapter_dir)
    if why:
        raise BadInput(f"{REFUSAL}{why}.")
    if out_path.exists():
        raise Conflict(f"{out_path} already exists; not overwriting it.")
    cdir = converter_dir()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}-{time.time_ns() % 10**8}.partial")
    # -P: the script's folder (pipelines/export, with modules named like common words) stays off sys.path
    cmd = [sys.executable, "-P", str(CHILD), str(adapter_dir.resolve()), str(base_dir.resolve()), str(tmp), outtype,
           name or out_path.stem]
    progress(0.0, f"Writing the LoRA adapter as a GGUF ({outtype})...")
    try:
        proc = subprocess.run(cmd, env=converter_env(cdir), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        refused = next((ln[len("REFUSED: "):] for ln in proc.stderr.splitlines() if ln.startswith("REFUSED: ")), None)
        if refused:
            raise BadInput(f"{REFUSAL}{refused}.")
        if proc.returncode != 0 or not is_gguf(tmp):
            raise ExportFailed(f"Writing the LoRA GGUF failed (exit code {proc.returncode}). Last lines:\n"
                               f"{last_lines(proc.stderr)}")
        os.replace(tmp, out_path)
    except subprocess.TimeoutExpired as e:
        raise ExportFailed(f"Writing the LoRA GGUF took more than {timeout:.0f} s.") from e
    finally:
        tmp.unlink(missing_ok=True)
    progress(1.0, f"{out_path.name}: {human_bytes(out_path.stat().st_size)}")
    return out_path



def _base_with_trained_tokenizer(base_dir: Path, tuned_dir: Path, view: Path) -> Path:
    """A folder that is the base model (its files linked, not copied) with the tokenizer as trained (the merged
    folder's tokenizer files and chat template), so that the base GGUF carries the template the LoRA was tuned
    with."""
    from .merge import TOKENIZER_FILES  # noqa: PLC0415

    view.mkdir(parents=True)
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES:
            (view / f.name).symlink_to(f.resolve())
    for name in TOKENIZER_FILES:
        if (tuned_dir / name).is_file():
            (view / name).write_bytes((tuned_dir / name).read_bytes())
    return view


def export_lora(folder: Path, name: str, adapter_dir: Path, base_dir: Path, tuned_dir: Path, outtype: str,
                chat_template: str | None, system: str | None, progress: ProgressFn = no_progress,
                specials: tuple[str, str] = ("", "")) -> dict:
    """An export's LoRA files in <folder>/lora-gguf/: the base model's GGUF (`outtype`, with the tokenizer as
    trained), <name>-lora.gguf and its Modelfile (FROM the base, ADAPTER the LoRA). Returns {"base", "lora",
    "modelfile"} (paths), or {"skipped": reason} when llama.cpp cannot apply this adapter (the merged GGUFs carry it
    then). The base GGUF has its output layer written out when the LoRA needs it (`needs_untied_base`)."""

    from ..serving.lora import untied_gguf  # noqa: PLC0415
    from .convert import convert  # noqa: PLC0415
    from .ollama import modelfile  # noqa: PLC0415

    why = adapter_problem(adapter_dir)
    if why:
        return {"skipped": f"no LoRA GGUF: {why}"}
    out = folder / LORA_FOLDER
    view = out / f".base-view-{os.getpid()}"
    untied = needs_untied_base(adapter_dir, base_dir)
    try:
        base_gguf = convert(_base_with_trained_tokenizer(base_dir, tuned_dir, view), out, outtype,
                            lambda f, m: progress(0.75 * f, m), stem=f"{name}-base")
    finally:
        shutil.rmtree(view, ignore_errors=True)
    if untied:  # the same model with its output layer written out, for the LoRA's output.weight pair
        progress(0.75, "Writing the base GGUF's output layer out (the adapter trains rows tied to it)...")
        untied_gguf(base_gguf, base_gguf)
    try:
        lora = adapter_gguf(adapter_dir, base_dir, out / f"{name}-lora.gguf", "f32", name,
                            lambda f, m: progress(0.8 + 0.2 * f, m))
    except BadInput as e:  # refused on its tensors (the config looked fine): no base without its LoRA is left
        shutil.rmtree(out, ignore_errors=True)
        return {"skipped": f"no LoRA GGUF: {e.message.removeprefix(REFUSAL).rstrip('.')}"}
    mf = modelfile(lora, chat_template, system, base_gguf=base_gguf, bos_token=specials[0], eos_token=specials[1])
    return {"base": str(base_gguf), "lora": str(lora), "modelfile": str(mf)}
