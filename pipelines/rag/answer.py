"""Answers over a knowledge base: retrieve, fit the passages into the model's context window (counted with that
model's own tokenizer), and stream the answer with numbered citations [1] [2] that map to file and page. When no
passage is similar enough to the question (below the threshold), say so instead of answering from nothing.

What a question costs is mostly the prompt the model reads before its first token: the instructions, the passages
and the question. The passages that fit are chosen before anything is evaluated (those that do not fit are left out,
with a note, and never reach the model; when not even the first fits, as much of it as does), the prompt is built
once, and the instructions - the head every question shares - are marked for the model to keep evaluated (a GGUF
worker's prefix cache), so a later question evaluates only its passages and itself. The first event says what the
prompt holds and what retrieval and building it took (`timings`); the chunks carry the model's own
prompt-evaluation figures.

    for ev in stream_answer(lm, kb, "How do I reset the device?", ChatParams(), top_k=5):
        ev.chunk (a ChatChunk while streaming) / ev.passages / ev.citations / ev.refused / ev.note / ev.timings
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

from .. import chat
from ..errors import BadInput
from .retrieve import Passage, search
from .store import KB

THRESHOLD = 0.25  # cosine similarity below which a passage is not relevant
INSTRUCTIONS = ("Answer the question using only the numbered passages below. Cite the passages you use as [1], [2]. "
                "If the passages do not contain the answer, say that you do not know.")


@dataclass(frozen=True)
class RagTimings:
    """Where a RAG answer's time goes before the model starts reading, and what it will read."""

    retrieval_s: float  # the question embedded and searched
    prompt_s: float  # passages fitted, the prompt rendered and tokenized
    prompt_tokens: int  # what the model reads before answering
    fixed_tokens: int  # of those, the head every question shares (instructions): kept evaluated where the model can

    def summary(self, chunk: chat.ChatChunk | None = None) -> str:
        """Where the wait before the first token went: the prompt's size, how much of it the model kept evaluated
        and read (its own figures, from `chunk`, when the backend gives them), retrieval and prompt building."""
        bits = [f"prompt {self.prompt_tokens:,} tokens"]
        if chunk is not None and chunk.prompt_evaluated is not None:
            reused = max(0, self.prompt_tokens - chunk.prompt_evaluated)
            read = f"{chunk.prompt_evaluated:,} read by the model"
            if chunk.prompt_eval_s:
                read += f" in {chunk.prompt_eval_s:.2f} s ({chunk.prompt_evaluated / chunk.prompt_eval_s:.0f} tokens/s)"
            bits.append((f"{reused:,} kept evaluated from the last question, " if reused else "") + read)
        elif chunk is None:
            bits.append("the model is reading it…")
        bits += [f"retrieval {1000 * self.retrieval_s:.0f} ms", f"building the prompt {1000 * self.prompt_s:.0f} ms"]
        return " · ".join(bits)


@dataclass
class RagEvent:
    passages: list[Passage]  # what the prompt holds, numbered from 1
    chunk: chat.ChatChunk | None = None
    citations: list[int] = field(default_factory=list)  # passage numbers the answer cites (last event)
    refused: str | None = None  # why it did not answer (nothing relevant)
    dropped: int = 0  # retrieved passages that did not fit the context window
    note: str | None = None  # what the user should know about the passages (those left out)
    timings: RagTimings | None = None  # on every event once the prompt is built


def passages_text(passages: list[Passage]) -> str:
    return "\n\n".join(f"[{i}] ({p.where}) {p.text}" for i, p in enumerate(passages, 1))


def system_text(params: chat.ChatParams, passages: list[Passage]) -> str:
    own = params.system_prompt.strip()
    return (own + "\n\n" if own else "") + f"{INSTRUCTIONS}\n\n{passages_text(passages)}"


