"""Chat: one streaming generator, `stream_chat()`, over both backends - llama.cpp (GGUF) and transformers (with
optional PEFT LoRA adapters switched on and off without reloading the base).

How a turn goes:

1. `normalize_messages` checks the conversation (roles system/user/assistant, text content; Gradio 6 content
   parts are accepted) and `build_prompt` renders it with the model's chat template in a *sandboxed* Jinja
   environment - the same path for both backends - then tokenizes it and trims the oldest turns until the prompt
   plus room for the answer fits the context window (the system prompt is always kept).
2. `stream_chat` takes the model's lock (one generation per loaded model at a time; a second tab waits, and is
   told so), then streams: llama.cpp through `Llama.create_completion(prompt=<our token ids>, stream=True)`,
   transformers through `model.generate` in a thread feeding a `TextIteratorStreamer`.
3. It yields `ChatChunk`s: a text delta plus running figures; the last chunk has `finish_reason` set
   ("stop": end of turn or a stop string, "length": max_new_tokens or the context, "stopped": the caller's Event).

Template choice (`chat_template_of`): the tokenizer's `chat_template`; a GGUF's `tokenizer.chat_template` metadata;
Gemma's turn format (`models.GEMMA_CHAT_TEMPLATE`) for a model with `<start_of_turn>` in its vocabulary but no
template (the embedded default GGUF); otherwise `PLAIN_CHAT_TEMPLATE` ("System: ...\\nUser: ...\\nAssistant:",
stopping at "\\nUser:").

Sampling is seeded on both backends: the same seed and settings give the same answer on the same backend (llama.cpp
seeds its sampler; transformers samples with a private torch.Generator, so concurrent chats on other models
cannot disturb it). temperature 0 is greedy. Note the backends order their samplers differently (llama.cpp applies
temperature after top-k/top-p/min-p, transformers before) and llama.cpp's repetition penalty looks at the last 64
tokens, transformers' at the whole sequence.

Try it:  python -m pipelines.chat MODEL_PATH "Hello!"   (a .gguf file or an HF folder)
"""

from __future__ import annotations

import copy
import functools
import json
import queue
import random
import re
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from . import device as devicemod
from .errors import BadInput, Conflict, MacTunerError, NotFound
from .models import GEMMA_CHAT_TEMPLATE, LoadedModel

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "stopped")

# The documented fallback for base models that carry no chat template.
PLAIN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ 'System: ' + m['content'] | trim + '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'User: ' + m['content'] | trim + '\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + m['content'] | trim + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)
PLAIN_STOP = "\nUser:"
# End-of-turn tokens that transformers' generation_config often omits (llama.cpp treats them as end-of-generation).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                      "<|return|>", "</s>", "<eos>")
LLAMA_UTF8_MARGIN = 4  # context tokens kept free on llama.cpp (see build_prompt)
MAX_IMPORT_BYTES = 10 * 1024 * 1024
MAX_TEMPLATE_OUTPUT = 10_000_000  # characters a sandboxed template may build with + or *
CONVERSATION_FORMAT = "mactuner.chat"


class ContextTooLong(BadInput):
    """The prompt cannot fit the model's context window, even with the history trimmed."""


# ------------------------------------------------------------------------------------------------- dataclasses


