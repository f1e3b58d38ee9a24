"""Chat templates, rendered safely: the sandboxed Jinja environment every stage renders templates with (chat, the
Data tab's preview, training, export validation), the templates MacTuner brings for models that carry none, and
`reply_spans`: where each assistant reply lies in a rendered conversation (the training mask), for any template.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import threading
import time
from datetime import datetime
from typing import Any, Callable

from .errors import BadInput

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
# The Data and Train stages' fallback for a tokenizer without a chat template (ChatML markup).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format, for the embedded GGUF whose metadata carries no chat template (its vocabulary has the
# <start_of_turn>/<end_of_turn> tokens). A system message is folded into the first user turn, as Gemma does.
GEMMA_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""


MAX_TEMPLATE_OUTPUT = 10_000_000  # characters a sandboxed template may build with + or *, or write
MAX_TEMPLATE_SECONDS = 10.0  # wall time one rendering may take (a real chat template needs milliseconds)


class TemplateTimeout(Exception):
    """Raised inside a rendering that ran past its time bound (see `bounded`)."""

    def __init__(self, *args):
        super().__init__(*(args or (f"The chat template took more than {MAX_TEMPLATE_SECONDS:g} s to render and was "
                                    "stopped (a loop that never ends, or one far too large). Use a template from a "
                                    "source you trust.",)))


_BOUNDED: dict[int, list] = {}  # thread id -> [deadline, fired] of the rendering under way in that thread
_BOUNDED_LOCK = threading.Lock()
_WATCHDOG: threading.Thread | None = None


def _watch() -> None:
    """One daemon thread for all renderings: a rendering past its deadline gets TemplateTimeout raised in its own
    thread (CPython's PyThreadState_SetAsyncExc, delivered at its next bytecode), so nothing costs a thing until then."""
    import ctypes  # noqa: PLC0415

    while True:
        time.sleep(0.1)
        now = time.monotonic()
        with _BOUNDED_LOCK:
            for tid, entry in _BOUNDED.items():
                if not entry[1] and now > entry[0]:
                    entry[1] = True
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(TemplateTimeout))


@contextlib.contextmanager
def bounded(seconds: float | None = None):
    """Stop any template rendered inside this block (ours or transformers' apply_chat_template) after `seconds`
    (MAX_TEMPLATE_SECONDS by default) with TemplateTimeout. A block inside another one keeps the outer bound."""
    global _WATCHDOG
    tid = threading.get_ident()
    with _BOUNDED_LOCK:
        if tid in _BOUNDED and not _BOUNDED[tid][1]:
            outer = True
        else:
            outer = False
            _BOUNDED[tid] = [time.monotonic() + (MAX_TEMPLATE_SECONDS if seconds is None else seconds), False]
            if _WATCHDOG is None:
                _WATCHDOG = threading.Thread(target=_watch, name="template-watchdog", daemon=True)
                _WATCHDOG.start()
    if outer:
        yield
        return
    try:
        yield
    finally:
        with _BOUNDED_LOCK:
            if _BOUNDED.pop(tid)[1]:  # fired: drop the exception if it is still pending (it may have been raised)
                import ctypes  # noqa: PLC0415

                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)


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
        with bounded():
            out, size = [], 0
            for piece in tpl.generate(messages=messages, add_generation_prompt=add_generation_prompt, **extra):
                size += len(piece)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise BadInput(f"The chat template wrote more than {MAX_TEMPLATE_OUTPUT:,} characters for this "
                                   "conversation and was stopped.")
                out.append(piece)
            return "".join(out)
    except TemplateTimeout as e:
        raise BadInput(str(e)) from None
    except jinja2.exceptions.SecurityError as e:
        raise BadInput(f"The chat template tried something the sandbox does not allow ({e}); it was not run. "
                       "Use a template from a source you trust.") from None
    except jinja2.TemplateError as e:  # raise_exception(...) in the template, undefined misuse, ...
        raise BadInput(f"The chat template refused this conversation: {e.message or type(e).__name__}.") from None
    except OverflowError as e:  # the sandbox's range() refuses more than 100,000 items
        raise BadInput(f"The chat template tried to loop too far ({e}).") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise BadInput(f"The chat template failed on this conversation ({type(e).__name__}: {e}).") from None


