"""Who may use the studio, for every route: the UI, Gradio's API, the REST /api routes and /v1.

Three modes (`Access.mode`):

- "password": Gradio's own login (`--auth USER:PASS`, or the MACTUNER_PASSWORD secret on a Space). The REST and /v1
  routes take the login cookie, HTTP Basic, or `Authorization: Bearer USER:PASS`.
- "oauth": Hugging Face login on a Space (`hf_oauth: true`): only the Space's owner and the users (or members of the
  organisations) in MACTUNER_ALLOWED_USERS get in. Gradio's `auth_dependency` asks `Access.user` on every Gradio
  route; a browser that is not signed in gets a small page with the sign-in link instead of the app. Scripts send
  an HF access token of an admitted user (`Authorization: Bearer hf_...`, what gradio_client's hf_token sends).
- "none": nobody is asked (loopback, or an explicit --no-auth / MACTUNER_OPEN=1; the UI then shows a warning).

Failed logins are rate-limited per client (`LoginLimiter`): Gradio's /login form and wrong credentials on the API
alike; once a client has failed too often it gets 429 with the seconds to wait, even with the right password.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import html
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pipelines.space import Login, hub_identity

LOGIN_PATHS = ("/login", "/login/")


class LoginLimiter:
    """At most `max_failures` failed logins per client in `window` seconds; then that client waits."""

    def __init__(self, max_failures: int = 5, window: float = 300.0, max_clients: int = 10_000):
        self.max_failures, self.window, self.max_clients = max_failures, window, max_clients
        self._fails: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> collections.deque:
        q = self._fails.get(key)
        if q is None:
            return collections.deque()
        while q and now - q[0] > self.window:
            q.popleft()
        if not q:
            self._fails.pop(key, None)
        return q

    def retry_after(self, key: str) -> int:
        """Seconds this client must wait before its next login attempt (0: it may try now)."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(key, now)
            if len(q) < self.max_failures:
                return 0
            return max(1, int(self.window - (now - q[0]) + 0.999))

    def failed(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            if key not in self._fails and len(self._fails) >= self.max_clients:  # bounded: forget the stalest
                for k in list(self._fails):
                    self._recent(k, now)
                if len(self._fails) >= self.max_clients:
                    self._fails.pop(next(iter(self._fails)))
            self._fails.setdefault(key, collections.deque()).append(now)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


def client_key(scope: dict, trust_proxy: bool = False) -> str:
    """The client a request comes from: its address, or behind a trusted proxy (a Space) the address the proxy
    added last to X-Forwarded-For (earlier entries are whatever the client sent)."""
    if trust_proxy:
        for k, v in scope.get("headers") or []:
            if k.lower() == b"x-forwarded-for":
                hops = [h.strip() for h in v.decode("latin-1").split(",") if h.strip()]
                if hops:
                    return hops[-1]
    client = scope.get("client")
    return str(client[0]) if client else "?"


def login_key(scope: dict, trust_proxy: bool, user: str | None) -> str:
    """What failed logins are counted by: the client and the user name it tried (behind a share link or a proxy
    every visitor has the same address: one visitor's wrong guesses must not lock the others out)."""
    return f"{client_key(scope, trust_proxy)}|{(user or '')[:200]}"


def too_many_message(wait: int) -> str:
    return f"Too many failed logins from this address: try again in {wait} s."


@dataclass
class Access:
    """The studio's login policy (see the module docstring)."""

    users: dict[str, str] | None = None  # password mode: user -> password
    login: Login | None = None  # oauth mode: who is admitted
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    trust_proxy: bool = False  # behind the Space's proxy: X-Forwarded-For names the client
    whoami: Callable[[str], dict] | None = None  # HF token -> whoami() answer (default: huggingface_hub.whoami)
    _tokens: dict = field(default_factory=dict, repr=False)  # sha256(token) -> (user or None, until)

    @property
    def mode(self) -> str:
        if self.users:
            return "password"
        if self.login is not None and self.login.mode == "oauth":
            return "oauth"
        return "none"

    # -------------------------------------------------------------------------------------------- oauth

    def session_user(self, request) -> tuple[str | None, bool]:
        """(the Hugging Face username signed in on this browser session or None, whether it is admitted)."""
        try:
            session = request.session
        except (AssertionError, AttributeError):  # no SessionMiddleware: nobody can be signed in
            return None, False
        info = session.get("oauth_info") if session is not None else None
        if not isinstance(info, dict):
            return None, False
        expires = info.get("expires_at")
        if isinstance(expires, (int, float)) and expires < time.time():
            return None, False
        name, orgs = hub_identity(info.get("userinfo") or {})
        return name, bool(self.login and self.login.admits(name, orgs))

    def token_user(self, token: str) -> str | None:
        """The admitted Hugging Face user whose access token this is (asked of the Hub once per 10 minutes)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._tokens.get(digest)
        if hit and hit[1] > time.time():
            return hit[0]
        user = None
        try:
            ask = self.whoami
            if ask is None:
                from huggingface_hub import whoami  # noqa: PLC0415

                ask = lambda t: whoami(token=t)  # noqa: E731
            name, orgs = hub_identity(ask(token))
            user = name if self.login and self.login.admits(name, orgs) else None
        except Exception:  # noqa: BLE001 - an invalid token, or the Hub unreachable: not admitted
            user = None
        if len(self._tokens) > 1000:
            self._tokens.clear()
        self._tokens[digest] = (user, time.time() + (600 if user else 30))
        return user

    # -------------------------------------------------------------------------------------------- checks

    def _credentials(self, request) -> tuple[str | None, str | None]:
        """(scheme, value) of the Authorization header: ("basic", "user:pass"), ("bearer", token) or (None, None)."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                return "basic", base64.b64decode(value.strip()).decode()
            except (ValueError, UnicodeDecodeError):
                return "basic", ""
        if scheme.lower() == "bearer" and value.strip():
            return "bearer", value.strip()
        return None, None

    def _password_ok(self, pair: str) -> bool:
        user, _, pwd = pair.partition(":")
        expected = (self.users or {}).get(user)
        return expected is not None and secrets.compare_digest(expected.encode(), pwd.encode())

    def user(self, request, app=None) -> str | None:
        """Who sends `request` ("" for anybody when the studio has no login), or None when nobody admitted does.
        Wrong credentials count as a failed login of the client."""
        if self.mode == "none":
            return ""
        if self.mode == "password" and app is not None:
            token = request.cookies.get(f"access-token-{app.cookie_id}") or request.cookies.get(
                f"access-token-unsecure-{app.cookie_id}")
            if token and app.tokens.get(token):
                return app.tokens[token]
        if self.mode == "oauth":
            name, admitted = self.session_user(request)
            if admitted:
                return name
        scheme, value = self._credentials(request)
        if scheme is None:
            return None
        key = self._key(request)
        if self.limiter.retry_after(key):
            return None
        if self.mode == "password" and self._password_ok(value or ""):
            self.limiter.succeeded(key)
            return (value or "").partition(":")[0]
        if self.mode == "oauth" and scheme == "bearer":
            found = self.token_user(value)
            if found:
                return found
        self.limiter.failed(key)
        return None

    def _key(self, request) -> str:
        scheme, value = self._credentials(request)
        user = (value or "").partition(":")[0] if scheme == "basic" or self.mode == "password" else None
        return login_key(request.scope, self.trust_proxy, user)

    def throttled(self, request) -> int:
        """Seconds the client of `request` must wait after too many failed logins (0: none)."""
        return self.limiter.retry_after(self._key(request)) if self.mode != "none" else 0

    async def gradio_dependency(self, request) -> str | None:
        """launch(auth_dependency=...) in oauth mode: the admitted user, or None (Gradio answers 401). Gradio awaits
        it on its event loop, so the check (a Bearer token may ask the Hub's whoami) runs in a worker thread."""
        import anyio  # noqa: PLC0415

        return (await anyio.to_thread.run_sync(self.user, request)) or None


# ------------------------------------------------------------------------------------------------ middleware


def _page(title: str, body: str, status: int = 200) -> tuple[int, bytes]:
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'><style>body{font-family:system-ui,"
           "sans-serif;max-width:34rem;margin:12vh auto;padding:0 1rem;line-height:1.5;color:#222}a.b{display:"
           "inline-block;padding:.6rem 1rem;border-radius:.5rem;background:#222;color:#fff;text-decoration:none}"
           f"</style></head><body><h1>MacTuner</h1>{body}</body></html>")
    return status, doc.encode()