@dataclass
class ChatParams:
    """Generation settings for one answer. The UI builds it, the CLI reads it from YAML, tests construct it."""

    system_prompt: str = field(default="", metadata={
        "help": "Instructions placed first in the conversation. Empty: a system message at the start of the "
                "conversation is used, if any. Always kept when old turns are trimmed."})
    temperature: float = field(default=0.7, metadata={
        "help": "Randomness: 0 always picks the most likely token (greedy); 0.7 is a good chat default; >1 rambles."})
    top_p: float = field(default=0.95, metadata={
        "help": "Nucleus sampling: keep the smallest set of tokens whose probabilities add up to this (1 = off)."})
    top_k: int = field(default=40, metadata={"help": "Keep only the k most likely tokens (0 = off)."})
    min_p: float = field(default=0.05, metadata={
        "help": "Drop tokens less likely than this fraction of the most likely one (0 = off)."})
    repetition_penalty: float = field(default=1.1, metadata={
        "help": "Penalize tokens already used (1 = off; 1.1 curbs the loops small models fall into)."})
    max_new_tokens: int = field(default=512, metadata={
        "help": "Longest answer in tokens; lowered automatically when the context window has less room."})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "Strings that end the answer when generated (not included in it). The plain fallback template "
                "adds '\\nUser:'."})
    seed: int | None = field(default=None, metadata={
        "help": "Random seed: the same seed and settings give the same answer on the same backend. "
                "Empty: a fresh seed each time (reported in the final chunk)."})
    adapter: str | None = field(default=None, metadata={
        "help": "Name of an attached LoRA adapter to answer with (transformers models only); empty: the base model."})

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
    seed: int | None = field(default=None, metadata={"help": "The seed used (None when greedy)."})

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


@dataclass
class AdapterInfo:
    name: str
    path: str
    base_model: str | None  # adapter_config.json's base_model_name_or_path
    peft_type: str
    rank: int | None
    target_modules: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- sandboxed templates


def _sandbox():
    """An ImmutableSandboxedEnvironment as transformers builds it (trim_blocks, lstrip_blocks, loopcontrols,
    {% generation %} blocks, raise_exception, strftime_now, tojson), plus: any access to an unsafe attribute
    raises at once (instead of rendering as empty), and + / * / ** may not build huge values."""
    import jinja2  # noqa: PLC0415
    import jinja2.ext  # noqa: PLC0415
    import jinja2.nodes  # noqa: PLC0415
    from jinja2.exceptions import SecurityError, TemplateError  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (used by some templates to mark assistant text): rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def _size(v) -> int:
        return len(v) if isinstance(v, (str, list, tuple)) else 0

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["+", "*", "**"])

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed")

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large")
            if operator == "*" and (isinstance(left, int) and _size(right) * abs(left) > MAX_TEMPLATE_OUTPUT
                                    or isinstance(right, int) and _size(left) * abs(right) > MAX_TEMPLATE_OUTPUT):
                raise SecurityError("the template builds too large a value")
            if operator == "+" and _size(left) + _size(right) > MAX_TEMPLATE_OUTPUT:
                raise SecurityError("the template builds too large a value")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names (no way to shadow internals through it)."""

        def __init__(*args, **kwargs):  # noqa: N805 - jinja's own signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"namespace attribute {name!r} is not allowed")

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=lambda *a, **k: dict(*a, **k))
    return env


_ENV = None
_ENV_LOCK = threading.Lock()


def _env():
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = _sandbox()
        return _ENV


@functools.lru_cache(maxsize=64)
def _compiled(template: str):
    import jinja2  # noqa: PLC0415

    try:
        return _env().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise BadInput(f"The chat template is not valid Jinja (line {e.lineno}: {e.message}).") from None
    except jinja2.exceptions.SecurityError as e:
        raise BadInput(f"The chat template was refused by the sandbox: {e}.") from None


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render a chat template in the sandbox. Anything a template must not do (reach Python internals, build huge
    values) and any error it raises itself becomes BadInput; nothing it contains is executed as Python."""
    import jinja2  # noqa: PLC0415

    tpl = _compiled(template)
    try:
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.SecurityError as e:
        raise BadInput(f"The chat template tried something the sandbox does not allow ({e}); it was not run. "
                       "Use a template from a source you trust.") from None
    except jinja2.TemplateError as e:  # raise_exception(...) in the template, undefined misuse, ...
        raise BadInput(f"The chat template refused this conversation: {e.message or type(e).__name__}.") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        raise BadInput(f"The chat template failed on this conversation ({type(e).__name__}: {e}).") from None


# ---------------------------------------------------------------------------------------- model introspection


def _check_loaded(lm: LoadedModel) -> None:
    if lm is None or lm.model is None:
        raise NotFound("No model is loaded (it may have been unloaded); load one in the Model tab.")
    if lm.backend not in ("llama.cpp", "transformers"):
        raise BadInput(f"Unknown backend {lm.backend!r}.")


