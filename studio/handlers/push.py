"""Export tab, "Publish to the Hub": what the picked export can push (adapter, merged model, GGUF files), the push
job (its own process, pipelines.export.push; the token reaches it in its environment only, never a file), and
following it with a progress bar of files and bytes. A refreshed page re-attaches by reading exports/.pushes/.

`PushHandlers(ctx)`: the tab wires its bound methods; they return named views of the section's outputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr

from pipelines.errors import BadInput, Unauthorized
from pipelines.export import push
from pipelines.jobs import JobStatus

from .common import JOB_BADGES, Context, progress_bar_html, ui_errors

PART_LABELS = {"adapter": "LoRA adapter", "merged": "merged model", "gguf": "GGUF files"}


class PushForm(NamedTuple):
    """The form for the picked export: what it can push (all ticked), its GGUF files, the repository, a note."""

    parts: Any
    ggufs: Any
    repo: Any  # the repository of its last push, so a second push goes to the same place
    note: str


class PushStarted(NamedTuple):
    message: str
    job: str | None  # the push job, which the monitor then follows
    token: str  # the token field, emptied


class PushMonitor(NamedTuple):
    job: str | None
    progress: str  # html: the bar, counting files and bytes
    status: str  # markdown: the job, its state, the repository and commit of a finished one


def _last_push_md(ctx: Context, name: str) -> str:
    done = [p for p in push.pushes(ctx.ws, name) if p.get("commit")]
    if not done:
        return "Not pushed yet. The repository is created **private** unless you tick *Public*."
    p = done[-1]
    return (f"Last pushed to [{p['repo_id']}]({p['url']}) on {p.get('when', '?').replace('T', ' ')} "
            f"(commit `{str(p['commit'])[:8]}`); pushing again updates that repository.")


def _names(values, what: str) -> list[str]:
    """A list of names as the form or a script sends it: a list, one name, or nothing."""
    values = [values] if isinstance(values, str) else list(values or [])
    if not all(isinstance(v, str) for v in values):
        raise BadInput(f"{what} must be a list of names, not {values!r:.80}.")
    return [v.strip() for v in values if v.strip()]


def push_request(name: str | None, repo_id: str | None, public: bool, parts: list | str | None,
                 ggufs: list | str | None) -> push.PushRequest:
    """The form's values (or a script's: the API takes them as sent) -> the push request (the token stays out of
    it)."""
    parts, ggufs = _names(parts, "What to push"), _names(ggufs, "GGUF files")
    if not isinstance(name, (str, type(None))) or not isinstance(repo_id, (str, type(None))):
        raise BadInput("The export and the repository are names (text).")
    if not isinstance(public, (bool, type(None))):  # the string "false" must not make a repository public
        raise BadInput(f"'Public' must be true or false, not {public!r:.40}.")
    if not parts:
        raise BadInput("Tick what to push: the adapter, the merged model and/or GGUF files.")
    what = [p for p in push.PARTS if p in parts] + [p for p in parts if p not in push.PARTS]  # unknown ones: refused
    return push.PushRequest(export=(name or "").strip(), repo_id=(repo_id or "").strip(), what=what,
                            ggufs=ggufs if "gguf" in parts else [], private=public is not True)


def _status_md(st: JobStatus) -> str:
    badge = JOB_BADGES.get(st.state, st.state)
    line = f"**push {st.label}** · {badge}"
    res = st.result if isinstance(st.result, dict) else {}
    if st.state == "finished" and res:
        line += f"\n\n{res.get('message', '')}\n\n[{res.get('repo_id')}]({res.get('url')})"
        if res.get("commit"):
            line += f" · commit `{str(res['commit'])[:8]}`"
    if st.state == "failed" and st.reason:
        line += f"\n\n{st.reason}"
    return line


class PushHandlers:
    """The "Publish to the Hub" section's events, for one workspace (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @ui_errors
    def form(self, name: str | None) -> PushForm:
        """The form for the picked export: only what it has, all ticked; the repository of its last push."""
        if not name:
            return PushForm(gr.update(choices=[], value=[]), gr.update(choices=[], value=[], visible=False),
                            gr.update(), "Pick an export above to publish it.")
        have = push.available(self.ctx.ws, name)
        return PushForm(gr.update(choices=[(PART_LABELS[p], p) for p in have["parts"]], value=list(have["parts"])),
                        gr.update(choices=have["ggufs"], value=list(have["ggufs"]), visible=bool(have["ggufs"])),
                        gr.update(value=have["last_repo"] or "", placeholder=f"your-name/{name}"),
                        _last_push_md(self.ctx, name))

    @ui_errors
    def start(self, name: str | None, repo_id: str | None, token: str | None, public: bool, parts: list | None,
              ggufs: list | None) -> PushStarted:
        """Start the push in its own process. Returns PushStarted (message, job id, the token field emptied). A
        studio reachable from other machines (a confined workspace: a Space, a share link) wants the token typed:
        the server's own HF_TOKEN is not lent to whoever has the page."""
        req = push_request(name, repo_id, public, parts, ggufs)
        token = token if isinstance(token, str) else None
        if getattr(self.ctx.ws, "confined", False) and not (token or "").strip():
            raise Unauthorized("Type your Hub access token (write) in the token field: this studio is reachable from "
                               "other machines, so the server's own HF_TOKEN is not used for pushes.")
        job = push.start(self.ctx.ws, req, token)
        what = ", ".join(PART_LABELS[p] for p in req.what)
        return PushStarted(f"Pushing **{req.export}** ({what}) to `{req.repo_id}` (job `{job}`); it runs in its own "
                           "process — closing this page does not stop it.", job, "")

    @ui_errors
    def cancel(self, job: str | None) -> str:
        job = job or next((j.name for j in push.list_jobs(self.ctx.ws) if j.active), None)
        if not job:
            raise BadInput("No push is running.")
        st = push.cancel(self.ctx.ws, job)
        return f"Push job `{job}`: {st.state}" + (" — nothing was committed." if st.state == "cancelled" else "")

    def poll(self, job: str | None) -> PushMonitor:
        """Follow `job` (default: the running push, else the newest)."""
        jobs = push.list_jobs(self.ctx.ws)
        running = next((j for j in jobs if j.active), None)
        st = next((j for j in jobs if j.name == job), None) if job else None
        if running and (st is None or not st.active):
            st = running
        st = st or (jobs[0] if jobs else None)
        if st is None:
            return PushMonitor(None, "", "")
        frac = st.fraction or 0.0
        caption = f"{100 * frac:.0f}% · {st.message or ''}" if st.active else \
            f"{st.state} · {st.message or ''}"  # the message counts files and bytes (pipelines.export.push)
        return PushMonitor(st.name, progress_bar_html(1.0 if st.state == "finished" else frac, caption),
                           _status_md(st))
