"""Streaming an answer: `stream_chat` (and `stream_completion`) take the model's lock, stream the model's backend
(pipelines.serving: a GGUF's worker process, transformers' generate() on a thread, ...), cut the text at stop
strings, honour the caller's stop Event and report running figures in ChatChunks; `compare` streams two answers
side by side.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from typing import Iterator

from ..models import LoadedModel
from ..serving.backend import Delta, Generation, ModelBackend, PromptEval
from .params import ChatChunk, ChatParams, ChatResult, RenderedPrompt
from .prompt import build_prompt, check_loaded, raw_prompt


def model_lock(lm: LoadedModel) -> threading.Lock:
    """The lock that serializes generation (and adapter changes) on one loaded model (its `lock` field)."""
    return lm.lock


class _Answer:
    """The running figures of one answer, and the ChatChunks that report them."""

    def __init__(self, prompt: RenderedPrompt, p: ChatParams, seed: int, t0: float):
        self.n_prompt, self.t0 = len(prompt.token_ids), t0
        self.seed = seed if p.temperature > 0 else None  # greedy answers have none
        self.notes = list(prompt.notes)  # repeated by the last chunk
        self.n_tokens = 0
        self.t_first: float | None = None  # perf_counter of the first answer token
        self.finish: str | None = None  # "stop" | "length" from the backend
        self.prompt_eval: PromptEval | None = None  # the backend's own figures for the prompt

    def took(self, delta: Delta) -> None:
        if delta.note:  # the backend said something on the way (a restarted model process)
            self.notes.append(delta.note)
            return
        if delta.prompt is not None:
            self.prompt_eval = delta.prompt
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.n_tokens = delta.n_tokens
        self.finish = delta.finish or self.finish

    def chunk(self, text: str, finish: str | None = None, note: str | None = None) -> ChatChunk:
        now = time.perf_counter()
        tps = None
        if self.t_first is not None and self.n_tokens > 1 and now > self.t_first:
            tps = (self.n_tokens - 1) / (now - self.t_first)
        pe = self.prompt_eval
        return ChatChunk(text=text, n_tokens=self.n_tokens, prompt_tokens=self.n_prompt,
                         ttft_s=(self.t_first - self.t0) if self.t_first is not None else None, tokens_per_s=tps,
                         elapsed_s=now - self.t0, finish_reason=finish,
                         note=("; ".join(self.notes) or None) if finish else note, seed=self.seed,
                         prompt_evaluated=pe.evaluated if pe else None, prompt_eval_s=pe.seconds if pe else None)


def hold_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could begin one of `stops` (kept until the next delta)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream_chat(lm: LoadedModel, messages: list[dict], params: ChatParams | None = None,
                stop: threading.Event | None = None) -> Iterator[ChatChunk]:
    """Answer the last user message of `messages`, streaming `ChatChunk`s; the last one has finish_reason set.

    `stop`: set it (from any thread) to end the answer; the generator then ends promptly with finish_reason
    "stopped" and no error, also when it is set before the first token or while waiting for the model.
    Raises BadInput / NotFound / Conflict (from the first iteration, as this is a generator) for a bad conversation,
    bad settings, an unknown adapter, or a message that cannot fit the context window."""
    t0 = time.perf_counter()
    p = _checked(lm, params)
    yield from _drive(lm, build_prompt(lm, messages, p), p, stop or threading.Event(), t0)


def stream_completion(lm: LoadedModel, text: str, params: ChatParams | None = None,
                      stop: threading.Event | None = None) -> Iterator[ChatChunk]:
    """Continue `text` as it is - no chat template, no system prompt (the /v1/completions path); otherwise as
    `stream_chat`. BadInput when the text does not fit the context window."""
    t0 = time.perf_counter()
    p = _checked(lm, params)
    yield from _drive(lm, raw_prompt(lm, text, p), p, stop or threading.Event(), t0)


def stream_rendered(lm: LoadedModel, prompt: RenderedPrompt, params: ChatParams | None = None,
                    stop: threading.Event | None = None) -> Iterator[ChatChunk]:
    """Answer a prompt `build_prompt` made (with the same params), without rendering it again - for a caller that
    built it to measure or fit it (RAG); otherwise as `stream_chat`."""
    t0 = time.perf_counter()
    p = _checked(lm, params)
    yield from _drive(lm, prompt, p, stop or threading.Event(), t0)


def _checked(lm: LoadedModel, params: ChatParams | None) -> ChatParams:
    check_loaded(lm)
    p = (params or ChatParams()).validated()
    lm.backend.check_adapter(p.adapter)  # an unknown adapter (or a model that takes none) fails before anything
    return p


def _generation(prompt: RenderedPrompt, p: ChatParams, seed: int) -> Generation:
    return Generation(token_ids=prompt.token_ids, max_new_tokens=prompt.max_new_tokens, temperature=p.temperature,
                      top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                      frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty, seed=seed,
                      adapter=p.adapter, keep_prefix=prompt.keep_prefix)


def _drive(lm: LoadedModel, prompt: RenderedPrompt, p: ChatParams, stop: threading.Event,
           t0: float) -> Iterator[ChatChunk]:
    """Generate for a rendered prompt: take the model's lock (saying so when another answer holds it), then stream
    the backend's answer; the lock is let go however this generator ends (closed by its reader too)."""
    answer = _Answer(prompt, p, p.seed if p.seed is not None else random.SystemRandom().randrange(2**31), t0)
    lock = model_lock(lm)
    if not lock.acquire(blocking=False):
        answer.notes.append("waited for another chat on this model to finish")
        yield answer.chunk("", note="waiting: this model is answering another chat")
        while not lock.acquire(timeout=0.05):
            if stop.is_set():
                yield answer.chunk("", "stopped")
                return
    try:
        if stop.is_set():
            yield answer.chunk("", "stopped")
            return
        check_loaded(lm)  # unloaded, or its adapter detached, while this answer waited
        lm.backend.check_adapter(p.adapter)
        if prompt.notes:
            yield answer.chunk("", note="; ".join(prompt.notes))
        yield from _stream_text(lm.backend, prompt, _generation(prompt, p, answer.seed or 0), answer, stop)
    finally:
        lock.release()


