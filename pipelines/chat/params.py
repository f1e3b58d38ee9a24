"""What a chat turn takes and gives: `ChatParams` (the generation settings, with the help and ranges the Chat tab's
widgets are made from), `ChatChunk` (one step of a streamed answer), `ChatResult`, `RenderedPrompt`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

from ..errors import BadInput

ROLES = ("system", "user", "assistant")


FINISH_REASONS = ("stop", "length", "stopped")


# End-of-turn tokens that transformers' generation_config often omits (llama.cpp treats them as end-of-generation).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                      "<|return|>", "</s>", "<eos>")


LLAMA_UTF8_MARGIN = 4  # context tokens kept free on llama.cpp (see build_prompt)


class ContextTooLong(BadInput):
    """The prompt cannot fit the model's context window, even with the history trimmed."""


@dataclass
class ChatParams:
    """Generation settings for one answer. The UI builds it (its widgets are made from these fields: "label", and
    "range" (min, max, step) for sliders), the CLI and /v1 parse it, tests construct it."""

    system_prompt: str = field(default="", metadata={"label": "System prompt",
        "help": "Instructions placed first in the conversation. Empty: a system message at the start of the "
                "conversation is used, if any. Always kept when old turns are trimmed."})
    temperature: float = field(default=0.7, metadata={"label": "Temperature", "range": (0.0, 2.0, 0.05),
        "help": "Randomness: 0 always picks the most likely token (greedy); 0.7 is a good chat default; >1 rambles."})
    top_p: float = field(default=0.95, metadata={"label": "Top-p", "range": (0.05, 1.0, 0.01),
        "help": "Nucleus sampling: keep the smallest set of tokens whose probabilities add up to this (1 = off)."})
    top_k: int = field(default=40, metadata={"label": "Top-k", "range": (0, 200, 1),
                                             "help": "Keep only the k most likely tokens (0 = off)."})
    min_p: float = field(default=0.05, metadata={"label": "Min-p", "range": (0.0, 0.5, 0.01),
        "help": "Drop tokens less likely than this fraction of the most likely one (0 = off)."})
    repetition_penalty: float = field(default=1.1, metadata={"label": "Repetition penalty", "range": (0.8, 2.0, 0.01),
        "help": "Penalize tokens used in the last 64 of the answer (1 = off; 1.1 curbs the loops small models fall "
                "into): a positive logit is divided by it, a negative one multiplied, as llama.cpp does."})
    # OpenAI's two penalties (/v1 takes them): not on the chat forms, which offer the repetition penalty
    frequency_penalty: float = field(default=0.0, metadata={"form": False, "range": (-2.0, 2.0, 0.01),
        "help": "OpenAI's frequency penalty: subtract this times the count of each token in the last 64 of the "
                "answer from its logit (0 = off; -2 to 2)."})
    presence_penalty: float = field(default=0.0, metadata={"form": False, "range": (-2.0, 2.0, 0.01),
        "help": "OpenAI's presence penalty: subtract this from the logit of each token in the last 64 of the answer "
                "(0 = off; -2 to 2)."})
    max_new_tokens: int = field(default=256, metadata={"label": "Max new tokens", "range": (1, 4096, 1),
        "help": "Longest answer in tokens; lowered automatically when the context window has less room."})
    stop: list[str] = field(default_factory=list, metadata={"label": "Stop strings (comma-separated; \\n allowed)",
        "help": "Strings that end the answer when generated (not included in it). The plain fallback template "
                "adds '\\nUser:'."})
    seed: int | None = field(default=None, metadata={"label": "Seed (-1 = random; the seed used is shown under the answer)",
        "help": "Random seed: the same seed and settings give the same answer on the same backend. "
                "Empty: a fresh seed each time (reported in the final chunk)."})
    adapter: str | None = field(default=None, metadata={
        "help": "Name of an attached LoRA adapter to answer with (transformers and MLX models); empty: the base "
                "model."})

    def validated(self) -> "ChatParams":
        """A checked, normalized copy (stop may be given as one string); BadInput names the bad field."""
        p = copy.copy(self)
        p.system_prompt = "" if p.system_prompt is None else p.system_prompt
        if not isinstance(p.system_prompt, str):
            raise BadInput("The system prompt must be text.")

        def num(name, cast, lo, hi, lo_open=False):
            v = getattr(p, name)
            try:
                v = cast(v)
            except (TypeError, ValueError):
                raise BadInput(f"{name} must be a number, not {getattr(p, name)!r}.") from None
            if (v <= lo if lo_open else v < lo) or v > hi:
                raise BadInput(f"{name} must be {'above' if lo_open else 'at least'} {lo} and at most {hi} (got {v}).")
            setattr(p, name, v)

        num("temperature", float, 0.0, 5.0)
        num("top_p", float, 0.0, 1.0, lo_open=True)
        num("top_k", int, 0, 1_000_000)
        num("min_p", float, 0.0, 1.0)
        if p.min_p >= 1.0:
            raise BadInput("min_p must be below 1.")
        num("repetition_penalty", float, 0.0, 10.0, lo_open=True)
        num("frequency_penalty", float, -2.0, 2.0)
        num("presence_penalty", float, -2.0, 2.0)
        num("max_new_tokens", int, 1, 1_000_000)
        if p.seed is not None and p.seed != "":
            num("seed", int, 0, 2**32 - 1)
        else:
            p.seed = None
        stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise BadInput("Stop strings must be text.")
        p.stop = [s for s in stops if s]
        if p.adapter is not None and not isinstance(p.adapter, str):
            raise BadInput("The adapter must be given by its name.")
        p.adapter = (p.adapter or "").strip() or None
        return p

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for tooltips and the CLI)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def sampling_fields(cls) -> list:
        """The settings a chat form shows, in order (the adapter is chosen beside the model; OpenAI's penalties are
        /v1's)."""
        return [f for f in fields(cls) if f.name != "adapter" and f.metadata.get("form", True)]

    @classmethod
    def from_form(cls, values, adapter: str | None = None) -> "ChatParams":
        """From a form's values in `sampling_fields()` order: stop strings comma-separated with escapes (\\n),
        seed -1 or empty for a fresh one. BadInput names a bad field (validated() checks the rest)."""
        d = dict(zip([f.name for f in cls.sampling_fields()], values))
        stops = []
        for s in str(d.get("stop") or "").split(","):
            if s.strip():
                try:
                    # escapes only: non-ASCII text passes as it is ("é" stays "é", not the Latin-1 of its bytes)
                    stops.append(s.encode("latin-1", "backslashreplace").decode("unicode_escape"))
                except UnicodeDecodeError:
                    raise BadInput(f"Stop string {s!r} has a bad escape (use \\n for a newline, \\t for a tab, "
                                   "\\\\ for a backslash).") from None
        d["stop"] = stops
        d["seed"] = None if d.get("seed") in (None, "", -1) else d["seed"]
        d["system_prompt"] = d.get("system_prompt") or ""
        return cls(**d, adapter=adapter)


