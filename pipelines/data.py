"""Data stage: read a table, map it to chat `messages`, clean it step by step (with undo), describe it (EDA as plotly
figures), preview one example through the chat template, and save named, versioned datasets in the workspace.

No gradio here; the Data tab calls these functions. From a notebook:

    from pipelines import data
    from pipelines.workspace import Workspace
    ws = Workspace.open()
    res = data.read_table("assets/sample_dataset.jsonl")          # ReadResult: df (text cells), warnings, sha256
    mapping = data.detect_mapping(res.df)                           # Mapping(format="alpaca", ...) or None
    counter = data.TokenCounter(data.load_tokenizer(data.default_tokenizer_path(ws)))
    cl = data.Cleaner(res.df)
    cl.apply(data.handle_missing, columns=data.required_columns(mapping))
    cl.apply(data.drop_duplicates, near=True)
    cl.apply(data.normalize_text)
    cl.apply(data.filter_token_length, counter=counter, mapping=mapping, max_tokens=2048, train_max_length=1024)
    lengths = data.token_lengths(cl.df, mapping, counter)          # the counts are cached: no second tokenization
    fig = data.token_length_figure(lengths, max_length=1024)
    saved = data.save_dataset(ws, "my-set", data.to_rows(cl.df, mapping), data.build_meta(res, mapping, cl))

Conventions
- Every cell is text (pandas `str` dtype, NaN for missing). Lists/objects found in JSON/Parquet become JSON text;
  `to_messages` parses `messages`/`conversations` cells back. Nothing is evaluated: a spreadsheet formula such as
  `=cmd|' /C calc'!A0` stays a string (a warning notes it).
- Chat shape: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`. The `text` format (plain text, for
  continued pre-training) is stored as `{"text": ...}` rows instead of `{"messages": [...]}`.
- Token lengths count the *content* of the turns (prompt = system + user turns, response = assistant turns, total =
  the sum); a chat template adds a few tokens per turn on top.
- Long functions take `progress(fraction, message)`.

Chat templates are rendered by transformers' `apply_chat_template`, which compiles them in jinja2's
`ImmutableSandboxedEnvironment` (transformers.utils.chat_template_utils._compile_jinja_template; pinned by a test).
The trained-token mask is computed by rendering the conversation prefix up to each assistant turn and comparing
character offsets (works with every template, `{% generation %}` or not); see `preview_example`.

Versions live in <workspace>/datasets/<name>/v<N>/{train.jsonl, validation.jsonl, meta.json}, written into a temp
folder renamed when complete; a save never overwrites, it takes the next version number.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import BadInput, Conflict, NotFound
from .workspace import Workspace, atomic_dir, human_bytes

ProgressFn = Callable[[float, str], None]  # (fraction 0..1, message)
MAX_BYTES = 500 * 1024 * 1024
LONG_CELL_CHARS = 100_000
SUPPORTED = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
DELIMITERS = ",;\t|"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Patterns written without \s, \w or \u escapes (literal characters instead) so that pandas runs them in pyarrow's
# RE2 engine instead of falling back to Python's re, cell by cell (~10x slower).
_WS = "[ \t\n\r\f\v]"
_FORMULA_RE = f"^{_WS}*(?:[=@]|[+\\-][A-Za-z0-9_.]*[(!|])"  # =..., @..., +cmd|..., -SUM(: spreadsheet formula-like
_CONTROL_RE = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]"  # control characters but \t \n (\r: see _normalize)
_USPACE_RE = "[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]"  # unicode spaces -> plain space
# Used when a tokenizer has no chat template of its own (ChatML markup, rendered through the same sandbox).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PREVIEW_CSS = (".mt-preview{white-space:pre-wrap;font-family:monospace;line-height:1.6}"
               ".mt-trained{background:#c8f7c5}.mt-masked{background:#eee;color:#777}")


def _noop(_f: float, _m: str) -> None:
    pass


# ============================================================================================================ read


@dataclass
class ReadResult:
    df: pd.DataFrame = field(metadata={"help": "the table; every cell is text (NaN = missing)"})
    path: str = field(metadata={"help": "the file that was read"})
    format: str = field(metadata={"help": "csv | tsv | json | jsonl | parquet"})
    encoding: str | None = field(metadata={"help": "utf-8, utf-8-sig, utf-16 or latin-1 (None for Parquet)"})
    delimiter: str | None = field(metadata={"help": "CSV/TSV delimiter that was detected"})
    sha256: str = field(metadata={"help": "sha256 of the file's bytes"})
    size_bytes: int = field(metadata={"help": "file size"})
    warnings: list[str] = field(default_factory=list, metadata={"help": "things the user should look at"})

    @property
    def n_rows(self) -> int:
        return len(self.df)

    @property
    def n_cols(self) -> int:
        return self.df.shape[1]

    def meta(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "encoding": self.encoding,
                "delimiter": self.delimiter, "rows": self.n_rows, "cols": self.n_cols, "size_bytes": self.size_bytes}


def read_table(path: str | os.PathLike, max_bytes: int = MAX_BYTES, progress: ProgressFn = _noop) -> ReadResult:
    """Read CSV/TSV/JSON/JSONL/Parquet into a text-only DataFrame; BadInput (one plain line) for anything unusable."""
    p = Path(path)
    kind = SUPPORTED.get(p.suffix.lower())
    if kind is None:
        raise BadInput(f"Unsupported file type '{p.suffix or p.name}'. Use one of: {', '.join(sorted(SUPPORTED))}.")
    if not p.is_file():
        raise NotFound(f"No file at {p}.")
    size = p.stat().st_size
    if size > max_bytes:
        raise BadInput(f"{p.name} is {human_bytes(size)}, over the {human_bytes(max_bytes)} limit.")
    if size == 0:
        raise BadInput(f"{p.name} is empty.")
    progress(0.0, f"Reading {p.name} ({human_bytes(size)})...")
    raw = p.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    warnings: list[str] = []
    encoding = delimiter = None
    if kind == "parquet":
        progress(0.3, "Parsing Parquet...")
        df = _read_parquet(raw, p.name, warnings)
    else:
        encoding = _detect_encoding(raw, p.name, warnings)
        sample = _text_sample(raw, encoding)
        if not sample.strip() and not raw.decode(encoding).strip():
            raise BadInput(f"{p.name} is empty (only whitespace).")
        progress(0.3, f"Parsing {kind.upper()}...")
        if kind in ("csv", "tsv"):
            delimiter = _sniff_delimiter(sample, kind)
            df = _read_csv(raw, encoding, delimiter, p.name)
        elif kind == "json":
            df = _columns_to_df(_parse_json(raw.decode(encoding), p.name, warnings), warnings)
        else:
            df = _columns_to_df(_parse_jsonl(raw.decode(encoding), p.name), warnings)
    if df.shape[1] == 0:
        raise BadInput(f"{p.name} has no columns.")
    if len(df) == 0:
        raise BadInput(f"{p.name} has a header ({', '.join(map(str, df.columns))}) but no data rows.")
    progress(0.8, "Checking cells...")
    _cell_warnings(df, warnings)
    progress(1.0, f"Read {len(df):,} rows x {df.shape[1]} columns")
    return ReadResult(df, str(p), kind, encoding, delimiter, sha, size, warnings)


def _first_bad_utf8(raw: bytes | memoryview, step: int = 1 << 24) -> int | None:
    """Offset of the first byte that is not valid UTF-8, or None; checked in chunks to keep memory flat."""
    view, pos = memoryview(raw), 0
    while pos < len(raw):
        end = min(len(raw), pos + step)
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # cut between characters, not inside one
            end += 1
        try:
            str(view[pos:end], "utf-8")
        except UnicodeDecodeError as e:
            return pos + e.start
        pos = end
    return None


def _detect_encoding(raw: bytes, name: str, warnings: list[str]) -> str:
    """utf-16 (BOM), utf-8-sig (BOM), utf-8, else latin-1 with a warning; BadInput for binary files."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            raw.decode("utf-16")
        except UnicodeDecodeError:
            raise BadInput(f"{name} starts with a UTF-16 byte-order mark but is not valid UTF-16.") from None
        enc = "utf-16"
    else:
        if b"\x00" in raw:
            raise BadInput(f"{name} is not a text file (it contains NUL bytes: a binary file, maybe a spreadsheet "
                           "or an archive renamed). Export it as CSV/JSON text first.")
        bom = raw.startswith(b"\xef\xbb\xbf")
        bad = _first_bad_utf8(memoryview(raw)[3:] if bom else raw)
        enc = "utf-8-sig" if bom else "utf-8"
        if bad is not None:
            enc = "latin-1"
            warnings.append(f"The file is not valid UTF-8 (first bad byte at offset {bad + 3 * bom}); it was read as "
                            "Latin-1. Check accented characters in the preview, or re-save the file as UTF-8.")
    sample = _text_sample(raw, enc)
    controls = sum(1 for ch in sample if ch < " " and ch not in "\t\n\r\f\v" or "\x7f" <= ch <= "\x9f")
    if "\x00" in sample or controls > 0.05 * len(sample):
        raise BadInput(f"{name} does not look like text (many control characters): a binary file renamed?")
    return enc


