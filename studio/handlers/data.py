"""Data tab handlers: file → table → mapping → cleaning steps (undoable) → EDA → saved dataset version.

The work in progress of one browser tab lives in a `DataSession` kept in `gr.State` (two tabs never share it);
uploaded files are copied into the workspace (datasets/.uploads/) so they can be picked again later.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from pipelines import data
from pipelines.errors import BadInput
from pipelines.workspace import human_bytes

from .common import Context, _gr_progress, ui_errors

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SAMPLE = ASSETS / "sample_dataset.jsonl"
ROLES = ("prompt", "input", "response", "messages", "text", "system")
PREVIEW_ROWS = 20
_tok_lock = threading.Lock()
_counters: OrderedDict[str, data.TokenCounter] = OrderedDict()  # the last few tokenizers' counts (each caches)
MAX_COUNTERS = 2


@dataclass
class DataSession:
    """One browser tab's work in progress (gr.State deep-copies the empty one per tab)."""

    read: data.ReadResult | None = None
    cleaner: data.Cleaner | None = None
    mapping: data.Mapping | None = None


def uploads_dir(ctx: Context) -> Path:
    return ctx.ws.datasets / ".uploads"


def workspace_files(ctx: Context) -> list[str]:
    """Data files the user can pick: earlier uploads, then the bundled sample."""
    d = uploads_dir(ctx)
    files = sorted((str(p) for p in d.iterdir() if p.suffix.lower() in data.SUPPORTED), key=str.lower) if d.is_dir() else []
    return files + ([str(SAMPLE)] if SAMPLE.exists() else [])


def _keep_upload(ctx: Context, src: str) -> Path:
    """Copy an uploaded file into the workspace under its own name (never overwriting: name-2.csv, ...)."""
    d = uploads_dir(ctx)
    d.mkdir(parents=True, exist_ok=True)
    name = Path(src).name
    stem, suffix = Path(name).stem, Path(name).suffix
    target, n = d / name, 2
    while target.exists():
        target, n = d / f"{stem}-{n}{suffix}", n + 1
    tmp = d / f".{target.name}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return target


def tokenizer_counter(ctx: Context) -> data.TokenCounter | None:
    """The tokenizer of the current HF model, else the default model's (once its training copy is prepared)."""
    lm = ctx.registry.current()
    tok, key = None, None
    if lm is not None and lm.tokenizer is not None:
        tok, key = lm.tokenizer, f"loaded:{lm.model_path}"
    else:
        p = data.default_tokenizer_path(ctx.ws)
        if p is not None:
            key = str(p)
    if key is None:
        return None
    with _tok_lock:
        if key not in _counters:
            _counters[key] = data.TokenCounter(tok if tok is not None else data.load_tokenizer(key))
            while len(_counters) > MAX_COUNTERS:
                _counters.popitem(last=False)
        _counters.move_to_end(key)
        return _counters[key]


NO_TOKENIZER = ("Token counts need a tokenizer: load a Hugging Face model in the Model tab, or prepare the default "
                "model's training copy there (about a minute, once).")


def _info_md(s: DataSession) -> str:
    r = s.read
    if r is None:
        return "Upload a file or pick one to start."
    bits = [f"**{Path(r.path).name}** · {r.format.upper()}", f"{human_bytes(r.size_bytes)}"]
    if r.encoding:
        bits.append(f"encoding {r.encoding}")
    if r.delimiter:
        bits.append("delimiter `" + ("\\t" if r.delimiter == "\t" else r.delimiter) + "`")
    rows = len(s.cleaner.df) if s.cleaner else r.n_rows
    bits.append(f"**{rows:,} rows** × {r.n_cols} columns" + (f" (read {r.n_rows:,})" if rows != r.n_rows else ""))
    md = " · ".join(bits)
    if r.warnings:
        md += "\n\n" + "\n".join(f"⚠️ {w}" for w in r.warnings)
    return md