def prompt_with(lm, question: str, passages: list[Passage], params: chat.ChatParams) -> chat.RenderedPrompt | None:
    """The real prompt with these passages (rendered with the model's template, counted with its tokenizer) when it
    leaves the answer its room; None when it does not."""
    p = replace(params, system_prompt=system_text(params, passages))
    try:
        prompt = chat.build_prompt(lm, [{"role": "user", "content": question}], p)
    except chat.ContextTooLong:
        return None
    return prompt if prompt.max_new_tokens >= min(params.max_new_tokens, prompt.context_window // 2) else None


def _fit(lm, question: str, passages: list[Passage],
         params: chat.ChatParams) -> tuple[list[Passage], int, chat.RenderedPrompt]:
    """(passages kept, how many were left out, the prompt with them). The most passages (in rank order) that fit
    are found by bisection - a prompt only grows with each passage - so a few prompts are built, not one per
    passage; when not even the first fits whole, as much of it as does. ContextTooLong when nothing fits."""
    lo, hi, best = 0, len(passages), None  # passages[:lo] fit (or lo = 0); passages[:hi + 1] do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        prompt = prompt_with(lm, question, passages[:mid], params)
        if prompt is not None:
            lo, best = mid, prompt
        else:
            hi = mid - 1
    kept = passages[:lo]
    if not kept and passages:
        p, lo, hi = passages[0], 0, len(passages[0].text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            prompt = prompt_with(lm, question, [replace(p, text=p.text[:mid] + "…")], params)
            if prompt is not None:
                lo, best = mid, prompt
            else:
                hi = mid - 1
        if lo:
            kept = [replace(p, text=p.text[:lo] + "…", end=p.start + lo)]
    if not kept:
        raise chat.ContextTooLong(f"{lm.name}'s context window ({chat.context_window(lm)} tokens) has no room for a "
                                  "passage beside this question and the answer: ask a shorter question, lower max "
                                  "new tokens, or use a model with a longer context.")
    return kept, len(passages) - len(kept), best


def fit_passages(lm, question: str, passages: list[Passage], params: chat.ChatParams) -> tuple[list[Passage], int]:
    """As many passages (in rank order) as fit the model's context window beside the question and the answer's
    room; when not even the first fits whole, as much of it as does. ContextTooLong when nothing fits."""
    kept, dropped, _prompt_built = _fit(lm, question, passages, params.validated())
    return kept, dropped


def shared_head(lm, question: str, prompt: chat.RenderedPrompt, params: chat.ChatParams) -> int:
    """How many leading tokens of `prompt` every question shares (the template's opening, the system prompt and the
    instructions): the common start of `prompt` and the same prompt without passages."""
    bare = prompt_with(lm, question, [], params)
    if bare is None:
        return 0
    n = 0
    for a, b in zip(prompt.token_ids, bare.token_ids):
        if a != b:
            break
        n += 1
    return min(n, len(prompt.token_ids) - 1)  # the last token is always evaluated: its logits start the answer


def left_out_note(dropped: int, kept: int, window: int) -> str | None:
    if not dropped:
        return None
    return (f"{dropped} more retrieved passage{'s' if dropped != 1 else ''} did not fit the {window}-token context "
            f"window beside the question and the answer's room and {'were' if dropped != 1 else 'was'} left out "
            f"(the model reads {kept}); lower top-k or max new tokens, or use a model with a longer context.")


def cited(text: str, n: int) -> list[int]:
    """The passage numbers [k] (1..n) the answer cites, in order of first mention."""
    out = []
    for m in re.finditer(r"\[(\d{1,3})\]", text):
        k = int(m.group(1))
        if 1 <= k <= n and k not in out:
            out.append(k)
    return out


def stream_answer(lm, kb: KB, question: str, params: chat.ChatParams | None = None, top_k: int = 5,
                  mode: str = "hybrid", threshold: float = THRESHOLD,
                  stop: threading.Event | None = None) -> Iterator[RagEvent]:
    """Retrieve, then stream the model's answer: a first event with the passages, one per ChatChunk, and a last
    one with the citations. A question no passage is relevant to (best similarity below `threshold`) gets one
    event with `refused` set and no model call."""
    params = (params or chat.ChatParams()).validated()
    given = threshold
    try:
        threshold = float(given)
    except (TypeError, ValueError):
        threshold = float("nan")  # refused just below
    if not 0.0 <= threshold <= 1.0:  # NaN too
        raise BadInput(f"The relevance threshold must be a number from 0 to 1 (got {given!r}).")
    t0 = time.perf_counter()
    found = search(kb, question, top_k, mode)
    retrieval_s = time.perf_counter() - t0
    relevant = [p for p in found if p.similarity >= threshold]
    if not relevant:
        best = max((p.similarity for p in found), default=0.0)
        yield RagEvent(found, refused=(f"Nothing in '{kb.name}' is relevant enough to answer this (best similarity "
                                       f"{best:.2f}, threshold {threshold:.2f}). Rephrase the question, lower the "
                                       "threshold, or add documents that cover it."))
        return
    t1 = time.perf_counter()
    kept, dropped, prompt = _fit(lm, question, relevant, params)
    prompt = replace(prompt, keep_prefix=shared_head(lm, question, prompt, params))
    params = replace(params, system_prompt=system_text(params, kept))
    timings = RagTimings(retrieval_s, time.perf_counter() - t1, len(prompt.token_ids), prompt.keep_prefix)
    note = left_out_note(dropped, len(kept), prompt.context_window)
    yield RagEvent(kept, dropped=dropped, note=note, timings=timings)
    text = ""
    for ch in chat.stream_rendered(lm, prompt, params, stop):
        text += ch.text
        yield RagEvent(kept, chunk=ch, dropped=dropped, note=note, timings=timings,
                       citations=cited(text, len(kept)) if ch.finish_reason else [])
