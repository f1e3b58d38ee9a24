"""What a RAG question will cost before it is asked: the prompt tokens the model would read (instructions, question,
the passages top-k would bring), counted with the model's own tokenizer, and the time to read them at the speed the
model last showed. On a small CPU model reading the prompt is most of the wait before the first token, so the
RAG tab shows this while the question is typed, and the figures of the real prompt once it is asked.

    est = estimate(lm, kb, "How do I reset it?", top_k=5, params=ChatParams())
    est.tokens, est.to_evaluate, est.seconds, est.summary()
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from .. import chat
from .answer import passages_text, prompt_with, shared_head
from .retrieve import Passage, check_top_k
from .store import KB

SAMPLE = 24  # passages tokenized to learn a knowledge base's passage size in the model's tokens
MIN_RATE_TOKENS = 32  # a measured prompt shorter than this says little about the model's reading speed
_SIZES: dict[tuple, tuple[float, int]] = {}  # see _passage_size
PROBE = Passage(0, 0, 0.0, 0.0, "a", 1, 0, 1, None, "a")  # a passage as short as they come
_SIZES_MAX = 32
_SIZES_LOCK = threading.Lock()


@dataclass(frozen=True)
class CostEstimate:
    tokens: int  # the prompt, about: fixed + question + passages x per_passage
    fixed: int  # the head every question shares (the template's opening, the instructions)
    question: int  # the question and the rest of the template
    passages: int  # passages it would hold: top-k, at most the chunks, at most what fits
    asked: int  # top-k as asked
    per_passage: float  # model tokens of one passage (with its [n] (file, page) line), on average in this KB
    cached: int  # tokens the model keeps evaluated from an earlier question (the head), so not read again
    rate: float | None  # prompt tokens per second the model showed on its latest prompt (None: not measured yet)

    @property
    def to_evaluate(self) -> int:
        return max(1, self.tokens - self.cached)

    @property
    def seconds(self) -> float | None:
        return self.to_evaluate / self.rate if self.rate else None

    def summary(self) -> str:
        fit = f" (of top-k {self.asked}, only {self.passages} fit the context window)" if self.passages < self.asked \
            else ""
        text = (f"≈ {self.tokens:,} prompt tokens: instructions {self.fixed}, question {self.question}, "
                f"{self.passages} passage{'s' if self.passages != 1 else ''} × ≈ {self.per_passage:.0f}{fit}")
        if self.cached:
            text += f"; {self.cached} of them (the instructions) kept evaluated from the last question"
        if self.seconds is not None:
            text += f" · ≈ {self.seconds:.1f} s to read at {self.rate:.0f} tokens/s (this model's latest prompt)"
        return text


def _passage_size(lm, kb: KB) -> tuple[float, int]:
    """(model tokens per passage in the prompt, chunks in the knowledge base), learned from up to SAMPLE passages
    spread over the knowledge base, once per generation of it and model."""
    generation = kb.meta().get("generation")
    key = (str(kb.path), generation, lm.model_path, lm.loaded_at)
    with _SIZES_LOCK:
        if key in _SIZES:
            return _SIZES[key]
    with kb.db() as con:
        n = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        rows = con.execute("SELECT c.id, s.name, c.page, c.text FROM chunks c JOIN sources s ON s.sha256 = c.sha256 "
                           "WHERE c.id % ? = 0 ORDER BY c.id LIMIT ?", (max(1, n // SAMPLE), SAMPLE)).fetchall()
    sample = [Passage(0, cid, 0.0, 0.0, name, page, 0, 0, None, text) for cid, name, page, text in rows]
    # "\n\n" joins passages in the prompt: counted with each
    per = sum(len(chat.tokenize(lm, passages_text([p]) + "\n\n")) for p in sample) / len(sample) if sample else 0.0
    out = (per, n)
    with _SIZES_LOCK:
        if len(_SIZES) >= _SIZES_MAX:
            _SIZES.pop(next(iter(_SIZES)))
        _SIZES[key] = out
    return out


def _measured(lm) -> tuple[float | None, bool]:
    """(prompt tokens per second the model showed on its latest prompt, whether it keeps a prompt head now)."""
    last = lm.backend.last_prompt()
    if last is None:
        return None, False
    keeps = lm.backend.keeps_prefix and bool(last.counters.get("heads"))
    if last.evaluated < MIN_RATE_TOKENS or last.seconds <= 0:
        return None, keeps
    return last.evaluated / last.seconds, keeps


def estimate(lm, kb: KB, question: str, top_k: int = 5, params: chat.ChatParams | None = None) -> CostEstimate:
    """The cost of asking `question` (empty: counted as "?") with `top_k` passages; see the module docstring.
    BadInput for a bad top-k or settings, ContextTooLong for a question that leaves no room; nothing is retrieved
    and the model is not called."""
    params = (params or chat.ChatParams()).validated()
    top_k = check_top_k(top_k)
    q = (question or "").strip() or "?"
    bare = prompt_with(lm, q, [], params)
    if bare is None:
        raise chat.ContextTooLong(f"This question leaves no room for passages in {lm.name}'s context window "
                                  f"({chat.context_window(lm)} tokens): shorten it or lower max new tokens.")
    per, n_chunks = _passage_size(lm, kb)
    probe = prompt_with(lm, q, [PROBE], params)  # where passages begin: the end of the shared head
    fixed = shared_head(lm, q, probe, params) if probe is not None else 0
    reserve = min(params.max_new_tokens, bare.context_window // 2) + lm.backend.context_margin
    room = bare.context_window - reserve - len(bare.token_ids)
    fits = top_k if per <= 0 else max(0, math.floor(room / per))
    passages = min(top_k, n_chunks, fits)
    rate, keeps = _measured(lm)
    tokens = len(bare.token_ids) + round(passages * per)
    return CostEstimate(tokens=tokens, fixed=fixed, question=len(bare.token_ids) - fixed, passages=passages,
                        asked=top_k, per_passage=per, cached=fixed if keeps else 0, rate=rate)
