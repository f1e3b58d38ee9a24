"""Prompt building: the conversation checked (`normalize_messages`), rendered by the model's backend (its template,
sandboxed) and tokenized, with the oldest turns trimmed until it fits (`build_prompt`); `raw_prompt` for a text
completion; `chat_template_of`, `context_window` and `tokenize` for the UI and the callers that ask.
"""

from __future__ import annotations

from typing import Any

from ..errors import BadInput, NotFound
from ..models import LoadedModel
from ..templates import PLAIN_CHAT_TEMPLATE, PLAIN_STOP
from .params import ROLES, ChatParams, ContextTooLong, RenderedPrompt


def check_loaded(lm: LoadedModel) -> None:
    if lm is None:
        raise NotFound("No model is loaded (it may have been unloaded); load one in the Model tab.")
    lm.ensure_loaded()


def chat_template_of(lm: LoadedModel, adapter: str | None = None) -> tuple[str, str]:
    """(template text, where it comes from) - what `stream_chat` renders prompts with, for the UI to show: the
    adapter's training template when it carries one, the model's own, else the plain fallback (see
    pipelines.chat)."""
    check_loaded(lm)
    return lm.backend.chat_template(adapter)


def context_window(lm: LoadedModel) -> int:
    """Tokens the model can attend to here: llama.cpp's n_ctx as loaded, or the HF config's positions."""
    check_loaded(lm)
    return lm.backend.context_window()


def tokenize(lm: LoadedModel, text: str) -> list[int]:
    """Token ids of a rendered prompt: special-token text is parsed, and a BOS is added only when the model wants
    one and the template did not write it already (no double BOS)."""
    check_loaded(lm)
    return lm.backend.tokenize(text)


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


MAX_CHARS_PER_TOKEN = 16  # more than any real text averages (English is about 4)


def build_prompt(lm: LoadedModel, messages: list[dict], params: ChatParams | None = None) -> RenderedPrompt:
    """Render and tokenize the conversation, trimming the oldest turns to fit the context window.

    Room is kept for the answer: min(max_new_tokens, half the window) tokens when deciding what to trim; the
    answer's max_new_tokens is then lowered to what is left if needed (with a note). Trimming drops whole turns from
    the start and restarts the history at a user message; the system prompt stays. A last message that does not fit
    on its own (with the system prompt) is BadInput."""
    check_loaded(lm)
    params = (params or ChatParams()).validated()
    system, turns = _split(normalize_messages(messages), params)
    backend = lm.backend
    template, source = backend.chat_template(params.adapter)
    n_ctx = backend.context_window()
    margin = backend.context_margin  # llama-cpp-python may run a few tokens past max_tokens (a UTF-8 character)
    reserve = max(1, min(params.max_new_tokens, n_ctx // 2)) + margin

    def render(start: int) -> tuple[str, list[int], list[dict]]:
        msgs = ([{"role": "system", "content": system}] if system else []) + turns[start:]
        text = backend.render(msgs, template)
        return text, backend.tokenize(text), msgs

    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]  # where a trimmed history may begin
    # Trim first: history whose text alone is longer than the window could hold at MAX_CHARS_PER_TOKEN cannot fit,
    # so it is never rendered nor tokenized (a turn's cost does not grow with a long history).
    budget, chars, first = n_ctx * MAX_CHARS_PER_TOKEN - len(system), 0, len(starts) - 1
    where = {i: k for k, i in enumerate(starts)}
    for i in range(len(turns) - 1, -1, -1):
        chars += len(str(turns[i]["content"] or ""))
        if chars > budget:
            break
        first = where.get(i, first)
    starts = starts[first:]
    start = starts[0]
    text, ids, msgs = render(start)
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
    check_loaded(lm)
    params = (params or ChatParams()).validated()
    if not isinstance(text, str) or not text:
        raise BadInput("The prompt must be non-empty text.")
    ids = lm.backend.tokenize(text)
    n_ctx = lm.backend.context_window()
    margin = lm.backend.context_margin
    if len(ids) + margin >= n_ctx:
        raise ContextTooLong(f"The prompt takes {len(ids)} tokens, but {lm.name} reads at most {n_ctx} tokens at once "
                       "(its context window). Shorten it.")
    max_new = min(params.max_new_tokens, n_ctx - len(ids) - margin)
    notes = [f"answer limited to {max_new} tokens by the {n_ctx}-token context window"] \
        if max_new < params.max_new_tokens else []
    return RenderedPrompt(text=text, token_ids=ids, messages=[], dropped=0, max_new_tokens=max_new,
                          context_window=n_ctx, stop=list(params.stop), template_source="none (raw completion)",
                          notes=notes)
