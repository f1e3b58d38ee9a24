"""Export jobs: a whole export, or one of its steps, in a process of its own (a pipelines.jobs job), so it outlives
the browser tab and a refreshed page re-attaches to it. One runs at a time per workspace (each loads a model and
uses every core); `cancel` ends the job's process group, and since the export writes every file under a temporary
name, a cancelled or killed job leaves nothing that looks finished.

A job is a folder exports/.jobs/<id>/ (see pipelines.jobs): job.json {"kind": "export", "step", "args"}, log.txt, and
status.json: a jobs.JobStatus (state running | finished | failed | cancelled, label, fraction, message, reason,
result) whose extra holds the step and its args.

Steps and their args (the same as `mactuner export <step>`):

    run       ExportRequest fields (source, name, base_model, outtypes, quants, validate, system)
    merge     source, base_model, name          convert   hf_dir, outtypes, name
    quantize  gguf, quants                      validate  gguf, hf, base_model, prompt

    job = start(ws, "run", {"source": ..., "quants": ["Q8_0"]})
    status(ws, job)  -> JobStatus;  jobs.wait(queue(ws).job(job)) -> the final one
"""

from __future__ import annotations

from pathlib import Path

from .. import jobs
from ..errors import BadInput
from ..progress import ProgressFn
from ..workspace import Workspace
from .common import file_slug, gguf_type
from .convert import convert, model_stem
from .merge import merge
from .plan import ExportRequest
from .quantize import quantize
from .run import export, problems_text, validation_sources
from .validate import failed_checks, validate

STEPS = {"run": "source", "merge": "source", "convert": "hf_dir", "quantize": "gguf", "validate": "gguf"}


def jobs_dir(ws: Workspace) -> Path:
    return ws.exports / ".jobs"


def check_args(step: str, args: dict) -> dict:
    """The step's args, checked (BadInput names what is missing or unknown)."""
    if step not in STEPS:
        raise BadInput(f"Unknown export step {step!r}; one of {', '.join(STEPS)}.")
    if not isinstance(args, dict):
        raise BadInput("An export step's arguments must be a mapping.")
    need = STEPS[step]
    if not str(args.get(need) or "").strip():
        raise BadInput(f"The {step} step needs {need.replace('_', ' ')}.")
    if step == "run":
        ExportRequest.from_dict(args)
    return args


def run_step(ws: Workspace, step: str, args: dict, progress: ProgressFn) -> dict:
    """One export step, in this process; returns its JSON-able result (the job's and the CLI's)."""
    check_args(step, args)
    if step == "run":
        r = export(ws, ExportRequest.from_dict(args), progress)
        rows = [{"type": gguf_type(Path(v.gguf)), "failed": failed_checks(v.as_dict())} for v in r.validations]
        return {"name": r.name, "folder": r.folder, "merged": r.merged, "ggufs": r.ggufs, "table": r.table,
                "ok": all(v.ok for v in r.validations) if r.validations else None, "problems": problems_text(rows)}
    if step == "merge":
        return {"merged": str(merge(ws, args["source"], args.get("base_model"), args.get("name"), progress))}
    if step == "convert":
        hf = Path(args["hf_dir"]).expanduser().resolve()
        name = file_slug(args.get("name") or model_stem(hf))
        outtypes = args.get("outtypes") or ["f16"]
        return {"gguf": str(convert(hf, ws.exports / name, outtypes[0], progress, stem=name))}
    if step == "quantize":
        if not args.get("quants"):
            raise BadInput("Give at least one quantization type (e.g. Q4_K_M).")
        return {"ggufs": [str(p) for p in quantize(args["gguf"], args["quants"], progress)]}
    hf, base = validation_sources(Path(args["gguf"]), args.get("hf"), args.get("base_model"))
    return validate(args["gguf"], hf, base, args.get("prompt"), progress).as_dict()


# ------------------------------------------------------------------------------------------ the studio's side


def queue(ws: Workspace) -> jobs.JobQueue:
    return jobs.JobQueue(jobs_dir(ws), "export", "export")


def status(ws: Workspace, job: str) -> jobs.JobStatus:
    """The job's status (NotFound for an unknown id)."""
    return queue(ws).status(job)


def list_jobs(ws: Workspace) -> list[jobs.JobStatus]:
    """Every job, newest first."""
    return queue(ws).list()


def active(ws: Workspace) -> jobs.JobStatus | None:
    """The running job, if any."""
    return queue(ws).active()


def start(ws: Workspace, step: str, args: dict) -> str:
    """Start one export step in its own process; returns the job id. Conflict while another job runs."""
    check_args(step, args)
    if ws.confined:  # a studio reachable from elsewhere: every path inside the workspace or the HF cache
        from ..models import resolve_source  # noqa: PLC0415

        args = dict(args)
        for key in ("source", "hf_dir", "gguf", "hf", "base_model"):
            if str(args.get(key) or "").strip():
                args[key] = str(resolve_source(str(args[key]), ws))
    if step in ("quantize", "validate"):  # they write beside the GGUF: only inside the workspace
        gguf = Path(str(args["gguf"])).expanduser().resolve()
        if ws.root not in gguf.parents:
            raise BadInput(f"{gguf} is outside the workspace ({ws.root}); {step} writes beside the GGUF, so pick one "
                           "under exports/ or models/.")
    label = jobs.slug(Path(str(args.get("name") or args[STEPS[step]])).name, step, 100)
    return queue(ws).start(label, {"step": step, "args": args, "root": str(ws.root)}, id_label=f"{step}-{label}",
                           step=step, args=args)


def cancel(ws: Workspace, job: str) -> jobs.JobStatus:
    """End a running job (it ends cancelled)."""
    return queue(ws).cancel(job)


def run_job(job: jobs.JobDir) -> int:
    """The export job's worker (`python -m pipelines.jobs --work exports/.jobs/<id>`)."""
    spec = job.spec()
    return jobs.run_reported(job, lambda rep: run_step(Workspace.open(spec["root"]), spec["step"], spec["args"],
                                                       rep.progress))
