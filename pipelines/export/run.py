"""A whole export into exports/<name>/ (merge, convert, quantize, Modelfiles, validate, export.json written last),
and the list of exports as their folders have them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from ..errors import BadInput, MacTunerError, NotFound
from ..progress import ProgressFn, no_progress
from ..runs import run_config as _run_config
from ..workspace import Workspace, human_bytes, sha256_file, write_json
from .adapter import LORA_FOLDER, export_lora
from .common import OUTTYPES, QUANT_TYPES, gguf_type, help_meta
from .convert import convert
from .families import translate
from .merge import merge, saved_chat_template, special_tokens
from .ollama import OLLAMA_FALLBACK, how_to_run, modelfile
from .plan import ExportPlan, ExportRequest, plan_export
from .quantize import quantize
from .validate import Validation, failed_checks, validate_gguf


@dataclass
class ExportResult:
    name: str = field(metadata=help_meta("Export folder name."))
    folder: str = field(metadata=help_meta("exports/<name>/"))
    merged: str | None = field(metadata=help_meta("The merged HF folder (None when the source was an HF folder)."))
    ggufs: list[str] = field(default_factory=list, metadata=help_meta("GGUF files written, float types first."))
    files: list[dict] = field(default_factory=list, metadata=help_meta("Every file: path, bytes, sha256."))
    validations: list[Validation] = field(default_factory=list, metadata=help_meta("One per GGUF when validated."))
    table: list[dict] = field(default_factory=list, metadata=help_meta("type, size, perplexity, delta_pct, tokens_per_s."))
    steps: list[dict] = field(default_factory=list, metadata=help_meta("step, seconds, detail."))
    how_to_run: dict = field(default_factory=dict, metadata=help_meta("Commands per GGUF for llama.cpp / Ollama / LM Studio."))
    lora: dict = field(default_factory=dict, metadata=help_meta(
        "The LoRA GGUF (lora-gguf/): base, lora, modelfile, validation, how_to_run - or skipped: the reason."))

    def as_dict(self) -> dict:
        return asdict(self)


def _train_prompt(ws: Workspace, run_dir: Path | None) -> list[dict] | None:
    """The first training conversation's turns up to its first assistant reply (user side only)."""
    cfg = _run_config(run_dir)
    if not cfg.get("dataset"):
        return None
    from ..training import dataset_dir, dataset_versions, read_rows  # noqa: PLC0415

    try:
        version = int(cfg.get("dataset_version") or 0) or max(dataset_versions(ws, cfg["dataset"]))
        rows = read_rows(dataset_dir(ws, cfg["dataset"], version) / "train.jsonl")
    except (MacTunerError, OSError, ValueError):
        return None
    for row in rows:
        msgs = row.get("messages") or []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > 0:
                return msgs[:i]
    return None


def export(ws: Workspace, req: ExportRequest, progress: ProgressFn = no_progress,
           free_fn: Callable[[Path], int] | None = None) -> ExportResult:
    """Everything into exports/<name>/: merged/ (when the source is an adapter), one GGUF per outtype, the quants of
    the first one, a Modelfile per GGUF, validations, and export.json (written last: an export without it is
    incomplete). Never touches an existing export (Conflict); every check runs first (plan_export)."""
    t_all = time.time()
    plan = plan_export(ws, req, free_fn)
    try:
        return _export_steps(ws, plan, req.validate, (req.system or "").strip() or None, t_all, progress)
    except BaseException as e:
        if plan.folder.is_dir():  # what was written stays (nothing is overwritten); the record says why it stopped
            write_json(plan.folder / "failed.json", {"error": str(e) or type(e).__name__, "type": type(e).__name__,
                                                     "when": datetime.now().isoformat(timespec="seconds")})
        raise


