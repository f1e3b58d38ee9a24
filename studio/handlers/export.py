"""Export tab handlers: pick what to export, check the plan (architecture, disk), start the export job (its own
process, pipelines.export.job), follow it, list exports with their validation tables, open a GGUF in the Chat tab.

The workspace is the truth: a refreshed page re-attaches to the running job by reading exports/.jobs/, and the
export list is read from exports/ each time.

`ExportHandlers(ctx)`: the tab wires its bound methods; they return (or stream) named views of the tab's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from pipelines import export as ex
from pipelines import follow as pfollow
from pipelines import models
from pipelines.errors import BadInput
from pipelines.export import job as export_job
from pipelines.jobs import JobStatus
from pipelines.workspace import human_bytes

from .chat import adapter_sources, model_choices
from .common import JOB_BADGES, Context, Followers, progress_bar_html, selected_cell, stream, ui_errors

EXPORT_COLUMNS = ["name", "state", "created", "GGUF types", "validation", "note"]
TABLE_COLUMNS = ["type", "file", "size", "perplexity", "Δ vs HF (%)", "tokens/s"]
CHECK_COLUMNS = ["GGUF", "check", "result", "detail"]
DEFAULT_QUANTS = list(ex.DEFAULT_QUANTS)  # Q8_0: keeps a small fine-tune (pipelines/export/common.py)
LOG_LINES = 14  # the log box shows its first lines: give it only the end
FOLLOWERS = Followers()


class ExportStarted(NamedTuple):
    message: str  # what was started, and the plan
    job: str | None  # the export job, which the monitor then follows


class ExportMonitor(NamedTuple):
    """The export monitor, one field per component."""

    job: str | None
    progress: str  # html: the bar and its caption
    status: str  # markdown: the step, the job, its state (and the failed checks of a finished one)
    log: str  # the log's last LOG_LINES lines
    seen: str | None  # "job:state" shown last (the table is read again when it changes)
    table: Any  # the exports (gr.update() when nothing changed)
    pick: Any  # the export picker: on the export just finished, so its validation shows


class Choices(NamedTuple):
    """The Export tab selected: what can be exported, and the exports."""

    source: Any
    pick: Any


class ExportList(NamedTuple):
    table: pd.DataFrame
    pick: Any


class ExportDetails(NamedTuple):
    """One export: its summary, its perplexity table, its validation checks, and the GGUF picker."""

    summary: str
    perplexity: pd.DataFrame
    checks: pd.DataFrame
    gguf: Any


class HowToRun(NamedTuple):
    commands: str  # markdown: the GGUF, and how llama.cpp, Ollama and LM Studio run it
    modelfile: str


class OpenedInChat(NamedTuple):
    """A GGUF opened in the Chat tab: the tabs (on Chat), its two model menus, the message."""

    tabs: Any
    model: Any
    model_b: Any
    message: str


def sources(ctx: Context) -> list[tuple[str, str]]:
    """(label, path) of everything exportable: run adapters and checkpoints, HF model folders, merged exports."""
    out = []
    for p in adapter_sources(ctx):
        path = Path(p)
        label = f"run {path.parent.name} · final adapter" if path.name == "adapter" else \
            f"run {path.parent.parent.name} · checkpoint {path.name}"
        out.append((label, p))
    for r in models.list_local_models(ctx.ws):
        if r["format"] == "hf-safetensors":
            out.append((f"HF model · {r['name']}", r["path"]))
    for m in sorted(ctx.ws.exports.glob("*/merged")):
        if (m / "config.json").is_file():
            out.append((f"merged export · {m.parent.name}", str(m)))
    return out


def export_request(source: str, base_model: str, name: str, outtypes: list, quants: list, validate: bool = True,
            system: str = "") -> ex.ExportRequest:
    """The form's values -> the export request (empty text fields mean "not given")."""
    return ex.ExportRequest(source=source or "", name=(name or "").strip(), base_model=(base_model or "").strip(),
                            outtypes=[str(t) for t in (outtypes or [])], quants=list(quants or []),
                            validate=bool(validate), system=(system or "").strip())


def _plan_md(plan: ex.ExportPlan) -> str:
    est = plan.estimate
    what = (f"merge the adapter `{plan.adapter}` into `{plan.base}`, then convert the merged model "
            if plan.adapter else f"convert `{plan.hf_src}` ") + f"({plan.architecture})"
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in est["parts"].items())
    return (f"✅ Ready to export **{plan.name}**: {what} to GGUF {', '.join(plan.outtypes)}"
            + (f", quantize to {', '.join(plan.quants)}" if plan.quants else "") + ".\n\n"
            f"Disk: about {human_bytes(est['total'])} ({parts}); {human_bytes(est['free'])} free in `{plan.folder.parent}`.")