def _preview(s: DataSession) -> pd.DataFrame:
    if s.cleaner is None:
        return pd.DataFrame()
    df = s.cleaner.df.head(PREVIEW_ROWS).copy()
    for c in df.columns:  # keep the table readable; the full text is in the saved dataset
        df[c] = df[c].map(lambda v: v if not isinstance(v, str) or len(v) <= 300 else v[:300] + "…")
    return df.reset_index(names="row")


def _history_md(s: DataSession) -> str:
    if s.cleaner is None or not s.cleaner.steps:
        return "No cleaning steps yet."
    lines = [f"{i}. {st.report.text()}" for i, st in enumerate(s.cleaner.steps, 1)]
    return "**Cleaning steps** (undo removes the last one):\n\n" + "\n".join(lines)


def _mapping_updates(s: DataSession) -> list:
    cols = [""] + [str(c) for c in s.read.df.columns] if s.read is not None else [""]
    m = s.mapping or data.Mapping(format="alpaca")
    ups = [gr.update(value=m.format)]
    ups += [gr.update(choices=cols, value=getattr(m, r) or "") for r in ROLES]
    ups.append(gr.update(value=m.system_prompt))
    return ups


def _all(s: DataSession, message: str = "") -> tuple:
    """Everything the tab shows for a session: state, info, preview, mapping widgets, history, message."""
    return (s, _info_md(s), _preview(s), *_mapping_updates(s), _history_md(s), message)


@ui_errors
def open_file(ctx: Context, s: DataSession, upload: str | None, picked: str | None, max_mb: float = 500,
              progress=gr.Progress()):
    """Read an uploaded file (kept in the workspace) or a picked one; propose a mapping."""
    if upload:
        path = _keep_upload(ctx, upload)
    elif picked:
        path = Path(picked)
        allowed = {Path(p) for p in workspace_files(ctx)}
        if path not in allowed:
            raise BadInput("Pick a file from the list (earlier uploads in this workspace, or the sample).")
    else:
        raise BadInput("Upload a file (CSV, TSV, JSON, JSONL or Parquet) or pick one from the list.")
    read = data.read_table(path, max_bytes=int(max_mb * 1024 * 1024), progress=_gr_progress(progress))
    s = DataSession(read=read, cleaner=data.Cleaner(read.df), mapping=data.detect_mapping(read.df))
    msg = (f"Recognised the **{s.mapping.format}** shape; check the mapping below." if s.mapping else
           "No known shape recognised: choose the format and the columns below.")
    return _all(s, msg)


@ui_errors
def open_sample(ctx: Context, s: DataSession, progress=gr.Progress()):
    return open_file(ctx, s, None, str(SAMPLE), progress=progress)


def _need(s: DataSession) -> data.Cleaner:
    if s is None or s.cleaner is None:
        raise BadInput("Load a file first (upload one, pick one, or try the sample).")
    return s.cleaner


@ui_errors
def set_mapping(s: DataSession, fmt: str, prompt: str, input_: str, response: str, messages: str, text: str,
                system: str, system_prompt: str):
    """Apply the mapping the user chose; it is checked against the table's columns."""
    cl = _need(s)
    m = data.Mapping(format=fmt, prompt=prompt or None, input=input_ or None, response=response or None,
                     messages=messages or None, text=text or None, system=system or None,
                     system_prompt=system_prompt or "")
    data.validate_mapping(cl.df, m)
    s.mapping = m
    return s, f"Mapping set: **{fmt}** ({', '.join(f'{k} ← {v}' for k, v in m.columns().items())})."


def _mapped(s: DataSession) -> data.Mapping:
    if s.mapping is None:
        raise BadInput("Choose a format and its columns (Map step) first.")
    return s.mapping


def _apply(s: DataSession, step, **params) -> tuple:
    cl = _need(s)
    report = cl.apply(step, **params)
    return _all(s, report.text())


@ui_errors
def clean_missing(s: DataSession, columns: list[str], action: str, fill_value: str):
    cl = _need(s)
    cols = columns or (data.required_columns(s.mapping) if s.mapping else list(cl.df.columns))
    return _apply(s, data.handle_missing, columns=cols, action=action, fill_value=fill_value or "")


@ui_errors
def clean_duplicates(s: DataSession, columns: list[str], near: bool):
    return _apply(s, data.drop_duplicates, columns=columns or None, near=bool(near))


