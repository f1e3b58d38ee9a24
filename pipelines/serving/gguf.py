"""The GGUF backend: a llama.cpp model answering from its worker process (client.GGUFWorker), with the vocabulary
kept in this process for tokenizing and templates. GGUF metadata never changes, so what is read from it is read
once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

from .. import device as devicemod
from ..chat.params import LLAMA_UTF8_MARGIN
from ..errors import BadInput
from .backend import Delta, Generation, Halted, ModelBackend, PromptEval
from .client import GGUFWorker

NO_PEFT = ("A GGUF model cannot take a LoRA adapter: merge the adapter into its HF base model and export a GGUF "
           "(Export stage), or load the HF base model to chat with the adapter.")


class GGUFBackend(ModelBackend):
    """A GGUF served by a worker process (see the module docstring)."""

    kind = "llama.cpp"
    keeps_prefix = True  # the worker's prefix cache (prefix_cache.py)
    context_margin = LLAMA_UTF8_MARGIN  # llama-cpp-python may run up to 3 tokens past max_tokens (a UTF-8 character)

    def __init__(self, worker: GGUFWorker):
        super().__init__()
        self.worker = worker
        self._probes: dict[str, bool] = {}  # has_special_token's answers

    # ------------------------------------------------------------------------------------------ the prompt

    def context_window(self) -> int:
        return self.worker.context_window()

    @functools.cached_property
    def _template(self) -> str | None:
        return self.worker.metadata.get("tokenizer.chat_template") or None

    def own_template(self) -> tuple[str | None, str]:
        return self._template, "GGUF metadata (tokenizer.chat_template)"

    def has_special_token(self, text: str) -> bool:
        if text not in self._probes:
            try:
                ids = self.worker.tokenize(text.encode(), add_bos=False, special=True)
            except (RuntimeError, ValueError):
                ids = []
            self._probes[text] = len(ids) == 1 and self._token_text(ids[0]) == text
        return self._probes[text]

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None or token_id < 0:
            return ""
        return self.worker.detokenize([token_id], special=True).decode("utf-8", "replace")

    @functools.cached_property
    def _specials(self) -> dict[str, str]:
        return {"bos_token": self._token_text(self.worker.token_bos()),
                "eos_token": self._token_text(self.worker.token_eos())}

    def special_tokens(self) -> dict[str, str]:
        return self._specials

    @functools.cached_property
    def _wants_bos(self) -> bool:
        bos = self.worker.token_bos()
        with_bos = self.worker.tokenize(b"a", add_bos=True, special=False)
        return bool(with_bos) and with_bos[0] == bos and bos >= 0

    def tokenize(self, text: str) -> list[int]:
        """Special-token text is parsed; a BOS is added only when the model wants one and the template did not
        write it already (no double BOS)."""
        ids = list(self.worker.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        bos = self.worker.token_bos()
        if self._wants_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def eos_ids(self) -> list[int]:
        md = self.worker.metadata
        ids = {self.worker.token_eos()} | {int(md[k]) for k in ("tokenizer.ggml.eot_token_id",
                                                                 "tokenizer.ggml.eom_token_id") if k in md}
        return sorted(i for i in ids if i >= 0)

    # ------------------------------------------------------------------------------------------ generating

    def stream(self, generation: Generation, halted: Halted) -> Iterator[Delta]:
        """Deltas from the worker, which counts the answer's tokens exactly and stops after the current token once
        `halted()`; the stream is also left as soon as it is."""
        g = generation
        self.check_adapter(g.adapter)
        earlier = self.worker.last_prompt  # the report on this answer's prompt replaces it before the first text
        items = self.worker.generate(g.token_ids, max_tokens=g.max_new_tokens, temperature=g.temperature,
                                     top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                                     repeat_penalty=g.repetition_penalty, frequency_penalty=g.frequency_penalty,
                                     presence_penalty=g.presence_penalty, seed=g.seed, keep_prefix=g.keep_prefix,
                                     halted=halted)
        try:
            for kind, value, n_tokens in items:
                if self.worker.last_prompt is not earlier:  # llama.cpp's own figures for the prompt (worker.py)
                    earlier = self.worker.last_prompt
                    yield Delta(prompt=self.last_prompt())
                if kind == "note":  # the worker had died before answering and was restarted
                    yield Delta(note=value)
                elif kind == "end":  # "stopped" is the caller's to report (its own stop, or a stop string)
                    yield Delta("", n_tokens, finish=None if value == "stopped" else value)
                    return
                else:
                    yield Delta(value, n_tokens)
                    if halted():
                        return
        finally:
            items.close()  # an answer left early: the worker is told to stop and read up to its end

    # ------------------------------------------------------------------------------------------ adapters

    def check_adapter(self, name: str | None) -> None:
        if name is not None:
            raise BadInput(NO_PEFT)

    def inspect_adapter(self, path: Path):
        raise BadInput(NO_PEFT)

    def attach_adapter(self, info) -> None:
        raise BadInput(NO_PEFT)

    def detach_adapter(self, name: str) -> None:
        raise BadInput(NO_PEFT)

    # ------------------------------------------------------------------------------------------ the rest

    def shape(self) -> devicemod.ModelShape:
        md = self.worker.metadata
        arch = md.get("general.architecture") or ""
        g = lambda k, d=0: int(md.get(f"{arch}.{k}", d) or d)  # noqa: E731
        hidden, heads = g("embedding_length"), g("attention.head_count", 1)
        return devicemod.ModelShape(
            n_params=int(self.worker.info.get("n_params") or 0), hidden_size=hidden, num_layers=g("block_count"),
            vocab_size=int(self.worker.n_vocab()), intermediate_size=g("feed_forward_length"),
            num_kv_heads=g("attention.head_count_kv", heads), head_dim=g("attention.key_length", hidden // max(1, heads)),
            num_heads=heads)

    def describe(self) -> dict:
        return {"worker": self.worker.status()}  # its process, as it is now

    def last_prompt(self) -> PromptEval | None:
        r = self.worker.last_prompt
        return PromptEval(r["tokens"], r["evaluated"], r["eval_ms"] / 1000, r["counters"]) if r else None

    def close(self) -> None:
        self.worker.close()
