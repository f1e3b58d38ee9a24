"""Reading a dataset file: CSV, TSV, JSON, JSONL, Parquet, Excel (.xlsx) or plain text (.txt) into a text-only
DataFrame, with the encoding and CSV dialect detected, and warnings for what a user should look at (formula-like cells,
very long cells, mixed types, a guessed encoding).

Encodings: a byte-order mark decides (UTF-8, UTF-16); else valid UTF-8 is UTF-8; else UTF-16 without a mark is
recognised by its zero bytes; else charset-normalizer guesses (cp949/EUC-KR, Shift-JIS, GBK/GB18030, Big5, ...), and a
Western single-byte guess is read as cp1252 (Latin-1 where cp1252 has holes). `encoding=` overrides the detection.

Plain text: `text_mode="blocks"` makes one row per blank-line-separated block, `"document"` one row of the whole file
(the trainer cuts long text into windows of its max length); `"auto"` takes blocks when there are several.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BadInput, NotFound
from ..progress import ProgressFn, no_progress
from ..workspace import human_bytes

MAX_BYTES = 500 * 1024 * 1024


LONG_CELL_CHARS = 100_000


SUPPORTED = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet", ".pq": "parquet", ".xlsx": "xlsx", ".txt": "txt"}
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "cp949", "euc-kr", "shift_jis", "cp932",
             "euc-jp", "gbk", "gb18030", "big5", "cp1252", "latin-1", "cp1251", "koi8-r", "cp1250", "iso-8859-7",
             "cp1253", "cp1254", "cp1255", "cp1256", "tis-620")  # offered as overrides; any Python codec name works
TEXT_MODES = ("auto", "blocks", "document")
_WESTERN = {"cp1252", "latin_1", "iso8859_15", "cp1250", "iso8859_2", "cp437", "cp850", "mac_roman", "cp858",
            "iso8859_9", "cp1254", "mac_latin2", "cp1257", "iso8859_4", "iso8859_13", "iso8859_10", "iso8859_3",
            "iso8859_14", "iso8859_16", "ascii", "cp775", "cp852", "hp_roman8", "mac_iceland", "mac_turkish"}


DELIMITERS = ",;\t|"


# Patterns written without \s, \w or \u escapes (literal characters instead) so that pandas runs them in pyarrow's
# RE2 engine instead of falling back to Python's re, cell by cell (~10x slower).
SPACE_CLASS = "[ \t\n\r\f\v]"


_FORMULA_RE = f"^{SPACE_CLASS}*(?:[=@]|[+\\-][A-Za-z0-9_.]*[(!|])"  # =..., @..., +cmd|..., -SUM(: spreadsheet formula-like


CONTROL_RE = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]"  # control characters but \t \n (\r: see _normalize)


USPACE_RE = "[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]"  # unicode spaces -> plain space


@dataclass
class ReadResult:
    df: pd.DataFrame = field(metadata={"help": "the table; every cell is text (NaN = missing)"})
    path: str = field(metadata={"help": "the file that was read"})
    format: str = field(metadata={"help": "csv | tsv | json | jsonl | parquet"})
    encoding: str | None = field(metadata={"help": "the text encoding used (None for Parquet and Excel)"})
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


def read_table(path: str | os.PathLike, max_bytes: int = MAX_BYTES, progress: ProgressFn = no_progress,
               encoding: str | None = None, text_mode: str = "auto", header: bool = True) -> ReadResult:
    """Read a data file into a text-only DataFrame; BadInput (one plain line) for anything unusable. `encoding`
    (a codec name; None or "auto": detected) overrides the detection for text files; `text_mode` is for .txt;
    `header` False reads a CSV/TSV's first line as data (columns named column_1, column_2, ...; a single one
    `text`). A one-column CSV read with its first line as the header says so in the warnings."""
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
    delimiter = None
    forced = encoding if encoding and encoding != "auto" else None
    encoding = None
    if kind == "parquet":
        progress(0.3, "Parsing Parquet...")
        df = _read_parquet(raw, p.name, warnings)
    elif kind == "xlsx":
        progress(0.3, "Parsing the spreadsheet...")
        df = _read_xlsx(raw, p.name, warnings)
    else:
        encoding = _forced_encoding(raw, forced, p.name) if forced else _detect_encoding(raw, p.name, warnings)
        sample = _text_sample(raw, encoding)
        if not sample.strip() and not raw.decode(encoding, errors="replace").strip():
            raise BadInput(f"{p.name} is empty (only whitespace).")
        progress(0.3, f"Parsing {kind.upper()}...")
        if kind == "txt":
            df = _read_txt(raw.decode(encoding), text_mode, warnings)
        elif kind in ("csv", "tsv"):
            delimiter = _sniff_delimiter(sample, kind)
            df = _read_csv(raw, encoding, delimiter, p.name, header)
            if header and df.shape[1] == 1:
                warnings.append(f"The first line ('{str(df.columns[0])[:60]}') was taken as the column name, not as "
                                "a row. If it is data (the file has no header), open the file again with 'First "
                                "line is a header' unticked.")
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


def _forced_encoding(raw: bytes, enc: str, name: str) -> str:
    import codecs  # noqa: PLC0415

    try:
        codecs.lookup(enc)
        raw.decode(enc)
    except LookupError:
        raise BadInput(f"Unknown encoding '{enc}'. Examples: {', '.join(ENCODINGS[:10])}.") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{name} is not valid {enc} (byte {e.start} cannot be decoded): choose another encoding, or "
                       "'auto' to detect it.") from None
    return enc


def _utf16_without_bom(raw: bytes) -> str | None:
    """'utf-16-le' / 'utf-16-be' when the zero bytes sit at odd / even offsets as in UTF-16 text, and it decodes."""
    head = raw[:65536]
    even, odd = head[0::2].count(0), head[1::2].count(0)
    half = len(head) // 2 or 1
    for enc, zeros, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if zeros > 0.3 * half and other < 0.05 * half:
            try:
                raw[: len(raw) - len(raw) % 2].decode(enc)
                return enc
            except UnicodeDecodeError:
                return None
    return None


def _guess_legacy(raw: bytes, bad: int, warnings: list[str]) -> str:
    """Not UTF-8: charset-normalizer's guess (CJK and other multi-byte code pages kept as guessed); a Western
    single-byte guess is read as cp1252 (latin-1 where cp1252 has no character)."""
    from charset_normalizer import from_bytes  # noqa: PLC0415 - a dependency of requests

    best = from_bytes(raw[: 1 << 20]).best()
    enc = best.encoding if best is not None else "latin_1"
    if enc in _WESTERN:
        enc = "cp1252"
    try:
        raw.decode(enc)
    except (UnicodeDecodeError, LookupError):
        enc = "latin-1"  # decodes anything
    shown = {"cp1252": "cp1252 (Western European)", "latin-1": "Latin-1"}.get(enc, enc)
    warnings.append(f"The file is not UTF-8 (first non-UTF-8 byte at offset {bad}); it was read as {shown}, the "
                    "detected encoding. If the preview shows garbled characters, choose the right encoding and open "
                    "it again (or re-save the file as UTF-8).")
    return enc.replace("_", "-")


def _detect_encoding(raw: bytes, name: str, warnings: list[str]) -> str:
    """A byte-order mark (UTF-16, UTF-8), else UTF-8, else UTF-16 without a mark, else a guess with a warning;
    BadInput for binary files."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            raw.decode("utf-16")
        except UnicodeDecodeError:
            raise BadInput(f"{name} starts with a UTF-16 byte-order mark but is not valid UTF-16.") from None
        enc = "utf-16"
    elif b"\x00" in raw:
        enc = _utf16_without_bom(raw)
        if enc is None:
            raise BadInput(f"{name} is not a text file (it contains NUL bytes: a binary file, maybe a spreadsheet "
                           "or an archive renamed). Export it as CSV/JSON text first.")
        warnings.append(f"The file is UTF-16 without a byte-order mark; it was read as {enc}.")
    else:
        bom = raw.startswith(b"\xef\xbb\xbf")
        bad = _first_bad_utf8(memoryview(raw)[3:] if bom else raw)
        enc = "utf-8-sig" if bom else "utf-8"
        if bad is not None:
            enc = _guess_legacy(raw, bad + 3 * bom, warnings)
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


