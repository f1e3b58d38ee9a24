"""HTTP routes beside the UI, documented at /docs; each calls the same pipelines as the UI.

- `/api/model/...`: errors are JSON `{"error": message}` with a fitting status: 400 bad input, 401 token/gated,
  404 not found, 409 busy, 503 Hub unreachable.
- `/v1/...`: the OpenAI-compatible API (pipelines.serving.openai): `GET /v1/models`, `POST /v1/chat/completions`,
  `POST /v1/completions`, streamed as server-sent events when asked; errors `{"error": {"message", "type",
  "param", "code"}}`.

When the studio has a login (studio.access), every route needs it: with --auth (or a Space's password) the studio's
login cookie, HTTP Basic, or `Authorization: Bearer USER:PASS` (what an OpenAI client sends as its api_key); with
Hugging Face login on a Space the signed-in session or `Bearer <an admitted user's HF token>`. A client that failed
to log in too often gets 429.
"""

from __future__ import annotations

import json
import logging
import threading

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from pipelines import __version__, hub, models
from pipelines import device as devicemod
from pipelines.errors import MacTunerError
from pipelines.serving import openai, registry

from .access import Access, too_many_message
from .handlers.common import Context
from .handlers.model import current_model

log = logging.getLogger("mactuner.studio")


class DownloadRequest(BaseModel):
    model_id: str = Field(description="Hub model id, e.g. google/gemma-3-270m")
    access_token: str | None = Field(default=None, description="Hub access token; HF_TOKEN is used when absent")


class LoadRequest(BaseModel):
    path: str = Field(description="A model folder, a .gguf file, a name under the workspace's models/, or a downloaded Hub id")
    trust_remote_code: bool = Field(default=False, description="Run the model's own Python code (only if you trust it)")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MacTunerError as e:
        log.info("refused (%s %s): %s", type(e).__name__, e.status, e.message)  # one line: a user error, not a bug
        return _error(e.status, e.message)


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


async def _body(request: Request, model: type[BaseModel]):
    if not _is_json(request):
        raise _BadBody("Send the request body as JSON (Content-Type: application/json).", 415)
    try:
        return model.model_validate(await request.json())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise _BadBody(f"{where}: {first.get('msg')}") from None
    except (ValueError, RecursionError):
        raise _BadBody("The request body must be JSON (and not nested hundreds of levels deep).") from None


