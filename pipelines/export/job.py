"""Export jobs: a whole export, or one of its steps, in a process of its own (a pipelines.jobs job), so it outlives
the browser tab and a refreshed page re-attaches to it. One runs at a time per workspace (each loads a model and
uses every core); `cancel` ends the job's process group, and since the export writes every file under a temporary
name, a cancelled or killed job leaves nothing that looks finished.

A job is a folder exports/.jobs/<id>/ (see pipelines.jobs): job.json {"kind": "export", "step", "args"}, log.txt, and

    status.json   {"state": running|complete|failed|cancelled, "step", "args", "label", "fraction", "message",
                   "pid", "create_time", "started", "ended", "error", "result"}

Steps and their args (the same as `mactuner export <step>`):

    run       ExportRequest fields (source, name, base_model, outtypes, quants, validate, system)
    merge     source, base_model, name          convert   hf_dir, outtypes, name
    quantize  gguf, quants                      validate  gguf, hf, base_model, prompt

    job = start(ws, "run", {"source": ..., "quants": ["Q8_0"]})
    status(ws, job)  -> dict (a dead process is reported as failed)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from .. import jobs
from ..errors import BadInput, Conflict, MacTunerError, NotFound
from ..workspace import Workspace, write_json
from .common import ProgressFn, _slug
from .convert import _model_stem, convert
from .merge import merge
from .plan import ExportRequest
from .quantize import quantize
from .run import export, validation_sources
from .validate import validate

STEPS = {"run": "source", "merge": "source", "convert": "hf_dir", "quantize": "gguf", "validate": "gguf"}
FINAL = ("complete", "failed", "cancelled")


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
        return {"name": r.name, "folder": r.folder, "merged": r.merged, "ggufs": r.ggufs, "table": r.table,
                "ok": all(v.ok for v in r.validations) if r.validations else None}
    if step == "merge":
        return {"merged": str(merge(ws, args["source"], args.get("base_model"), args.get("name"), progress))}
    if step == "convert":
        hf = Path(args["hf_dir"]).expanduser().resolve()
        name = _slug(args.get("name") or _model_stem(hf))
        outtypes = args.get("outtypes") or ["f16"]
        return {"gguf": str(convert(hf, ws.exports / name, outtypes[0], progress, stem=name))}
    if step == "quantize":
        if not args.get("quants"):
            raise BadInput("Give at least one quantization type (e.g. Q4_K_M).")
        return {"ggufs": [str(p) for p in quantize(args["gguf"], args["quants"], progress)]}
    hf, base = validation_sources(Path(args["gguf"]), args.get("hf"), args.get("base_model"))
    return validate(args["gguf"], hf, base, args.get("prompt"), progress).as_dict()


# ------------------------------------------------------------------------------------------ the studio's side


def _job(ws: Workspace, job: str) -> jobs.JobDir:
    if not job or "/" in job or "\\" in job or job.startswith("."):
        raise BadInput(f"'{job}' is not an export job id.")
    return jobs.JobDir(jobs_dir(ws) / job)


def _failed(job: jobs.JobDir):
    def fields(code: int | None) -> dict:
        tail = job.log_tail(3, 600).strip().splitlines()
        return {"state": "failed", "error": "the export process ended unexpectedly"
                + (f" (exit code {code})" if code else "") + (": " + " | ".join(tail) if tail else "")}
    return fields


def status(ws: Workspace, job: str) -> dict:
    """The job's status; a job whose process is gone while it says running becomes failed (with the log's end)."""
    j = _job(ws, job)
    if j.read() is None:
        raise NotFound(f"There is no export job '{job}'.")
    j.fail_if_dead(("running",), _failed(j))
    st = j.read() or {}
    st["id"] = job
    return st


def list_jobs(ws: Workspace) -> list[dict]:
    """Every job, newest first."""
    if not jobs_dir(ws).is_dir():
        return []
    out = [status(ws, d.name) for d in jobs_dir(ws).iterdir() if d.is_dir() and (d / "status.json").exists()]
    out.sort(key=lambda s: (s.get("started") or 0, s["id"]), reverse=True)
    return out


def active(ws: Workspace) -> dict | None:
    """The running job, if any."""
    return next((j for j in list_jobs(ws) if j.get("state") == "running"), None)


def start(ws: Workspace, step: str, args: dict) -> str:
    """Start one export step in its own process; returns the job id. Conflict while another job runs."""
    check_args(step, args)
    if step in ("quantize", "validate"):  # they write beside the GGUF: only inside the workspace
        gguf = Path(str(args["gguf"])).expanduser().resolve()
        if ws.root not in gguf.parents:
            raise BadInput(f"{gguf} is outside the workspace ({ws.root}); {step} writes beside the GGUF, so pick one "
                           "under exports/ or models/.")
    jobs_dir(ws).mkdir(parents=True, exist_ok=True)
    with jobs.file_lock(jobs_dir(ws) / ".lock"):
        running = active(ws)
        if running:
            raise Conflict(f"An export job is running ({running.get('step')} {running.get('label', '')}, "
                           f"{int(100 * (running.get('fraction') or 0))}%): wait for it or cancel it.")
        label = jobs.slug(Path(str(args.get("name") or args[STEPS[step]])).name, step, 120)
        job = f"{time.strftime('%Y%m%d-%H%M%S')}-{step}-{label}"[:120]
        while (jobs_dir(ws) / job).exists():
            job += "-2"
        j = jobs.JobDir(jobs_dir(ws) / job)
        j.path.mkdir(parents=True)
        write_json(j.spec_path, {"kind": "export", "step": step, "args": args, "root": str(ws.root)})
        j.update(step=step, args=args, label=label, fraction=0.0, message="starting…", error=None, result=None)
        jobs.start(j)
    return job


def cancel(ws: Workspace, job: str) -> dict:
    """End a running job's process group (SIGTERM: the job records itself as cancelled)."""
    st = status(ws, job)
    if st.get("state") != "running":
        return st
    j = _job(ws, job)
    j.signal(signal.SIGTERM)
    for _ in range(100):  # the job writes its end within a moment
        st = status(ws, job)
        if st.get("state") != "running":
            return st
        time.sleep(0.1)
    j.signal(signal.SIGKILL)
    return status(ws, job)


