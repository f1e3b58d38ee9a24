"""How the HF backend streams an answer: transformers' `generate()` runs on a thread of its own, feeding an
`AnswerStreamer` that queues `Delta`s; `HaltWhen` stops it at the next step once the caller's flag is set, and
`SeededSample` draws each token with a private generator, so the same seed gives the same answer whatever other
threads do with torch's global RNG.

    thread = GenerationThread(model, tokenizer, eos_ids, generation, halted, adapter_context)
    thread.start()
    yield from thread.deltas()      # ends at the answer's end or once halted() (the thread then ends on its own)

Sampling order: the penalties (`Penalties`: llama.cpp's, on the answer's last 64 tokens), temperature, then top-k,
top-p and min-p (llama.cpp applies the temperature last; see chat's docstring). temperature 0 is greedy.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, ContextManager, Iterator

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from ..errors import MacTunerError
from .backend import PENALTY_WINDOW, Delta, Generation, Halted


class AnswerStreamer(BaseStreamer):
    """Receives generate()'s tokens (the prompt first, which it skips) and queues a Delta per answer token: the text
    decoded since the last one (per token, not per word as TextStreamer; held back while it ends inside a UTF-8
    character) and the answer's token count so far (end-of-generation tokens not counted). `end()` may be called
    twice (by generate and by the thread's own finally)."""

    END = None  # queued last

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.queue: queue.Queue = queue.Queue()
        self.n_tokens = 0
        self._prompt_seen = False
        self._ids: list[int] = []  # tokens since the last line break (decoded together, for correct spacing)
        self._shown = 0  # characters of their text already queued
        self._ended = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self._ids, skip_special_tokens=True)

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.n_tokens += sum(1 for i in ids if i not in self.eos_ids)
        self._ids.extend(ids)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: its text waits for the next token
            self.queue.put(Delta("", self.n_tokens))
            return
        delta, self._shown = text[self._shown:], len(text)
        if text.endswith("\n"):  # a finished line is never decoded again
            self._ids, self._shown = [], 0
        self.queue.put(Delta(delta, self.n_tokens))

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        rest = self._decode()[self._shown:] if self._ids else ""
        if rest:
            self.queue.put(Delta(rest, self.n_tokens))
        self.queue.put(self.END)


class HaltWhen(StoppingCriteria):
    """Ends generate() at the next step once `halted()` is true."""

    def __init__(self, halted: Halted):
        self.halted = halted

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.halted(), dtype=torch.bool, device=input_ids.device)


class SeededSample(LogitsProcessor):
    """Sampling with a private CPU generator: picks the token and leaves only it possible, so the greedy step that
    follows takes it. Deterministic per seed, whatever other threads do with torch's global RNG."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        pick = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick, 0.0)


class Penalties(LogitsProcessor):
    """llama.cpp's penalties sampler, for transformers: over the last `window` tokens of the answer (the prompt is
    not looked at), a token's logit is divided by `repetition` (multiplied when not positive), then less
    count x `frequency` + `presence`, in llama.cpp's order of operations - so the same model penalizes alike on
    both backends (transformers' own repetition penalty looks at the prompt too, and has no other penalty)."""

    def __init__(self, n_prompt: int, repetition: float, frequency: float, presence: float,
                 window: int = PENALTY_WINDOW):
        self.n_prompt, self.window = n_prompt, window
        self.repetition, self.frequency, self.presence = repetition, frequency, presence

    def __call__(self, input_ids, scores):
        recent = input_ids[:, self.n_prompt:][:, -self.window:]
        if recent.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, recent, torch.ones(recent.shape, dtype=scores.dtype,
                                                                             device=scores.device))
        seen = counts > 0
        if self.repetition != 1.0:
            scores = torch.where(seen, torch.where(scores <= 0, scores * self.repetition, scores / self.repetition),
                                 scores)
        return scores - (counts * self.frequency + seen.to(scores.dtype) * self.presence)


def logits_processors(g: Generation) -> LogitsProcessorList:
    """The sampling chain for `g`: the penalties first (as in llama.cpp), then - unless greedy, where generate()
    takes the most likely token - temperature, top-k, top-p, min-p and the seeded draw."""
    chain = LogitsProcessorList()
    if g.repetition_penalty != 1.0 or g.frequency_penalty or g.presence_penalty:
        chain.append(Penalties(len(g.token_ids), g.repetition_penalty, g.frequency_penalty, g.presence_penalty))
    if g.temperature > 0:
        chain.append(TemperatureLogitsWarper(g.temperature))
        if g.top_k > 0:
            chain.append(TopKLogitsWarper(g.top_k))
        if g.top_p < 1.0:
            chain.append(TopPLogitsWarper(g.top_p))
        if g.min_p > 0:
            chain.append(MinPLogitsWarper(g.min_p))
        chain.append(SeededSample(g.seed))
    return chain


class GenerationThread(threading.Thread):
    """generate() for one answer on a thread of its own; `deltas()` reads its stream. `on_end` is called when the
    thread is done with the model (the HF backend's idle flag)."""

    def __init__(self, model, tokenizer, eos_ids: list[int], g: Generation, halted: Halted,
                 adapter_context: Callable[[], ContextManager], on_end: Callable[[], None]):
        super().__init__(name="hf-generate", daemon=True)
        self.model, self.g = model, g
        self._abandoned = threading.Event()
        self.halted = lambda: self._abandoned.is_set() or halted()
        self.adapter_context, self.on_end = adapter_context, on_end
        self.streamer = AnswerStreamer(tokenizer, set(eos_ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        self.pad_id, self.eos_ids = pad, eos_ids
        self.error: BaseException | None = None

    def abandon(self) -> None:
        """Nobody reads the answer any more: generate() stops at its next step."""
        self._abandoned.set()

    def _generate_kwargs(self) -> dict:
        g = self.g
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([g.token_ids], dtype=torch.long, device=device)
        # The model's generation_config may carry its own sampling settings: every one is set here, to nothing.
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=g.max_new_tokens,
                    do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, min_p=None,
                    repetition_penalty=None, logits_processor=logits_processors(g), stopping_criteria=StoppingCriteriaList([HaltWhen(self.halted)]),
                    streamer=self.streamer, eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id)

    def run(self) -> None:
        try:
            with self.adapter_context(), torch.inference_mode():
                self.model.generate(**self._generate_kwargs())
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            self.error = e
        finally:
            self.streamer.end()
            self.on_end()

    def deltas(self) -> Iterator[Delta]:
        """The answer's Deltas, the last with finish "stop" or "length"; returns early (no finish) once halted -
        the thread then stops after its current step by itself."""
        while True:
            try:
                item = self.streamer.queue.get(timeout=0.05)
            except queue.Empty:
                if self.halted():
                    return
                continue
            if item is AnswerStreamer.END:
                break
            yield item
            if self.halted():
                return
        self.join()
        if self.error is not None:
            if isinstance(self.error, MacTunerError):
                raise self.error
            raise RuntimeError(f"Generation failed: {type(self.error).__name__}: {self.error}") from self.error
        n = self.streamer.n_tokens
        yield Delta("", n, finish="length" if n >= self.g.max_new_tokens else "stop")
