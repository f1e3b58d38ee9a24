"""LoRA adapters on a loaded transformers model: check one against the base (shapes read from the safetensors header),
attach it (the base stays: adapters are switched per answer), detach it, and `open_adapter` - load the base an
adapter was trained on, if needed, and attach it.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import device as devicemod
from .errors import BadInput, Conflict, MacTunerError, NotFound
from .models import LoadedModel


@dataclass
class AdapterInfo:
    name: str
    path: str
    base_model: str | None  # adapter_config.json's base_model_name_or_path
    peft_type: str
    rank: int | None
    target_modules: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _is_peft(model) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _check_adapter(model, adapter: str | None) -> None:
    if adapter is None:
        return
    attached = list(model.peft_config) if _is_peft(model) else []
    if adapter not in attached:
        raise NotFound(f"No adapter named '{adapter}' is attached to this model "
                       f"(attached: {', '.join(attached) or 'none'}).")


def _adapter_context(model, adapter: str | None):
    """Base model (adapter None) or the named adapter, for one generation. Called with the model lock held."""
    _check_adapter(model, adapter)
    if not _is_peft(model):
        return nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter, inference_mode=True)
    return nullcontext()


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _base_module(model):
    return model.get_base_model() if _is_peft(model) else model


def _module_dims(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can target."""
    module = getattr(module, "base_layer", module)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return int(module.num_embeddings), int(module.embedding_dim)
    w = getattr(module, "weight", None)
    if w is not None and w.dim() == 2 and type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None