def _cache(lm: LoadedModel) -> dict:
    """Per-model facts worth computing once (kept on the LoadedModel object, outside its dataclass fields)."""
    return lm.__dict__.setdefault("_mactuner_chat", {})


def _gguf_has_token(llm, text: str) -> bool:
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    except (RuntimeError, ValueError):
        return False
    return len(ids) == 1 and llm.detokenize(ids, special=True).decode("utf-8", "replace") == text


def _hf_template(tok) -> str | None:
    tpl = getattr(tok, "chat_template", None)
    if isinstance(tpl, dict):  # named templates: the default one
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl or None


def chat_template_of(lm: LoadedModel) -> tuple[str, str]:
    """(template text, where it comes from) - what `stream_chat` renders prompts with, for the UI to show."""
    _check_loaded(lm)
    if lm.backend == "llama.cpp":  # GGUF metadata never changes: probe once
        c = _cache(lm)
        if "gguf_template" not in c:
            tpl = lm.model.metadata.get("tokenizer.chat_template")
            c["gguf_template"] = (tpl, not tpl and _gguf_has_token(lm.model, "<start_of_turn>"))
        tpl, gemma = c["gguf_template"]
        source = "GGUF metadata (tokenizer.chat_template)"
    else:  # read each time: a tokenizer's template may be edited
        tpl = _hf_template(lm.tokenizer)
        gemma = not tpl and "<start_of_turn>" in (getattr(lm.tokenizer, "added_tokens_encoder", None) or {})
        source = f"tokenizer chat_template of {lm.name}"
    if tpl:
        return tpl, source
    if gemma:
        return GEMMA_CHAT_TEMPLATE, ("built-in Gemma turn format (the model carries no chat template; its vocabulary "
                                     "has <start_of_turn>)")
    return PLAIN_CHAT_TEMPLATE, ("plain fallback (the model has no chat template): 'System: / User: / Assistant:' "
                                 "lines, stopping at '\\nUser:'")


def _special_tokens(lm: LoadedModel) -> dict[str, str]:
    c = _cache(lm)
    if "specials" not in c:
        if lm.backend == "llama.cpp":
            llm = lm.model

            def text(i):
                return llm.detokenize([i], special=True).decode("utf-8", "replace") if i is not None and i >= 0 else ""

            c["specials"] = {"bos_token": text(llm.token_bos()), "eos_token": text(llm.token_eos())}
        else:
            tok = lm.tokenizer
            c["specials"] = {k: str(getattr(tok, k, None) or "") for k in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token")}
    return c["specials"]


def context_window(lm: LoadedModel) -> int:
    """Tokens the model can attend to here: llama.cpp's n_ctx as loaded, or the HF config's positions."""
    _check_loaded(lm)
    if lm.backend == "llama.cpp":
        return lm.model.context_window()
    n = lm.context_length or getattr(lm.tokenizer, "model_max_length", 0) or 0
    return int(n) if 0 < n < 10**7 else 32768


def tokenize(lm: LoadedModel, text: str) -> list[int]:
    """Token ids of a rendered prompt: special-token text is parsed, and a BOS is added only when the model wants
    one and the template did not write it already (no double BOS)."""
    c = _cache(lm)
    if lm.backend == "llama.cpp":
        llm = lm.model
        if "wants_bos" not in c:
            with_bos = llm.tokenize(b"a", add_bos=True, special=False)
            c["wants_bos"] = bool(with_bos) and with_bos[0] == llm.token_bos() and llm.token_bos() >= 0
        ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        bos = llm.token_bos()
    else:
        tok = lm.tokenizer
        if "wants_bos" not in c:
            a, b = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
            c["wants_bos"] = tok.bos_token_id is not None and len(a) > len(b) and a[0] == tok.bos_token_id
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        bos = tok.bos_token_id
    if c["wants_bos"] and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


# ------------------------------------------------------------------------------------------------- messages


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):  # Gradio 6 / OpenAI content parts
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadInput(f"{where} holds a {kind} part; the chat takes text only.")
        return "".join(parts)
    raise BadInput(f"{where}: content must be text, not {type(content).__name__}.")


