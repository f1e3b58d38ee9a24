"""Data tab handlers: file → table → mapping → row check → cleaning steps (undoable) → EDA → saved dataset version.

The work in progress of one browser tab lives in a `DataSession` kept in `gr.State` (two tabs never share it);
uploaded files are copied into the workspace (datasets/.uploads/, one copy per content) so they can be picked again
later. In the browser a refused action leaves the tab as it was, with one message (`keep_last_good`); through the
API it is an error.

`DataHandlers(ctx, max_upload_mb)`: the tab wires its bound methods. Actions that change the table return a
`DataView` (every output of the panel, by name).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from pipelines import data
from pipelines.errors import BadInput, MacTunerError
from pipelines.training.encode import check_tool_format
from pipelines.workspace import human_bytes, sha256_file

from .common import Context, gr_progress, keep_last_good

data_errors = (MacTunerError,)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
SAMPLE = ASSETS / "sample_dataset.jsonl"
ROLES = ("prompt", "input", "response", "messages", "text", "system", "chosen", "rejected", "label", "tools")
SAVE_AS = ("preference pairs (for preference training)", "the chosen answers as SFT conversations")
TEXT_MODES = {"auto": "auto (blocks when there are several)", "blocks": "one example per blank-line block",
              "document": "the whole file as one document"}
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
    _conv: tuple | None = None  # (id of the table, mapping, Conversion): converted once per table and mapping

    def conversion(self) -> data.Conversion | None:
        """Every row of the current table under the current mapping (None without one); BadInput if unusable."""
        if self.cleaner is None or self.mapping is None:
            return None
        df = self.cleaner.df
        if self._conv is None or self._conv[0] is not df or self._conv[1] != self.mapping:
            self._conv = (df, self.mapping, data.convert(df, self.mapping))
        return self._conv[2]

    def __deepcopy__(self, memo):  # gr.State copies the empty session per tab; a loaded one is not shared
        return DataSession(self.read, self.cleaner, self.mapping)


def uploads_dir(ctx: Context) -> Path:
    return ctx.ws.datasets / ".uploads"


def workspace_files(ctx: Context) -> list[str]:
    """Data files the user can pick: earlier uploads, then the bundled sample."""
    d = uploads_dir(ctx)
    files = sorted((str(p) for p in d.iterdir() if p.suffix.lower() in data.SUPPORTED), key=str.lower) if d.is_dir() else []
    return files + ([str(SAMPLE)] if SAMPLE.exists() else [])


def _keep_upload(ctx: Context, src: str) -> Path:
    """Copy an uploaded file into the workspace under its own name (never overwriting: name-2.csv, ...); a file
    with the same content uploaded before is reused instead of copied again."""
    d = uploads_dir(ctx)
    d.mkdir(parents=True, exist_ok=True)
    size, digest = os.path.getsize(src), None
    for old in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
        if old.stat().st_size == size and (digest := digest or sha256_file(Path(src))) == sha256_file(old):
            return old
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
    loaded_tok = getattr(lm.backend, "tokenizer", None) if lm is not None else None  # a backend with an HF tokenizer
    if loaded_tok is not None:
        tok, key = loaded_tok, f"loaded:{lm.model_path}"
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


def check_md(ctx: Context, s: DataSession) -> str:
    """What the mapping makes of every row: kind, usable rows, each reason for leaving rows out (with row numbers
    as the table numbers them), labels, placeholders, tool calls and whether the current model can learn them."""
    try:
        conv = s.conversion()
    except data_errors as e:
        return f"⚠️ {e.message}"
    if conv is None:
        return "Choose a mapping to see which rows can be used."
    lines = [f"**Rows:** {conv.summary()}."]
    if conv.kind == "preference":
        lines.append("ℹ️ This is **preference data** (a chosen and a rejected answer per prompt). Save it as "
                     "preference pairs for preference training (DPO/ORPO), or keep only the chosen answers as "
                     "conversations for supervised fine-tuning (choose under Save).")
    if conv.kind == "kto":
        lines.append("ℹ️ Rows labelled undesirable are kept with their label; supervised fine-tuning never trains "
                     "on them as targets.")
    if conv.placeholders:
        lines.append("⚠️ Template placeholders such as " + ", ".join(f"`{{{{{k}}}}}`" for k in conv.placeholders)
                     + " are in the answers: fill them in under Save, or they will be trained literally.")
    if conv.tool_rows:
        counter = tokenizer_counter(ctx)
        tok = getattr(counter, "tokenizer", None)
        verdict = "load the model to train to check its chat template"
        if tok is not None and hasattr(tok, "apply_chat_template"):
            try:
                check_tool_format(tok)
                verdict = "the current model's chat template writes them in its tool format"
            except BadInput:
                verdict = ("**the current model's chat template has no tool format: training it on these rows is "
                           "refused** (choose a model whose template supports tools)")
        lines.append(f"ℹ️ {conv.tool_rows:,} rows have tool calls or tools; {verdict}.")
    return "\n\n".join(lines)


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


# Every output of the panel an action on the table changes, by name: the session, the file's line and preview, the
# mapping (format, one column picker per role, system prompt), the row check, the save options, the cleaning
# history and the action's message.
DataView = NamedTuple("DataView", [("session", DataSession), ("info", str), ("table", pd.DataFrame), ("format", Any),
                                   *[(role, Any) for role in ROLES], ("system_prompt", Any), ("check", str),
                                   ("save_as", Any), ("placeholders", Any), ("history", str), ("message", str)])


class ExploreView(NamedTuple):
    summary: pd.DataFrame  # one row per column
    lengths: Any  # the token-length histogram (None without a tokenizer)
    stats: pd.DataFrame | None
    turns: Any  # turns per conversation
    roles: Any  # role balance
    preview: str  # html: one example through the chat template, trained tokens highlighted
    note: str  # rows, duplicates, and what the preview shows (or why there is none)


class SaveView(NamedTuple):
    message: str
    datasets: pd.DataFrame


class ColumnsView(NamedTuple):
    """The pickers that list the table's columns, and the workspace's files (an upload joins them)."""

    missing: Any
    duplicates: Any
    files: Any


class PageLoad(NamedTuple):
    files: Any
    datasets: pd.DataFrame


def _save_updates(s: DataSession) -> tuple:
    """The Save options that apply: 'save as' for preference data, the placeholder values when there are some."""
    try:
        conv = s.conversion()
    except data_errors:
        conv = None
    pref = conv is not None and conv.kind == "preference"
    holders = sorted(conv.placeholders) if conv is not None else []
    return gr.update(visible=pref), gr.update(visible=bool(holders), placeholder=", ".join(
        f"{k}=…" for k in holders) or "name=value")


def data_view(ctx: Context, s: DataSession, message: str = "") -> DataView:
    """Everything the panel shows for a session."""
    cols = [""] + [str(c) for c in s.read.df.columns] if s.read is not None else [""]
    m = s.mapping or data.Mapping(format="alpaca")
    save_as, placeholders = _save_updates(s)
    return DataView(session=s, info=_info_md(s), table=_preview(s), format=gr.update(value=m.format),
                    **{r: gr.update(choices=cols, value=getattr(m, r) or "") for r in ROLES},
                    system_prompt=gr.update(value=m.system_prompt), check=check_md(ctx, s), save_as=save_as,
                    placeholders=placeholders, history=_history_md(s), message=message)


def _need(s: DataSession) -> data.Cleaner:
    if s is None or s.cleaner is None:
        raise BadInput("Load a file first (upload one, pick one, or try the sample).")
    return s.cleaner


def _mapped(s: DataSession) -> data.Mapping:
    if s.mapping is None:
        raise BadInput("Choose a format and its columns (Map step) first.")
    return s.mapping


def _example(conv: data.Conversion, df: pd.DataFrame, example: int) -> tuple[dict, str]:
    """The saved row made from table row `example` (numbered as the table shows them), else why there is none."""
    labels = list(df.index)
    if example not in labels:
        return None, f"There is no row {example} (rows {labels[0]}–{labels[-1]}; cleaning may have removed it)."
    row = conv.per_row[labels.index(example)]
    if row is None:
        why = next((w for w, rows in conv.dropped.items() if example in rows), "cannot be used")
        return None, f"Row {example} is left out: it is one of the rows that {why}."
    return row, ""


PREVIEW_CSS = ("<style>.mt-preview{white-space:pre-wrap;font-family:monospace;font-size:13px;line-height:1.5}"
               ".mt-trained{background:#d9f2d9;color:#14501a}.mt-masked{color:#888}</style>")


DATASET_COLUMNS = ["name", "version", "kind", "train", "validation", "created", "source"]


def datasets_table(ctx: Context) -> pd.DataFrame:
    return pd.DataFrame(data.list_datasets(ctx.ws), columns=DATASET_COLUMNS)


class DataHandlers:
    """The Data tab's events, for one workspace (`ctx`) and upload limit (`max_upload_mb`)."""

    def __init__(self, ctx: Context, max_upload_mb: float = 500):
        self.ctx = ctx
        self.max_upload_mb = max_upload_mb

    def _open(self, path: Path, encoding: str, text_mode: str, progress, header: bool = True,
              max_mb: float | None = None) -> DataView:
        read = data.read_table(path, max_bytes=int((max_mb or self.max_upload_mb) * 1024 * 1024),
                               progress=gr_progress(progress), encoding=encoding or None,
                               text_mode=text_mode or "auto", header=header is not False)
        s = DataSession(read=read, cleaner=data.Cleaner(read.df), mapping=data.detect_mapping(read.df))
        s.conversion()  # refused here (images, audio...), before the tab shows the file as usable
        if s.mapping is None:
            msg = "No known shape recognised: choose the format and the columns below."
        else:
            kind = data.KINDS[s.mapping.kind]
            msg = f"Recognised the **{s.mapping.format}** shape ({kind}); check the mapping and the row check below."
        return data_view(self.ctx, s, msg)

    @keep_last_good(DataView)
    def open_file(self, s: DataSession, upload: str | None, picked: str | None, encoding: str = "auto",
                  text_mode: str = "auto", header: bool = True, progress=gr.Progress(),
                  request: gr.Request = None) -> DataView:
        """Read an uploaded file (kept in the workspace) or a picked one; propose a mapping and check its rows."""
        if upload:
            path = _keep_upload(self.ctx, upload)
        elif picked:
            path = Path(picked)
            allowed = {Path(p) for p in workspace_files(self.ctx)}
            if path not in allowed:
                raise BadInput("Pick a file from the list (earlier uploads in this workspace, or the sample).")
        else:
            raise BadInput("Upload a file (CSV, TSV, JSON, JSONL, Parquet, Excel or text) or pick one from the list.")
        return self._open(path, encoding, text_mode, progress, header)

    def open_upload(self, s: DataSession, upload: str | None, encoding: str = "auto", text_mode: str = "auto",
                    header: bool = True, progress=gr.Progress(), request: gr.Request = None) -> DataView:
        """A file dropped on the upload box: read it at once (the picked file plays no part)."""
        return self.open_file(s, upload, None, encoding, text_mode, header, progress, request)

    @keep_last_good(DataView)
    def open_sample(self, s: DataSession, progress=gr.Progress(), request: gr.Request = None) -> DataView:
        return self._open(SAMPLE, "auto", "auto", progress, max_mb=500)

    @keep_last_good(DataView)
    def set_mapping(self, s: DataSession, fmt: str, prompt: str, input_: str, response: str, messages: str,
                    text: str, system: str, chosen: str, rejected: str, label: str, tools: str, system_prompt: str,
                    request: gr.Request = None) -> DataView:
        """Apply the mapping the user chose; it is checked against the table's columns, and every row is
        converted."""
        cl = _need(s)
        m = data.Mapping(format=fmt, prompt=prompt or None, input=input_ or None, response=response or None,
                         messages=messages or None, text=text or None, system=system or None, chosen=chosen or None,
                         rejected=rejected or None, label=label or None, tools=tools or None,
                         system_prompt=system_prompt or "")
        data.validate_mapping(cl.df, m)
        data.convert(cl.df, m)  # refused before it is kept
        s = DataSession(s.read, cl, m)
        return data_view(self.ctx, s, f"Mapping set: **{fmt}** "
                                      f"({', '.join(f'{k} ← {v}' for k, v in m.columns().items())}).")

    def _apply(self, s: DataSession, step, **params) -> DataView:
        report = _need(s).apply(step, **params)
        return data_view(self.ctx, s, report.text())

    @keep_last_good(DataView)
    def clean_missing(self, s: DataSession, columns: list[str], action: str, fill_value: str,
                      request: gr.Request = None) -> DataView:
        cl = _need(s)
        cols = columns or (data.required_columns(s.mapping) if s.mapping else list(cl.df.columns))
        return self._apply(s, data.handle_missing, columns=cols, action=action, fill_value=fill_value or "")

    @keep_last_good(DataView)
    def clean_duplicates(self, s: DataSession, columns: list[str], near: bool,
                         request: gr.Request = None) -> DataView:
        return self._apply(s, data.drop_duplicates, columns=columns or None, near=bool(near))

    @keep_last_good(DataView)
    def clean_normalize(self, s: DataSession, request: gr.Request = None) -> DataView:
        return self._apply(s, data.normalize_text)

    @keep_last_good(DataView)
    def clean_length(self, s: DataSession, min_tokens: int, max_tokens: int, train_max_length: int,
                     progress=gr.Progress(), request: gr.Request = None) -> DataView:
        m = _mapped(s)
        counter = tokenizer_counter(self.ctx)
        if counter is None:
            raise BadInput(NO_TOKENIZER)
        return self._apply(s, data.filter_token_length, counter=counter, mapping=m, min_tokens=int(min_tokens),
                           max_tokens=int(max_tokens) or None, train_max_length=int(train_max_length) or None,
                           progress=gr_progress(progress))

    @keep_last_good(DataView)
    def undo(self, s: DataSession, request: gr.Request = None) -> DataView:
        r = _need(s).undo()
        return data_view(self.ctx, s, f"Undid: {r.name}." if r else "Nothing to undo.")

    @keep_last_good(DataView)
    def reset(self, s: DataSession, request: gr.Request = None) -> DataView:
        _need(s).reset()
        return data_view(self.ctx, s, "Back to the file as read.")

    def columns(self, s: DataSession) -> ColumnsView:
        cols = [str(c) for c in s.read.df.columns] if s and s.read is not None else []
        return ColumnsView(gr.update(choices=cols, value=[]), gr.update(choices=cols, value=[]),
                           gr.update(choices=workspace_files(self.ctx)))

    def on_load(self) -> PageLoad:
        """A fresh page lists the uploads and datasets made since the app was built."""
        return PageLoad(gr.update(choices=workspace_files(self.ctx)), datasets_table(self.ctx))

    @keep_last_good(ExploreView, message="note")
    def explore(self, s: DataSession, max_length: int, example: int, progress=gr.Progress(),
                request: gr.Request = None) -> ExploreView:
        """Column summary, token-length histogram and stats, turns and role balance, one example through the template."""
        cl = _need(s)
        m = _mapped(s)
        df = cl.df
        if df.empty:
            raise BadInput("The table has no rows left: undo a cleaning step.")
        conv = s.conversion()
        summary = data.column_summary(df)
        dup_note = f"{len(df):,} rows ({len(conv.rows):,} usable) · {data.duplicate_rows(df):,} exact duplicate rows"
        counter = tokenizer_counter(self.ctx)
        note = ""
        len_fig = stats = None
        if counter is not None:
            lengths = data.token_lengths(df, m, counter, progress=gr_progress(progress))
            len_fig = data.token_length_figure(lengths, int(max_length) or None)
            stats = data.length_stats(lengths, int(max_length) or None).round(1).reset_index(names="")
        else:
            note = NO_TOKENIZER
        conversations = [] if conv.kind == "text" else [
            r["prompt"] + r["chosen"] if "chosen" in r else r["messages"] for r in conv.rows]
        turns_fig = data.turns_figure(conversations) if conversations else None
        roles_fig = data.role_balance_figure(conversations) if conversations else None
        preview_html, preview_md = "", ""
        row, why = _example(conv, df, int(example or 0))
        if row is None:
            preview_md = why
        elif counter is not None and counter.tokenizer is not None and hasattr(counter.tokenizer, "apply_chat_template"):
            try:
                pv = data.preview_example(row, counter.tokenizer)
            except BadInput as e:  # the template refuses this row, or its replies cannot be found: say why, keep the EDA
                preview_md = f"⚠️ Row {int(example or 0)} cannot be previewed: {e.message}"
            else:
                preview_html = PREVIEW_CSS + pv.html
                extra = (" · preference pair: the prompt and the chosen answer" if "chosen" in row else
                         " · labelled undesirable: never trained" if row.get("label") is False else "")
                preview_md = (f"Row {int(example or 0)}: **{pv.trained_tokens}** tokens trained (highlighted), "
                              f"{pv.masked_tokens} masked · template: {pv.template}{extra}")
        return ExploreView(summary, len_fig, stats, turns_fig, roles_fig, preview_html,
                           " · ".join(x for x in (dup_note, preview_md or note) if x))

    @keep_last_good(SaveView)
    def save(self, s: DataSession, name: str, val_ratio: float, seed: int, save_as: str = SAVE_AS[0],
             placeholders: str = "", progress=gr.Progress(), request: gr.Request = None) -> SaveView:
        """Save the usable rows as the next version of `name`: preference data as pairs or as its chosen answers,
        placeholders filled with the values given; the rows left out and why are in the message and the metadata."""
        cl = _need(s)
        m = _mapped(s)
        conv = s.conversion()
        if not conv.rows:
            raise BadInput(f"Nothing to save: none of the rows can be used ({conv.summary()}). Check the mapping.")
        rows, kind = conv.rows, conv.kind
        if kind == "preference" and save_as == SAVE_AS[1]:
            rows, kind = data.chosen_as_sft(rows), "sft"
        values = data.parse_placeholder_values(placeholders)
        rows = data.fill_placeholders(rows, values)
        unfilled = sorted(set(conv.placeholders) - set(values))
        meta = data.build_meta(s.read, m, cl, conv, kind=kind, placeholders_filled=values,
                               placeholders_unfilled=unfilled)
        v = data.save_dataset(self.ctx.ws, (name or "").strip(), rows, meta, val_ratio=float(val_ratio), seed=int(seed),
                              progress=gr_progress(progress))
        cl.mark_saved()
        msg = (f"Saved **{v.name} v{v.version}** ({data.KINDS[kind]}): {len(v.train):,} train + {len(v.validation):,} "
               f"validation rows in `{v.path}`.")
        if conv.dropped:
            msg += f" ⚠️ {conv.n_dropped:,} of {conv.total:,} rows were left out (see the row check; recorded in meta.json)."
        if unfilled:
            msg += " ⚠️ Placeholders " + ", ".join(f"{{{{{k}}}}}" for k in unfilled) + " were saved as written."
        if kind == "preference":
            msg += " It is preference data: supervised fine-tuning does not train on it."
        return SaveView(msg, datasets_table(self.ctx))