@ui_errors
def clean_normalize(s: DataSession):
    return _apply(s, data.normalize_text)


@ui_errors
def clean_length(ctx: Context, s: DataSession, min_tokens: int, max_tokens: int, train_max_length: int,
                 progress=gr.Progress()):
    m = _mapped(s)
    counter = tokenizer_counter(ctx)
    if counter is None:
        raise BadInput(NO_TOKENIZER)
    return _apply(s, data.filter_token_length, counter=counter, mapping=m, min_tokens=int(min_tokens),
                  max_tokens=int(max_tokens) or None, train_max_length=int(train_max_length) or None,
                  progress=_gr_progress(progress))


@ui_errors
def undo(s: DataSession):
    cl = _need(s)
    r = cl.undo()
    return _all(s, f"Undid: {r.name}." if r else "Nothing to undo.")


@ui_errors
def reset(s: DataSession):
    cl = _need(s)
    cl.reset()
    return _all(s, "Back to the file as read.")


@ui_errors
def explore(ctx: Context, s: DataSession, max_length: int, example: int, progress=gr.Progress()):
    """Column summary, token-length histogram and stats, turns and role balance, one example through the template."""
    cl = _need(s)
    m = _mapped(s)
    df = cl.df
    if df.empty:
        raise BadInput("The table has no rows left: undo a cleaning step.")
    summary = data.column_summary(df)
    dup_note = f"{len(df):,} rows · {data.duplicate_rows(df):,} exact duplicate rows"
    counter = tokenizer_counter(ctx)
    note = ""
    len_fig = stats = None
    if counter is not None:
        lengths = data.token_lengths(df, m, counter, progress=_gr_progress(progress))
        len_fig = data.token_length_figure(lengths, int(max_length) or None)
        stats = data.length_stats(lengths, int(max_length) or None).round(1).reset_index(names="")
    else:
        note = NO_TOKENIZER
    rows = data.to_rows(df.iloc[: max(1, int(example) + 1)], m)
    conversations = [r["messages"] for r in data.to_rows(df, m)] if m.format != "text" else []
    turns_fig = data.turns_figure(conversations) if conversations else None
    roles_fig = data.role_balance_figure(conversations) if conversations else None
    preview_html, preview_md = "", ""
    if counter is not None and counter.tokenizer is not None and hasattr(counter.tokenizer, "apply_chat_template"):
        i = min(int(example), len(rows) - 1)
        pv = data.preview_example(rows[i], counter.tokenizer)
        preview_html = PREVIEW_CSS + pv.html
        preview_md = (f"Row {i}: **{pv.trained_tokens}** tokens trained (highlighted), {pv.masked_tokens} masked · "
                      f"template: {pv.template}")
    return summary, len_fig, stats, turns_fig, roles_fig, preview_html, " · ".join(x for x in (dup_note, preview_md or note) if x)


PREVIEW_CSS = ("<style>.mt-preview{white-space:pre-wrap;font-family:monospace;font-size:13px;line-height:1.5}"
               ".mt-trained{background:#d9f2d9;color:#14501a}.mt-masked{color:#888}</style>")


DATASET_COLUMNS = ["name", "version", "train", "validation", "created", "source"]


def datasets_table(ctx: Context) -> pd.DataFrame:
    return pd.DataFrame(data.list_datasets(ctx.ws), columns=DATASET_COLUMNS)


@ui_errors
def save(ctx: Context, s: DataSession, name: str, val_ratio: float, seed: int, progress=gr.Progress()):
    cl = _need(s)
    m = _mapped(s)
    rows = data.to_rows(cl.df, m)
    v = data.save_dataset(ctx.ws, (name or "").strip(), rows, data.build_meta(s.read, m, cl), val_ratio=float(val_ratio),
                          seed=int(seed), progress=_gr_progress(progress))
    cl.mark_saved()
    return (f"Saved **{v.name} v{v.version}**: {len(v.train):,} train + {len(v.validation):,} validation rows "
            f"in `{v.path}`."), datasets_table(ctx)
