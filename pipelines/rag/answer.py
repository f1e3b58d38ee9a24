"""Answers over a knowledge base: retrieve, fit the passages into the model's context window (counted with that
model's own tokenizer), and stream the answer with numbered citations [1] [2] that map to file and page. When no
passage is similar enough to the question (below the threshold), say so instead of answering from nothing.

    for ev in stream_answer(lm, kb, "How do I reset the device?", ChatParams(), top_k=5):
        ev.chunk (a ChatChunk while streaming) / ev.passages / ev.citations / ev.refused
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, replace
from typing import Iterator

from .. import chat
from ..errors import BadInput
from .retrieve import Passage, search
from .store import KB

THRESHOLD = 0.25  # cosine similarity below which a passage is not relevant
INSTRUCTIONS = ("Answer the question using only the numbered passages below. Cite the passages you use as [1], [2]. "
                "If the passages do not contain the answer, say that you do not know.")


@dataclass
class RagEvent:
    passages: list[Passage]  # what the prompt holds, numbered from 1
    chunk: chat.ChatChunk | None = None
    citations: list[int] = field(default_factory=list)  # passage numbers the answer cites (last event)
    refused: str | None = None  # why it did not answer (nothing relevant)
    dropped: int = 0  # retrieved passages that did not fit the context window


def _context(passages: list[Passage]) -> str:
    return "\n\n".join(f"[{i}] ({p.where}) {p.text}" for i, p in enumerate(passages, 1))


def _system(params: chat.ChatParams, passages: list[Passage]) -> str:
    own = params.system_prompt.strip()
    return (own + "\n\n" if own else "") + f"{INSTRUCTIONS}\n\n{_context(passages)}"


def _fits(lm, question: str, passages: list[Passage], params: chat.ChatParams) -> bool:
    """The real prompt (rendered with the model's template, counted with its tokenizer) leaves the answer its room."""
    p = replace(params, system_prompt=_system(params, passages))
    try:
        prompt = chat.build_prompt(lm, [{"role": "user", "content": question}], p)
    except chat.ContextTooLong:
        return False
    return prompt.max_new_tokens >= min(params.max_new_tokens, prompt.context_window // 2)


def fit_passages(lm, question: str, passages: list[Passage], params: chat.ChatParams) -> tuple[list[Passage], int]:
    """As many passages (in rank order) as fit the model's context window beside the question and the answer's
    room; when not even the first fits whole, as much of it as does. ContextTooLong when nothing fits."""
    k = 0
    while k < len(passages) and _fits(lm, question, passages[:k + 1], params):
        k += 1
    kept = passages[:k]
    if not kept and passages:
        p, lo, hi = passages[0], 0, len(passages[0].text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(lm, question, [replace(p, text=p.text[:mid] + "…")], params):
                lo = mid
            else:
                hi = mid - 1
        if lo:
            kept = [replace(p, text=p.text[:lo] + "…", end=p.start + lo)]
    if not kept:
        raise chat.ContextTooLong(f"{lm.name}'s context window ({chat.context_window(lm)} tokens) has no room for a "
                                  "passage beside this question and the answer: ask a shorter question, lower max "
                                  "new tokens, or use a model with a longer context.")
    return kept, len(passages) - len(kept)


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
    found = search(kb, question, top_k, mode)
    relevant = [p for p in found if p.similarity >= threshold]
    if not relevant:
        best = max((p.similarity for p in found), default=0.0)
        yield RagEvent(found, refused=(f"Nothing in '{kb.name}' is relevant enough to answer this (best similarity "
                                       f"{best:.2f}, threshold {threshold:.2f}). Rephrase the question, lower the "
                                       "threshold, or add documents that cover it."))
        return
    kept, dropped = fit_passages(lm, question, relevant, params)
    params = replace(params, system_prompt=_system(params, kept))
    yield RagEvent(kept, dropped=dropped)
    text = ""
    for ch in chat.stream_chat(lm, [{"role": "user", "content": question}], params, stop):
        text += ch.text
        yield RagEvent(kept, chunk=ch, dropped=dropped,
                       citations=cited(text, len(kept)) if ch.finish_reason else [])
