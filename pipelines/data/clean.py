"""Cleaning steps, each reporting rows before and after: missing values, duplicates and near-duplicates, Unicode and
whitespace normalisation, a token-length filter; `Cleaner` applies them in order and undoes them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import BadInput
from .explore import TokenCounter, as_counter, token_lengths
from .map import Mapping, blank_cells
from .read import CONTROL_RE, SPACE_CLASS, USPACE_RE, ProgressFn, no_progress


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
    examples = [{"_row": jsonable(i), **{str(c): (v[:200] if isinstance(v, str) else None) for c, v in r.items()}}
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
    blank = pd.DataFrame({c: blank_cells(df[c]) for c in cols}, index=df.index)
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
    return s.fillna("").astype(str).str.lower().str.replace(f"{SPACE_CLASS}{{2,}}|[\t\n\r\f\v]", " ", regex=True).str.strip()


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
    t = t.str.replace("\r\n?", "\n", regex=True).str.replace(CONTROL_RE, "", regex=True)
    t = t.str.replace(USPACE_RE, " ", regex=True).str.replace("[ \t]+\n", "\n", regex=True)
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
                        progress: ProgressFn = no_progress) -> tuple[pd.DataFrame, StepReport]:
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


def jsonable(v: Any) -> Any:
    if isinstance(v, TokenCounter):
        return v.name
    if isinstance(v, Mapping):
        return asdict(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
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
        self._steps.append(AppliedStep(step.__name__, {k: jsonable(v) for k, v in params.items()
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
