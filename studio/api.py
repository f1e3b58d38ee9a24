"""HTTP routes beside the UI, documented at /docs; each calls the same pipelines as the UI.

- `/api/model/...`: errors are JSON `{"error": message}` with a fitting status: 400 bad input, 401 token/gated,
  404 not found, 409 busy, 503 Hub unreachable.
- `/v1/...`: the OpenAI-compatible API (pipelines.serving.openai): `GET /v1/models`, `POST /v1/chat/completions`,
  `POST /v1/completions`, streamed as server-sent events when asked; errors `{"error": {"message", "type",
  "param", "code"}}`.

When the studio runs with --auth, every route needs the same credentials: the studio's login cookie, HTTP Basic,
or `Authorization: Bearer USER:PASS` (what an OpenAI client sends as its api_key).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from pipelines import __version__, hub, models
from pipelines import device as devicemod
from pipelines.errors import MacTunerError
from pipelines.serving import openai, registry

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


def authenticated(request: Request, auth: dict[str, str] | None, app=None) -> bool:
    """True when the studio has no login, or the request carries the studio's login cookie, HTTP Basic
    credentials, or `Bearer USER:PASS`."""
    if not auth:
        return True
    token = request.cookies.get(f"access-token-{app.cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{app.cookie_id}") if app is not None else None
    if token and app.tokens.get(token):
        return True
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    pair = ""
    if scheme.lower() == "basic":
        try:
            pair = base64.b64decode(value.strip()).decode()
        except (ValueError, UnicodeDecodeError):
            pair = ""
    elif scheme.lower() == "bearer":
        pair = value.strip()
    user, _, pwd = pair.partition(":")
    return user in auth and secrets.compare_digest(auth[user], pwd)


def build_router(ctx: Context, auth: dict[str, str] | None = None, app=None) -> APIRouter:
    """The /api/model routes for this studio. `auth` maps user to password; `app` is the gradio App (its cookie)."""

    def check_auth(request: Request):
        if not authenticated(request, auth, app):
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


def build_v1_router(ctx: Context, auth: dict[str, str] | None = None, app=None) -> APIRouter:
    """The OpenAI-compatible /v1 routes (pipelines.serving.openai does the work)."""

    def check_auth(request: Request):
        if not authenticated(request, auth, app):
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
            try:
                async for item in iterate_in_threadpool(items):
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                stop.set()  # the client went away (or the answer ended): the model stops at its next token

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


def unauthenticated_handler(request, exc):
    return _error(401, "Authentication required (HTTP Basic or the studio's login).")


def v1_unauthenticated_handler(request, exc):
    return _v1_error(openai.APIError(401, "Authentication required: pass the studio's login as the API key "
                                          "(USER:PASS), or HTTP Basic.", "authentication_error",
                                     code="invalid_api_key"))


# Passed to the FastAPI constructor (launch's app_kwargs): handlers added after start-up would not be seen.
EXCEPTION_HANDLERS = {_Unauthenticated: unauthenticated_handler, _V1Unauthenticated: v1_unauthenticated_handler}


def install(app, ctx: Context, auth: dict[str, str] | None = None) -> None:
    """Add the REST and /v1 routes to the running gradio App (routes are matched per request, so adding them now
    works)."""
    app.include_router(build_router(ctx, auth, app))
    app.include_router(build_v1_router(ctx, auth, app))
    app.openapi_schema = None  # regenerate /docs with our routes
