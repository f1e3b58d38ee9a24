"""Mapping a table to chat messages: the shape is recognised (Alpaca, prompt/completion, Q&A, OpenAI messages,
ShareGPT, plain text) as a `Mapping` of columns, checked, and turned into rows of {"messages": [...]} or {"text"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BadInput

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