# ------------------------------------------------------------------ where the replies are (the training mask)


class ReplyNotFound(BadInput):
    """The chat template does not write an assistant reply where it can be found: no mask can be built from it."""


Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> rendered text


def _sentinels(messages: list[dict]) -> tuple[str, str]:
    """Opening and closing marker stems (lowercase letters and digits only, so that trim, tojson or escaping leave
    them alone), checked not to occur in the conversation."""
    seen = json.dumps(messages, ensure_ascii=False, default=str).lower()
    while True:
        stem = "mtreply" + secrets.token_hex(4)
        if stem not in seen:
            return stem + "o", stem + "c"


def _marked(messages: list[dict], indices, marks: tuple[str, str]) -> list[dict]:
    """Copies of the messages whose replies at `indices` carry `<open>{i}x` and `<close>{i}x` around their text,
    inside any outer whitespace (a template that trims then trims the same as without markers). Empty replies (a
    tool call alone) stay unmarked: markers would make them non-empty and change what the template writes."""
    out = []
    for i, m in enumerate(messages):
        text = m.get("content")
        if i in indices and isinstance(text, str) and text.strip():
            lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
            m = dict(m, content=f"{lead}{marks[0]}{i}x{text.strip()}{marks[1]}{i}x{trail}")
        out.append(m)
    return out


def _unmark(text: str, marks: tuple[str, str]) -> tuple[str, dict[int, int], dict[int, int]]:
    """The text without markers and, per message index, where its opening / closing marker stood in that text. A
    marker the template wrote twice (it repeated a reply) anchors nothing."""
    pattern = re.compile(f"({re.escape(marks[0])}|{re.escape(marks[1])})(\\d+)x")
    pieces, found, removed, end = [], {}, 0, 0
    for hit in pattern.finditer(text):
        pieces.append(text[end:hit.start()])
        found.setdefault((hit.group(1), int(hit.group(2))), []).append(hit.start() - removed)
        removed += hit.end() - hit.start()
        end = hit.end()
    pieces.append(text[end:])
    once = {key: at[0] for key, at in found.items() if len(at) == 1}
    return ("".join(pieces), {i: at for (kind, i), at in once.items() if kind == marks[0]},
            {i: at for (kind, i), at in once.items() if kind == marks[1]})


def _shared_markup(tail: str, rest: str, atoms: frozenset[str]) -> int:
    """How much of `tail` (what the template writes after a reply when it is the last message) the whole text also
    writes after it (`rest`): their common prefix, cut back to the start of any atom (a special token such as
    <|endoftext|> vs <|user|>) that the two only share the first characters of."""
    shared = len(os.path.commonprefix([tail, rest]))
    if shared == len(tail) or shared == len(rest):
        return shared
    moved = True
    while moved:
        moved = False
        for atom in atoms:
            at = tail.find(atom, max(0, shared - len(atom) + 1))  # any hit here runs past `shared`
            if 0 <= at < shared:
                shared, moved = at, True
    return shared