def _text_sample(raw: bytes, encoding: str, size: int = 65536) -> str:
    """The first lines of the file (whole lines when the file is longer than the sample)."""
    text = raw[:size].decode(encoding, errors="ignore")
    if len(raw) > size and "\n" in text:
        text = text[: text.rindex("\n")]
    return text


def _sniff_delimiter(sample: str, kind: str) -> str:
    """csv.Sniffer on the sample (delimiters , ; tab |), kept only if the header has it; else the most frequent
    candidate in the header; else tab for .tsv and comma for .csv (a one-column file)."""
    header = sample.split("\n", 1)[0]
    try:
        delim = csv.Sniffer().sniff(sample[:32768], delimiters=DELIMITERS).delimiter
        if delim in header:
            return delim
    except csv.Error:
        pass
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ("\t" if kind == "tsv" else ",")


def _read_csv(raw: bytes, encoding: str, delimiter: str, name: str) -> pd.DataFrame:
    try:  # from bytes: the C parser reads them ~2x faster than a decoded StringIO
        return pd.read_csv(io.BytesIO(raw), sep=delimiter, dtype=str, keep_default_na=False, na_values=[""],
                           skip_blank_lines=True, engine="c", encoding=encoding)
    except pd.errors.EmptyDataError:
        raise BadInput(f"{name} has no header and no rows.") from None
    except (pd.errors.ParserError, ValueError) as e:
        msg = str(e).strip().splitlines()[-1]
        raise BadInput(f"Malformed {'TSV' if delimiter == chr(9) else 'CSV'} in {name} (delimiter {delimiter!r}): "
                       f"{msg}. Check the quoting and the delimiter.") from None