def _export_steps(ws: Workspace, plan: ExportPlan, validate: bool, system: str | None, t_all: float,
                  progress: ProgressFn) -> ExportResult:
    folder, name, src, adapter, base, run_dir = plan.folder, plan.name, plan.source, plan.adapter, plan.base, plan.run_dir
    is_hf, outtypes, quants, est = adapter is None, plan.outtypes, plan.quants, plan.estimate
    steps: list[dict] = []

    def sub(lo: float, hi: float) -> ProgressFn:
        return lambda f, m: progress(lo + (hi - lo) * max(0.0, min(1.0, f)), m)

    def step(label: str, t0: float, detail: str = "") -> None:
        steps.append({"step": label, "seconds": round(time.time() - t0, 2), "detail": detail})

    merged = None
    if not is_hf:
        t0 = time.time()
        merged = merge(ws, adapter, str(base), name, sub(0.0, 0.3))
        step("merge", t0, str(merged))
        hf_dir = merged
    else:
        folder.mkdir(parents=True)
        hf_dir = src
    ggufs: list[Path] = []
    for i, t in enumerate(outtypes):
        t0 = time.time()
        ggufs.append(convert(hf_dir, folder, t, sub(0.3 + 0.2 * i / len(outtypes), 0.3 + 0.2 * (i + 1) / len(outtypes)),
                             stem=name))
        step(f"convert {t}", t0, ggufs[-1].name)
    for i, q in enumerate(quants):
        t0 = time.time()
        (qf,) = quantize(ggufs[0], [q], sub(0.5 + 0.15 * i / len(quants), 0.5 + 0.15 * (i + 1) / len(quants)))
        step(f"quantize {q}", t0, qf.name)  # not tensor_types(qf): gguf's reader takes ~20 s on a 262k vocabulary
        ggufs.append(qf)
    t0 = time.time()
    tpl, specials = saved_chat_template(hf_dir), special_tokens(hf_dir)
    for g in ggufs:
        modelfile(g, tpl, system, bos_token=specials[0], eos_token=specials[1])
    translated = translate(tpl, *specials)
    step("Modelfiles", t0, f"template: {translated.label}" if translated.template else
         f"NO TEMPLATE: {translated.reason} ({OLLAMA_FALLBACK})")
    lora: dict = {}
    if plan.lora_gguf:
        t0 = time.time()
        lora = export_lora(folder, name, adapter, base, hf_dir, outtypes[0], tpl, system, sub(0.62, 0.65), specials)
        step("LoRA GGUF", t0, lora.get("skipped") or Path(lora["lora"]).name)
    validations: list[Validation] = []
    prompt = _train_prompt(ws, run_dir) if validate else None
    n_val = len(ggufs) + (1 if lora.get("lora") else 0)
    for i, g in enumerate(ggufs if validate else []):
        t0 = time.time()
        validations.append(validate_gguf(g, hf_dir, base, prompt,
                                          sub(0.65 + 0.33 * i / n_val, 0.65 + 0.33 * (i + 1) / n_val)))
        step(f"validate {gguf_type(g)}", t0, "ok" if validations[-1].ok else "problems")
    if validate and lora.get("lora"):
        t0 = time.time()
        val = validate_gguf(Path(lora["base"]), hf_dir, base, prompt, sub(0.98 - 0.33 / n_val, 0.98),
                             lora=Path(lora["lora"]), merged_gguf=ggufs[0])
        lora["validation"] = val.as_dict()
        step("validate LoRA", t0, "ok" if val.ok else "problems")
    if lora.get("lora"):
        lora["how_to_run"] = how_to_run(lora["lora"], lora["base"])
    table: list[dict] = []
    for v in validations:
        for row in v.table:
            if row.type == "HF (merged)" and table and table[0]["type"] == "HF (merged)":
                continue
            table.append(asdict(row))
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            files.append({"path": str(p.relative_to(folder)), "bytes": p.stat().st_size,
                          "sha256": sha256_file(p) if p.suffix in (".gguf", ".safetensors") else None})
    result = ExportResult(name=name, folder=str(folder), merged=str(merged) if merged else None,
                          ggufs=[str(g) for g in ggufs], files=files, validations=validations, table=table,
                          steps=steps, how_to_run={g.name: how_to_run(g) for g in ggufs}, lora=lora)
    manifest = {"name": name, "created": datetime.now().isoformat(timespec="seconds"), "source": str(src),
                "base_model": str(base) if base else None, "outtypes": outtypes, "quants": quants,
                "estimate": est, "seconds": round(time.time() - t_all, 2), **result.as_dict()}
    write_json(folder / "export.json", manifest)
    progress(1.0, f"Export '{name}' ready: {len(ggufs)} GGUF file(s)")
    return result


