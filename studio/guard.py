"""Requests accepted only from the studio's own hosts and origins (DNS rebinding, cross-site requests).

An ASGI middleware on the app gradio builds, so it covers every route: the UI, Gradio's API and uploads, the REST
/api routes and /v1. Two checks:

- the `Host` header must name a host the studio was started for: a loopback name, an IP address (a rebinding page
  has a DNS name), the `--host` given, this machine's name, the share or Space host, or one listed in
  `MACTUNER_ALLOWED_HOSTS` (comma-separated, for a reverse proxy);
- an `Origin` header, when there is one, must be the studio's own (same host and port as the request, or a name
  of the list above other than loopback and IP addresses: a reverse proxy's); a browser sends it on every
  cross-site POST, so a page elsewhere (another local server included) cannot load, unload or download models,
  nor upload.

A refused request gets a 403 whose body says why.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from urllib.parse import urlsplit

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def hostname(netloc: str) -> str:
    """'Example.COM:7860' -> 'example.com'; '[::1]:7860' -> '::1'."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def is_loopback(host: str) -> bool:
    """True for a host only this machine reaches (127.0.0.1, ::1, localhost)."""
    name = hostname(host) if not _is_ip(host) else host
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostOriginGuard:
    """Refuse requests for a foreign Host (403) and requests from a foreign Origin (403)."""

    def __init__(self, app, hosts: set[str] | None = None):
        self.app = app
        self.hosts = hosts if hosts is not None else allowed_hosts()

    def host_ok(self, host: str) -> bool:
        name = hostname(host)
        return bool(name) and (name in LOOPBACK_NAMES or name.endswith(".localhost") or _is_ip(name)
                               or name in self.hosts)

    def refusal(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.host_ok(host):
            return (f"Refused: this studio does not answer for the host {hostname(host) or '(none)'!r}. Open it at "
                    "its own address (e.g. http://127.0.0.1:7860), or add the name to MACTUNER_ALLOWED_HOSTS.")
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            name = hostname(parts.netloc)
            own = parts.netloc.lower() == host.strip().lower() or (
                name in self.hosts and name not in LOOPBACK_NAMES and not _is_ip(name))  # a proxy's name
            if origin == "null" or not parts.netloc or not own:
                return (f"Refused: a request from another web page ({origin}) may not use this studio. "
                        "Use the studio's own page, or call its API without an Origin header.")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        why = self.refusal(scope)
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            return
        path = scope.get("path", "")
        body = {"error": {"message": why, "type": "forbidden", "param": None, "code": "forbidden"}} \
            if path.startswith("/v1/") else {"error": why}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def allowed_hosts(host: str | None = None) -> set[str]:
    """Host names (besides loopback names and IP addresses) the studio answers for."""
    names = set()
    if host and host not in ("0.0.0.0", "::"):
        names.add(hostname(host) if not _is_ip(host) else host)
    if host in ("0.0.0.0", "::"):  # reachable from the network: this machine's own names too
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.update({name.lower(), f"{name.lower()}.local"})
    for var in ("SPACE_HOST", "MACTUNER_ALLOWED_HOSTS"):
        names.update(hostname(n) for n in os.environ.get(var, "").split(",") if n.strip())
    return names
