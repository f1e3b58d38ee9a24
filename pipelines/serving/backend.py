"""One protocol for every kind of loaded model: `ModelBackend`. A `LoadedModel` (pipelines.models) holds one in its
`backend` field; chat, /v1, RAG and the Model tab reach the model only through it, so a new kind of model is one new
class, not a branch in each of them.

    HFBackend    serving/hf.py     transformers in this process, PEFT LoRA adapters switched per answer
    GGUFBackend  serving/gguf.py   llama.cpp in a worker process of its own (serving/client.py)
    MLXBackend   serving/mlx.py    Apple's MLX in this process (mlx-lm), PEFT adapters as mlx-lm's LoRA layers

What every backend answers (the abstract methods must be written; the rest is shared):

    kind                                "transformers" | "llama.cpp" | ...: what the Model tab shows
    context_margin                      context tokens kept free past the answer (llama.cpp may overrun max_tokens)
    context_window()                    tokens the model attends to, as loaded
    chat_template(adapter) -> (text, source)   the adapter's training template, the model's own, else the plain
                                        fallback with the reason
    special_tokens()                    bos_token, eos_token, ... as the template reads them
    render(messages)                    the conversation rendered in the sandbox, ready for the answer
    tokenize(text)                      ids of a rendered prompt: special-token text parsed, one BOS when wanted
    eos_ids()                           the ids that end an answer
    stream(generation, halted)          `Delta`s of one answer (see Generation and Delta below)
    inspect_adapter, attach_adapter, detach_adapter, check_adapter, adapters
                                        LoRA adapters: checked against the model, attached, chosen per answer
    shape(), describe()                 the memory estimate's view; extra facts for the Model tab
    close()                             free the weights (a worker process ends)

The caller serializes: `stream`, `attach_adapter`, `detach_adapter` and `close` are called with the LoadedModel's
lock held (pipelines.chat does that), so a backend never sees two of them at once - except that a backend whose
generation runs on a thread of its own (HF) must let that thread finish before it starts the next or changes the
model, since the caller lets go of the lock as soon as a stopped stream returns.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import NotFound
from ..templates import PLAIN_CHAT_TEMPLATE, render_template


@dataclass(frozen=True)
class Generation:
    """One answer to generate: the prompt's ids and the sampling settings (temperature 0: greedy, seed unused)."""

    token_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int
    adapter: str | None = None  # an attached adapter's name; None: the base model
    # The penalties work as llama.cpp's penalties sampler does, on every backend: over the last PENALTY_WINDOW tokens
    # of the answer (not the prompt), a token's logit is divided by repetition_penalty (multiplied when negative),
    # then less count x frequency_penalty, less presence_penalty; before any other sampling step. A backend that
    # cannot honour a setting raises BadInput naming it.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


PENALTY_WINDOW = 64  # answer tokens the penalties look at (llama-cpp-python's last_n_tokens_size, as the worker sets)


@dataclass(frozen=True)
class Delta:
    """One step of a backend's stream. The last one of an answer that ended by itself has `finish` set ("stop": end
    of generation, "length": max_new_tokens); a halted answer just ends (the caller knows it halted)."""

    text: str = ""
    n_tokens: int = 0  # answer tokens so far (end-of-generation tokens not counted)
    finish: str | None = None
    note: str | None = None  # something the user should know (the model process was restarted before answering)


Halted = Callable[[], bool]  # polled by a stream: once true, the answer ends after the current token


PLAIN_BECAUSE_BASE = ("plain fallback (a base model: no chat template; its vocabulary has <start_of_turn>, but a base "
                      "model never learned those turns, so plain 'System: / User: / Assistant:' lines are used, "
                      "stopping at '\\nUser:')")
PLAIN_BECAUSE_NONE = ("plain fallback (the model has no chat template): 'System: / User: / Assistant:' lines, "
                      "stopping at '\\nUser:'")


class ModelBackend(abc.ABC):
    """A loaded model as chat and serving see it (see the module docstring)."""

    kind: str = "?"
    context_margin: int = 0

    def __init__(self):
        self.adapters: dict = {}  # name -> adapters.AdapterInfo, in the order they were attached

    # ------------------------------------------------------------------------------------------ the prompt

    @abc.abstractmethod
    def context_window(self) -> int: ...

    @abc.abstractmethod
    def own_template(self) -> tuple[str | None, str]:
        """(the model's own chat template or None, where it comes from)."""

    @abc.abstractmethod
    def has_special_token(self, text: str) -> bool:
        """Whether `text` is one special token of the vocabulary."""

    @abc.abstractmethod
    def special_tokens(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def eos_ids(self) -> list[int]: ...

    def chat_template(self, adapter: str | None = None) -> tuple[str, str]:
        """(template text, where it comes from): the one `adapter` was trained with when it says so (a LoRA on a base
        GGUF whose metadata has another, or none); else the model's own; else the plain fallback - also for a base
        model with Gemma's turn tokens in its vocabulary (bench/sampling.py: it drifts far less on plain lines)."""
        info = self.adapters.get(adapter) if adapter else None
        if info is not None and info.chat_template:
            return info.chat_template, f"the chat template adapter {adapter} was trained with"
        template, source = self.own_template()
        if template:
            return template, source
        if self.has_special_token("<start_of_turn>"):
            return PLAIN_CHAT_TEMPLATE, PLAIN_BECAUSE_BASE
        return PLAIN_CHAT_TEMPLATE, PLAIN_BECAUSE_NONE

    def render(self, messages: list[dict], template: str | None = None) -> str:
        """The conversation rendered (sandboxed) with `template` (default: chat_template()), ready for the answer."""
        return render_template(template or self.chat_template()[0], messages, True, **self.special_tokens())

    # ------------------------------------------------------------------------------------------ generating

    @abc.abstractmethod
    def stream(self, generation: Generation, halted: Halted) -> Iterator[Delta]: ...

    # ------------------------------------------------------------------------------------------ adapters

    def check_adapter(self, name: str | None) -> None:
        """NotFound (or BadInput, for a backend that takes none) unless `name` is None or an attached adapter."""
        if name is not None and name not in self.adapters:
            raise NotFound(f"No adapter named '{name}' is attached to this model "
                           f"(attached: {', '.join(self.adapters) or 'none'}).")

    @abc.abstractmethod
    def inspect_adapter(self, path: Path):
        """The adapters.AdapterInfo of the adapter at `path` once checked against this model, without loading it;
        BadInput (with the reason) when this model cannot take it."""

    @abc.abstractmethod
    def attach_adapter(self, info) -> None:
        """Load an inspected adapter under `info.name` and add it to `adapters`; BadInput when that fails."""

    @abc.abstractmethod
    def detach_adapter(self, name: str) -> None: ...

    # ------------------------------------------------------------------------------------------ the rest

    @abc.abstractmethod
    def shape(self):
        """devicemod.ModelShape: what the memory estimate needs to know of the model."""

    def describe(self) -> dict:
        """Extra facts for the Model tab and /api/model/current (a worker's state, say)."""
        return {}

    @abc.abstractmethod
    def close(self) -> None: ...