def _read_csv(raw: bytes, encoding: str, delimiter: str, name: str, header: bool = True) -> pd.DataFrame:
    try:  # from bytes: the C parser reads them ~2x faster than a decoded StringIO
        df = pd.read_csv(io.BytesIO(raw), sep=delimiter, dtype=str, keep_default_na=False, na_values=[""],
                         skip_blank_lines=True, engine="c", encoding=encoding, header=0 if header else None)
        if not header:
            df.columns = ["text"] if df.shape[1] == 1 else [f"column_{i + 1}" for i in range(df.shape[1])]
        return df
    except pd.errors.EmptyDataError:
        raise BadInput(f"{name} has no header and no rows.") from None
    except (pd.errors.ParserError, ValueError) as e:
        msg = str(e).strip().splitlines()[-1]
        raise BadInput(f"Malformed {'TSV' if delimiter == chr(9) else 'CSV'} in {name} (delimiter {delimiter!r}): "
                       f"{msg}. Check the quoting and the delimiter.") from None


def _read_txt(text: str, mode: str, warnings: list[str]) -> pd.DataFrame:
    if mode not in TEXT_MODES:
        raise BadInput(f"Text mode must be one of {', '.join(TEXT_MODES)} (got {mode!r}).")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [b.strip("\n") for b in re.split(r"\n(?:[ \t]*\n)+", text) if b.strip()]
    if mode == "auto":
        mode = "blocks" if len(blocks) > 1 else "document"
        warnings.append("Plain text: one example per blank-line-separated block (choose 'whole file as one document' "
                        "to keep it in one piece)." if mode == "blocks" else "Plain text: the whole file is one "
                        "document (the trainer cuts it into pieces of its max length).")
    rows = blocks if mode == "blocks" else [text.strip("\n")]
    return pd.DataFrame({"text": pd.Series(rows, dtype=str)})