def _parse_json(text: str, name: str, warnings: list[str]) -> dict[str, list]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json
            try:
                cols = _parse_jsonl(text, name)
            except BadInput:
                cols = None
            if cols is not None:
                warnings.append(f"{name} holds one JSON object per line (JSONL); it was read as JSONL.")
                return cols
        raise BadInput(f"Malformed JSON in {name} at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise BadInput(f"{name}: expected a JSON array of objects or {{\"data\": [...]}}, found {type(obj).__name__}.")
    return _records_to_columns(obj, name, "item")


def _parse_jsonl(text: str, name: str) -> dict[str, list]:
    records, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BadInput(f"Malformed JSONL in {name} at line {n} (column {e.colno}): {e.msg}.") from None
        lines.append(n)
    return _records_to_columns(records, name, "line", lines)


def _records_to_columns(records: list, name: str, what: str, numbers: list[int] | None = None) -> dict[str, list]:
    columns: dict[str, list] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            where = numbers[i] if numbers else i + 1
            raise BadInput(f"{name}: {what} {where} is a {type(rec).__name__}, not an object with named fields.")
        for k in rec:
            if k not in columns:
                columns[str(k)] = [None] * i
        for k, col in columns.items():
            col.append(rec.get(k))
    return columns


def _kind(v: Any) -> str:
    if isinstance(v, str):
        return "text"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return "list" if isinstance(v, list) else "object"


def _to_text(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


def _columns_to_df(columns: dict[str, list], warnings: list[str]) -> pd.DataFrame:
    out = {}
    for name, values in columns.items():
        kinds = {_kind(v) for v in values if v is not None}
        if len(kinds) > 1:
            warnings.append(f"Column '{name}' mixes types ({', '.join(sorted(kinds))}); all values were converted "
                            "to text.")
        out[name] = pd.Series([_to_text(v) for v in values], dtype=str)
    return pd.DataFrame(out)


def _read_parquet(raw: bytes, name: str, warnings: list[str]) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (raw.startswith(b"PAR1") and raw.endswith(b"PAR1")):
        raise BadInput(f"{name} is not a Parquet file (no PAR1 marker).")
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError) as e:
        raise BadInput(f"Could not read Parquet file {name}: {e}") from None
    cols = {}
    for fname, col in zip(table.column_names, table.columns):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            cols[fname] = col.to_pandas().astype(str)
        else:
            cols[fname] = pd.Series([_to_text(v) for v in col.to_pylist()], dtype=str)
    return pd.DataFrame(cols)


def _cell_warnings(df: pd.DataFrame, warnings: list[str]) -> None:
    formulas, long_cells, first = 0, 0, None
    for col in df.columns:
        s = df[col]
        hit = s.str.contains(_FORMULA_RE, regex=True, na=False)
        if hit.any():
            formulas += int(hit.sum())
            first = first or (col, int(np.flatnonzero(hit.to_numpy())[0]) + 1)
        long_cells += int((s.str.len() > LONG_CELL_CHARS).sum())
    if formulas:
        warnings.append(f"{formulas} cell(s) look like spreadsheet formulas (first: column '{first[0]}', data row "
                        f"{first[1]}). They are kept as plain text and never evaluated; take care if you open an "
                        "export in a spreadsheet program.")
    if long_cells:
        warnings.append(f"{long_cells} cell(s) are longer than {LONG_CELL_CHARS:,} characters; they are kept, but "
                        "the length filter will probably remove them.")


# ========================================================================================================= mapping

FORMATS: dict[str, dict] = {
    "alpaca": {"label": "instruction / input / output (Alpaca)", "required": ("prompt", "response"),
               "optional": ("input",)},
    "prompt_completion": {"label": "prompt / completion", "required": ("prompt", "response"), "optional": ()},
    "qa": {"label": "question / answer", "required": ("prompt", "response"), "optional": ()},
    "messages": {"label": "OpenAI messages (list of {role, content})", "required": ("messages",), "optional": ()},
    "sharegpt": {"label": "ShareGPT conversations (list of {from, value})", "required": ("messages",),
                 "optional": ()},
    "text": {"label": "plain text (stored as {\"text\": ...} rows)", "required": ("text",), "optional": ()},
}
_SHAPES = [  # (format, {role: accepted column names}), first match wins; names compared case-insensitively
    ("messages", {"messages": ("messages",)}),
    ("sharegpt", {"messages": ("conversations", "conversation")}),
    ("alpaca", {"prompt": ("instruction",), "response": ("output", "response")}),
    ("prompt_completion", {"prompt": ("prompt",), "response": ("completion", "response")}),
    ("qa", {"prompt": ("question", "query"), "response": ("answer", "response")}),
    ("text", {"text": ("text", "content")}),
]
ROLE_ALIASES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}


@dataclass
class Mapping:
    format: str = field(metadata={"help": "one of FORMATS: alpaca, prompt_completion, qa, messages, sharegpt, text"})
    prompt: str | None = field(default=None, metadata={"help": "column with the user's request (instruction, "
                                                                  "prompt, question)"})
    input: str | None = field(default=None, metadata={"help": "optional column with extra context, appended to "
                                                                "the request after a blank line (Alpaca input)"})
    response: str | None = field(default=None, metadata={"help": "column with the answer to learn (output, "
                                                                      "completion, answer)"})
    messages: str | None = field(default=None, metadata={"help": "column holding a conversation: a list (or its "
                                                                      "JSON text) of {role, content} or {from, value}"})
    text: str | None = field(default=None, metadata={"help": "column of plain text (format 'text')"})
    system: str | None = field(default=None, metadata={"help": "optional column with a per-row system prompt"})
    system_prompt: str = field(default="", metadata={"help": "constant system prompt, used where the system column "
                                                               "is absent or empty"})

    def columns(self) -> dict[str, str]:
        """role -> column for every role this mapping names."""
        return {r: getattr(self, r) for r in ("prompt", "input", "response", "messages", "text", "system")
                if getattr(self, r)}


def detect_mapping(df: pd.DataFrame) -> Mapping | None:
    """Propose a mapping from the column names (case-insensitive); None when no known shape matches."""
    lower = {str(c).lower(): c for c in df.columns}
    system = next((lower[n] for n in ("system", "system_prompt") if n in lower), None)
    for fmt, roles in _SHAPES:
        found = {r: next((lower[n] for n in names if n in lower), None) for r, names in roles.items()}
        if all(found.values()):
            m = Mapping(format=fmt, system=system, **found)
            if fmt == "alpaca":
                m.input = next((lower[n] for n in ("input", "context") if n in lower), None)
            return m
    return None


def required_columns(mapping: Mapping) -> list[str]:
    """The columns that must not be empty for a row to be usable (a good default for `handle_missing`)."""
    return [getattr(mapping, r) for r in FORMATS[mapping.format]["required"]]


def validate_mapping(df: pd.DataFrame, mapping: Mapping) -> Mapping:
    """BadInput unless the format is known, its required roles are set and every named column is in `df`."""
    if mapping.format not in FORMATS:
        raise BadInput(f"Unknown format '{mapping.format}'; choose one of: {', '.join(FORMATS)}.")
    for role in FORMATS[mapping.format]["required"]:
        if not getattr(mapping, role):
            raise BadInput(f"Format '{mapping.format}' needs a column for the '{role}' role.")
    available = ", ".join(map(str, df.columns))
    for role, col in mapping.columns().items():
        if col not in df.columns:
            raise BadInput(f"Column '{col}' (the {role} role) is not in the file. Available columns: {available}.")
    return mapping


def _blank(s: pd.Series) -> pd.Series:
    return s.isna() | s.fillna("").astype(str).str.strip().eq("")


def _system_series(df: pd.DataFrame, m: Mapping) -> pd.Series | None:
    if not m.system and not m.system_prompt:
        return None
    if not m.system:
        return pd.Series(m.system_prompt, index=df.index, dtype=str)
    s = df[m.system].astype(str)
    return s.where(~_blank(df[m.system]), m.system_prompt)


def _user_series(df: pd.DataFrame, m: Mapping) -> pd.Series:
    p = df[m.prompt].fillna("").astype(str)
    if not m.input:
        return p
    inp = df[m.input]
    return p.where(_blank(inp), p + "\n\n" + inp.fillna("").astype(str))


def _content(c: Any) -> str:
    if c is None:
        return ""
    if isinstance(c, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in c)
    return c if isinstance(c, str) else str(c)


def _parse_conversation(cell: Any, row: Any) -> list[dict]:
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise BadInput(f"Row {row}: the conversation cell is not valid JSON ({e.msg} at column {e.colno}).") \
                from None
    if cell is None or (isinstance(cell, float) and cell != cell):
        return []
    if not isinstance(cell, list):
        raise BadInput(f"Row {row}: expected a list of messages, found {type(cell).__name__}.")
    out = []
    for msg in cell:
        if not isinstance(msg, dict):
            raise BadInput(f"Row {row}: a message is a {type(msg).__name__}, not an object with role and content.")
        raw_role = msg.get("role", msg.get("from"))
        role = ROLE_ALIASES.get(str(raw_role).lower())
        if role is None:
            raise BadInput(f"Row {row}: unknown role '{raw_role}' (known: {', '.join(sorted(ROLE_ALIASES))}).")
        out.append({"role": role, "content": _content(msg.get("content", msg.get("value")))})
    return out


def _conversations(df: pd.DataFrame, m: Mapping) -> list[list[dict]]:
    """One conversation per df row (empty contents kept), in row order."""
    system = _system_series(df, m)
    if m.format in ("messages", "sharegpt"):
        convs = [_parse_conversation(c, i + 1 if isinstance(i, (int, np.integer)) else i)
                 for i, c in zip(df.index, df[m.messages].tolist())]
        if system is not None:
            convs = [c if any(x["role"] == "system" for x in c) or not s else [{"role": "system", "content": s}] + c
                     for c, s in zip(convs, system.tolist())]
        return convs
    user, resp = _user_series(df, m).tolist(), df[m.response].fillna("").astype(str).tolist()
    sys_list = system.fillna("").tolist() if system is not None else [""] * len(df)
    return [([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": u},
                                                                  {"role": "assistant", "content": r}]
            for s, u, r in zip(sys_list, user, resp)]


def to_rows(df: pd.DataFrame, mapping: Mapping) -> list[dict]:
    """Rows ready to save: `{"messages": [...]}` per row, or `{"text": ...}` for the text format.

    Messages with empty content are dropped; a row left without a user or an assistant turn (or an empty text) is
    left out - compare `len(result)` with `len(df)`."""
    validate_mapping(df, mapping)
    if mapping.format == "text":
        s = df[mapping.text]
        return [{"text": t} for t in s[~_blank(s)].astype(str).tolist()]
    rows = []
    for conv in _conversations(df, mapping):
        conv = [x for x in conv if x["content"].strip()]
        roles = {x["role"] for x in conv}
        if "assistant" in roles and "user" in roles:
            rows.append({"messages": conv})
    return rows


def to_messages(df: pd.DataFrame, mapping: Mapping) -> list[list[dict]]:
    """The conversations of `to_rows` (chat formats only; the text format has none - use `to_rows`)."""
    if mapping.format == "text":
        raise BadInput("The 'text' format has no conversations; its rows are saved as {\"text\": ...} (to_rows).")
    return [r["messages"] for r in to_rows(df, mapping)]


# ======================================================================================================== tokens


def default_tokenizer_path(ws: Workspace) -> Path | None:
    """The default model's HF folder (holds Gemma 3's tokenizer) when it has been prepared, else None."""
    from .models import default_hf_path

    p = default_hf_path(ws)
    return p if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists() else None


def load_tokenizer(path: str | os.PathLike):
    """A local tokenizer folder -> transformers tokenizer (no remote code, no network)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise NotFound(f"No tokenizer folder at {p}.")
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BadInput(f"Could not load a tokenizer from {p}: {str(e).splitlines()[0]}") from None


class TokenCounter:
    """Counts tokens of many texts with the tokenizer's Rust batch API (`encode_batch_fast`), each distinct text
    once, and remembers the counts by text: the length filter and the EDA that follows it, or a redraw of the
    histogram at another max length, do not tokenize the same texts again."""

    def __init__(self, tokenizer, batch_size: int = 4096, max_cached: int = 2_000_000):
        import tokenizers

        self.tokenizer = tokenizer
        self.backend = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else \
            getattr(tokenizer, "backend_tokenizer", None)
        self.name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        self.batch_size, self.max_cached = batch_size, max_cached
        self._cache: dict[str, int] = {}

    def _encode(self, texts: list[str]) -> list[int]:
        if self.backend is not None:
            enc = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [len(e) for e in enc(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count(self, texts: Iterable[str | None], progress: ProgressFn = _noop) -> np.ndarray:
        texts = ["" if t is None or (isinstance(t, float) and t != t) else t for t in texts]
        cache = self._cache
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if len(cache) + len(todo) > self.max_cached:
            cache.clear()
            todo = list(dict.fromkeys(texts))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            cache.update(zip(chunk, self._encode(chunk)))
            progress(min(1.0, (start + len(chunk)) / len(todo)), f"Tokenized {start + len(chunk):,} / {len(todo):,} "
                                                                    "distinct texts")
        return np.fromiter((cache[t] for t in texts), dtype=np.int64, count=len(texts))


def as_counter(tokenizer) -> TokenCounter:
    return tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)


def _turns(df: pd.DataFrame, m: Mapping) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Flatten the rows into turns: (row position, is-trained-turn, text), vectorised for column formats."""
    validate_mapping(df, m)
    n = np.arange(len(df))
    if m.format == "text":
        return n, np.ones(len(df), bool), df[m.text].fillna("").astype(str).tolist()
    if m.format in ("messages", "sharegpt"):
        rows, trained, texts = [], [], []
        for i, conv in enumerate(_conversations(df, m)):
            for x in conv:
                rows.append(i)
                trained.append(x["role"] == "assistant")
                texts.append(x["content"])
        return np.array(rows, dtype=np.int64), np.array(trained, dtype=bool), texts
    parts = [(_user_series(df, m), False), (df[m.response].fillna("").astype(str), True)]
    system = _system_series(df, m)
    if system is not None:
        parts.insert(0, (system.fillna(""), False))
    return (np.concatenate([n] * len(parts)), np.concatenate([np.full(len(df), t) for _, t in parts]),
            [x for s, _ in parts for x in s.tolist()])


def token_lengths(df: pd.DataFrame, mapping: Mapping, tokenizer, progress: ProgressFn = _noop) -> pd.DataFrame:
    """Per row: prompt/response/total tokens (content only) and characters; index = df.index."""
    rows, trained, texts = _turns(df, mapping)
    counts = as_counter(tokenizer).count(texts, progress).astype(float)
    chars = np.fromiter(map(len, texts), dtype=float, count=len(texts))
    n = len(df)
    out = {}
    for label, sel in (("prompt", ~trained), ("response", trained)):
        out[f"{label}_tokens"] = np.bincount(rows[sel], weights=counts[sel], minlength=n).astype(np.int64)
        out[f"{label}_chars"] = np.bincount(rows[sel], weights=chars[sel], minlength=n).astype(np.int64)
    out["total_tokens"] = out["prompt_tokens"] + out["response_tokens"]
    out["total_chars"] = out["prompt_chars"] + out["response_chars"]
    cols = ["prompt_tokens", "response_tokens", "total_tokens", "prompt_chars", "response_chars", "total_chars"]
    return pd.DataFrame(out, index=df.index)[cols]


# ========================================================================================================== clean


@dataclass
class StepReport:
    name: str = field(metadata={"help": "the cleaning step"})
    rows_before: int = field(metadata={"help": "rows going in"})
    rows_after: int = field(metadata={"help": "rows coming out"})
    removed_examples: list[dict] = field(default_factory=list, metadata={"help": "up to 3 removed rows (cells "
                                                                                  "cut to 200 chars, _row = index)"})
    detail: dict = field(default_factory=dict, metadata={"help": "step-specific counts (JSON-safe)"})

    @property
    def removed(self) -> int:
        return self.rows_before - self.rows_after

    def text(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.detail.items() if k != "all_removed")
        msg = f"{self.name}: {self.rows_before:,} -> {self.rows_after:,} rows ({self.removed:,} removed)"
        msg += f"; {extra}" if extra else ""
        if self.detail.get("all_removed"):
            msg += ". This step removed every row: undo it or loosen its settings; an empty dataset cannot be saved."
        return msg


def _report(name: str, before: pd.DataFrame, after: pd.DataFrame, **detail) -> StepReport:
    gone = before.loc[before.index.difference(after.index)].head(3)
    examples = [{"_row": _jsonable(i), **{str(c): (v[:200] if isinstance(v, str) else None) for c, v in r.items()}}
                for i, r in zip(gone.index, gone.to_dict("records"))]
    if len(before) and not len(after):
        detail["all_removed"] = True
    return StepReport(name, len(before), len(after), examples, detail)


def _columns(df: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    cols = list(columns) if columns else list(df.columns)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise BadInput(f"Column '{missing[0]}' is not in the table. Available columns: "
                       f"{', '.join(map(str, df.columns))}.")
    return cols


def handle_missing(df: pd.DataFrame, columns: Sequence[str] | None = None, action: str = "drop",
                   fill_value: str = "") -> tuple[pd.DataFrame, StepReport]:
    """Missing = NaN or empty/whitespace-only text. action "drop": drop rows missing any of `columns` (default all);
    "fill": put `fill_value` in those cells instead."""
    cols = _columns(df, columns)
    blank = pd.DataFrame({c: _blank(df[c]) for c in cols}, index=df.index)
    per_col = {c: int(blank[c].sum()) for c in cols}
    if action == "drop":
        out = df[~blank.any(axis=1)]
        return out, _report("missing values (drop)", df, out, missing_per_column=per_col)
    if action == "fill":
        out = df.copy()
        for c in cols:
            out.loc[blank[c], c] = fill_value
        return out, _report("missing values (fill)", df, out, filled_per_column=per_col, fill_value=fill_value)
    raise BadInput(f"Unknown action '{action}' for missing values; use 'drop' or 'fill'.")


def _near_key(s: pd.Series) -> pd.Series:
    # replace only runs and non-space whitespace: replacing every single space with itself is slow
    return s.fillna("").astype(str).str.lower().str.replace(f"{_WS}{{2,}}|[\t\n\r\f\v]", " ", regex=True).str.strip()


def drop_duplicates(df: pd.DataFrame, columns: Sequence[str] | None = None,
                    near: bool = False) -> tuple[pd.DataFrame, StepReport]:
    """Keep the first of rows equal on `columns` (default all); `near` compares them ignoring case and runs of
    whitespace."""
    cols = _columns(df, columns)
    keys = pd.DataFrame({c: _near_key(df[c]) for c in cols}, index=df.index) if near else df[cols]
    out = df[~keys.duplicated(keep="first")]
    return out, _report("near duplicates" if near else "exact duplicates", df, out, columns=cols)


def _normalize(s: pd.Series) -> pd.Series:
    t = s.astype(str) if s.dtype == object else s
    t = t.str.replace("\r\n?", "\n", regex=True).str.replace(_CONTROL_RE, "", regex=True)
    t = t.str.replace(_USPACE_RE, " ", regex=True).str.replace("[ \t]+\n", "\n", regex=True)
    t = t.str.replace("\n{3,}", "\n\n", regex=True).str.strip()
    wide = ~t.fillna("").str.isascii().to_numpy(dtype=bool)  # NFC can only change non-ASCII text
    if wide.any():
        t = t.copy()
        t[wide] = [unicodedata.normalize("NFC", x) for x in t[wide].tolist()]
    return t.where(s.notna(), s)


def normalize_text(df: pd.DataFrame, columns: Sequence[str] | None = None) -> tuple[pd.DataFrame, StepReport]:
    """Unicode NFC; \\r\\n -> \\n; control characters removed (\\n and \\t kept); unicode spaces -> ' '; spaces at
    line ends and 3+ blank lines trimmed; cells stripped. Spaces inside a line are kept (code indentation)."""
    cols = _columns(df, columns)
    out = df.copy()
    changed = {}
    for c in cols:
        out[c] = _normalize(df[c])
        changed[c] = int((out[c].fillna("") != df[c].fillna("")).sum())
    return out, _report("normalise text", df, out, changed_cells=changed)


def filter_token_length(df: pd.DataFrame, counter, mapping: Mapping, min_tokens: int = 0,
                        max_tokens: int | None = None, train_max_length: int | None = None,
                        progress: ProgressFn = _noop) -> tuple[pd.DataFrame, StepReport]:
    """Drop rows whose total content tokens are < min_tokens or > max_tokens (batch tokenization); report how many
    of the kept rows are longer than `train_max_length` (training would cut them)."""
    lengths = token_lengths(df, mapping, counter, progress)["total_tokens"]
    keep = lengths >= min_tokens
    if max_tokens is not None:
        keep &= lengths <= max_tokens
    out = df[keep.to_numpy()]
    detail = {"min_tokens": min_tokens, "max_tokens": max_tokens, "too_short": int((lengths < min_tokens).sum()),
              "too_long": int((lengths > max_tokens).sum()) if max_tokens is not None else 0,
              "tokenizer": as_counter(counter).name}
    if train_max_length:
        over = int((lengths[keep.to_numpy()] > train_max_length).sum())
        detail.update(train_max_length=train_max_length, over_train_max=over,
                      over_train_max_share=round(over / len(out), 4) if len(out) else 0.0)
    return out, _report("token length", df, out, **detail)


def _jsonable(v: Any) -> Any:
    if isinstance(v, TokenCounter):
        return v.name
    if isinstance(v, Mapping):
        return asdict(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(getattr(v, "name_or_path", "") or type(v).__name__)


@dataclass
class AppliedStep:
    step: str = field(metadata={"help": "function name"})
    params: dict = field(metadata={"help": "its parameters (JSON-safe)"})
    report: StepReport = field(metadata={"help": "what it did"})


class Cleaner:
    """The cleaning history of one table: apply a step, undo the last, reset; `mark_saved` (call it after
    save_dataset) makes the steps so far permanent: undo and reset then stop at that point. Each state is kept, so
    undo is instant (memory: about one table per step)."""

    def __init__(self, df: pd.DataFrame):
        self.original = df
        self._states: list[pd.DataFrame] = [df]
        self._saved: list[AppliedStep] = []
        self._steps: list[AppliedStep] = []

    @property
    def df(self) -> pd.DataFrame:
        return self._states[-1]

    @property
    def steps(self) -> list[AppliedStep]:
        return self._saved + self._steps

    @property
    def can_undo(self) -> bool:
        return bool(self._steps)

    def apply(self, step: Callable[..., tuple[pd.DataFrame, StepReport]], /, **params) -> StepReport:
        df, report = step(self.df, **params)
        self._states.append(df)
        self._steps.append(AppliedStep(step.__name__, {k: _jsonable(v) for k, v in params.items()
                                                       if k != "progress"}, report))
        return report

    def undo(self) -> StepReport | None:
        if not self._steps:
            return None
        self._states.pop()
        return self._steps.pop().report

    def reset(self) -> None:
        """Back to the table as read (or as last saved)."""
        self._states, self._steps = self._states[:1], []

    def mark_saved(self) -> None:
        self._saved += self._steps
        self._states, self._steps = [self.df], []

    def history(self) -> list[dict]:
        return [{"step": s.step, "params": s.params, "report": asdict(s.report)} for s in self.steps]


# ============================================================================================================ EDA


def _column_type(s: pd.Series) -> str:
    v = s.dropna()
    if v.empty:
        return "empty"
    if pd.to_numeric(v.head(100), errors="coerce").notna().all() and pd.to_numeric(v, errors="coerce").notna().all():
        return "number"
    if v.astype(str).str.match(f"{_WS}*[\\[{{]").all():
        return "json"
    return "text"


def column_summary(df: pd.DataFrame, examples: int = 3) -> pd.DataFrame:
    """One row per column: type (text/number/json/empty), non-null (not missing/blank), unique, duplicates
    (non-null values seen before), example values."""
    rows = []
    for c in df.columns:
        s = df[c]
        filled = s[~_blank(s)]
        uniq = filled.unique()
        rows.append({"column": str(c), "type": _column_type(filled), "non_null": len(filled),
                     "missing": len(s) - len(filled), "unique": len(uniq), "duplicates": len(filled) - len(uniq),
                     "examples": " | ".join(str(x)[:80] for x in uniq[:examples])})
    return pd.DataFrame(rows, columns=["column", "type", "non_null", "missing", "unique", "duplicates", "examples"])


def duplicate_rows(df: pd.DataFrame) -> int:
    """Rows that exactly repeat an earlier row."""
    return int(df.duplicated().sum())


def length_stats(lengths: pd.DataFrame, max_length: int | None = None) -> pd.DataFrame:
    """count/mean/min/p50/p90/p99/max for each column of `token_lengths`, plus rows over `max_length` tokens."""
    q = lengths.quantile([0.5, 0.9, 0.99])
    stats = pd.DataFrame({"count": lengths.count(), "mean": lengths.mean().round(1), "min": lengths.min(),
                          "p50": q.loc[0.5], "p90": q.loc[0.9], "p99": q.loc[0.99], "max": lengths.max()})
    if max_length:
        stats["over_max"] = pd.array([int((lengths[c] > max_length).sum()) if c.endswith("_tokens") else None
                                      for c in lengths.columns], dtype="Int64")
    return stats


def token_length_figure(lengths: pd.DataFrame, max_length: int | None = None):
    """Overlaid histograms of prompt/response/total tokens per row, the training max length as a dashed line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for role in ("prompt", "response", "total"):
        col = f"{role}_tokens"
        if col in lengths and lengths[col].any():
            fig.add_trace(go.Histogram(x=lengths[col], name=role, opacity=0.6, nbinsx=60))
    title = f"Token length per row ({len(lengths):,} rows)"
    if max_length:
        over = int((lengths["total_tokens"] > max_length).sum())
        fig.add_vline(x=max_length, line_dash="dash", line_color="red",
                      annotation_text=f"max length {max_length}", annotation_position="top right")
        title += f" - {over:,} over {max_length}"
    fig.update_layout(title=title, barmode="overlay", xaxis_title="tokens", yaxis_title="rows")
    return fig


def turns_figure(conversations: Sequence[Sequence[dict]]):
    """Histogram of user+assistant turns per conversation."""
    import plotly.graph_objects as go

    turns = [sum(1 for m in c if m["role"] != "system") for c in conversations]
    fig = go.Figure(go.Histogram(x=turns, name="turns"))
    fig.update_layout(title="Turns per conversation", xaxis_title="turns (user + assistant)", yaxis_title="rows")
    return fig


def role_balance_figure(conversations: Sequence[Sequence[dict]]):
    """Bar chart: how many messages each role has."""
    import plotly.graph_objects as go

    counts = {r: 0 for r in ("system", "user", "assistant")}
    for c in conversations:
        for m in c:
            counts[m["role"]] = counts.get(m["role"], 0) + 1
    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), name="messages"))
    fig.update_layout(title="Messages per role", yaxis_title="messages")
    return fig


# ======================================================================================================== preview


@dataclass
class Preview:
    html: str = field(metadata={"help": "escaped rendering; tokens in <span class='mt-trained'> or 'mt-masked'"})
    text: str = field(metadata={"help": "the rendered template text"})
    trained_tokens: int = field(metadata={"help": "tokens the loss is computed on (assistant turns)"})
    masked_tokens: int = field(metadata={"help": "tokens only read as context"})
    mask: list[int] = field(metadata={"help": "1 = trained, per token"})
    template: str = field(metadata={"help": "'tokenizer' (its own chat template), 'fallback' or 'none' (text)"})


def _render(tokenizer, messages: list[dict], template: str | None, add_generation_prompt: bool = False) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # SecurityError (sandbox) is a TemplateError
        raise BadInput(f"The chat template failed on this example: {e}") from None


def assistant_spans(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    For assistant message i the span runs from the end of render(messages[:i], add_generation_prompt=True) to the
    end of render(messages[:i+1]) - the answer plus the template's end-of-turn markup, so the model learns to stop.
    When a template renders a prefix differently (e.g. it drops earlier reasoning), the content is searched for in
    the full text instead (then only the content itself is marked)."""
    full = _render(tokenizer, messages, template)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], template)
        if through.startswith(before) and full.startswith(through) and len(before) >= pos:
            spans.append((len(before), len(through)))
        else:
            content = m["content"].strip()
            j = full.find(content, pos)
            if j < 0:
                raise BadInput(f"Could not find assistant turn {i + 1} in the rendered chat template.")
            spans.append((j, j + len(content)))
        pos = spans[-1][1]
    return full, spans


def preview_example(example: list[dict] | dict, tokenizer) -> Preview:
    """Render one example (a conversation, or a {"text"} / {"messages"} row) and mark the trained tokens.

    Uses the tokenizer's chat template, or FALLBACK_CHAT_TEMPLATE when it has none (both rendered by transformers in
    its sandboxed Jinja environment). Text rows are trained in full."""
    if isinstance(example, dict) and "text" in example:
        text, spans, kind = str(example["text"]), None, "none"
    else:
        messages = example["messages"] if isinstance(example, dict) else example
        template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        text, spans = assistant_spans(tokenizer, list(messages), template)
        kind = "fallback" if template else "tokenizer"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [1 if spans is None or any(a <= s < b for a, b in spans) else 0 for s, _ in offsets]
    parts, end = [], 0
    for tid, (_s, e), m in zip(ids, offsets, mask):
        if e <= end:  # several tokens for one character (byte fallback): already shown
            continue
        piece = text[end:e]  # any gap before the token (e.g. a space it does not cover) goes with it
        cls = "mt-trained" if m else "mt-masked"
        parts.append(f'<span class="{cls}" title="token {tid}">{html.escape(piece)}</span>')
        end = e
    if end < len(text):
        parts.append(html.escape(text[end:]))
    return Preview(f'<div class="mt-preview">{"".join(parts)}</div>', text, sum(mask), len(mask) - sum(mask), mask,
                   kind)


# =========================================================================================================== save


@dataclass
class DatasetVersion:
    name: str = field(metadata={"help": "dataset name"})
    version: int = field(metadata={"help": "version number (v<N> folder)"})
    path: Path = field(metadata={"help": "the version folder"})
    train: list[dict] = field(default_factory=list, metadata={"help": "train rows"})
    validation: list[dict] = field(default_factory=list, metadata={"help": "validation rows"})
    meta: dict = field(default_factory=dict, metadata={"help": "meta.json"})


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadInput(f"Dataset name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_'.")
    return name


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))


