"""A tiny local server that answers like the Hugging Face Hub, for tests of code that uses huggingface_hub.

Point the real client at it with HF_ENDPOINT (or `endpoint=`); nothing is mocked inside huggingface_hub.

    with FakeHub(token="hf_good") as hub:
        hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": data}, gated="manual")
        os.environ["HF_ENDPOINT"] = hub.url
        ...
        assert hub.downloaded("org/tiny") == {"config.json", "model.safetensors"}

What it answers, as the Hub does (as far as huggingface_hub 2.x reads it):
  GET  /api/models/{org}/{name}[/revision/{rev}]   model info; `?blobs=true` adds size / blobId / lfs to siblings
  GET  /api/models/{org}/{name}/tree/{rev}[/dir]   file listing (snapshot_download reads it)
  HEAD|GET /{org}/{name}/resolve/{rev}/{file}      small files: 200 with ETag (git blob sha1), X-Repo-Commit,
                                                   Content-Length. LFS files (weights): 302 to a "CDN" with
                                                   X-Linked-Etag (sha256), X-Linked-Size, Location
  HEAD|GET /cdn/{org}/{name}/{sha256}             the blob. The CDN url uses host `localhost` while the Hub is
                                                   `127.0.0.1`, so the client treats it as another host and drops
                                                   the token, as with the real CDN. GET honours `Range`.
Errors carry the X-Error-Code / X-Error-Message headers that `hf_raise_for_status` maps to exceptions:
  unknown repo: RepoNotFound (401 when anonymous, 404 with a valid token, like the Hub);
  unknown revision: RevisionNotFound 404; unknown file: EntryNotFound 404;
  gated repo file without a valid token: GatedRepo 401 (info and tree stay public, as on the Hub);
  any request with a bearer token not in `tokens`: 401 "Invalid credentials in Authorization header".
Every request is recorded in `hub.requests` (method, path, authorization, range, repo, file).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".onnx")


@dataclass
class FakeRepo:
    id: str
    files: dict[str, bytes]
    author: str | None = None  # defaults to the org part of the id
    downloads: int = 0
    likes: int = 0
    license: str | None = "apache-2.0"
    gated: bool | str = False  # False | "auto" | "manual"
    pipeline_tag: str | None = "text-generation"
    library_name: str | None = "transformers"
    last_modified: str = "2024-05-01T12:00:00.000Z"
    sha: str = field(default_factory=lambda: secrets.token_hex(20))
    safetensors: dict | None = None  # {"parameters": {"F32": n}, "total": n}, as the Hub computes it

    def __post_init__(self):
        self.author = self.author or self.id.split("/")[0]

    def blob(self, name: str) -> dict:
        data = self.files[name]
        d = {"size": len(data), "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            d["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return d

    def info(self, blobs: bool) -> dict:
        siblings = [{"rfilename": n, **(self.blob(n) if blobs else {})} for n in self.files]
        tags = [t for t in (self.library_name, self.pipeline_tag) if t]
        tags += [f"license:{self.license}"] if self.license else []
        d = {
            "_id": self.sha[:24], "id": self.id, "modelId": self.id, "author": self.author, "sha": self.sha,
            "lastModified": self.last_modified, "createdAt": self.last_modified, "private": False,
            "disabled": False, "gated": self.gated, "downloads": self.downloads, "likes": self.likes,
            "library_name": self.library_name, "pipeline_tag": self.pipeline_tag, "tags": tags,
            "cardData": {"license": self.license} if self.license else {}, "siblings": siblings,
            "usedStorage": sum(len(b) for b in self.files.values()),
        }
        if self.safetensors is not None:
            d["safetensors"] = self.safetensors
        return d

    def tree(self, prefix: str) -> list[dict]:
        rows = []
        for n in self.files:
            if prefix and not n.startswith(prefix.rstrip("/") + "/"):
                continue
            b = self.blob(n)
            row = {"type": "file", "oid": b["blobId"], "size": b["size"], "path": n}
            if "lfs" in b:
                row["lfs"] = {"oid": b["lfs"]["sha256"], "size": b["size"], "pointerSize": 134}
            rows.append(row)
        return rows


@dataclass
class Request:
    method: str
    path: str
    query: dict
    authorization: str | None
    range: str | None
    repo: str | None = None  # set for /resolve and /cdn requests
    file: str | None = None
    status: int | None = None  # the status code answered


class FakeHub:
    def __init__(self, token: str | None = "hf_fake_valid_token", cdn_host: str = "localhost"):
        self.tokens = {token} if token else set()
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.cdn_host = cdn_host
        self.delays: dict[str, float] = {}  # file name -> seconds to wait before sending its content (a slow file)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------------------------------------- setup
    def add_repo(self, repo_id: str, files: dict[str, bytes], **kw) -> FakeRepo:
        self.repos[repo_id] = repo = FakeRepo(repo_id, dict(files), **kw)
        return repo

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------------------ assertions
    def downloaded(self, repo_id: str) -> set[str]:
        """Files of `repo_id` whose whole content was sent (a GET answered 200, on /resolve or the CDN)."""
        with self._lock:
            return {r.file for r in self.requests if r.method == "GET" and r.repo == repo_id and r.status == 200}

    def auth_seen(self) -> set[str | None]:
        with self._lock:
            return {r.authorization for r in self.requests}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        # --------------------------------------------------------------------------------- plumbing
        def _send(self, code: int, body: bytes = b"", head: bool = False, **headers) -> None:
            self.req.status = code
            self.send_response(code)
            headers.setdefault("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), str(v))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _json(self, code: int, obj, head=False, **headers) -> None:
            self._send(code, json.dumps(obj).encode(), head, Content_Type="application/json", **headers)

        def _error(self, code: int, error_code: str | None, message: str, head: bool, **headers) -> None:
            if error_code:
                headers["X-Error-Code"] = error_code
            self._json(code, {"error": message}, head, X_Error_Message=message, **headers)

        def _serve_bytes(self, data: bytes, head: bool, **headers) -> None:
            if not head:
                time.sleep(hub.delays.get(self.req.file, 0))
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", (rng or "").strip())
            if m and not head and data:
                start = int(m[1] or 0)
                end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
                self._send(206, data[start:end + 1], head, Content_Range=f"bytes {start}-{end}/{len(data)}",
                           Accept_Ranges="bytes", **headers)
            else:
                self._send(200, data, head, Accept_Ranges="bytes", Content_Length=len(data), **headers)

        # ----------------------------------------------------------------------------------- routes
        def _route(self, head: bool) -> None:
            u = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            self.req = req = Request(self.command, u.path, parse_qs(u.query), auth, self.headers.get("Range"))
            with hub._lock:
                hub.requests.append(req)
            token = auth.split(" ", 1)[1] if auth and auth.lower().startswith("bearer ") else None
            if auth and token not in hub.tokens:
                return self._error(401, None, "Invalid credentials in Authorization header", head)

            if m := re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]{64})", u.path):
                repo = hub.repos.get(m[1])
                names = [n for n in (repo.files if repo else ()) if repo.blob(n).get("lfs", {}).get("sha256") == m[2]]
                if not names:
                    return self._error(404, None, "No such blob", head)
                req.repo, req.file = repo.id, names[0]
                return self._serve_bytes(repo.files[names[0]], head, ETag=f'"{m[2]}"')

            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", u.path):
                kind, repo_id, rev, rest = "info", m[1], m[2], None
            elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", u.path):
                kind, repo_id, rev, rest = "tree", m[1], m[2], (m[3] or "")
            elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", u.path):
                kind, repo_id, rev, rest = "resolve", m[1], m[2], m[3]
            else:
                return self._error(404, None, "Sorry, we can't find the page you are looking for.", head)
            repo, rev, rest = hub.repos.get(unquote(repo_id)), unquote(rev or "main"), unquote(rest or "")
            if repo is None:  # the Hub answers 401 to anonymous requests so as not to reveal private repos
                return self._error(404 if token else 401, "RepoNotFound", "Repository not found", head)
            if rev not in ("main", repo.sha):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if kind == "info":
                return self._json(200, repo.info(blobs=req.query.get("blobs") == ["true"]), head)
            if kind == "tree":
                return self._json(200, repo.tree(rest.lstrip("/")), head)

            req.repo, req.file = repo.id, rest
            if req.file not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", head, X_Repo_Commit=repo.sha)
            if repo.gated and not token:
                msg = (f"Access to model {repo.id} is restricted. You must have access to it and be authenticated "
                       "to access it. Please log in.")
                return self._error(401, "GatedRepo", msg, head)
            b = repo.blob(req.file)
            if "lfs" in b:
                sha256 = b["lfs"]["sha256"]
                return self._send(302, b"", head, Location=f"http://{hub.cdn_host}:{hub.port}/cdn/{repo.id}/{sha256}",
                                  X_Repo_Commit=repo.sha, X_Linked_Etag=f'"{sha256}"', X_Linked_Size=b["size"],
                                  ETag=f'"{b["blobId"]}"')
            return self._serve_bytes(repo.files[req.file], head, ETag=f'"{b["blobId"]}"', X_Repo_Commit=repo.sha)

    return Handler
