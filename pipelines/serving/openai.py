"""The OpenAI-compatible facade: what `/v1/models`, `/v1/chat/completions` and `/v1/completions` answer, in plain
Python (studio/api.py only routes HTTP to it). Answers come from the same `chat.stream_chat` as the Chat tab.

Model names (`list_models`), stable across restarts:

    <loaded name>                 a model loaded in the studio, as the Model tab names it
    default                       the embedded default GGUF (loaded on first use)
    run:<run>  run:<run>@step-N   a training run's adapter or checkpoint: its base model is loaded with it
    export:<export>/<file>.gguf   an exported GGUF (loaded on first use)

Models loaded for a request are loaded beside the current one (the Chat tab's model is not replaced). A setting a
request leaves out gets OpenAI's default (`OPENAI_DEFAULTS`: no repetition, frequency or presence penalty unless
asked); `frequency_penalty` and `presence_penalty` work as in llama.cpp on every backend.
Errors are `APIError`s: {"error": {"message", "type", "param", "code"}} with an HTTP status.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from .. import chat
from ..errors import BadInput, Conflict, MacTunerError, NotFound, Unauthorized, Unavailable
from ..workspace import Workspace

# Accepted and ignored when they ask for nothing we would do differently.
_HARMLESS = {"user": None, "n": 1, "logprobs": (None, False), "response_format": ({"type": "text"}, None),
             "tools": (None, []), "tool_choice": (None, "none", "auto"), "parallel_tool_calls": None,
             "logit_bias": (None, {}),
             "store": (None, False), "metadata": None, "service_tier": None, "echo": (None, False),
             "best_of": (None, 1), "suffix": None, "top_logprobs": (None, 0), "modalities": (None, ["text"])}
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repeat_penalty", "frequency_penalty",
             "presence_penalty", "seed", "stop", "max_tokens", "max_completion_tokens")
# What a request that leaves a setting out gets: OpenAI's defaults for OpenAI's settings (no penalty of any kind);
# top_k and min_p, which OpenAI lacks, keep llama.cpp's server defaults, so sampling at temperature 1 stays among a
# small model's likely tokens. The Chat tab's defaults (ChatParams) are its own.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.0,
                   "frequency_penalty": 0.0, "presence_penalty": 0.0}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: MacTunerError) -> APIError:
    """A pipelines error as the OpenAI error shape."""
    if isinstance(e, chat.ContextTooLong):
        return APIError(400, e.message, param="messages", code="context_length_exceeded")
    if isinstance(e, NotFound):
        return APIError(404, e.message, code="model_not_found" if "model" in e.message.lower() else None)
    if isinstance(e, Unauthorized):
        return APIError(401, e.message, "authentication_error")
    if isinstance(e, Conflict):
        return APIError(409, e.message, "conflict_error")
    if isinstance(e, Unavailable):
        return APIError(503, e.message, "server_error", code="model_crashed" if "crash" in e.message else None)
    return APIError(400, e.message)


# ------------------------------------------------------------------------------------------------------ models


def _gguf_files(ws: Workspace) -> list[tuple[str, str]]:
    out = []
    if ws.exports.is_dir():
        for d in sorted(p for p in ws.exports.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [(f"export:{d.name}/{g.name}", str(g)) for g in sorted(d.glob("*.gguf")) if not g.name.startswith(".")]
    return out


def _adapters(ws: Workspace) -> list[tuple[str, str]]:
    from .. import runs  # noqa: PLC0415

    out = []
    for run in runs.all_runs(ws):
        if (run.adapter_dir / "adapter_config.json").is_file():
            out.append((f"run:{run.name}", str(run.adapter_dir)))
        out += [(f"run:{run.name}@{c.name}", str(c)) for c in reversed(run.checkpoints())]
    return out


def list_models(ws: Workspace, registry) -> list[dict]:
    """Every model a request may name: loaded ones first, then the default, run adapters and exported GGUFs."""
    from ..models import DEFAULT_NAME, default_gguf_path  # noqa: PLC0415

    now = int(time.time())
    rows, seen = [], set()

    def add(mid: str, kind: str, loaded: bool, path: str | None):
        if mid not in seen:
            seen.add(mid)
            rows.append({"id": mid, "object": "model", "created": now, "owned_by": "mactuner",
                         "mactuner": {"kind": kind, "loaded": loaded, "path": path}})

    for name in registry.names():
        lm = registry.get(name)
        if lm is not None:
            add(name, "loaded", True, lm.model_path)
    add("default", "embedded", registry.get(DEFAULT_NAME) is not None, str(default_gguf_path(ws)))
    for mid, path in _adapters(ws):
        add(mid, "adapter", False, path)
    for mid, path in _gguf_files(ws):
        add(mid, "gguf", registry.get(mid) is not None, path)
    return rows


def resolve(ws: Workspace, registry, model_id: Any) -> tuple[Any, str | None]:
    """(loaded model, adapter name or None) for a model name of `list_models`, loading what it needs."""
    from ..models import DEFAULT_NAME, ensure_default_gguf  # noqa: PLC0415

    if not isinstance(model_id, str) or not model_id.strip():
        raise APIError(400, "'model' is required: one of the ids GET /v1/models lists.", param="model")
    model_id = model_id.strip()
    lm = registry.get(model_id)
    if lm is not None:
        return lm, None
    if model_id == "default":
        lm = registry.get(DEFAULT_NAME)
        if lm is None:
            lm = registry.load(str(ensure_default_gguf(ws)), ws, name=DEFAULT_NAME, replace=False, current=False)
        return lm, None
    if model_id.startswith("run:"):
        path = dict(_adapters(ws)).get(model_id)
        if path is None:
            raise APIError(404, f"There is no run adapter '{model_id}' (GET /v1/models lists them).", param="model",
                           code="model_not_found")
        lm, adapter, _note = chat.open_adapter(ws, registry, path, current=False)
        return lm, adapter
    if model_id.startswith("export:"):
        path = dict(_gguf_files(ws)).get(model_id)
        if path is None:
            raise APIError(404, f"There is no exported GGUF '{model_id}' (GET /v1/models lists them).",
                           param="model", code="model_not_found")
        return registry.load(path, ws, name=model_id, replace=False, current=False), None
    raise APIError(404, f"The model '{model_id}' does not exist (GET /v1/models lists the models).", param="model",
                   code="model_not_found")


# ----------------------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    model: str
    params: chat.ChatParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions


def _check_known(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in _HARMLESS:
            ok = _HARMLESS[key]
            if ok is None or value == ok or (isinstance(ok, tuple) and value in ok):
                continue
            raise APIError(400, f"'{key}'={value!r} is not supported by MacTuner's models.", param=key,
                           code="unsupported_parameter")
        raise APIError(400, f"Unknown parameter '{key}'.", param=key, code="unknown_parameter")


def _params(body: dict) -> chat.ChatParams:
    defaults = {**{f: getattr(chat.ChatParams(), f) for f in ("max_new_tokens", "seed")}, **OPENAI_DEFAULTS}
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    rep = body.get("repetition_penalty", body.get("repeat_penalty"))
    values = dict(temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=body.get("top_k"),
                  min_p=body.get("min_p"), repetition_penalty=rep, frequency_penalty=body.get("frequency_penalty"),
                  presence_penalty=body.get("presence_penalty"), max_new_tokens=max_new, seed=body.get("seed"))
    for key, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            name = {"max_new_tokens": "max_tokens"}.get(key, key)
            raise APIError(400, f"'{name}' must be a number.", param=name)
    if values["temperature"] is not None and not 0 <= values["temperature"] <= 2:
        raise APIError(400, "'temperature' must be between 0 and 2.", param="temperature")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise APIError(400, "'stop' must be a string or a list of strings.", param="stop")
    p = chat.ChatParams(**{k: (v if v is not None else defaults[k]) for k, v in values.items()}, stop=stop or [])
    try:
        return p.validated()
    except BadInput as e:
        param = next((f for f in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                                  "presence_penalty", "seed", "stop") if e.message.startswith(f) or f"'{f}'" in e.message),
                     None)
        raise APIError(400, e.message.replace("max_new_tokens", "max_tokens"), param=param) from None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "'stream' must be true or false.", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object.", param="stream_options")
    return bool(stream), bool(opts.get("include_usage"))


def chat_request(body: Any) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    _check_known(body, {"model", "messages", "stream", "stream_options", *_SAMPLING})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}.", param="messages")
    norm = []
    for i, m in enumerate(msgs):
        if isinstance(m, dict) and m.get("role") == "developer":  # OpenAI's newer name for the system role
            m = {**m, "role": "system"}
        norm.append(m)
    try:
        messages = chat.normalize_messages(norm)
    except BadInput as e:
        raise APIError(400, e.message, param="messages") from None
    stream, usage = _stream_flags(body)
    return Request(model=body.get("model"), params=_params(body), stream=stream, include_usage=usage,
                   messages=messages)


def completion_request(body: Any) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    _check_known(body, {"model", "prompt", "stream", "stream_options", *_SAMPLING})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string.", param="prompt")
    stream, usage = _stream_flags(body)
    return Request(model=body.get("model"), params=_params(body), stream=stream, include_usage=usage, prompt=prompt)


# ---------------------------------------------------------------------------------------------------- answers


def _chunks(ws, registry, req: Request, stop: threading.Event) -> tuple[Iterator[chat.ChatChunk], str]:
    """The answer stream and the model name to report. Raises APIError before anything streams."""
    try:
        lm, adapter = resolve(ws, registry, req.model)
        if adapter:
            req.params.adapter = adapter
        if req.messages is not None:
            chat.build_prompt(lm, req.messages, req.params)  # a bad conversation fails now, as a 4xx
            gen = chat.stream_chat(lm, req.messages, req.params, stop)
        else:
            chat.raw_prompt(lm, req.prompt, req.params)
            gen = chat.stream_completion(lm, req.prompt, req.params, stop)
    except MacTunerError as e:
        raise api_error(e) from None
    return gen, req.model


def _usage(last: chat.ChatChunk | None) -> dict:
    p, c = (last.prompt_tokens, last.n_tokens) if last else (0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(last: chat.ChatChunk | None) -> str:
    return "length" if last is not None and last.finish_reason == "length" else "stop"


def answer(ws, registry, req: Request) -> dict:
    """A whole (non-streamed) chat.completion or text_completion."""
    gen, model = _chunks(ws, registry, req, threading.Event())
    parts, last = [], None
    try:
        for last in gen:
            parts.append(last.text)
    except MacTunerError as e:
        raise api_error(e) from None
    text, created = "".join(parts), int(time.time())
    if req.messages is not None:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(last)}], "usage": _usage(last)}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": _finish(last), "logprobs": None}],
            "usage": _usage(last)}


def stream(ws, registry, req: Request, stop: threading.Event) -> Iterator[dict]:
    """Streamed chunks (dicts for `data:` lines; the caller adds [DONE]). The first call raises APIError for a bad
    request; an error while answering (the model's process crashed, say) becomes a last {"error": ...} item."""
    gen, model = _chunks(ws, registry, req, stop)
    return _stream_items(gen, model, req)


def _stream_items(gen, model: str, req: Request) -> Iterator[dict]:
    is_chat = req.messages is not None
    cid, created = (f"chatcmpl-{uuid.uuid4().hex}" if is_chat else f"cmpl-{uuid.uuid4().hex}"), int(time.time())
    obj = "chat.completion.chunk" if is_chat else "text_completion"

    def item(text: str | None, finish: str | None, first: bool = False) -> dict:
        if is_chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}

    if is_chat:
        yield item(None, None, first=True)
    last = None
    try:
        for last in gen:
            if last.text:
                yield item(last.text, None)
    except MacTunerError as e:
        yield api_error(e).body()
        return
    finally:
        gen.close()
    yield item(None, _finish(last))
    if req.include_usage:
        yield {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": _usage(last)}