def normalize_messages(messages: Any) -> list[dict]:
    """[{role, content}] with text content; accepts Gradio 6's content parts; drops other keys. BadInput says
    which message is wrong."""
    if not isinstance(messages, (list, tuple)):
        raise BadInput("The conversation must be a list of messages.")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise BadInput(f"Message {i} must be an object with 'role' and 'content', not {type(m).__name__}.")
        role = m.get("role")
        if role not in ROLES:
            raise BadInput(f"Message {i}: role {role!r} is not one of {', '.join(ROLES)}.")
        if "content" not in m:
            raise BadInput(f"Message {i} has no 'content'.")
        out.append({"role": role, "content": _content_text(m["content"], f"Message {i}")})
    return out


def _split(messages: list[dict], params: ChatParams) -> tuple[str, list[dict]]:
    """(system prompt, the user/assistant turns); the last turn must be a non-empty user message."""
    system = ""
    turns = messages
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    if any(m["role"] == "system" for m in turns):
        raise BadInput("A system message may only come first in the conversation.")
    if params.system_prompt.strip():
        system = params.system_prompt
    if not turns or turns[-1]["role"] != "user":
        raise BadInput("The conversation must end with a user message to answer.")
    if not turns[-1]["content"].strip():
        raise BadInput("The message is empty; type something to send.")
    return system, turns


