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
from ..errors import BadInput, NotFound
from .backend import Delta, Generation, Halted, ModelBackend, PromptEval
from .client import GGUFWorker
from .lora import AdapterInfo

NO_PEFT = ("A GGUF model takes a LoRA adapter as a LoRA GGUF file (general.type adapter), not a PEFT folder: choose "
           "the run in the Chat tab's Adapter menu (it writes one when the base model has this GGUF), export the run "
           "(Export stage: its lora-gguf/ folder), or load the HF base model to chat with the adapter folder.")


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
        `halted()`; the stream is also left as soon as it is. The worker switches to the generation's adapter."""
        g = generation
        self.check_adapter(g.adapter)
        earlier = self.worker.last_prompt  # the report on this answer's prompt replaces it before the first text
        items = self.worker.generate(g.token_ids, max_tokens=g.max_new_tokens, temperature=g.temperature,
                                     top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                                     repeat_penalty=g.repetition_penalty, frequency_penalty=g.frequency_penalty,
                                     presence_penalty=g.presence_penalty, seed=g.seed, adapter=g.adapter,
                                     keep_prefix=g.keep_prefix,
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

    def inspect_adapter(self, path: Path) -> AdapterInfo:
        """A LoRA GGUF (what the Adapter menu writes for a run, or an export's lora-gguf/) for this model's
        architecture; its tensors are matched to the model's when the worker loads it."""
        if path.is_dir():
            raise BadInput(NO_PEFT)
        if not path.is_file():
            raise NotFound(f"No adapter file at {path} (it may have been deleted).")
        meta = lora_gguf_metadata(path)
        arch = self.worker.metadata.get("general.architecture")
        if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
            raise BadInput(f"{path.name} is not a LoRA adapter GGUF (general.type is "
                           f"{meta.get('general.type') or 'missing'}); a GGUF model takes its LoRA as such a file.")
        if meta.get("general.architecture") != arch:
            raise BadInput(f"{path.name} is a LoRA for the {meta.get('general.architecture')} architecture; the loaded "
                           f"model is {arch}. Load its base model first.")
        return AdapterInfo(name=path.stem, path=str(path.resolve()), base_model=meta.get("general.base_model"),
                           peft_type="LORA", rank=meta.get("rank"), target_modules=meta.get("targets", []))

    def attach_adapter(self, info: AdapterInfo) -> None:
        self.worker.load_lora(info.name, info.path)
        self.adapters[info.name] = info

    def detach_adapter(self, name: str) -> None:
        self.worker.free_lora(name)
        self.adapters.pop(name, None)

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


def lora_gguf_metadata(path: Path) -> dict:
    """The keys of a GGUF that say what it is (general.type, general.architecture, adapter.type), the LoRA's rank
    and the layers it adapts, read with the gguf library (nothing loaded). BadInput for a file that is no GGUF."""
    import gguf  # noqa: PLC0415 - only when an adapter file is checked

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise BadInput(f"{path.name} is not a readable GGUF file ({str(e).splitlines()[0][:160]}).") from None
    out: dict = {}
    for key in ("general.type", "general.architecture", "adapter.type", "general.base_model"):
        field = reader.fields.get(key)
        if field is not None:
            out[key] = field.contents()
    lora_a = [t for t in reader.tensors if t.name.endswith(".lora_a")]
    if lora_a:
        out["rank"] = int(min(lora_a[0].shape))
        # blk.0.attn_q.weight.lora_a -> attn_q; token_embd.weight.lora_a (trained token rows) -> token_embd
        out["targets"] = sorted({t.name.removesuffix(".weight.lora_a").split(".")[-1] for t in lora_a})
    return out
