"""The GGUF worker's prefix cache: the evaluated state (llama.cpp's KV cells) of prompt heads that later prompts
share - a RAG answer's fixed instructions - kept so that a prompt starting with one evaluates only the rest, even
after other prompts came in between. llama-cpp-python by itself reuses only what a prompt shares with the one just
before it; a chat question between two RAG questions would make the second evaluate its instructions again.

Why not llama-cpp-python's own prompt cache (`Llama.set_cache(LlamaRAMCache())`): it saves the whole context state
after every answer, and `load_state` copies and then scans the whole scores buffer (n_batch x n_vocab floats: 512 MB
with Gemma's 262k-token vocabulary) - far slower than evaluating the few dozen tokens it would spare. Here only the
KV cells of sequence 0 up to the head are saved and restored (llama_state_seq_get_data / set_data): about 1 MB for
50 tokens of Gemma 3 270M.

A head is kept per LoRA adapter: one evaluated with other weights is of no use (the worker resets its context when
it switches adapters, and only a head of the adapter in use is restored).

`PromptLedger` is the worker's account of the prompts it reads: it prepares each one with the cache and reports
llama.cpp's own figures for it (llama_perf_context: tokens evaluated and their time) with the worker's cumulative
counters - what the studio shows under an answer and what the tests read to prove the reuse.

Runs in the worker process only (it calls llama.cpp).

    ledger = PromptLedger()
    ledger.begin(llm, prompt, keep=42, adapter=None)   # before llm.create_completion(prompt=prompt, ...)
    ledger.report(llm)                                 # once the first token is sampled: {"tokens", "evaluated", ...}
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict

import numpy as np

from . import llamacpp

MIN_HEAD = 8  # tokens: a shorter head costs less to evaluate than to keep and restore
MAX_HEADS = 8  # kept at once, least recently used dropped first
MAX_BYTES = 256 << 20
SEQ = 0  # llama-cpp-python evaluates everything in sequence 0


def common_prefix(a, b) -> int:
    """How many leading tokens `a` and `b` share."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


Head = tuple  # (adapter name or None, token id, token id, ...)


class PrefixCache:
    """Saved KV states of prompt heads, keyed by adapter and token ids (see the module docstring)."""

    def __init__(self, max_heads: int = MAX_HEADS, max_bytes: int = MAX_BYTES):
        self.max_heads, self.max_bytes = max_heads, max_bytes
        self._heads: OrderedDict[Head, bytes] = OrderedDict()
        self.saved = self.restored = self.failed = 0

    def counters(self) -> dict:
        return {"heads": len(self._heads), "bytes": sum(len(v) for v in self._heads.values()),
                "saved": self.saved, "restored": self.restored, "failed": self.failed}

    def prepare(self, llm, prompt: list[int], keep: int = 0, adapter: str | None = None) -> tuple[int, str | None]:
        """Make the context hold as much of `prompt`'s head as is known, before llama-cpp-python evaluates the
        prompt (it evaluates only what follows what the context holds). When `keep` > 0, the first `keep` tokens
        are worth keeping for later prompts: their state is saved (evaluated first if need be). `adapter`: the LoRA
        adapter the context computes with now. Returns (tokens the context holds now, "restored" | "saved" | None)."""
        held = common_prefix(llm.input_ids[:llm.n_tokens], prompt)
        what = None
        best = max((h for h in self._heads if h[0] == adapter and held < len(h) - 1 < len(prompt)
                    and tuple(prompt[:len(h) - 1]) == h[1:]), key=len, default=None)
        if best is not None:
            restored = self._restore(llm, best)
            held, what = (len(best) - 1, "restored") if restored else (0, None)
        keep = min(int(keep), len(prompt) - 1)  # at least one token is evaluated: its logits start the answer
        if keep >= MIN_HEAD and (adapter, *prompt[:keep]) not in self._heads:
            if held < keep:
                llm.n_tokens = held  # eval() drops the cells past n_tokens first
                llm.eval(prompt[held:keep])
            elif held > keep:
                self._truncate(llm, keep)
            held = keep
            self._save(llm, (adapter, *prompt[:keep]))
            what = "saved"
        return held, what

    def forget(self, adapter: str | None) -> None:
        """Drop the heads computed with `adapter` (it was unloaded)."""
        for head in [h for h in self._heads if h[0] == adapter]:
            del self._heads[head]

    # ------------------------------------------------------------------------------------------ llama.cpp state

    @staticmethod
    def _truncate(llm, n: int) -> None:
        lib = llamacpp.llama_cpp_module().llama_cpp
        lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), SEQ, n, -1)
        llm.n_tokens = n

    def _save(self, llm, head: Head) -> None:
        lib = llamacpp.llama_cpp_module().llama_cpp
        size = lib.llama_state_seq_get_size(llm.ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        n = lib.llama_state_seq_get_data(llm.ctx, buf, size, SEQ)
        if not n or n > size:
            self.failed += 1
            return
        self._heads[head] = bytes(buf[:n])
        self.saved += 1
        while len(self._heads) > self.max_heads or (len(self._heads) > 1 and
                                                    sum(len(v) for v in self._heads.values()) > self.max_bytes):
            self._heads.popitem(last=False)

    def _restore(self, llm, head: Head) -> bool:
        lib = llamacpp.llama_cpp_module().llama_cpp
        data = self._heads[head]
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if lib.llama_state_seq_set_data(llm.ctx, buf, len(data), SEQ) != len(data):
            # llama.cpp empties the sequence when a restore fails: the context holds nothing now
            llm.n_tokens = 0
            del self._heads[head]
            self.failed += 1
            return False
        llm.input_ids[:len(head) - 1] = head[1:]
        llm.n_tokens = len(head) - 1
        self._heads.move_to_end(head)
        self.restored += 1
        return True


class PromptLedger:
    """The worker's account of the prompts it reads (see the module docstring)."""

    def __init__(self, cache: PrefixCache | None = None):
        self.cache = cache or PrefixCache()
        self.answers = self.prompt_tokens = self.evaluated = 0
        self._tokens, self._head = 0, None

    def begin(self, llm, prompt: list[int], keep: int = 0, adapter: str | None = None) -> None:
        """Before a prompt is evaluated: llama.cpp's counters reset (so the report counts this prompt alone, a head
        evaluated to be saved included), and the context given what the cache holds of it."""
        llamacpp.llama_cpp_module().llama_perf_context_reset(llm.ctx)
        self._tokens = len(prompt)
        _held, self._head = self.cache.prepare(llm, prompt, keep, adapter)

    def report(self, llm) -> dict:
        """Once the prompt is evaluated (its first token sampled): tokens llama.cpp evaluated for it (a single
        remaining token counts as an eval, not a prompt eval) and their time, with the worker's totals."""
        perf = llamacpp.llama_cpp_module().llama_perf_context(llm.ctx)
        # llama_perf_context reports n_eval as at least 1: a count with no time behind it is that floor
        evaluated = int(perf.n_p_eval) + (int(perf.n_eval) if perf.t_eval_ms > 0 else 0)
        self.answers += 1
        self.prompt_tokens += self._tokens
        self.evaluated += evaluated
        return {"tokens": self._tokens, "evaluated": evaluated, "eval_ms": round(perf.t_p_eval_ms + perf.t_eval_ms, 3),
                "head": self._head, "counters": {"answers": self.answers, "prompt_tokens": self.prompt_tokens,
                                                 "evaluated": self.evaluated, **self.cache.counters()}}
