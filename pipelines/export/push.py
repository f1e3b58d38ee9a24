"""Publish an export to the Hugging Face Hub: its adapter, merged model and/or GGUF files into a model repository
(created private unless asked otherwise) with a model card made from the run (card.py). Pushing the same export
again is a new commit in the same repository; files the Hub already has are not sent again (it knows their hashes),
and an unchanged export makes no commit at all.

    result = push(ws, PushRequest(export="my-export", repo_id="me/my-model"), token="hf_...")
    job = start(ws, req, token)      # the same in a process of its own (the Export tab); status(ws, job)

Where things go in the repository: the merged model at the root (from_pretrained(repo)), each GGUF with its
Modelfile at the root (`ollama run hf.co/<repo>:Q8_0`), the adapter at the root unless the repository holds a merged
model (then adapter/), README.md the card. Local paths stay on this machine: mactuner.json and the local READMEs are
not sent, and the adapter's base_model_name_or_path becomes the base's Hub id when it is known.

On disk: exports/<name>/pushes.json lists every push of the export (repo, commit, url, what, files, bytes);
exports/.pushes/<id>/ are the push jobs (pipelines.jobs; status.json has files_done / bytes_done). The token is
never written there: the job gets it in its environment (HF_TOKEN).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import jobs
from ..errors import BadInput, Conflict, MacTunerError, NotFound, Unauthorized, Unavailable
from ..hub import hub_endpoint, is_timeout, timeout_words, transport_errors, use_timeouts, validate_model_id
from ..workspace import Workspace, human_bytes, write_json
from .card import model_card, run_info, scrub_paths
from .common import RequestFields, help_meta
from .merge import TOKENIZER_FILES

PARTS = ("adapter", "merged", "gguf")
PUSHES_FILE = "pushes.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES)
ROOT_ADAPTER = ("adapter_config.json", "adapter_model.safetensors")
NOT_SENT = {"README.md", "mactuner.json"}  # local cards and records hold local paths
TOKEN_HELP = ("Create a token with write access at https://huggingface.co/settings/tokens and give it in the "
              "token field or HF_TOKEN.")


@dataclass
class PushRequest(RequestFields):
    """One push - the Export tab, the push job and `mactuner push` build it. The token is not part of it (it never
    goes into a job folder)."""

    KIND = "push"

    export: str = field(default="", metadata=help_meta("The export to publish (its folder under exports/)."))
    repo_id: str = field(default="", metadata=help_meta(
        "Hub model repository, user/name or org/name (a bare name goes under the token's user)."))
    what: list[str] = field(default_factory=list, metadata=help_meta(
        "What to push: adapter, merged, gguf (empty: everything the export has)."))
    ggufs: list[str] = field(default_factory=list, metadata=help_meta("GGUF files to push (empty: all of the export's)."))
    private: bool = field(default=True, metadata=help_meta(
        "Create the repository private (an existing repository keeps its visibility)."))
    message: str = field(default="", metadata=help_meta("Commit message (empty: 'Upload <export> with MacTuner')."))


@dataclass
class PushResult:
    repo_id: str = field(metadata=help_meta("The repository pushed to."))
    url: str = field(metadata=help_meta("Its page on the Hub."))
    commit: str | None = field(metadata=help_meta("The commit made (the current one when nothing changed)."))
    created: bool = field(metadata=help_meta("True when this push created the repository."))
    private: bool | None = field(metadata=help_meta("The repository's visibility."))
    changed: bool = field(metadata=help_meta("False when the repository already had every file as it is here."))
    what: list[str] = field(default_factory=list, metadata=help_meta("adapter / merged / gguf pushed."))
    files: list[dict] = field(default_factory=list, metadata=help_meta("path, bytes, unchanged (already on the Hub)."))
    deleted: list[str] = field(default_factory=list, metadata=help_meta("Files removed (a root adapter moved to adapter/)."))
    message: str = field(default="", metadata=help_meta("One line saying what happened."))

    def as_dict(self) -> dict:
        return asdict(self)


def _quiet(*_a, **_k) -> None:
    pass


# ------------------------------------------------------------------------------------------------ what is there


def _export_folder(ws: Workspace, name: str) -> Path:
    name = (name or "").strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise BadInput(f"'{name}' is not an export name." if name else "Choose the export to push.")
    folder = ws.exports / name
    if not folder.is_dir():
        raise NotFound(f"There is no export '{name}'.")
    return folder


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return {}


def pushes(ws: Workspace, name: str) -> list[dict]:
    """The earlier pushes of an export, oldest first (pushes.json)."""
    try:
        data = json.loads((_export_folder(ws, name) / PUSHES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def available(ws: Workspace, name: str) -> dict:
    """What an export can push: {"adapter": folder | None, "merged": folder | None, "ggufs": [file names],
    "parts": [...], "last_repo": the repository of its latest push | None}."""
    from .run import finished_ggufs  # noqa: PLC0415

    folder = _export_folder(ws, name)
    info = run_info(ws, _manifest(folder))
    merged = folder / "merged"
    out = {"adapter": str(info.adapter) if info.adapter and (info.adapter / "adapter_config.json").is_file() else None,
           "merged": str(merged) if (merged / "config.json").is_file() else None,
           "ggufs": [g.name for g in finished_ggufs(folder)]}
    out["parts"] = [p for p in PARTS if (out["ggufs"] if p == "gguf" else out[p])]
    last = pushes(ws, name)
    out["last_repo"] = last[-1]["repo_id"] if last else None
    return out


def check_request(ws: Workspace, req: PushRequest) -> tuple[dict, list[str], list[str]]:
    """(available(), the parts to push, the GGUF files to push), or BadInput / NotFound / Conflict saying why not."""
    have = available(ws, req.export)
    from . import job as export_job  # noqa: PLC0415

    running = export_job.active(ws)
    if running and running.label == req.export:
        raise Conflict(f"The export '{req.export}' is still being written: push it when its job has finished.")
    if (req.repo_id or "").strip():
        validate_model_id(req.repo_id)
    else:
        raise BadInput("Enter the Hub repository to push to, for example 'your-name/my-model'.")
    parts = [p.strip().lower() for p in (req.what or have["parts"]) if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise BadInput(f"Unknown part(s) to push: {', '.join(unknown)} (adapter, merged, gguf).")
    missing = [p for p in parts if p not in have["parts"]]
    if missing:
        names = {"adapter": "adapter", "merged": "merged model", "gguf": "GGUF file"}
        raise BadInput(f"The export '{req.export}' has no {' and no '.join(names[p] for p in missing)} to push "
                       f"(it has: {', '.join(have['parts']) or 'nothing'}).")
    if not parts:
        raise BadInput(f"The export '{req.export}' has nothing to push (no adapter, merged model or GGUF).")
    ggufs = list(req.ggufs or have["ggufs"]) if "gguf" in parts else []
    stray = [g for g in ggufs if g not in have["ggufs"]]
    if stray:
        raise BadInput(f"Not a GGUF of '{req.export}': {', '.join(stray)} (it has: {', '.join(have['ggufs'])}).")
    if "gguf" in parts and not ggufs:
        raise BadInput("Choose at least one GGUF file to push.")
    return have, [p for p in PARTS if p in parts], ggufs


# ------------------------------------------------------------------------------------------------ errors


def _token(token: str | None) -> str:
    token = (token or "").strip() or os.environ.get("HF_TOKEN", "").strip()
    if not token:
        from huggingface_hub import get_token  # noqa: PLC0415 - a `hf auth login` token

        token = get_token() or ""
    if not token:
        raise Unauthorized("Pushing needs a Hub access token with write access. " + TOKEN_HELP)
    return token


def _push_error(exc: BaseException, repo_id: str, who: dict | None, existed: bool) -> MacTunerError | None:
    """A huggingface_hub / network exception as a message a user can act on (None: not one of those)."""
    from huggingface_hub import errors as hfe  # noqa: PLC0415

    if isinstance(exc, RuntimeError) and exc.__cause__ is not None:  # "Error while uploading 'x' to the Hub."
        return _push_error(exc.__cause__, repo_id, who, existed)
    if isinstance(exc, hfe.OfflineModeIsEnabled):
        return Unavailable("The Hub is unreachable: offline mode is on (HF_HUB_OFFLINE=1). Nothing was pushed.")
    if is_timeout(exc):
        return Unavailable(f"The Hub at {hub_endpoint()} {timeout_words(exc)}: it is slow or unreachable. The push "
                           "stopped; push again later (files the Hub already has are not sent again).")
    if isinstance(exc, transport_errors()):
        return Unavailable(f"Cannot reach the Hub at {hub_endpoint()} ({type(exc).__name__}): no network, or the Hub "
                           "is down. No commit was made; push again when it is back.")
    namespace = repo_id.split("/")[0]
    user = (who or {}).get("name") or "?"
    orgs = [o.get("name") for o in (who or {}).get("orgs", []) if o.get("name")]
    if isinstance(exc, hfe.RepositoryNotFoundError) and who is not None:
        return Conflict(f"There is no repository '{repo_id}' your token ({user}) can write to: the name is taken by "
                        "a repository you cannot see. Choose another name.")
    if not isinstance(exc, hfe.HfHubHTTPError):
        return None
    code = getattr(getattr(exc, "response", None), "status_code", None)
    server = (getattr(exc, "server_message", None) or str(exc)).strip().splitlines()[0][:300]
    if code == 401:
        return Unauthorized("The Hub refused the token (401): it is invalid, expired or revoked. " + TOKEN_HELP)
    if code == 403:
        if who is not None and namespace != user and namespace not in orgs:
            member = f" (member of {', '.join(orgs)})" if orgs else ""
            return Unauthorized(f"The repo '{repo_id}' belongs to '{namespace}'; your token is for '{user}'{member}. "
                                f"Push to '{user}/{repo_id.split('/')[-1]}', or use a token of '{namespace}'.")
        if existed:
            return Conflict(f"'{repo_id}' already exists and your token ({user}) cannot write to it: the name is "
                            "taken. Choose another name, or ask its owners for write access.")
        return Unauthorized(f"Your token ({user}) may not create or write repositories in '{namespace}': it needs "
                            f"write access there (a fine-grained token: write on '{namespace}'). " + TOKEN_HELP)
    if code == 409:
        return Conflict(f"The name '{repo_id}' is taken by a repository your token cannot write to. Choose another "
                        "name.")
    if code == 400:
        return BadInput(f"The Hub refused the push of '{repo_id}': {server}")
    return Unavailable(f"The Hub answered with an error ({code}) for '{repo_id}': {server}")


# ------------------------------------------------------------------------------------------------ the push


def _remote(api, repo_id: str, token: str) -> tuple[dict[str, int], object | None]:
    """({path: bytes} of the repository's files, its info) - ({}, None) when there is no such repository."""
    from huggingface_hub import errors as hfe  # noqa: PLC0415

    try:
        info = api.model_info(repo_id, files_metadata=True, token=token)
    except hfe.RepositoryNotFoundError:
        return {}, None
    return {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}, info


def _adapter_config(adapter: Path, base_id: str | None) -> bytes:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_id or scrub_paths(cfg.get("base_model_name_or_path"))
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def _plan_files(folder: Path, have: dict, parts: list[str], ggufs: list[str], adapter_dir: str,
                base_id: str | None) -> list[tuple[str, Path | bytes]]:
    """(path in the repository, local file or bytes) of everything but README.md."""
    out: list[tuple[str, Path | bytes]] = []
    if "merged" in parts:
        merged = Path(have["merged"])
        out += [(str(p.relative_to(merged)), p) for p in sorted(merged.rglob("*"))
                if p.is_file() and p.name not in NOT_SENT and not p.name.startswith(".")]
    if "adapter" in parts:
        adapter = Path(have["adapter"])
        prefix = f"{adapter_dir}/" if adapter_dir else ""
        for name in ADAPTER_FILES:
            if (adapter / name).is_file():
                src = _adapter_config(adapter, base_id) if name == "adapter_config.json" else adapter / name
                out.append((prefix + name, src))
    for g in ggufs:
        out.append((g, folder / g))
        mf = folder / f"{g[: -len('.gguf')]}.Modelfile"
        if mf.is_file():
            out.append((mf.name, mf))
    return out


def _plan(ws: Workspace, folder: Path, req: PushRequest, have: dict, parts: list[str], ggufs: list[str],
          repo_id: str, remote: dict[str, int]) -> tuple[list, dict[str, int], list[str], list[str]]:
    """(files to send, README.md last; their sizes; files to delete; the parts pushed) for a repository that holds
    `remote` now."""
    merged_in_repo = "merged" in parts or "config.json" in remote
    # a merged model joins a repository whose adapter is at its root: the adapter moves to adapter/ (this export's
    # adapter is brought along; without one, the root adapter stays as it is)
    deletes = [n for n in ROOT_ADAPTER if n in remote] if "merged" in parts and have["adapter"] else []
    if deletes and "adapter" not in parts:
        parts = [p for p in PARTS if p in (*parts, "adapter")]
    adapter_dir = "adapter" if merged_in_repo else ""
    rinfo = run_info(ws, _manifest(folder))
    planned = _plan_files(folder, have, parts, ggufs, adapter_dir, rinfo.base_model)
    sizes = {p: (len(src) if isinstance(src, bytes) else src.stat().st_size) for p, src in planned}
    final = {**{p: b for p, b in remote.items() if p not in deletes}, **sizes}  # the repository after the commit
    in_repo = set(parts)
    for part, there in (("merged", "config.json" in final), ("gguf", any(p.endswith(".gguf") for p in final)),
                        ("adapter", any(p.split("/")[-1] == "adapter_config.json" for p in final))):
        if there:
            in_repo.add(part)
    from .run import export_details  # noqa: PLC0415

    gguf_rows = [g for g in export_details(ws, req.export)["gguf_files"] if g["file"] in final]
    card = model_card(repo_id, req.export, rinfo, in_repo, gguf_rows,
                      [{"path": p, "bytes": b} for p, b in final.items()],
                      adapter_dir if "adapter" in in_repo else "").encode()
    planned.append(("README.md", card))
    sizes["README.md"] = len(card)
    return planned, sizes, deletes, parts


def push(ws: Workspace, req: PushRequest, token: str | None = None, progress: Callable[..., None] = _quiet) -> PushResult:
    """Push the export as `req` says (see the module docstring). `progress(fraction, message, **counts)` gets
    files_done / files_total / bytes_done / bytes_total while files go up."""
    have, parts, ggufs = check_request(ws, req)
    folder = _export_folder(ws, req.export)
    token = _token(token)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi  # noqa: PLC0415

    use_timeouts()  # a Hub that accepts the connection and never answers must not hang the push
    api = HfApi(endpoint=hub_endpoint(), token=token)
    repo_id, who, existed = req.repo_id.strip(), None, False
    try:
        progress(0.0, "Checking the token with the Hub…")
        who = api.whoami(token=token)
        if (who.get("auth", {}).get("accessToken") or {}).get("role") == "read":
            raise Unauthorized(f"The token of '{who.get('name')}' is read-only: pushing needs write access. "
                               + TOKEN_HELP)
        if "/" not in repo_id:
            repo_id = f"{who['name']}/{repo_id}"
        remote, info = _remote(api, repo_id, token)
        existed = info is not None
        if not existed:
            progress(0.02, f"Creating the {'private' if req.private else 'public'} repository {repo_id}…")
            api.create_repo(repo_id, private=req.private, exist_ok=True, token=token)
            remote, info = _remote(api, repo_id, token)
        planned, sizes, deletes, parts = _plan(ws, folder, req, have, parts, ggufs, repo_id, remote)
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for p, src in planned]
        total, done = sum(sizes.values()), 0
        for i, op in enumerate(ops):
            counts = {"files_done": i, "files_total": len(ops), "bytes_done": done, "bytes_total": total}
            progress(0.05 + 0.9 * done / max(total, 1),
                     f"Uploading {op.path_in_repo} ({human_bytes(sizes[op.path_in_repo])}) — file {i + 1} of "
                     f"{len(ops)}, {human_bytes(done)} / {human_bytes(total)}", **counts)
            api.preupload_lfs_files(repo_id, additions=[op], token=token, free_memory=False)
            done += sizes[op.path_in_repo]
        progress(0.96, f"Committing {len(ops)} file(s) to {repo_id}…", files_done=len(ops), files_total=len(ops),
                 bytes_done=total, bytes_total=total)
        unchanged = {op.path_in_repo for op in ops
                     if getattr(op, "_remote_oid", None) is not None and op._remote_oid == op._local_oid}
        changed = bool(deletes) or len(unchanged) < len(ops)
        commit = api.create_commit(
            repo_id, operations=[*ops, *(CommitOperationDelete(path_in_repo=d) for d in deletes)],
            commit_message=(req.message or "").strip() or f"Upload {req.export} with MacTuner",
            commit_description=f"Pushed by MacTuner: {', '.join(parts)} of the export '{req.export}'.", token=token)
    except MacTunerError:
        raise
    except Exception as e:  # noqa: BLE001 - narrowed in _push_error; anything else is a bug and goes on up
        mapped = _push_error(e, repo_id, who, existed)
        if mapped is None:
            raise
        raise mapped from None
    private = getattr(info, "private", None)
    url = f"{hub_endpoint().rstrip('/')}/{repo_id}"
    sent = sum(sizes[p] for p in sizes if p not in unchanged)
    msg = (f"{'Created' if not existed else 'Updated'} {'private' if private else 'public'} repository {repo_id}: "
           f"{len(ops) - len(unchanged)} file(s) sent ({human_bytes(sent)}), {len(unchanged)} already there"
           + (f", {len(deletes)} removed" if deletes else "") + ".") if changed else \
        f"Nothing changed since the last push: {repo_id} already has every file as it is here."
    result = PushResult(repo_id=repo_id, url=url, commit=getattr(commit, "oid", None), created=not existed,
                        private=private, changed=changed, what=parts, deleted=deletes, message=msg,
                        files=[{"path": p, "bytes": sizes[p], "unchanged": p in unchanged} for p in sizes])
    record = {"repo_id": repo_id, "url": url, "commit": result.commit, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "what": parts, "ggufs": ggufs, "files": len(ops), "bytes": total, "sent_bytes": sent,
              "changed": changed, "private": private}
    write_json(folder / PUSHES_FILE, [*pushes(ws, req.export), record])
    progress(1.0, msg)
    return result