def job_problems(st: JobStatus) -> str:
    """"1 check failed: fine-tune survived (Q4_K_M)" for a finished job whose validation failed checks, else ""."""
    res = st.result or {}
    if st.state != "finished" or not isinstance(res, dict):
        return ""
    if st.extra.get("step") == "validate":
        failed = ex.failed_checks(res)
        return ex.problems_text([{"type": Path(str(res.get("gguf", ""))).name, "failed": failed}])
    return res.get("problems") or ""


def _job_md(st: JobStatus) -> str:
    problems = job_problems(st)
    badge = f"⚠️ done — {problems}" if problems else JOB_BADGES.get(st.state, st.state)
    line = f"**{st.extra.get('step')} {st.label}** · {badge}"
    if st.state == "failed" and st.reason:
        line += f"\n\n{st.reason}"
    if problems:
        line += ("\n\nThe files are written, but a failed check means this GGUF does not behave like the model you "
                 "tuned; see its checks below (a finer quantization such as Q8_0 keeps a small fine-tune).")
    return line


def _pick_job(ctx: Context, job: str | None) -> JobStatus | None:
    """The job to show: `job`, unless another one runs (started in another tab or the API: that is what this page
    should show), else the newest."""
    jobs = export_job.list_jobs(ctx.ws)  # read once: status, the running one, the newest
    running = next((j for j in jobs if j.active), None)
    st = next((j for j in jobs if j.name == job), None) if job else None
    if running and (st is None or not st.active):
        st = running
    return st if st is not None else (jobs[0] if jobs else None)


def _view(ctx: Context, st: JobStatus, seen: str | None, log: str) -> ExportMonitor:
    """The monitor for job status `st`. The table is re-read while a job runs and when its state changes; a finished
    export is picked so its validation shows."""
    frac = st.fraction or 0.0
    problems = job_problems(st)
    caption = f"{100 * frac:.0f}% · {st.message or ''}" if st.active else \
        f"⚠️ done — {problems}" if problems else f"{st.state} · {st.message or ''}"
    key = f"{st.name}:{st.state}"
    changed = key != seen
    table = exports_table(ctx, st if st.active else None, read=False) if changed or st.active else gr.update()
    pick = gr.update()
    if changed and seen is not None and st.state == "finished" and st.extra.get("step") == "run":
        pick = gr.update(choices=export_names(ctx), value=st.label)
    return ExportMonitor(st.name, progress_bar_html(1.0 if st.state == "finished" else frac, caption), _job_md(st),
                         log, key, table, pick)


def _validation_cell(row: dict) -> str:
    if row.get("problems"):
        return f"⚠️ {row['problems']}"
    if row["ok"] is None:
        return "–"
    return "✅ passed" if row["ok"] else "⚠️ problems"


def exports_table(ctx: Context, running: JobStatus | None = None, read: bool = True) -> pd.DataFrame:
    """The exports as a table; the running job (`read`: read again when not given) shows as "exporting N%"."""
    if running is None and read:
        running = export_job.active(ctx.ws)
    rows = []
    for r in ex.list_exports(ctx.ws):
        state = r["state"]
        note = r.get("error") or ""
        if running is not None and running.extra.get("step") == "run" and running.label == r["name"]:
            state, note = f"exporting {100 * (running.fraction or 0):.0f}%", running.message or ""
        elif state == "incomplete":
            note = "no export.json: made by single steps, or interrupted"
        rows.append([r["name"], state, r.get("created") or "", ", ".join(g["type"] for g in r["ggufs"]),
                     _validation_cell(r), note])
    return pd.DataFrame(rows, columns=EXPORT_COLUMNS)


def export_names(ctx: Context) -> list[str]:
    return [r["name"] for r in ex.list_exports(ctx.ws)]


# ------------------------------------------------------------------------------------------------ API


def run_step(ctx: Context, step: str, args: dict):
    """Start one export step as a job and stream its status until it ends; the last status carries the result."""
    job = export_job.start(ctx.ws, step, args)
    q = export_job.queue(ctx.ws)
    for up in pfollow.follow(q.job(job), lambda: q.status(job)):
        st = up.status
        yield st.to_dict()
    if st.state != "finished":
        raise BadInput(f"The {step} job ended {st.state}: {st.reason or 'see its log'} (job {job}).")