def sign_in_page(name: str | None) -> tuple[int, bytes]:
    """What a browser gets at / in oauth mode before it is admitted."""
    if name:
        return _page("MacTuner - not admitted", (
            f"<p>You are signed in as <b>{html.escape(name)}</b>, but this studio admits only its owner and the users "
            "the owner listed (MACTUNER_ALLOWED_USERS): it trains on the owner's hardware.</p>"
            "<p><a class='b' href='/logout'>Sign out</a></p>"), 403)
    return _page("MacTuner - sign in", (
        "<p>This studio belongs to the owner of this Space: sign in with your Hugging Face account to use it (the "
        "owner and the users they listed get in).</p>"
        "<p><a class='b' id='sign-in' href='/login/huggingface'>Sign in with Hugging Face</a></p>"))


class AccessGuard:
    """ASGI middleware: failed logins at Gradio's /login are counted and a client over the limit gets 429; in oauth
    mode a browser opening / before it is admitted gets the sign-in page. Installed inside Gradio's session
    middleware (it reads the OAuth session)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def _send_body(self, send, status: int, body: bytes, ctype: bytes, extra=()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.access.mode == "none":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path in LOGIN_PATHS and method == "POST":
            return await self._login(scope, receive, send)
        if self.access.mode == "oauth" and path == "/" and method in ("GET", "HEAD"):
            from starlette.requests import Request  # noqa: PLC0415

            name, admitted = self.access.session_user(Request(scope))
            if not admitted:
                status, body = sign_in_page(name)
                return await self._send_body(send, status, body, b"text/html; charset=utf-8")
        return await self.app(scope, receive, send)

    async def _login(self, scope, receive, send):
        from urllib.parse import parse_qs  # noqa: PLC0415

        body, more = b"", True  # the form (small: bounded) is read to count failures per user name, then replayed
        while more and len(body) <= 65536:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
        user = parse_qs(body[:65536].decode("latin-1")).get("username", [""])[0]
        key = login_key(scope, self.access.trust_proxy, user)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        wait = self.access.limiter.retry_after(key)
        if wait:
            body = json.dumps({"detail": too_many_message(wait)}).encode()
            return await self._send_body(send, 429, body, b"application/json", [(b"retry-after", str(wait).encode())])
        seen = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        await self.app(scope, replay, watch)
        status = seen.get("status", 500)
        if status < 300:
            self.access.limiter.succeeded(key)
        elif status in (400, 401, 403):
            self.access.limiter.failed(key)