class _BadBody(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def authenticated(request: Request, access: Access | None, app=None) -> bool:
    """True when the studio has no login or `request` carries an admitted one (see studio.access); raises
    _Throttled for a client that failed to log in too often."""
    if access is None or access.mode == "none":
        return True
    wait = access.throttled(request)  # before this attempt: the attempt that reaches the limit still gets its 401
    if access.user(request, app):
        return True
    if wait:
        raise _Throttled(wait)
    return False


def build_router(ctx: Context, access: Access | None = None, app=None) -> APIRouter:
    """The /api/model routes for this studio. `access`: who may use it; `app` is the gradio App (its cookie)."""

    def check_auth(request: Request):
        if not authenticated(request, access, app):
            raise _Unauthenticated()

    r = APIRouter(prefix="/api/model", tags=["model"], dependencies=[Depends(check_auth)])

    @r.get("/health", summary="Liveness, version, device and default-model state")
    def health():
        prof = devicemod.profile()
        lm = ctx.registry.current()
        return {"status": "ok", "version": __version__, "device": prof.kind,
                "current_model": lm.name if lm else None, "default_hf": models.default_hf_status(ctx.ws)["state"]}

    @r.get("/current", summary="The current model (or loaded=false)")
    def current():
        return current_model(ctx)

    @r.get("/local-models", summary="Models on this machine: embedded default, workspace, HF cache")
    def local_models():
        return {"models": models.list_local_models(ctx.ws)}

    @r.get("/info/{model_id:path}", summary="Hub info without downloading")
    def info(model_id: str, access_token: str | None = None):
        return _call(lambda: hub.hub_info(model_id, access_token).as_dict())

    @r.post("/download", summary="Download a model from the Hub into the HF cache", openapi_extra=_schema(DownloadRequest))
    async def download(request: Request):
        try:
            body = await _body(request, DownloadRequest)
        except _BadBody as e:
            return _error(e.status, str(e))
        def run():
            path = hub.download(body.model_id, body.access_token)
            return {"model_id": body.model_id.strip(), "path": str(path)}

        return await run_in_threadpool(_call, run)

    @r.post("/load", summary="Load a local model and make it current", openapi_extra=_schema(LoadRequest))
    async def load(request: Request):
        try:
            body = await _body(request, LoadRequest)
        except _BadBody as e:
            return _error(e.status, str(e))
        def run():
            lm = ctx.registry.load(body.path, ctx.ws, trust_remote_code=body.trust_remote_code)
            return {"loaded": True, "model": lm.describe()}

        return await run_in_threadpool(_call, run)

    @r.post("/load-default", summary="Load the embedded default model (Gemma 3 270M GGUF)")
    def load_default():
        return _call(lambda: {"loaded": True, "model": registry.load_default(ctx.ws, ctx.registry).describe()})

    @r.post("/unload", summary="Unload the current model and release its memory")
    def unload():
        return _call(ctx.registry.unload)

    return r


def _v1_error(e: openai.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _v1_body(request: Request):
    if not _is_json(request):
        raise openai.APIError(415, "Send the request body as JSON (Content-Type: application/json).")
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise openai.APIError(400, "The request body is not valid JSON (or is nested hundreds of levels deep).") \
            from None


_END = object()


async def _closing_iterate(items, stop: threading.Event):
    """The items of the sync generator `items`, each taken in a worker thread. However this ends - the last item,
    or the client hanging up (Starlette then cancels the response, and this with it) - `stop` is set and `items` is
    closed as soon as its step in progress returns: the generation ends and lets go of the model at once, instead of
    holding it until the abandoned generator is garbage-collected."""
    turn = threading.Lock()  # a generator runs one step at a time: next() and close() take turns

    def step():
        with turn:
            return next(items, _END)

    def close():
        with turn:
            items.close()

    try:
        while (item := await anyio.to_thread.run_sync(step, abandon_on_cancel=True)) is not _END:
            yield item
    finally:
        stop.set()  # the step in progress (a token, or the wait for a busy model) returns at once
        # a thread of its own: a cancelled task cannot wait here, and the step may still run
        threading.Thread(target=close, name="v1-close", daemon=True).start()


def build_v1_router(ctx: Context, access: Access | None = None, app=None) -> APIRouter:
    """The OpenAI-compatible /v1 routes (pipelines.serving.openai does the work)."""

    def check_auth(request: Request):
        try:
            ok = authenticated(request, access, app)
        except _Throttled as e:
            raise _V1Throttled(e.wait) from None
        if not ok:
            raise _V1Unauthenticated()

    r = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(check_auth)])

    async def complete(request: Request, parse):
        try:
            req = parse(await _v1_body(request))
            if not req.stream:
                return await run_in_threadpool(openai.answer, ctx.ws, ctx.registry, req)
            stop = threading.Event()
            items = await run_in_threadpool(openai.stream, ctx.ws, ctx.registry, req, stop)
        except openai.APIError as e:
            return _v1_error(e)
        except MacTunerError as e:
            return _v1_error(openai.api_error(e))

        async def events():
            async for item in _closing_iterate(items, stop):
                yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @r.get("/models", summary="Models a request may name: loaded, default, run adapters, exported GGUFs")
    def list_models():
        return {"object": "list", "data": openai.list_models(ctx.ws, ctx.registry)}

    @r.post("/chat/completions", summary="Chat completion (stream: server-sent events)")
    async def chat_completions(request: Request):
        return await complete(request, openai.chat_request)

    @r.post("/completions", summary="Text completion of a raw prompt, no chat template")
    async def completions(request: Request):
        return await complete(request, openai.completion_request)

    return r


class _Unauthenticated(Exception):
    pass


class _V1Unauthenticated(Exception):
    pass


class _Throttled(Exception):
    def __init__(self, wait: int):
        super().__init__(wait)
        self.wait = wait


class _V1Throttled(_Throttled):
    pass


def unauthenticated_handler(request, exc):
    return _error(401, "Authentication required (the studio's login: HTTP Basic, or on a Space with Hugging Face "
                       "login an admitted user's HF token as Bearer).")


def v1_unauthenticated_handler(request, exc):
    return _v1_error(openai.APIError(401, "Authentication required: pass the studio's login as the API key "
                                          "(USER:PASS; on a Space with Hugging Face login, an admitted user's HF "
                                          "token), or HTTP Basic.", "authentication_error",
                                     code="invalid_api_key"))


def throttled_handler(request, exc):
    return JSONResponse({"error": too_many_message(exc.wait)}, status_code=429,
                        headers={"Retry-After": str(exc.wait)})


def v1_throttled_handler(request, exc):
    err = openai.APIError(429, too_many_message(exc.wait), "rate_limit_error", code="too_many_failed_logins")
    return JSONResponse(err.body(), status_code=429, headers={"Retry-After": str(exc.wait)})


# Passed to the FastAPI constructor (launch's app_kwargs): handlers added after start-up would not be seen.
EXCEPTION_HANDLERS = {_Unauthenticated: unauthenticated_handler, _V1Unauthenticated: v1_unauthenticated_handler,
                      _V1Throttled: v1_throttled_handler, _Throttled: throttled_handler}


def install(app, ctx: Context, access: Access | None = None) -> None:
    """Add the REST and /v1 routes to the running gradio App (routes are matched per request, so adding them now
    works). `access`: who may use them (None: anybody)."""
    app.include_router(build_router(ctx, access, app))
    app.include_router(build_v1_router(ctx, access, app))
    app.openapi_schema = None  # regenerate /docs with our routes