# ------------------------------------------------------------------------------------------------ as a job


def queue(ws: Workspace) -> jobs.JobQueue:
    return jobs.JobQueue(ws.exports / ".pushes", "push", "upload")


def start(ws: Workspace, req: PushRequest, token: str | None = None) -> str:
    """Check the request, then push in a process of its own; returns the job id. The token (else HF_TOKEN, else
    a `hf auth login` token) goes to the job in its environment only."""
    check_request(ws, req)
    token = _token(token)
    return queue(ws).start(f"{req.export} → {req.repo_id.strip()}", {"args": req.as_dict(), "root": str(ws.root)},
                           id_label=jobs.slug(req.export, "push", 60), env={"HF_TOKEN": token}, step="push",
                           args=req.as_dict())


def status(ws: Workspace, job: str) -> jobs.JobStatus:
    return queue(ws).status(job)


def list_jobs(ws: Workspace) -> list[jobs.JobStatus]:
    return queue(ws).list()


def cancel(ws: Workspace, job: str) -> jobs.JobStatus:
    """End a running push (before its commit the repository stays as it was)."""
    return queue(ws).cancel(job)


def run_job(job: jobs.JobDir) -> int:
    """The push job's worker (`python -m pipelines.jobs --work exports/.pushes/<id>`); the token is in its
    HF_TOKEN."""
    from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415 - status.json has the progress

    disable_progress_bars()
    spec = job.spec()
    return jobs.run_reported(job, lambda rep: push(Workspace.open(spec["root"]), PushRequest.from_dict(spec["args"]),
                                                   None, rep.progress).as_dict())


