"""Streaming an answer: `stream_chat` (and `stream_completion`) take the model's lock, stream deltas from the backend -
the GGUF's worker process or transformers' generate() in a thread - cut them at stop strings, honour the caller's
stop Event and report running figures in ChatChunks; `compare` streams two answers side by side.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from typing import Iterator

from ..adapters import _adapter_context, _check_adapter
from ..errors import BadInput, MacTunerError
from ..models import LoadedModel
from .params import END_OF_TURN_TOKENS, ChatChunk, ChatParams, ChatResult, RenderedPrompt
from .prompt import _cache, _check_loaded, build_prompt, raw_prompt


def model_lock(lm: LoadedModel) -> threading.Lock:
    """The lock that serializes generation (and adapter changes) on one loaded model (its `lock` field)."""
    return lm.lock


class _Run:
    """What a backend reports to the driver while it streams."""

    def __init__(self, user_stop: threading.Event):
        self.n_tokens = 0
        self.t_first: float | None = None  # perf_counter of the first answer token
        self.finish: str | None = None  # "stop" | "length" from the backend
        self.handed_off = False  # True once a generation thread owns the model lock
        self.notes: list[str] = []  # what the backend reported on the way (a restarted model process)
        self.user_stop = user_stop  # the caller's Event
        self.halt = threading.Event()  # set by the driver: a stop string, the caller's stop, or the end of the stream

    def halted(self) -> bool:
        return self.halt.is_set() or self.user_stop.is_set()


def _llama_stream(lm: LoadedModel, prompt: RenderedPrompt, p: ChatParams, seed: int, run: _Run) -> Iterator[str]:
    """Text deltas from the model's worker process (serving.client.GGUFWorker), which counts the answer's tokens
    exactly and stops after the current token once a flag is set; the stream is also left as soon as one is."""
    stream = lm.model.generate(prompt.token_ids, max_tokens=prompt.max_new_tokens, temperature=p.temperature,
                               top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repeat_penalty=p.repetition_penalty,
                               seed=seed, halted=run.halted)
    try:
        for kind, value, n_tokens in stream:
            if kind == "note":  # the worker had died before answering and was restarted
                run.notes.append(value)
                continue
            if run.t_first is None:
                run.t_first = time.perf_counter()
            run.n_tokens = n_tokens
            if kind == "end":
                if value != "stopped":  # a stop is the driver's to report (the caller's, or a stop string)
                    run.finish = value
                return
            yield value
            if run.halted():
                return
    finally:
        stream.close()


def _hf_eos_ids(lm: LoadedModel) -> list[int]:
    c = _cache(lm)
    if "eos" not in c:
        tok, ids = lm.tokenizer, set()
        gc = getattr(lm.model, "generation_config", None)
        for v in (getattr(gc, "eos_token_id", None), tok.eos_token_id):
            ids.update([v] if isinstance(v, int) else (v or []))
        added = getattr(tok, "added_tokens_encoder", {}) or {}
        ids.update(added[t] for t in END_OF_TURN_TOKENS if t in added)
        c["eos"] = sorted(i for i in ids if isinstance(i, int) and i >= 0)
    return c["eos"]


def _hf_stream(lm: LoadedModel, prompt: RenderedPrompt, p: ChatParams, seed: int | None, run: _Run,
               release) -> Iterator[str]:
    """Text deltas from transformers: generate() runs in a thread that feeds a TextIteratorStreamer and stops at
    the next step once a stop flag is set. The thread owns the model lock from here and calls `release()` when generate
    returns, so this generator may return at once when stopped (before the first token, say)."""
    import torch  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        LogitsProcessor,
        LogitsProcessorList,
        MinPLogitsWarper,
        StoppingCriteria,
        StoppingCriteriaList,
        TemperatureLogitsWarper,
        TextIteratorStreamer,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    tok, model = lm.tokenizer, lm.model
    eos = set(_hf_eos_ids(lm))

    class Streamer(TextIteratorStreamer):
        """Per-token text (TextStreamer waits for a space); counts answer tokens; an idempotent end()."""

        def __init__(self):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.ended = False

        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            ids = value.reshape(-1).tolist()
            if run.t_first is None:
                run.t_first = time.perf_counter()
            run.n_tokens += sum(1 for i in ids if i not in eos)
            self.token_cache.extend(ids)
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                return
            delta, self.print_len = text[self.print_len:], len(text)
            if text.endswith("\n"):
                self.token_cache, self.print_len = [], 0
            if delta:
                self.text_queue.put(delta)

        def end(self):
            if self.ended:
                return
            self.ended = True
            if self.token_cache:
                text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                if text[self.print_len:]:
                    self.text_queue.put(text[self.print_len:])
            self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
            self.text_queue.put(self.stop_signal)

    class Halt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), run.halted(), dtype=torch.bool, device=input_ids.device)

    class SeededSample(LogitsProcessor):
        """Sampling with a private CPU generator: picks the token, leaves only it possible, so the greedy step
        that follows takes it. Deterministic per seed, whatever other threads do with torch's global RNG."""

        def __init__(self, s: int):
            self.gen = torch.Generator(device="cpu").manual_seed(s)

        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float(), dim=-1).cpu()
            pick = torch.multinomial(probs, 1, generator=self.gen).to(scores.device)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, pick, 0.0)

    processors = LogitsProcessorList()
    if p.temperature > 0:
        processors.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            processors.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            processors.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            processors.append(MinPLogitsWarper(p.min_p))
        processors.append(SeededSample(seed))
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=device)
    streamer = Streamer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
    gen_kwargs = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=prompt.max_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, min_p=None,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
        logits_processor=processors, stopping_criteria=StoppingCriteriaList([Halt()]), streamer=streamer,
        eos_token_id=sorted(eos) or None, pad_token_id=pad,
    )
    error: list[BaseException] = []

    def generate():
        try:
            adapter_ctx = _adapter_context(model, p.adapter)
            with adapter_ctx, torch.inference_mode():
                model.generate(**gen_kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            error.append(e)
        finally:
            streamer.end()
            release()

    thread = threading.Thread(target=generate, name=f"chat-{lm.name}", daemon=True)
    thread.start()
    run.handed_off = True
    while True:
        try:
            item = streamer.text_queue.get(timeout=0.05)
        except queue.Empty:
            if run.halted():
                return  # the thread stops after its current step and releases the lock itself
            continue
        if item is streamer.stop_signal:
            break
        yield item
        if run.halted():
            return
    thread.join()
    if error:
        e = error[0]
        if isinstance(e, MacTunerError):
            raise e
        raise RuntimeError(f"Generation failed: {type(e).__name__}: {e}") from e
    run.finish = "length" if run.n_tokens >= prompt.max_new_tokens else "stop"


def _hold_back(text: str, stops: list[str]) -> int:
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


def _checked(lm: LoadedModel, params: ChatParams | None) -> ChatParams:
    _check_loaded(lm)
    p = (params or ChatParams()).validated()
    if p.adapter and lm.backend != "transformers":
        raise BadInput("A GGUF model cannot take a LoRA adapter: merge the adapter into its HF base model and export "
                       "a GGUF (Export stage), or load the HF base model to chat with the adapter.")
    return p


def _drive(lm: LoadedModel, prompt: RenderedPrompt, p: ChatParams, stop: threading.Event,
           t0: float) -> Iterator[ChatChunk]:
    """Generate for a rendered prompt: take the model's lock, stream deltas from the backend, cut at stop strings,
    honour the caller's stop Event, and report running figures in ChatChunks."""
    seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**31)
    notes = list(prompt.notes)
    n_prompt = len(prompt.token_ids)

    def chunk(text: str, run: _Run, finish: str | None = None, note: str | None = None) -> ChatChunk:
        now = time.perf_counter()
        tps = None
        if run.t_first is not None and run.n_tokens > 1 and now > run.t_first:
            tps = (run.n_tokens - 1) / (now - run.t_first)
        return ChatChunk(text=text, n_tokens=run.n_tokens, prompt_tokens=n_prompt,
                         ttft_s=(run.t_first - t0) if run.t_first is not None else None, tokens_per_s=tps,
                         elapsed_s=now - t0, finish_reason=finish,
                         note=("; ".join(notes) or None) if finish else note,
                         seed=seed if p.temperature > 0 else None)

    run = _Run(stop)
    lock = model_lock(lm)
    if not lock.acquire(blocking=False):
        notes.append("waited for another chat on this model to finish")
        yield chunk("", run, note="waiting: this model is answering another chat")
        while not lock.acquire(timeout=0.05):
            if stop.is_set():
                yield chunk("", run, "stopped")
                return
    try:
        if stop.is_set():
            yield chunk("", run, "stopped")
            return
        if lm.backend == "transformers":
            _check_adapter(lm.model, p.adapter)  # an unknown adapter name fails here, before anything starts
        if prompt.notes:
            yield chunk("", run, note="; ".join(prompt.notes))
        if lm.backend == "llama.cpp":
            deltas = _llama_stream(lm, prompt, p, seed, run)
        else:
            deltas = _hf_stream(lm, prompt, p, seed if p.temperature > 0 else None, run, lock.release)
        pending, finish = "", None
        try:
            for delta in deltas:
                pending += delta
                keep = 0
                if prompt.stop:
                    hits = [i for i in (pending.find(s) for s in prompt.stop) if i >= 0]
                    if hits:
                        pending, finish = pending[:min(hits)], "stop"
                        run.halt.set()
                        break
                    keep = _hold_back(pending, prompt.stop)
                out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                if out:
                    yield chunk(out, run)
                if stop.is_set():
                    break
        finally:
            run.halt.set()  # whatever ended the loop (even the consumer closing us), generation stops now
            deltas.close()
        if stop.is_set() and finish is None:
            finish = "stopped"
        notes += run.notes
        yield chunk(pending, run, finish or run.finish or "stop")
    finally:
        run.halt.set()
        if not run.handed_off:
            lock.release()


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