def _stream_text(backend: ModelBackend, prompt: RenderedPrompt, generation: Generation, answer: _Answer,
                 stop: threading.Event) -> Iterator[ChatChunk]:
    """The backend's answer as ChatChunks: text that might begin a stop string is held back until it cannot, the
    answer ends at the first stop string (not included) or at the caller's stop; the last chunk has finish_reason."""
    halt = threading.Event()  # a stop string was found, or the reader left
    deltas = backend.stream(generation, lambda: halt.is_set() or stop.is_set())
    pending, finish = "", None
    try:
        for delta in deltas:
            answer.took(delta)
            pending += delta.text
            keep = 0
            if prompt.stop:
                hits = [i for i in (pending.find(s) for s in prompt.stop) if i >= 0]
                if hits:
                    pending, finish = pending[:min(hits)], "stop"
                    break
                keep = hold_back(pending, prompt.stop)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            if out:
                yield answer.chunk(out)
            if stop.is_set():
                break
    finally:
        halt.set()  # whatever ended the loop (even the reader closing us), generation stops now
        deltas.close()
    if stop.is_set() and finish is None:
        finish = "stopped"
    yield answer.chunk(pending, finish or answer.finish or "stop")


def chat(lm: LoadedModel, messages: list[dict], params: ChatParams | None = None,
         stop: threading.Event | None = None) -> ChatResult:
    """`stream_chat` collected into one result (for the CLI, RAG and tests)."""
    parts, last = [], None
    for last in stream_chat(lm, messages, params, stop):
        parts.append(last.text)
    return ChatResult(text="".join(parts), n_tokens=last.n_tokens, prompt_tokens=last.prompt_tokens,
                      ttft_s=last.ttft_s, tokens_per_s=last.tokens_per_s, elapsed_s=last.elapsed_s,
                      finish_reason=last.finish_reason, note=last.note, seed=last.seed)


def compare(a: tuple[LoadedModel, ChatParams], b: tuple[LoadedModel, ChatParams], messages: list[dict],
            stop: threading.Event | None = None) -> Iterator[tuple[int, ChatChunk]]:
    """One conversation answered by two (model, params) at once - two models, or a base and its adapter: yields
    (0 or 1, chunk) as each side streams, until both are done. An error on either side stops both and is raised."""
    stop = stop or threading.Event()
    q: queue.Queue = queue.Queue()
    done = object()

    def run(side: int, lm: LoadedModel, p: ChatParams):
        try:
            for ch in stream_chat(lm, messages, p, stop):
                q.put((side, ch))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer below, which raises it
            q.put((side, e))
        q.put((side, done))

    for side, (lm, p) in enumerate((a, b)):
        threading.Thread(target=run, args=(side, lm, p), name=f"compare-{side}", daemon=True).start()
    ended = 0
    try:
        while ended < 2:
            side, item = q.get()
            if item is done:
                ended += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield side, item
    finally:
        if ended < 2:
            stop.set()  # the consumer left (or one side failed): the other side stops too
