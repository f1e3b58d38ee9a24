"""Prompt building: which template a model uses (`chat_template_of`), its special tokens and context window, the
conversation checked (`normalize_messages`), rendered in the sandbox and tokenized, with the oldest turns trimmed
until it fits (`build_prompt`); `raw_prompt` for a text completion.
"""

from __future__ import annotations

from typing import Any

from ..errors import BadInput, NotFound
from ..models import LoadedModel
from ..templates import PLAIN_CHAT_TEMPLATE, PLAIN_STOP, render_template
from .params import LLAMA_UTF8_MARGIN, ROLES, ChatParams, ContextTooLong, RenderedPrompt


def _check_loaded(lm: LoadedModel) -> None:
    if lm is None:
        raise NotFound("No model is loaded (it may have been unloaded); load one in the Model tab.")
    lm.ensure_loaded()
    if lm.backend not in ("llama.cpp", "transformers"):
        raise BadInput(f"Unknown backend {lm.backend!r}.")


def _cache(lm: LoadedModel) -> dict:
    """Per-model facts worth computing once (the model's own cache field)."""
    return lm.cache


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
    if gemma:  # a base model: its turn tokens were never trained (bench/sampling.py: plain text drifts far less)
        return PLAIN_CHAT_TEMPLATE, ("plain fallback (a base model: no chat template; its vocabulary has "
                                     "<start_of_turn>, but a base model never learned those turns, so plain "
                                     "'System: / User: / Assistant:' lines are used, stopping at '\\nUser:')")
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