@ui_errors
def architectures() -> str:
    """The architectures llama.cpp's converter supports, as the Export tab lists them."""
    return ", ".join(f"`{a}`" for a in ex.supported_architectures())


class ExportHandlers:
    """The Export tab's events, for one workspace and model registry (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def refresh_choices(self, source: str | None) -> Choices:
        """Fresh source and export lists; an empty source becomes the newest run's final adapter (the usual next
        step after training)."""
        choices = sources(self.ctx)
        if not source:
            source = next((p for label, p in choices if label.endswith("final adapter")), None)
        return Choices(gr.update(choices=choices, value=source), gr.update(choices=export_names(self.ctx)))

    def refresh(self) -> ExportList:
        """↻: the exports read again."""
        return ExportList(exports_table(self.ctx), gr.update(choices=export_names(self.ctx)))

    @ui_errors
    def check(self, source: str, base_model: str, name: str, outtypes: list, quants: list) -> str:
        """What the export will do, or why it cannot (before anything is written)."""
        return _plan_md(ex.plan_export(self.ctx.ws, export_request(source, base_model, name, outtypes, quants)))

    @ui_errors
    def start(self, source: str, base_model: str, name: str, outtypes: list, quants: list, validate: bool,
              system: str) -> ExportStarted:
        """Check everything, then start the export in its own process. Returns ExportStarted (message, job id)."""
        req = export_request(source, base_model, name, outtypes, quants, validate, system)
        plan = ex.plan_export(self.ctx.ws, req)
        req.source, req.name, req.base_model = str(plan.source), plan.name, str(plan.base) if plan.base else ""
        job = export_job.start(self.ctx.ws, "run", req.as_dict())
        return ExportStarted(f"Started export **{plan.name}** (job `{job}`); it runs in its own process — closing "
                             "this page does not stop it.\n\n" + _plan_md(plan), job)

    @ui_errors
    def cancel(self, job: str | None) -> str:
        active = export_job.active(self.ctx.ws)
        job = job or (active.name if active else None)
        if not job:
            raise BadInput("No export is running.")
        st = export_job.cancel(self.ctx.ws, job)
        why = st.reason if st.reason not in (None, st.state) else None
        return f"Export job `{job}`: {st.state}" + (f" — {why}" if why else "")

    @ui_errors
    async def follow(self, job: str | None, seen: str | None, request: gr.Request = None):
        """Stream the export monitor (ExportMonitor): the job to show (`_pick_job`) followed from its folder (status
        and log from byte offsets) with an update per change, ending with the job; this page's newer follower ends
        it."""
        stop = FOLLOWERS.start(request)
        st = _pick_job(self.ctx, job)
        if st is None:
            yield ExportMonitor(None, "", "No export has run yet.", "", seen, gr.update(), gr.update())
            return
        lines: list[str] = []
        q = export_job.queue(self.ctx.ws)
        async for up in stream(pfollow.follow(q.job(st.name), lambda: q.status(st.name), log_bytes=8000, stop=stop,
                                              idle=True)):
            lines = (lines + up.log.splitlines())[-LOG_LINES:]
            view = _view(self.ctx, up.status, seen, "\n".join(lines))
            seen = view.seen
            yield view

    def discover(self, job: str | None):
        """A job started elsewhere (another tab, the API): its id, so this page follows it; else nothing changes."""
        running = export_job.active(self.ctx.ws)
        return running.name if running and running.name != job else gr.skip()

    def pick_row(self, table: pd.DataFrame, evt: gr.SelectData):
        """Clicking a row of the exports table picks that export."""
        return gr.update(choices=export_names(self.ctx), value=selected_cell(table, evt, "name"))

    @ui_errors
    def details(self, name: str | None) -> ExportDetails:
        """The summary, perplexity table, checks table and GGUF picker of one export."""
        if not name:
            return ExportDetails("Pick an export.", pd.DataFrame(columns=TABLE_COLUMNS),
                                 pd.DataFrame(columns=CHECK_COLUMNS), gr.update(choices=[], value=None))
        d = ex.export_details(self.ctx.ws, name)
        lines = [f"### {d['name']} · {d['state']}"]
        if d.get("error"):
            lines.append(f"❌ {d['error']}")
        if d.get("source"):
            base = f" · base `{d['base_model']}`" if d.get("base_model") else ""
            lines.append(f"- Source: `{d['source']}`{base}")
        if d.get("merged"):
            lines.append(f"- Merged HF model: `{d['merged']}`")
        if d.get("steps"):
            lines.append("- Steps: " + ", ".join(f"{s['step']} {s['seconds']:.1f} s" for s in d["steps"])
                         + (f" · total {d['seconds']:.1f} s" if d.get("seconds") else ""))
        mf_step = next((s for s in d.get("steps") or [] if s["step"] == "Modelfiles"), None)
        if mf_step:
            lines.append(("- ⚠️ Ollama Modelfile: " if mf_step["detail"].startswith("NO TEMPLATE") else
                          "- Ollama Modelfile ") + mf_step["detail"])
        lines.append(f"- Folder: `{d['folder']}`")
        table = pd.DataFrame([[r["type"], r["file"], human_bytes(r["size"]), r["perplexity"], r["delta_pct"],
                               r["tokens_per_s"]] for r in d["table"]], columns=TABLE_COLUMNS)
        checks = []
        for g in d["gguf_files"]:
            for item in (g["validation"] or {}).get("items", []):
                mark = {True: "✅ pass", False: "❌ fail", None: "– skipped"}[item["ok"]]
                checks.append([g["file"], ex.CHECK_LABELS.get(item["name"], item["name"]), mark, item["detail"]])
            if not g["validation"]:
                checks.append([g["file"], "(all)", "– not validated", ""])
        lora = d.get("lora")
        if lora:
            for item in (lora["validation"] or {}).get("items", []):
                mark = {True: "✅ pass", False: "❌ fail", None: "– skipped"}[item["ok"]]
                checks.append([lora["file"], ex.CHECK_LABELS.get(item["name"], item["name"]), mark, item["detail"]])
            if lora.get("how_to_run"):
                lines.append(f"- LoRA GGUF: `{lora['path']}` ({lora['size']}) on `{Path(lora['base']).name}` · "
                             f"llama.cpp: `{lora['how_to_run']['llama.cpp']}` · Ollama: `{lora['how_to_run']['ollama']}`")
        if d.get("lora_skipped"):
            lines.append(f"- {d['lora_skipped']}")
        problems = ex.problems_text(d["gguf_files"] + ([lora] if lora else []))
        if problems:
            lines.insert(1, f"⚠️ {problems}")
        best = ex.preferred_gguf(d["gguf_files"])
        return ExportDetails("\n".join(lines), table, pd.DataFrame(checks, columns=CHECK_COLUMNS),
                             gr.update(choices=[(g["label"], g["path"]) for g in d["gguf_files"]],
                                       value=best["path"] if best else None))

    @ui_errors
    def gguf_info(self, name: str | None, gguf: str | None) -> HowToRun:
        """How to run one GGUF of the export, and its Modelfile."""
        if not name or not gguf:
            return HowToRun("", "")
        g = next((g for g in ex.export_details(self.ctx.ws, name)["gguf_files"] if g["path"] == gguf), None)
        if g is None:
            return HowToRun("", "")
        cmds = g["how_to_run"]
        md = (f"**{g['file']}** · {g['type']} · {g['size']}\n\n"
              f"- llama.cpp: `{cmds['llama.cpp']}`\n- Ollama: `{cmds['ollama']}`\n- LM Studio: `{cmds['lm_studio']}`")
        return HowToRun(md, g["modelfile"] or "(no Modelfile beside this GGUF)")

    @ui_errors
    def open_in_chat(self, gguf: str | None, progress=gr.Progress()) -> OpenedInChat:
        """Load the GGUF beside the current model and switch to the Chat tab with it selected."""
        ctx = self.ctx
        if not gguf:
            raise BadInput("Pick a GGUF file of the export first.")
        lm = ctx.registry.load(gguf, ctx.ws, name=Path(gguf).stem, progress=lambda f, m: progress(f, desc=m),
                               replace=False)
        names = model_choices(ctx)
        failed = next((g["failed"] for r in ex.list_exports(ctx.ws) for g in r["ggufs"]
                       if str(Path(r["folder"]) / g["file"]) == str(gguf)), [])
        warn = (f" ⚠️ Its validation failed: {', '.join(failed)} — it may not answer like your fine-tune."
                if failed else "")
        return OpenedInChat(gr.Tabs(selected="chat"), gr.update(choices=names, value=lm.name),
                            gr.update(choices=names), f"Loaded **{lm.name}**: it is selected in the Chat tab.{warn}")