def finished_ggufs(folder: Path) -> list[Path]:
    """The finished GGUFs of a folder, float types first, then quantizations from large to small."""
    order = {t: i for i, t in enumerate((*OUTTYPES, *QUANT_TYPES))}
    return sorted(folder.glob("*.gguf"), key=lambda p: (order.get(gguf_type(p), 99), p.name))


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "export.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _validation_of(g: Path, manifest: dict | None) -> dict | None:
    """A GGUF's latest validation: <stem>.validation.json (a later `validate` rewrites it), else the manifest's."""
    try:
        return json.loads(g.with_name(f"{g.stem}.validation.json").read_text())
    except (OSError, json.JSONDecodeError):
        return next((v for v in (manifest or {}).get("validations", []) if Path(v.get("gguf", "")).name == g.name),
                    None)


def _gguf_row(g: Path, manifest: dict | None) -> dict:
    val = _validation_of(g, manifest)
    failed = failed_checks(val)
    return {"file": g.name, "type": gguf_type(g), "bytes": g.stat().st_size, "size": human_bytes(g.stat().st_size),
            "ok": (not failed) if val else None, "failed": failed}


def lora_row(folder: Path) -> dict | None:
    """The LoRA GGUF of an export (lora-gguf/<name>-lora.gguf) as export_details shows it: file, path, type "LoRA",
    base (the GGUF it applies on), size, latest validation, ok, failed checks, Modelfile, run commands; None when
    the export has none."""
    d = Path(folder) / LORA_FOLDER
    lora = next(iter(sorted(d.glob("*-lora.gguf"))), None) if d.is_dir() else None
    if lora is None:
        return None
    base = next((p for p in sorted(d.glob("*.gguf")) if p != lora), None)
    try:
        val = json.loads(lora.with_name(f"{lora.stem}.validation.json").read_text())
    except (OSError, json.JSONDecodeError):
        val = None
    failed = failed_checks(val)
    mf = lora.with_name(f"{lora.stem}.Modelfile")
    return {"file": lora.name, "path": str(lora), "type": "LoRA", "base": str(base) if base else None,
            "bytes": lora.stat().st_size, "size": human_bytes(lora.stat().st_size), "validation": val,
            "ok": (not failed) if val else None, "failed": failed,
            "modelfile": mf.read_text() if mf.is_file() else None,
            "how_to_run": how_to_run(lora, base) if base else None}


def problems_text(rows: list[dict]) -> str:
    """"1 check failed: fine-tune survived (Q4_K_M)" for GGUF rows (list_exports' "ggufs"); "" when none failed."""
    failed = [f"{label} ({r['type']})" for r in rows for label in r.get("failed", [])]
    if not failed:
        return ""
    return f"{len(failed)} check{'s' if len(failed) > 1 else ''} failed: " + ", ".join(failed)


def _export_row(d: Path, m: dict | None) -> dict:
    """The list_exports row of folder `d`, whose export.json is `m` (None when missing or unreadable)."""
    failed, why = None, None
    if not m and (d / "failed.json").is_file():
        try:
            why = json.loads((d / "failed.json").read_text())
            failed = why.get("error")
        except (OSError, json.JSONDecodeError):
            failed = "unreadable failed.json"
    state = "complete" if m else ("cancelled" if (why or {}).get("type") == "KeyboardInterrupt" else
                                  "failed" if failed else "incomplete")
    ggufs = [_gguf_row(g, m) for g in finished_ggufs(d)]
    lora = lora_row(d)
    files = ggufs + ([lora] if lora else [])  # the LoRA's checks count, but it is no model of its own to pick
    checked = [g for g in files if g["ok"] is not None]
    return {"name": d.name, "folder": str(d), "state": state, "error": failed,
            "created": (m or {}).get("created"), "base_model": (m or {}).get("base_model"),
            "ggufs": ggufs, "lora": lora, "table": (m or {}).get("table", []),
            "ok": all(g["ok"] for g in checked) if m and checked else None, "problems": problems_text(files)}


FAILED_MARK = {"fine-tune survived": "⚠ fine-tune lost"}