def reply_spans(render: Render, messages: list[dict], atoms=()) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each assistant message in order, the character span the model learns to
    write: from where the generation prompt leaves off to the end of the reply's end-of-turn markup (up to where the
    next turn starts), so the tune learns to stop.

    Nothing assumes a rendered prefix is a prefix of the whole text (Mistral puts the system prompt into the last
    user turn; Qwen3 drops earlier reasoning; Phi-3 ends a text without a generation prompt with eos): each reply is
    rendered with a unique marker around its text, the markers are located, and the markup around them comes from
    the generation prompt and from the conversation rendered up to that reply. `atoms`: strings never to cut in two
    (the tokenizer's special tokens). Raises ReplyNotFound, saying why, when a reply cannot be located; a template's
    own refusal (raise_exception) comes through as BadInput."""
    full = render(messages, False)
    replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not replies:
        return full, []
    marks = _sentinels(messages)
    text, opens, closes = _unmark(render(_marked(messages, replies, marks), False), marks)
    if text != full:
        raise ReplyNotFound("The chat template changes what it writes depending on the words of a reply (rendered "
                            "with markers around each reply it differs from the plain rendering), so the replies "
                            "cannot be told apart from the prompts: no training mask can be built with it. Use a "
                            "model whose chat template writes each reply as given.")
    spans, low, atoms, header = [], 0, frozenset(a for a in atoms if a), None
    for n, i in enumerate(replies, 1):
        span, header = _reply_span(render, messages, i, n, full, (opens.get(i), closes.get(i)), low, marks, atoms,
                                   header)
        spans.append(span)
        low = span[1]
    return full, spans


def _not_found(n: int, why: str) -> ReplyNotFound:
    return ReplyNotFound(f"Assistant reply {n} could not be located in the rendered chat template ({why}), so the "
                         "tokens to learn cannot be told from the prompt: no training mask can be built. Use a model "
                         "whose chat template writes each reply as given.")


def _header(render: Render, messages: list[dict], i: int) -> tuple[str, str]:
    """The prompt for reply `i` (the conversation before it with the generation prompt) and the generation prompt's
    own markup at its end (the assistant header: what that prompt writes beyond the same messages without it)."""
    if not i:
        return "", ""
    prompt = render(messages[:i], True)
    return prompt, prompt[len(os.path.commonprefix([prompt, render(messages[:i], False)])):]


def _after_header(full: str, header: str, anchor: int | None, low: int) -> int | None:
    """Where the reply begins: after the last assistant header before its text (`anchor`), or for an empty reply (a
    tool call alone) after the first one after the turn before (`low`); None when there is none."""
    if not header:
        return None
    at = full.rfind(header, low, anchor) if anchor is not None else full.find(header, low)
    return at + len(header) if at >= 0 else None


def _reply_span(render: Render, messages: list[dict], i: int, n: int, full: str, edges: tuple[int | None, int | None],
                low: int, marks: tuple[str, str], atoms: frozenset[str], header: str | None):
    """((begin, end) of reply `n` (message `i`) in `full`, the assistant header used). `edges` are where its text
    begins / ends there (None where the template did not keep that edge: Qwen3 cuts the <think> part off the front),
    `low` where the previous reply ended, `header` the one the previous reply found (one render pair saved per reply
    when it is found again; otherwise this reply's own prompt is rendered)."""
    start, stop = edges
    text = messages[i].get("content")
    if start is None and stop is None and isinstance(text, str) and text.strip():
        raise _not_found(n, "its text does not appear in it, or more than once")
    anchor = start if start is not None else stop
    prompt, begin = None, None
    if header is not None and anchor is not None:  # "" : the template has no generation prompt
        begin = _after_header(full, header, anchor, low) if header else start
    if begin is None:
        prompt, header = _header(render, messages, i)
        begin = _after_header(full, header, anchor, low)
    if begin is None:  # no generation prompt (Mistral, Llama 2): the reply begins with its text
        begin = start
    if begin is None:
        raise _not_found(n, "neither the start of its text nor the assistant header is in it")
    # The end-of-turn markup: what the template writes after the reply when it is the last message, as far as the
    # whole conversation writes the same (the next turn's markup, or Phi-3's closing eos, is not shared).
    upto, _o, ends = _unmark(render(_marked(messages[: i + 1], {i}, marks), False), marks)
    if stop is not None and i in ends:
        end = stop + _shared_markup(upto[ends[i]:], full[stop:], atoms)
    else:  # an empty reply (a tool call alone): what the template writes for it, from the point where it writes the
        # same as the whole text (Qwen3 puts an empty <think> block in front of a last reply only)
        prompt = _header(render, messages, i)[0] if prompt is None else prompt
        if not upto.startswith(prompt):
            raise _not_found(n, "the conversation up to it renders differently")
        tail, rest = upto[len(prompt):], full[begin:]
        end = begin + max((_shared_markup(tail[j:], rest, atoms) for j in range(len(tail)) if tail[j] == rest[:1]),
                          default=0)
    if not low <= begin < end:
        raise _not_found(n, "it overlaps the turn before it")
    return (begin, end), header
