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

Writing, as `HfApi.create_repo` / `create_commit` / `upload_folder` do it over the legacy LFS protocol (the tests set
HF_HUB_DISABLE_XET=1: the Xet protocol's chunk store is not faked). Each token belongs to a user (`add_user`: name,
orgs, role read | write); a user may write the repos of its own namespace and of its orgs (or, when a repo lists
`writers`, only those users), and reads a private repo only when it may write it:
  GET  /api/whoami-v2                              the token's user: name, orgs, auth.accessToken.role
  POST /api/repos/create                           {name, organization, visibility | private}: 200 {url}; 409 {url}
                                                   when it exists; 403 outside the user's namespaces or read token
  POST /api/validate-yaml                          the README's front matter: 400 {errors} when it is no YAML mapping
  POST /api/models/{repo}/preupload/{rev}          per file: uploadMode (lfs by suffix, size > 10 MB or a NUL in the
                                                   sample), shouldIgnore, oid of the file there now (sha256 if LFS)
  POST /{repo}.git/info/lfs/objects/batch          upload actions for the objects not stored yet (no actions: stored)
  PUT  /lfs-upload/{sha256}   (on the CDN host)    the object; refused (400) when its sha256 is not the oid
  POST /{repo}.git/info/lfs/objects/verify         200 when the object is stored with that size
  POST /api/models/{repo}/commit/{rev}             NDJSON header / file / lfsFile / deletedFile / deletedFolder: a new
                                                   commit (repo.commits), the files stored as given
