"""The HF backend: a transformers model and its tokenizer in this process, with PEFT LoRA adapters attached beside the
base and chosen per answer (the first adapter wraps the model in a PeftModel; removing the last unwraps it).

    HFBackend          the ModelBackend (in_process.InProcessBackend: its tokenizer facts and idle gate are shared
                       with the MLX backend): answers stream from hf_generate.GenerationThread

An adapter is checked before it is loaded: its tensor shapes (read from the safetensors header) against the loaded
layers, so an adapter trained for another base is refused with the layers that differ.
"""

from __future__ import annotations

import gc
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch

from .. import device as devicemod
from ..errors import BadInput
from .backend import Delta, Generation, Halted
from .hf_generate import GenerationThread
from .in_process import HFTokenizerFacts, InProcessBackend
from .lora import AdapterInfo, read_lora_folder


class HFBackend(InProcessBackend):
    """A transformers model in this process (see the module docstring)."""

    kind = "transformers"

    def __init__(self, model, tokenizer, model_path: str, name: str, context_length: int | None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.model_path, self.name, self.context_length = model_path, name, context_length
        self.n_params = sum(p.numel() for p in model.parameters())  # the base's, before any adapter
        self.facts = HFTokenizerFacts(tokenizer, getattr(model, "generation_config", None), name)

    # ------------------------------------------------------------------------------------------ the prompt

    def context_window(self) -> int:
        n = self.context_length or getattr(self.tokenizer, "model_max_length", 0) or 0
        return int(n) if 0 < n < 10**7 else 32768

    # ------------------------------------------------------------------------------------------ generating

    def stream(self, generation: Generation, halted: Halted) -> Iterator[Delta]:
        if not self._wait_idle(halted):
            return
        self.check_adapter(generation.adapter)  # detached while this answer waited
        self._idle.clear()
        thread = GenerationThread(self.model, self.tokenizer, self.eos_ids(), generation, halted,
                                  lambda: self._adapter_context(generation.adapter), self._idle.set)
        thread.start()
        try:
            yield from thread.deltas()
        finally:
            thread.abandon()  # a reader that left early: the thread stops at its next step (a no-op once it ended)

    def _adapter_context(self, name: str | None):
        """The base model (name None) or the named adapter, for one generation."""
        if not _is_peft(self.model):
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name, inference_mode=True)
        return nullcontext()

    # ------------------------------------------------------------------------------------------ adapters

    def inspect_adapter(self, path: Path) -> AdapterInfo:
        folder = read_lora_folder(path)
        base = self.model.get_base_model() if _is_peft(self.model) else self.model
        named = folder.config.get("base_model_name_or_path")
        problems = lora_shape_mismatches(base, folder.weights)
        if problems:
            more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
            raise BadInput(f"This adapter was trained for a different base model ({named or 'unnamed'}) than the "
                           f"loaded {self.name}: {'; '.join(problems[:2])}{more}. Load its base model first.")
        warnings = []
        if not self._same_base(named, base):
            warnings.append(f"adapter_config.json names '{named}' as its base, but the loaded model is {self.name}; "
                            "the layer shapes match, so it was attached - check that this is the right base model")
        return folder.info(warnings)

    def _same_base(self, named: str | None, base) -> bool:
        if not named:
            return True
        config = getattr(base, "config", None)
        candidates = {self.model_path, self.name, str(getattr(config, "name_or_path", "") or ""),
                      str(getattr(config, "_name_or_path", "") or "")} - {""}
        norm = lambda s: s.rstrip("/").lower()  # noqa: E731
        names = {norm(c) for c in candidates} | {norm(Path(c).name) for c in candidates}
        if norm(named) in names or norm(Path(named).name) in names:
            return True
        try:
            return Path(named).expanduser().resolve() == Path(self.model_path).resolve()
        except OSError:
            return False

    def attach_adapter(self, info: AdapterInfo) -> None:
        from peft import PeftModel  # noqa: PLC0415 - peft is imported when the first adapter comes

        from ..training.tokens import fast_token_rows  # noqa: PLC0415 - training imports torch-heavy modules

        self._wait_idle()
        try:  # torch work off the caller's (a server worker's) thread: see device.in_own_thread
            if isinstance(self.model, PeftModel):
                devicemod.in_own_thread(self.model.load_adapter, info.path, adapter_name=info.name,
                                        is_trainable=False)
            else:
                self.model = devicemod.in_own_thread(PeftModel.from_pretrained, self.model, info.path,
                                                     adapter_name=info.name, is_trainable=False)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise BadInput(f"PEFT could not load the adapter {Path(info.path).name}: "
                           f"{str(e).splitlines()[0][:240]}") from None
        self.model.eval()
        fast_token_rows(self.model)  # trained token rows without a copy of the vocabulary per token
        self.adapters[info.name] = info

    def detach_adapter(self, name: str) -> None:
        self._wait_idle()
        if len(self.model.peft_config) == 1:
            self.model = self.model.unload()  # the plain base model again
        else:
            self.model.delete_adapter(name)
        self.adapters.pop(name, None)

    # ------------------------------------------------------------------------------------------ the rest

    def shape(self) -> devicemod.ModelShape:
        return devicemod.ModelShape.from_config(self.model.config, self.n_params)

    def close(self) -> None:
        """Drop the model (its memory goes once nothing else holds it) and empty the accelerator's cache."""
        self._wait_idle()
        self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            torch.mps.empty_cache()


def _is_peft(model) -> bool:
    peft = sys.modules.get("peft")  # not imported before an adapter was attached: then it is no PeftModel
    return peft is not None and isinstance(model, peft.PeftModel)


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


_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def lora_shape_mismatches(base, weights: Path) -> list[str]:
    """The adapter's tensor shapes (read from the safetensors header only) against the loaded base's layers: one
    sentence per layer that differs."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(weights), framework="pt") as st:
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise BadInput(f"{weights.name} is not a valid safetensors file ({str(e).splitlines()[0][:160]}).") from None
    problems, params = [], None
    for key, shape in shapes.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        m = _LORA_KEY.match(name)
        if m:
            problem = _lora_problem(base, m.group(1), m.group(2), shape)
            if problem:
                problems.append(problem)
            continue
        if params is None:
            params = {k: tuple(v.shape) for k, v in base.state_dict().items()}
        plain = name.replace(".modules_to_save", "").replace(".original_module", "")
        if plain in params and params[plain] != shape:
            problems.append(f"{plain} is {list(params[plain])} here, the adapter holds {list(shape)}")
    return problems


def _lora_problem(base, path: str, part: str, shape: tuple) -> str | None:
    try:
        dims = _module_dims(base.get_submodule(path))
    except AttributeError:
        return f"the loaded model has no layer '{path}'"
    if dims is None or len(shape) != 2:
        return None
    if part == "lora_A" and shape[1] != dims[0]:
        return f"{path} takes {dims[0]} inputs here, the adapter expects {shape[1]}"
    if part == "lora_B" and shape[0] != dims[1]:
        return f"{path} gives {dims[1]} outputs here, the adapter expects {shape[0]}"
    if part == "lora_embedding_A" and shape[1] != dims[0]:
        return f"{path} has {dims[0]} tokens here, the adapter expects {shape[1]}"
    if part == "lora_embedding_B" and shape[0] != dims[1]:
        return f"{path} has width {dims[1]} here, the adapter expects {shape[0]}"
    return None