def _check_rows(rows: Sequence) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, list):
            r = {"messages": r}
        ok = isinstance(r, dict) and (
            isinstance(r.get("text"), str) or
            (isinstance(r.get("messages"), list) and r["messages"] and
             all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and
                 isinstance(m.get("content"), str) for m in r["messages"])))
        if not ok:
            raise BadInput(f"Row {i + 1} is neither {{\"messages\": [{{role, content}}...]}} nor {{\"text\": ...}}.")
        out.append(r)
    return out


def build_meta(read: ReadResult | None = None, mapping: Mapping | None = None, cleaner: Cleaner | None = None,
               **extra) -> dict:
    """What save_dataset records about where the rows came from."""
    return {"source": read.meta() if read else None, "mapping": asdict(mapping) if mapping else None,
            "cleaning": cleaner.history() if cleaner else [], "warnings": read.warnings if read else [], **extra}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_dataset(ws: Workspace, name: str, rows: Sequence[dict | list], meta: dict | None = None,
                 val_ratio: float = 0.1, val_count: int | None = None, seed: int = 0,
                 progress: ProgressFn = _noop) -> DatasetVersion:
    """Write rows as the next version of `name`: train.jsonl / validation.jsonl / meta.json, atomically.

    The split is a seeded shuffle; `val_count` (when given) wins over `val_ratio`. Never overwrites; BadInput for
    no rows or a split that leaves no training rows."""
    check_name(name)
    rows = _check_rows(rows)
    if not rows:
        raise BadInput("Nothing to save: there are no rows left (cleaning removed them all?). Undo a step or "
                       "loosen the filters.")
    n = len(rows)
    if val_count is None:
        if not 0 <= val_ratio < 1:
            raise BadInput(f"Validation ratio must be in [0, 1), got {val_ratio}.")
        k = int(round(n * val_ratio))
    else:
        if val_count < 0:
            raise BadInput(f"Validation count must be >= 0, got {val_count}.")
        k = int(val_count)
    if n - k <= 0:
        raise BadInput(f"A split of {k} validation rows out of {n} leaves no training rows.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val, train = [rows[i] for i in order[:k]], [rows[i] for i in order[k:]]
    folder = ws.datasets / name
    for _attempt in range(5):
        version = (_versions(folder) or [0])[-1] + 1
        try:
            with atomic_dir(folder / f"v{version}") as tmp:
                progress(0.1, f"Writing {len(train):,} train rows...")
                _write_jsonl(tmp / "train.jsonl", train)
                progress(0.7, f"Writing {len(val):,} validation rows...")
                _write_jsonl(tmp / "validation.jsonl", val)
                full_meta = {**(meta or {}), "name": name, "version": version,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "shape": "text" if "text" in train[0] else "messages",
                             "counts": {"train": len(train), "validation": len(val), "total": n},
                             "split": {"val_ratio": val_ratio if val_count is None else None,
                                       "val_count": val_count, "seed": seed}}
                with open(tmp / "meta.json", "w", encoding="utf-8") as fh:
                    json.dump(_jsonable(full_meta), fh, indent=2, ensure_ascii=False)
            break
        except Conflict:  # another save took this number meanwhile: take the next
            continue
    else:
        raise Conflict(f"Could not find a free version number for dataset '{name}'.")
    progress(1.0, f"Saved {name} v{version}")
    return DatasetVersion(name, version, folder / f"v{version}", train, val, full_meta)


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def list_datasets(ws: Workspace) -> list[dict]:
    """One row per saved version: name, version, train, validation, created, source (sorted by name, version)."""
    out = []
    if not ws.datasets.is_dir():
        return out
    for folder in sorted(p for p in ws.datasets.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
        for v in _versions(folder):
            meta = _read_meta(folder / f"v{v}")
            counts, source = meta.get("counts", {}), meta.get("source") or {}
            out.append({"name": folder.name, "version": v, "train": counts.get("train"),
                        "validation": counts.get("validation"), "created": meta.get("created"),
                        "source": source.get("path") if isinstance(source, dict) else source})
    return out


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_dataset_version(ws: Workspace, name: str, version: int | None = None) -> DatasetVersion:
    """Rows and meta of one saved version (the latest when `version` is None); NotFound when missing."""
    check_name(name)
    folder = ws.datasets / name
    versions = _versions(folder)
    if not versions:
        raise NotFound(f"No dataset named '{name}'.")
    version = versions[-1] if version is None else int(version)
    if version not in versions:
        raise NotFound(f"Dataset '{name}' has no version {version} (it has: "
                       f"{', '.join(f'v{v}' for v in versions)}).")
    path = folder / f"v{version}"
    return DatasetVersion(name, version, path, _read_jsonl(path / "train.jsonl"),
                          _read_jsonl(path / "validation.jsonl"), _read_meta(path))