def build_prompt(lm: LoadedModel, messages: list[dict], params: ChatParams | None = None) -> RenderedPrompt:
    """Render and tokenize the conversation, trimming the oldest turns to fit the context window.

    Room is kept for the answer: min(max_new_tokens, half the window) tokens when deciding what to trim; the
    answer's max_new_tokens is then lowered to what is left if needed (with a note). Trimming drops whole turns from
    the start and restarts the history at a user message; the system prompt stays. A last message that does not fit
    on its own (with the system prompt) is BadInput."""
    _check_loaded(lm)
    params = (params or ChatParams()).validated()
    system, turns = _split(normalize_messages(messages), params)
    template, source = chat_template_of(lm)
    specials = _special_tokens(lm)
    n_ctx = context_window(lm)
    reserve = max(1, min(params.max_new_tokens, n_ctx // 2)) + (LLAMA_UTF8_MARGIN if lm.backend == "llama.cpp" else 0)

    def render(start: int) -> tuple[str, list[int], list[dict]]:
        msgs = ([{"role": "system", "content": system}] if system else []) + turns[start:]
        text = render_template(template, msgs, True, **specials)
        return text, tokenize(lm, text), msgs

    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]  # where a trimmed history may begin
    text, ids, msgs = render(0)
    start = 0
    if len(ids) + reserve > n_ctx and len(starts) > 1:
        lo, hi = 1, len(starts) - 1  # first index into starts whose render fits; the last one is the fallback
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            r = render(starts[mid])
            if len(r[1]) + reserve <= n_ctx:
                best, hi = (mid, r), mid - 1
            else:
                lo = mid + 1
        if best is None:
            best = (len(starts) - 1, render(starts[-1]))
        start = starts[best[0]]
        text, ids, msgs = best[1]
    notes = []
    if start:
        notes.append(f"history trimmed: the {start} oldest message{'s' if start != 1 else ''} did not fit the "
                     f"{n_ctx}-token context window")
    # llama-cpp-python may run up to 3 tokens past max_tokens to complete a UTF-8 character: keep that margin
    margin = LLAMA_UTF8_MARGIN if lm.backend == "llama.cpp" else 0
    if len(ids) + margin >= n_ctx:
        what = "The system prompt and this message take" if system else "This message takes"
        raise ContextTooLong(f"{what} {len(ids)} tokens, but {lm.name} reads at most {n_ctx} tokens at once "
                       "(its context window). Shorten the message" + (" or the system prompt" if system else "") + ".")
    max_new = min(params.max_new_tokens, n_ctx - len(ids) - margin)
    if max_new < params.max_new_tokens:
        notes.append(f"answer limited to {max_new} tokens by the {n_ctx}-token context window")
    stop = list(params.stop)
    if template == PLAIN_CHAT_TEMPLATE and PLAIN_STOP not in stop:
        stop.append(PLAIN_STOP)
    return RenderedPrompt(text=text, token_ids=ids, messages=msgs, dropped=start, max_new_tokens=max_new,
                          context_window=n_ctx, stop=stop, template_source=source, notes=notes)


def raw_prompt(lm: LoadedModel, text: str, params: ChatParams | None = None) -> RenderedPrompt:
    """A prompt that is `text` as given (BOS added when the model wants one), fitted to the context window."""
    _check_loaded(lm)
    params = (params or ChatParams()).validated()
    if not isinstance(text, str) or not text:
        raise BadInput("The prompt must be non-empty text.")
    ids = tokenize(lm, text)
    n_ctx = context_window(lm)
    margin = LLAMA_UTF8_MARGIN if lm.backend == "llama.cpp" else 0
    if len(ids) + margin >= n_ctx:
        raise ContextTooLong(f"The prompt takes {len(ids)} tokens, but {lm.name} reads at most {n_ctx} tokens at once "
                       "(its context window). Shorten it.")
    max_new = min(params.max_new_tokens, n_ctx - len(ids) - margin)
    notes = [f"answer limited to {max_new} tokens by the {n_ctx}-token context window"] \
        if max_new < params.max_new_tokens else []
    return RenderedPrompt(text=text, token_ids=ids, messages=[], dropped=0, max_new_tokens=max_new,
                          context_window=n_ctx, stop=list(params.stop), template_source="none (raw completion)",
                          notes=notes)


# ---------------------------------------------------------------------------------------------- per-model lock

_LOCKS_GUARD = threading.Lock()


def model_lock(lm: LoadedModel) -> threading.Lock:
    """The lock that serializes generation (and adapter changes) on one loaded model. A plain Lock, so a streaming
    generator resumed on another thread (Gradio does that) may release it."""
    with _LOCKS_GUARD:
        return lm.__dict__.setdefault("_mactuner_lock", threading.Lock())


# ------------------------------------------------------------------------------------------------ streaming


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
    from transformers import (LogitsProcessor, LogitsProcessorList, MinPLogitsWarper, StoppingCriteria,  # noqa: PLC0415
                              StoppingCriteriaList, TemperatureLogitsWarper, TextIteratorStreamer, TopKLogitsWarper,
                              TopPLogitsWarper)

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


def _is_peft(model) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _check_adapter(model, adapter: str | None) -> None:
    if adapter is None:
        return
    attached = list(model.peft_config) if _is_peft(model) else []
    if adapter not in attached:
        raise NotFound(f"No adapter named '{adapter}' is attached to this model "
                       f"(attached: {', '.join(attached) or 'none'}).")


def _adapter_context(model, adapter: str | None):
    """Base model (adapter None) or the named adapter, for one generation. Called with the model lock held."""
    _check_adapter(model, adapter)
    if not _is_peft(model):
        return nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter, inference_mode=True)
    return nullcontext()


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


# -------------------------------------------------------------------------------------------------- adapters

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _base_module(model):
    return model.get_base_model() if _is_peft(model) else model