@dataclass
class ChatChunk:
    """One step of a streamed answer. Concatenating `text` over all chunks gives the whole answer."""

    text: str = field(metadata={"help": "New text since the previous chunk (may be empty)."})
    n_tokens: int = field(default=0, metadata={"help": "Answer tokens generated so far."})
    prompt_tokens: int = field(default=0, metadata={"help": "Tokens in the prompt after trimming."})
    ttft_s: float | None = field(default=None, metadata={
        "help": "Seconds from the call to the first answer token (None until it arrives)."})
    tokens_per_s: float | None = field(default=None, metadata={
        "help": "Decode speed: tokens after the first / seconds since the first."})
    elapsed_s: float = field(default=0.0, metadata={"help": "Seconds since the call."})
    finish_reason: str | None = field(default=None, metadata={
        "help": "None while streaming; on the last chunk 'stop' (end of turn or a stop string), 'length' "
                "(max_new_tokens or the context window) or 'stopped' (the caller's stop Event)."})
    note: str | None = field(default=None, metadata={
        "help": "Something the user should know (history trimmed, answer shortened, waiting for another chat). "
                "The last chunk repeats every note of the answer."})
    seed: int | None = field(default=None, metadata={"label": "Seed (-1 = random; the seed used is shown under the answer)","help": "The seed used (None when greedy)."})

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChatResult:
    """A whole answer, as `chat()` returns it."""

    text: str
    n_tokens: int
    prompt_tokens: int
    ttft_s: float | None
    tokens_per_s: float | None
    elapsed_s: float
    finish_reason: str
    note: str | None
    seed: int | None


@dataclass
class RenderedPrompt:
    """The prompt `stream_chat` will send: the text, its token ids, and what trimming did."""

    text: str
    token_ids: list[int]
    messages: list[dict]  # what was rendered (system first if any), after trimming
    dropped: int  # messages dropped from the start of the history
    max_new_tokens: int  # possibly lowered to fit the context window
    context_window: int
    stop: list[str]  # params.stop plus the template's own
    template_source: str
    notes: list[str] = field(default_factory=list)