def _read_xlsx(raw: bytes, name: str, warnings: list[str]) -> pd.DataFrame:
    import zipfile  # noqa: PLC0415

    if not raw.startswith(b"PK\x03\x04"):
        raise BadInput(f"{name} is not an Excel .xlsx workbook (an .xlsx file is a zip archive). An old .xls "
                       "workbook must be saved as .xlsx or CSV first.")
    try:
        sheets = pd.read_excel(io.BytesIO(raw), sheet_name=None, dtype=object, engine="openpyxl")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise BadInput(f"Could not read the workbook {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                       " (truncated, or not an Excel workbook?).") from None
    used = {k: v for k, v in sheets.items() if not v.dropna(how="all").empty}
    if not used:
        raise BadInput(f"{name} has no data in any sheet.")
    first = next(iter(used))
    if len(used) > 1:
        warnings.append(f"The workbook has {len(used)} sheets with data; the first, '{first}', was read "
                        f"(the others: {', '.join(list(used)[1:])}). Save the sheet you want first, or as CSV.")
    df = used[first].dropna(how="all")
    cols = {str(c): [_to_text(v.isoformat() if hasattr(v, "isoformat") else v) for v in df[c].tolist()]
            for c in df.columns}
    return pd.DataFrame({c: pd.Series(v, dtype=str) for c, v in cols.items()})


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
    except RecursionError:
        raise BadInput(f"{name} is nested too deeply to read (hundreds of levels of arrays or objects inside each "
                       "other); a dataset is a list of records with flat fields.") from None
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
        except RecursionError:
            raise BadInput(f"{name} line {n} is nested too deeply to read (hundreds of levels of arrays or objects "
                           "inside each other); a dataset is a list of records with flat fields.") from None
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
    return json.dumps(v, ensure_ascii=False, default=_binary)


def _binary(v: Any) -> Any:
    """JSON for what json cannot write: bytes (an image or audio file inside the table) become a marker that the
    mapping refuses by name; anything else its text."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"<binary>": len(bytes(v))}
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


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