def _module_dims(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can target."""
    module = getattr(module, "base_layer", module)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return int(module.num_embeddings), int(module.embedding_dim)
    w = getattr(module, "weight", None)
    if w is not None and w.dim() == 2 and type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None


def _shape_mismatches(base, weights: Path) -> list[str]:
    """Compare the adapter's tensor shapes (read from the safetensors header only) with the loaded base's layers."""
    from safetensors import safe_open  # noqa: PLC0415

    problems = []
    params = None
    try:
        with safe_open(str(weights), framework="pt") as st:
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise BadInput(f"{weights.name} is not a valid safetensors file ({str(e).splitlines()[0][:160]}).") from None
    for key, shape in shapes.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        m = re.match(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$", name)
        if m:
            path, part = m.group(1), m.group(2)
            try:
                dims = _module_dims(base.get_submodule(path))
            except AttributeError:
                problems.append(f"the loaded model has no layer '{path}'")
                continue
            if dims is None or len(shape) != 2:
                continue
            if part == "lora_A" and shape[1] != dims[0]:
                problems.append(f"{path} takes {dims[0]} inputs here, the adapter expects {shape[1]}")
            elif part == "lora_B" and shape[0] != dims[1]:
                problems.append(f"{path} gives {dims[1]} outputs here, the adapter expects {shape[0]}")
            elif part == "lora_embedding_A" and shape[1] != dims[0]:
                problems.append(f"{path} has {dims[0]} tokens here, the adapter expects {shape[1]}")
            elif part == "lora_embedding_B" and shape[0] != dims[1]:
                problems.append(f"{path} has width {dims[1]} here, the adapter expects {shape[0]}")
            continue
        if params is None:
            params = {k: tuple(v.shape) for k, v in base.state_dict().items()}
        plain = name.replace(".modules_to_save", "").replace(".original_module", "")
        if plain in params and params[plain] != shape:
            problems.append(f"{plain} is {list(params[plain])} here, the adapter holds {list(shape)}")
    return problems


def _same_base(named: str | None, lm: LoadedModel, base) -> bool:
    if not named:
        return True
    candidates = {lm.model_path, lm.name, str(getattr(getattr(base, "config", None), "name_or_path", "") or ""),
                  str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")}
    candidates.discard("")
    norm = lambda s: s.rstrip("/").lower()  # noqa: E731
    names = {norm(c) for c in candidates} | {norm(Path(c).name) for c in candidates}
    if norm(named) in names or norm(Path(named).name) in names:
        return True
    try:
        return Path(named).expanduser().resolve() == Path(lm.model_path).resolve()
    except OSError:
        return False


def inspect_adapter(lm: LoadedModel, adapter_dir: str | Path) -> AdapterInfo:
    """Check that `adapter_dir` is a PEFT LoRA folder (safetensors) that fits the loaded base, without loading it."""
    _check_loaded(lm)
    if lm.backend != "transformers":
        raise BadInput("A GGUF model cannot take a PEFT adapter: merge the adapter into its HF base model and export "
                       "a GGUF (Export stage), or load the HF base model to chat with the adapter.")
    path = Path(str(adapter_dir)).expanduser()
    if not path.exists():
        raise NotFound(f"No adapter folder at {path} (the run or checkpoint may have been deleted).")
    if not path.is_dir():
        raise BadInput(f"{path} is a file; choose the adapter's folder (it holds adapter_config.json).")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise BadInput(f"{path.name} is not a PEFT adapter folder: it has no adapter_config.json.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"adapter_config.json in {path.name} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"adapter_config.json in {path.name} is not a JSON object.")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise BadInput(f"{path.name} is a {peft_type or 'unknown'} adapter; MacTuner chats with LoRA adapters.")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        if any(path.glob("adapter_model.bin")) or any(path.glob("*.pt")):
            raise BadInput(f"{path.name} has its weights as a pickle file (adapter_model.bin), which could run code "
                           "when loaded; MacTuner only loads adapter_model.safetensors.")
        raise BadInput(f"{path.name} has no adapter_model.safetensors.")
    base = _base_module(lm.model)
    named = cfg.get("base_model_name_or_path")
    problems = _shape_mismatches(base, weights)
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise BadInput(f"This adapter was trained for a different base model ({named or 'unnamed'}) than the loaded "
                       f"{lm.name}: {'; '.join(problems[:2])}{more}. Load its base model first.")
    warnings = []
    if not _same_base(named, lm, base):
        warnings.append(f"adapter_config.json names '{named}' as its base, but the loaded model is {lm.name}; the "
                        "layer shapes match, so it was attached - check that this is the right base model")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    return AdapterInfo(name=path.name, path=str(path.resolve()), base_model=named, peft_type=peft_type,
                       rank=cfg.get("r"), target_modules=sorted(map(str, targets)), warnings=warnings)


def attach_adapter(lm: LoadedModel, adapter_dir: str | Path, name: str | None = None) -> AdapterInfo:
    """Load a LoRA adapter onto a loaded HF model, keeping the base: the first wraps lm.model in a PeftModel, later
    ones are added with load_adapter. Select it per answer with ChatParams.adapter=name (None: the base model).

    BadInput: a GGUF model, not a LoRA/safetensors folder, or trained for another base (layer shapes differ).
    NotFound: the folder is gone. Conflict: the name is taken (detach_adapter first)."""
    info = inspect_adapter(lm, adapter_dir)
    name = (name or "").strip() or re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(info.path).name).lstrip(".-_") or "adapter"
    if not _ADAPTER_NAME.fullmatch(name):
        raise BadInput(f"Adapter name {name!r}: use letters, digits, '.', '_' or '-' (64 at most).")
    info.name = name
    from peft import PeftModel  # noqa: PLC0415

    with model_lock(lm):
        model = lm.model
        if model is None:
            raise NotFound("The model was unloaded meanwhile.")
        try:
            if isinstance(model, PeftModel):
                if name in model.peft_config:
                    raise Conflict(f"An adapter named '{name}' is already attached; detach it first or choose "
                                   "another name.")
                devicemod.in_own_thread(model.load_adapter, info.path, adapter_name=name, is_trainable=False)
            else:  # torch work off the caller's (a server worker's) thread: see device.in_own_thread
                lm.model = devicemod.in_own_thread(PeftModel.from_pretrained, model, info.path, adapter_name=name,
                                                   is_trainable=False)
        except MacTunerError:
            raise
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise BadInput(f"PEFT could not load the adapter {Path(info.path).name}: "
                           f"{str(e).splitlines()[0][:240]}") from None
        lm.model.eval()
        lm.__dict__.setdefault("_mactuner_adapters", {})[name] = info
    return info


def adapter_label(adapter_dir: Path, run_dir: Path | None) -> str:
    """A stable adapter name for a run's adapter ("<run>") or checkpoint ("<run>.step-N")."""
    run = run_dir.name if run_dir is not None else adapter_dir.name
    base = re.sub(r"[^A-Za-z0-9_.\-]", "-", run).lstrip(".-_")[:48] or "adapter"
    return base if adapter_dir.name == "adapter" or run_dir is None or adapter_dir == run_dir else \
        f"{base}.{re.sub(r'[^A-Za-z0-9_.-]', '-', adapter_dir.name)[:14]}"


def open_adapter(ws, registry, source: str | Path, current: bool = True) -> tuple[LoadedModel, str, str | None]:
    """Make an adapter (a run folder, its adapter/ or a checkpoint) ready to answer with: its HF base model is
    loaded if no loaded model is that base (beside the others; `current` makes it the current model), then the
    adapter is attached under `adapter_label`. Returns (model, adapter name, a note saying what was loaded or
    None)."""
    from .models import DEFAULT_HF_NAME, default_hf_path  # noqa: PLC0415
    from .runs import resolve_adapter, resolve_base  # noqa: PLC0415

    adapter_dir, run_dir = resolve_adapter(source)
    base = resolve_base(ws, adapter_dir, run_dir)
    name = adapter_label(adapter_dir, run_dir)
    note = None
    lm = next((m for m in map(registry.get, registry.names())
               if m is not None and m.backend == "transformers" and Path(m.model_path).resolve() == base), None)
    if lm is None:
        label = DEFAULT_HF_NAME if base == default_hf_path(ws).resolve() else None
        lm = registry.load(str(base), ws, name=label, replace=False, current=current)
        note = f"loaded {lm.name} (the adapter's base model) to answer with it"
    if name not in {a.name for a in list_adapters(lm)}:
        attach_adapter(lm, adapter_dir, name)
    return lm, name, note


def list_adapters(lm: LoadedModel) -> list[AdapterInfo]:
    """Adapters attached to this model, in the order they were attached."""
    return list(lm.__dict__.get("_mactuner_adapters", {}).values())


def detach_adapter(lm: LoadedModel, name: str) -> None:
    """Remove an attached adapter; removing the last one gives lm.model back as the plain base model."""
    with model_lock(lm):
        model = lm.model
        if not _is_peft(model) or name not in model.peft_config:
            raise NotFound(f"No adapter named '{name}' is attached to this model.")
        if len(model.peft_config) == 1:
            lm.model = model.unload()
        else:
            model.delete_adapter(name)
        lm.__dict__.get("_mactuner_adapters", {}).pop(name, None)


# ------------------------------------------------------------------------------------------ conversation JSON


def export_conversation(messages: list[dict], model: str | None = None, params: ChatParams | None = None) -> str:
    """The conversation as JSON text: {"format", "version", "exported_at", "model", "params", "messages"}."""
    msgs = normalize_messages(messages)
    doc = {"format": CONVERSATION_FORMAT, "version": 1,
           "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model": model, "params": asdict(params) if params is not None else None, "messages": msgs}
    return json.dumps(doc, ensure_ascii=False, indent=2)


def import_conversation(data: str | bytes) -> list[dict]:
    """Messages from exported JSON (or a bare list of {role, content}). Strict: every message needs a role in
    system/user/assistant and string content; BadInput says which one is wrong."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_IMPORT_BYTES:
            raise BadInput(f"The file is larger than {MAX_IMPORT_BYTES // 2**20} MB; not a conversation export.")
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadInput("The file is not UTF-8 text; a conversation export is JSON.") from None
    if not isinstance(data, str):
        raise BadInput("Give the conversation as JSON text.")
    if len(data) > MAX_IMPORT_BYTES:
        raise BadInput(f"The text is larger than {MAX_IMPORT_BYTES // 2**20} MB; not a conversation export.")
    if not data.strip():
        raise BadInput("The file is empty.")
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as e:
        raise BadInput(f"Not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    if isinstance(doc, dict):
        if "messages" not in doc:
            raise BadInput("This JSON has no 'messages' list; it is not a conversation export.")
        if doc.get("format") not in (None, CONVERSATION_FORMAT):
            raise BadInput(f"This JSON is a {doc.get('format')!r} file, not a MacTuner conversation.")
        doc = doc["messages"]
    if not isinstance(doc, list):
        raise BadInput("A conversation is a list of messages, each {\"role\": ..., \"content\": ...}.")
    out = []
    for i, m in enumerate(doc, 1):
        if not isinstance(m, dict):
            raise BadInput(f"Message {i} must be an object with 'role' and 'content'.")
        if m.get("role") not in ROLES:
            raise BadInput(f"Message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}.")
        if not isinstance(m.get("content"), str):
            raise BadInput(f"Message {i}: content must be a string.")
        out.append({"role": m["role"], "content": m["content"]})
    if any(m["role"] == "system" for m in out[1:]):
        raise BadInput("A system message may only come first in the conversation.")
    return out


def _cli(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    from . import models  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m pipelines.chat", description="Stream one answer from a model.")
    ap.add_argument("model", help="a .gguf file or an HF model folder")
    ap.add_argument("message")
    types = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
             "max_new_tokens": int, "seed": int, "adapter": str}
    for f in fields(ChatParams):
        if f.name in types:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=types[f.name], default=f.default,
                            help=f.metadata["help"])
    ap.add_argument("--stop", action="append", default=[], help=ChatParams.help()["stop"])
    ap.add_argument("--system", default="", help=ChatParams.help()["system_prompt"])
    ap.add_argument("--adapter-dir", default=None, help="attach this LoRA folder and answer with it")
    args = ap.parse_args(argv)
    path = Path(args.model)
    lm = models.load_gguf(path) if path.is_file() else models.load_hf(path)
    if args.adapter_dir:
        args.adapter = attach_adapter(lm, args.adapter_dir, args.adapter).name
    params = ChatParams(system_prompt=args.system, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed, adapter=args.adapter)
    last = None
    try:
        for last in stream_chat(lm, [{"role": "user", "content": args.message}], params):
            print(last.text, end="", flush=True)
    except MacTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\n[{last.finish_reason}; {last.n_tokens} tokens; ttft {last.ttft_s or 0:.3f} s; "
          f"{last.tokens_per_s or 0:.1f} tok/s{'; ' + last.note if last.note else ''}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