def _shape_mismatches(base, weights: Path) -> list[str]:
    """Compare the adapter's tensor shapes (read from the safetensors header only) with the loaded base's layers."""
    from safetensors import safe_open  # noqa: PLC0415

    problems = []
    params = None
    try:
        with safe_open(str(weights), framework="pt") as st:
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise BadInput(f"{weights.name} is not a valid safetensors file ({str(e).splitlines()[0][:160]}).") from None
    for key, shape in shapes.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        m = re.match(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$", name)
        if m:
            path, part = m.group(1), m.group(2)
            try:
                dims = _module_dims(base.get_submodule(path))
            except AttributeError:
                problems.append(f"the loaded model has no layer '{path}'")
                continue
            if dims is None or len(shape) != 2:
                continue
            if part == "lora_A" and shape[1] != dims[0]:
                problems.append(f"{path} takes {dims[0]} inputs here, the adapter expects {shape[1]}")
            elif part == "lora_B" and shape[0] != dims[1]:
                problems.append(f"{path} gives {dims[1]} outputs here, the adapter expects {shape[0]}")
            elif part == "lora_embedding_A" and shape[1] != dims[0]:
                problems.append(f"{path} has {dims[0]} tokens here, the adapter expects {shape[1]}")
            elif part == "lora_embedding_B" and shape[0] != dims[1]:
                problems.append(f"{path} has width {dims[1]} here, the adapter expects {shape[0]}")
            continue
        if params is None:
            params = {k: tuple(v.shape) for k, v in base.state_dict().items()}
        plain = name.replace(".modules_to_save", "").replace(".original_module", "")
        if plain in params and params[plain] != shape:
            problems.append(f"{plain} is {list(params[plain])} here, the adapter holds {list(shape)}")
    return problems


def _same_base(named: str | None, lm: LoadedModel, base) -> bool:
    if not named:
        return True
    candidates = {lm.model_path, lm.name, str(getattr(getattr(base, "config", None), "name_or_path", "") or ""),
                  str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")}
    candidates.discard("")
    norm = lambda s: s.rstrip("/").lower()  # noqa: E731
    names = {norm(c) for c in candidates} | {norm(Path(c).name) for c in candidates}
    if norm(named) in names or norm(Path(named).name) in names:
        return True
    try:
        return Path(named).expanduser().resolve() == Path(lm.model_path).resolve()
    except OSError:
        return False


def inspect_adapter(lm: LoadedModel, adapter_dir: str | Path) -> AdapterInfo:
    """Check that `adapter_dir` is a PEFT LoRA folder (safetensors) that fits the loaded base, without loading it."""
    lm.ensure_loaded()
    if lm.backend != "transformers":
        raise BadInput("A GGUF model cannot take a PEFT adapter: merge the adapter into its HF base model and export "
                       "a GGUF (Export stage), or load the HF base model to chat with the adapter.")
    path = Path(str(adapter_dir)).expanduser()
    if not path.exists():
        raise NotFound(f"No adapter folder at {path} (the run or checkpoint may have been deleted).")
    if not path.is_dir():
        raise BadInput(f"{path} is a file; choose the adapter's folder (it holds adapter_config.json).")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise BadInput(f"{path.name} is not a PEFT adapter folder: it has no adapter_config.json.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"adapter_config.json in {path.name} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"adapter_config.json in {path.name} is not a JSON object.")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise BadInput(f"{path.name} is a {peft_type or 'unknown'} adapter; MacTuner chats with LoRA adapters.")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        if any(path.glob("adapter_model.bin")) or any(path.glob("*.pt")):
            raise BadInput(f"{path.name} has its weights as a pickle file (adapter_model.bin), which could run code "
                           "when loaded; MacTuner only loads adapter_model.safetensors.")
        raise BadInput(f"{path.name} has no adapter_model.safetensors.")
    base = _base_module(lm.model)
    named = cfg.get("base_model_name_or_path")
    problems = _shape_mismatches(base, weights)
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise BadInput(f"This adapter was trained for a different base model ({named or 'unnamed'}) than the loaded "
                       f"{lm.name}: {'; '.join(problems[:2])}{more}. Load its base model first.")
    warnings = []
    if not _same_base(named, lm, base):
        warnings.append(f"adapter_config.json names '{named}' as its base, but the loaded model is {lm.name}; the "
                        "layer shapes match, so it was attached - check that this is the right base model")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    return AdapterInfo(name=path.name, path=str(path.resolve()), base_model=named, peft_type=peft_type,
                       rank=cfg.get("r"), target_modules=sorted(map(str, targets)), warnings=warnings)


def attach_adapter(lm: LoadedModel, adapter_dir: str | Path, name: str | None = None) -> AdapterInfo:
    """Load a LoRA adapter onto a loaded HF model, keeping the base: the first wraps lm.model in a PeftModel, later
    ones are added with load_adapter. Select it per answer with ChatParams.adapter=name (None: the base model).

    BadInput: a GGUF model, not a LoRA/safetensors folder, or trained for another base (layer shapes differ).
    NotFound: the folder is gone. Conflict: the name is taken (detach_adapter first)."""
    info = inspect_adapter(lm, adapter_dir)
    name = (name or "").strip() or re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(info.path).name).lstrip(".-_") or "adapter"
    if not _ADAPTER_NAME.fullmatch(name):
        raise BadInput(f"Adapter name {name!r}: use letters, digits, '.', '_' or '-' (64 at most).")
    info.name = name
    from peft import PeftModel  # noqa: PLC0415

    with lm.lock:
        model = lm.model
        if model is None:
            raise NotFound("The model was unloaded meanwhile.")
        try:
            if isinstance(model, PeftModel):
                if name in model.peft_config:
                    raise Conflict(f"An adapter named '{name}' is already attached; detach it first or choose "
                                   "another name.")
                devicemod.in_own_thread(model.load_adapter, info.path, adapter_name=name, is_trainable=False)
            else:  # torch work off the caller's (a server worker's) thread: see device.in_own_thread
                lm.model = devicemod.in_own_thread(PeftModel.from_pretrained, model, info.path, adapter_name=name,
                                                   is_trainable=False)
        except MacTunerError:
            raise
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise BadInput(f"PEFT could not load the adapter {Path(info.path).name}: "
                           f"{str(e).splitlines()[0][:240]}") from None
        lm.model.eval()
        from .training.tokens import fast_token_rows  # noqa: PLC0415

        fast_token_rows(lm.model)  # trained token rows without a copy of the vocabulary per token
        lm.adapters[name] = info
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
    lm = next((m for m in map(registry.get, registry.names())
               if m is not None and m.backend == "transformers" and Path(m.model_path).resolve() == base), None)
    if lm is None:
        label = DEFAULT_HF_NAME if base == default_hf_path(ws).resolve() else None
        lm = registry.load(str(base), ws, name=label, replace=False, current=current)
        note = f"loaded {lm.name} (the adapter's base model) to answer with it"
    if name not in {a.name for a in list_adapters(lm)}:
        attach_adapter(lm, adapter_dir, name)
    return lm, name, note


def list_adapters(lm: LoadedModel) -> list[AdapterInfo]:
    """Adapters attached to this model, in the order they were attached."""
    return list(lm.adapters.values())


def detach_adapter(lm: LoadedModel, name: str) -> None:
    """Remove an attached adapter; removing the last one gives lm.model back as the plain base model."""
    with lm.lock:
        model = lm.model
        if not _is_peft(model) or name not in model.peft_config:
            raise NotFound(f"No adapter named '{name}' is attached to this model.")
        if len(model.peft_config) == 1:
            lm.model = model.unload()
        else:
            model.delete_adapter(name)
        lm.adapters.pop(name, None)