# ------------------------------------------------------------------------------------------------ the CLI


def add_cli(sub) -> None:
    """`mactuner push EXPORT REPO_ID [--token T] [--public] [--what adapter,merged,gguf] [--gguf FILE]...`"""
    p = sub.add_parser("push", help="publish an export (adapter, merged model, GGUFs) to a Hub model repository")
    p.add_argument("export", help="the export's name (see `mactuner export list`)")
    p.add_argument("repo_id", help="user/name or org/name (a bare name goes under the token's user)")
    p.add_argument("--token", default=None, help="a token with write access (default: HF_TOKEN, else the `hf auth "
                   "login` one); HF_TOKEN is safer: a command line is visible to the machine's other users")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--what", default="", help="comma-separated parts: adapter,merged,gguf (default: all it has)")
    p.add_argument("--gguf", action="append", default=None, help="a GGUF file to push (repeatable; default: all)")
    p.add_argument("--message", default="", help="the commit message")
    p.add_argument("--root", default=None, help="workspace folder (default ~/.mactuner, or $MACTUNER_HOME)")
    p.set_defaults(fn=_cli)


def _cli(a) -> int:
    from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415

    disable_progress_bars()
    req = PushRequest(export=a.export, repo_id=a.repo_id, what=[w for w in a.what.split(",") if w.strip()],
                      ggufs=a.gguf or [], private=not a.public, message=a.message)
    try:
        result = push(Workspace.open(a.root), req, a.token,
                      lambda f, msg, **_k: print(f"{100 * f:5.1f}%  {msg}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("mactuner push: cancelled before the commit; the repository is as it was", file=sys.stderr)
        return 130
    print(json.dumps(result.as_dict(), indent=2))
    return 0