Writes are recorded too: `hub.uploads` (the sha256 of every LFS object PUT), `repo.commits`; `hub.upload_delay`
makes each PUT slow.
"""

from __future__ import annotations

import base64
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
    private: bool = False
    writers: set[str] | None = None  # user names that may write; None: the namespace's user and org members
    lfs: set[str] = field(default_factory=set)  # files committed as LFS pointers (besides the LFS_SUFFIXES ones)
    commits: list[dict] = field(default_factory=list)  # {oid, summary, description, added, deleted}

    def __post_init__(self):
        self.author = self.author or self.id.split("/")[0]

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or name in self.lfs

    def blob(self, name: str) -> dict:
        data = self.files[name]
        d = {"size": len(data), "blobId": git_sha1(data)}
        if self.is_lfs(name):
            d["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return d

    def info(self, blobs: bool) -> dict:
        siblings = [{"rfilename": n, **(self.blob(n) if blobs else {})} for n in self.files]
        tags = [t for t in (self.library_name, self.pipeline_tag) if t]
        tags += [f"license:{self.license}"] if self.license else []
        d = {
            "_id": self.sha[:24], "id": self.id, "modelId": self.id, "author": self.author, "sha": self.sha,
            "lastModified": self.last_modified, "createdAt": self.last_modified, "private": self.private,
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


def git_sha1(data: bytes) -> str:
    """The git blob id of `data` (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeUser:
    name: str
    orgs: list[str] = field(default_factory=list)
    role: str = "write"  # read | write

    def may_write(self, repo: FakeRepo | None, namespace: str) -> bool:
        if self.role != "write":
            return False
        if repo is not None and repo.writers is not None:
            return self.name in repo.writers
        return namespace == self.name or namespace in self.orgs

    def whoami(self) -> dict:
        return {"type": "user", "id": hashlib.sha1(self.name.encode()).hexdigest()[:24], "name": self.name,
                "fullname": self.name.title(), "email": f"{self.name}@example.org", "emailVerified": True,
                "isPro": False, "orgs": [{"type": "org", "name": o, "fullname": o.title()} for o in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": self.role}}}


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
    def __init__(self, token: str | None = "hf_fake_valid_token", cdn_host: str = "localhost", user: str = "fake-user",
                 orgs: tuple[str, ...] = ()):
        self.users: dict[str, FakeUser] = {token: FakeUser(user, list(orgs))} if token else {}
        self.repos: dict[str, FakeRepo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects uploaded, by sha256
        self.uploads: list[str] = []  # the sha256 of each LFS object PUT, in order
        self.requests: list[Request] = []
        self.cdn_host = cdn_host
        self.delays: dict[str, float] = {}  # file name -> seconds to wait before sending its content (a slow file)
        self.upload_delay = 0.0  # seconds each LFS upload (PUT) takes before it is answered (a slow uplink)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------------------------------------- setup
    @property
    def tokens(self) -> set[str]:
        return set(self.users)

    def add_user(self, token: str, name: str, orgs: tuple[str, ...] = (), role: str = "write") -> FakeUser:
        self.users[token] = user = FakeUser(name, list(orgs), role)
        return user

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

    def readable(self, repo: FakeRepo | None, user: FakeUser | None) -> bool:
        return repo is not None and (not repo.private or (user is not None and (
            user.may_write(repo, repo.namespace) or user.name in (repo.writers or ()))))


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def do_POST(self):
            self._write_route()

        def do_PUT(self):
            self._write_route()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

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

            if u.path == "/api/whoami-v2":
                if token is None:
                    return self._error(401, None, "Invalid credentials in Authorization header", head)
                return self._json(200, hub.users[token].whoami(), head)

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
            if not hub.readable(repo, hub.users.get(token)):  # anonymous: 401, so as not to reveal private repos
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

        # ------------------------------------------------------------------------------ write routes
        def _write_route(self) -> None:
            u = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            self.req = req = Request(self.command, u.path, parse_qs(u.query), auth, None)
            with hub._lock:
                hub.requests.append(req)
            body = self._body()
            if self.command == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", u.path)):
                time.sleep(hub.upload_delay)
                if hashlib.sha256(body).hexdigest() != m[1]:
                    return self._error(400, None, "The uploaded content does not match its sha256", False)
                with hub._lock:
                    hub.blobs[m[1]] = body
                    hub.uploads.append(m[1])
                return self._send(200)
            token = auth.split(" ", 1)[1] if auth and auth.lower().startswith("bearer ") else None
            if auth and token not in hub.tokens:
                return self._error(401, None, "Invalid credentials in Authorization header", False)
            user = hub.users.get(token)
            if u.path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body or b"{}"))
            if user is None:
                return self._error(401, None, "You must be authenticated to do this", False)
            if u.path == "/api/repos/create":
                return self._create(json.loads(body or b"{}"), user)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", u.path):
                kind, repo_id = m[2], unquote(m[1])
            elif m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", u.path):
                kind, repo_id = m[2], unquote(m[1])
            else:
                return self._error(404, None, "Sorry, we can't find the page you are looking for.", False)
            repo = hub.repos.get(repo_id)
            req.repo = repo_id
            if not hub.readable(repo, user):
                return self._error(404, "RepoNotFound", "Repository not found", False)
            if not user.may_write(repo, repo.namespace):
                return self._error(403, None, f"You don't have write access to {repo_id}", False)
            if kind == "preupload":
                return self._json(200, {"files": [self._upload_mode(repo, f) for f in json.loads(body)["files"]],
                                        "commitOid": repo.sha})
            if kind == "batch":
                return self._lfs_batch(json.loads(body))
            if kind == "verify":
                obj = json.loads(body)
                ok = len(hub.blobs.get(obj["oid"], b"")) == obj["size"] and obj["oid"] in hub.blobs
                return self._json(200 if ok else 404, {"ok": ok} if ok else {"error": "object not found"})
            return self._commit(repo, body)

        def _validate_yaml(self, payload: dict) -> None:
            text = payload.get("content", "")
            m = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
            try:
                import yaml

                meta = yaml.safe_load(m[1]) if m else {}
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []},
                                  X_Error_Message="Invalid metadata")
            if m and not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "The metadata must be a mapping"}], "warnings": []},
                                  X_Error_Message="Invalid metadata")
            warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
            return self._json(200, {"errors": [], "warnings": warnings})

        def _create(self, payload: dict, user: FakeUser) -> None:
            namespace = payload.get("organization") or user.name
            repo_id = f"{namespace}/{payload['name']}"
            existing = hub.repos.get(repo_id)
            if not user.may_write(None, namespace):
                msg = (f"You don't have the rights to create a model under the namespace \"{namespace}\"" if
                       user.role == "write" else "Your token has a read role: it cannot create repositories")
                return self._error(403, None, msg, False)
            url = f"{hub.url}/{repo_id}"
            if existing is not None:
                return self._json(409, {"error": "You already created this model repo", "url": url},
                                  X_Error_Message="You already created this model repo")
            private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
            gitattributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
            repo = hub.add_repo(repo_id, {".gitattributes": gitattributes}, private=private, license=None,
                                library_name=None, pipeline_tag=None)
            repo.commits.append({"oid": repo.sha, "summary": "initial commit", "description": "",
                                 "added": [".gitattributes"], "deleted": []})
            return self._json(200, {"url": url, "name": repo_id, "id": repo.sha[:24]})

        def _upload_mode(self, repo: FakeRepo, f: dict) -> dict:
            sample = base64.b64decode(f.get("sample") or "")
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000 or b"\0" in sample
            oid = None
            if f["path"] in repo.files:
                b = repo.blob(f["path"])
                oid = b["lfs"]["sha256"] if "lfs" in b else b["blobId"]
            return {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}

        def _lfs_batch(self, payload: dict) -> None:
            objects = []
            for o in payload.get("objects", []):
                row = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in hub.blobs:
                    row["authenticated"] = True
                    row["actions"] = {
                        "upload": {"href": f"http://{hub.cdn_host}:{hub.port}/lfs-upload/{o['oid']}"},
                        "verify": {"href": f"{hub.url}/{self.req.repo}.git/info/lfs/objects/verify"}}
                objects.append(row)
            self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                       Content_Type="application/vnd.git-lfs+json")

        def _commit(self, repo: FakeRepo, body: bytes) -> None:
            lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
            header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
            files, lfs = dict(repo.files), set(repo.lfs)
            added, deleted = [], []
            for ln in lines:
                key, v = ln["key"], ln["value"]
                if key == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                    lfs.discard(v["path"])
                    added.append(v["path"])
                elif key == "lfsFile":
                    if v["oid"] not in hub.blobs:
                        return self._error(422, None, f"LFS object {v['oid']} ({v['path']}) was never uploaded", False)
                    files[v["path"]] = hub.blobs[v["oid"]]
                    lfs.add(v["path"])
                    added.append(v["path"])
                elif key in ("deletedFile", "deletedFolder"):
                    gone = [n for n in files if n == v["path"] or (key == "deletedFolder" and
                                                                   n.startswith(v["path"].rstrip("/") + "/"))]
                    if not gone:
                        return self._error(404, "EntryNotFound", "A file with this name doesn't exist", False)
                    for n in gone:
                        files.pop(n)
                        lfs.discard(n)
                    deleted += gone
            with hub._lock:
                repo.files, repo.lfs, repo.sha = files, lfs, secrets.token_hex(20)
                repo.commits.append({"oid": repo.sha, "summary": header.get("summary", ""),
                                     "description": header.get("description", ""), "added": added,
                                     "deleted": deleted})
            return self._json(200, {"success": True, "commitOid": repo.sha, "pullRequestUrl": None,
                                    "commitUrl": f"{hub.url}/{repo.id}/commit/{repo.sha}"})

    return Handler