def gguf_label(name: str, failed: list[str]) -> str:
    """A GGUF's label in a picker: its file name, with "⚠ fine-tune lost" (or "⚠ <check> failed") when its
    validation failed a check."""
    if not failed:
        return name
    marks = [FAILED_MARK.get(f, f"⚠ {f} failed") for f in failed]
    return f"{name} · " + ", ".join(marks[:2]) + (f" (+{len(marks) - 2})" if len(marks) > 2 else "")


def gguf_choices(ws: Workspace, include_models: bool = True) -> list[tuple[str, str]]:
    """(label, path) of every GGUF in the workspace (exports, then models/ when include_models) for a picker: an
    exported GGUF whose validation failed a check is labelled so (gguf_label)."""
    out = []
    for r in list_exports(ws):
        out += [(gguf_label(g["file"], g["failed"]), str(Path(r["folder"]) / g["file"])) for g in r["ggufs"]]
    if include_models and ws.models.is_dir():
        out += [(p.name, str(p)) for p in sorted(ws.models.rglob("*.gguf")) if not p.name.startswith(".")]
    return out


def preferred_gguf(rows: list[dict]) -> dict | None:
    """The GGUF a picker preselects among one export's rows (float first, then large to small quants): the smallest
    one whose validation failed nothing, else the smallest."""
    return next((g for g in reversed(rows) if not g.get("failed")), rows[-1] if rows else None)


def list_exports(ws: Workspace) -> list[dict]:
    """One row per exports/<name>/: state complete | failed (with error) | cancelled | incomplete (in progress,
    made by single steps, or the process died), GGUFs with sizes and failed checks, the validation table, created,
    ok (no validated GGUF failed a check; None when none was validated), problems ("1 check failed: ...")."""
    if not ws.exports.is_dir():
        return []
    return [_export_row(d, _manifest(d))
            for d in sorted(p for p in ws.exports.iterdir() if p.is_dir() and not p.name.startswith("."))]


def export_details(ws: Workspace, name: str) -> dict:
    """One export as the folder has it now: its row in list_exports, the manifest's steps and source, and per GGUF
    (float types first) its size, type, latest validation (<stem>.validation.json), Modelfile and run commands;
    `lora` the LoRA GGUF (lora_row) or None; `table` joins the HF row and every GGUF's (and the LoRA's) perplexity
    row."""
    if not name or "/" in name or name.startswith("."):
        raise BadInput(f"'{name}' is not an export name.")
    folder = ws.exports / name
    if not folder.is_dir():
        raise NotFound(f"There is no export '{name}'.")
    man = _manifest(folder)
    row = _export_row(folder, man)
    man = man or {}
    ggufs, table = [], []
    for g in finished_ggufs(folder):
        val = _validation_of(g, man)
        mf = g.with_name(f"{g.stem}.Modelfile")
        failed = failed_checks(val)
        ggufs.append({"file": g.name, "path": str(g), "type": gguf_type(g), "bytes": g.stat().st_size,
                      "size": human_bytes(g.stat().st_size), "validation": val,
                      "ok": (not failed) if val else None, "failed": failed, "label": gguf_label(g.name, failed),
                      "modelfile": mf.read_text() if mf.is_file() else None, "how_to_run": how_to_run(g)})
        for r in (val or {}).get("table", []):
            if r["type"] == "HF (merged)" and any(t["type"] == r["type"] for t in table):
                continue
            table.append(r)
    if row["lora"]:
        table += [r for r in (row["lora"]["validation"] or {}).get("table", []) if r["type"] != "HF (merged)"]
    table.sort(key=lambda r: r["type"] != "HF (merged)")
    return {**row, "source": man.get("source"), "merged": man.get("merged"), "steps": man.get("steps", []),
            "lora_skipped": (man.get("lora") or {}).get("skipped"),
            "seconds": man.get("seconds"), "gguf_files": ggufs, "table": table}

def validation_sources(gguf_path: Path, hf_dir: str | None = None, base_dir: str | None = None) -> tuple:
    """(HF folder, base folder) to validate a GGUF against: the given ones, else those its export.json records
    (the merged folder or the converted HF source, and the adapter's base)."""
    man = _manifest(Path(gguf_path).resolve().parent) or {}
    hf = hf_dir or man.get("merged") or (man.get("source") if not man.get("base_model") else None)
    return (Path(hf) if hf else None), (Path(base_dir or man["base_model"]) if (base_dir or man.get("base_model"))
                                        else None)