def wait(ws: Workspace, job: str, timeout: float = 3600.0, poll: float = 0.5):
    """Yield the job's status every `poll` seconds until it ends (the last one yielded is final)."""
    return jobs.wait(_job(ws, job), lambda: status(ws, job), lambda st: st.get("state") in FINAL, timeout, poll)


def log_tail(ws: Workspace, job: str, lines: int | None = None, max_bytes: int = 8000) -> str:
    return _job(ws, job).log_tail(lines, max_bytes)


# ------------------------------------------------------------------------------------------------ in the job


class Reporter:
    """The job process's side: `progress(fraction, message)` into status.json (at most every 0.3 s, always when the
    message changes), then `done(result)` or `failed(error)`. SIGTERM becomes KeyboardInterrupt (→ cancelled)."""

    def __init__(self, job: jobs.JobDir):
        self.job = job
        self._last = (0.0, None)
        signal.signal(signal.SIGTERM, self._term)

    @staticmethod
    def _term(_sig, _frame):
        raise KeyboardInterrupt("cancelled")

    def progress(self, fraction: float, message: str) -> None:
        now = time.time()
        if message != self._last[1] or now - self._last[0] > 0.3:
            self._last = (now, message)
            self.job.update(fraction=round(max(0.0, min(1.0, float(fraction))), 4), message=message)

    def done(self, result) -> None:
        self.job.update(state="complete", fraction=1.0, message="done", result=result, ended=time.time())

    def failed(self, error: str, cancelled: bool = False) -> None:
        self.job.update(state="cancelled" if cancelled else "failed", error=error, ended=time.time())


def run_job(job: jobs.JobDir) -> int:
    """The export job's process (`python -m pipelines.jobs exports/.jobs/<id>`)."""
    import traceback  # noqa: PLC0415

    spec = job.spec()
    rep = Reporter(job)
    try:
        rep.done(run_step(Workspace.open(spec["root"]), spec["step"], spec["args"], rep.progress))
    except KeyboardInterrupt:
        rep.failed("cancelled", cancelled=True)
        return 130
    except MacTunerError as e:
        print(f"failed: {e.message}", flush=True)
        rep.failed(e.message)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: the traceback goes to the job's log, the status says so
        traceback.print_exc()
        rep.failed(f"unexpected error ({type(e).__name__}: {e}); the job's log has the details")
        return 1
    return 0
