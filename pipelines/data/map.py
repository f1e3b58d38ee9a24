"""Mapping a table to training rows: the shape is recognised (Alpaca, prompt/completion, Q&A, OpenAI messages,
ShareGPT, plain text) as a `Mapping` of columns, checked, and converted. What kind of data it is follows from the
columns: conversations to learn from ("sft"), preference pairs ("preference": chosen / rejected answers), rows
labelled desirable or not ("kto": a true/false `label`), or plain text ("text", for continued pre-training).

`convert(df, mapping)` returns every usable row and, for every row it cannot use, the reason and the row's number (as
the Data tab's preview numbers them) - nothing is dropped silently. Messages may carry content parts
([{"type": "text", "text" | "value": ...}]) and a per-message `loss_weight` (0: read as context, never trained);
ShareGPT tool calls (`function_call` / `observation` turns, a `tools` column) become OpenAI-style tool calls, kept
for templates that have a tool format. Image, audio or video parts are refused: MacTuner tunes text models.

Saved rows:  {"messages": [...]} (+ "tools", + "label" for kto) · {"text": ...} ·
             {"prompt": [...], "chosen": [...], "rejected": [...]} (preference)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BadInput
from .placeholders import count_placeholders

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
KINDS = {"sft": "conversations to learn from", "preference": "preference pairs (chosen / rejected answers)",
         "kto": "answers labelled desirable or not (KTO)", "text": "plain text (continued pre-training)"}

_SHAPES = [  # (format, {role: accepted column names}), first match wins; names compared case-insensitively
    ("messages", {"messages": ("messages",)}),
    ("sharegpt", {"messages": ("conversations", "conversation")}),
    ("alpaca", {"prompt": ("instruction",), "response": ("output", "response")}),
    ("prompt_completion", {"prompt": ("prompt",), "response": ("completion", "response")}),
    ("qa", {"prompt": ("question", "query"), "response": ("answer", "response")}),
    ("text", {"text": ("text", "content")}),
]
_PREF_SHAPES = [  # preference data has no response column: the prompt alone, and the chosen / rejected columns
    ("sharegpt", {"messages": ("conversations", "conversation")}),
    ("messages", {"messages": ("messages",)}),
    ("alpaca", {"prompt": ("instruction",)}),
    ("prompt_completion", {"prompt": ("prompt", "question", "query")}),
]
ROLE_ALIASES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "tool": "tool",
                "observation": "tool", "function": "tool", "ipython": "tool", "function_call": "assistant"}
MEDIA = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")
MEDIA_COLUMNS = ("image", "images", "image_url", "image_path", "img", "picture", "pixel_values", "audio", "audios",
                 "audio_path", "speech", "video", "videos", "video_path")
_BINARY_RE = r'^\s*[\[{].*(?:"<binary>"|"bytes"\s*:)'  # cells read from bytes (read.py's marker, HF Image/Audio)
TRUE, FALSE = ("true", "1", "yes", "y", "desirable", "good"), ("false", "0", "no", "n", "undesirable", "bad")


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
    chosen: str | None = field(default=None, metadata={"help": "preference data: column with the preferred answer"})
    rejected: str | None = field(default=None, metadata={"help": "preference data: column with the worse answer"})
    label: str | None = field(default=None, metadata={"help": "KTO data: column saying whether the answer is "
                                                                "desirable (true/false)"})
    tools: str | None = field(default=None, metadata={"help": "column with the tools (functions) a conversation "
                                                                "may call (ShareGPT / OpenAI JSON)"})

    @property
    def kind(self) -> str:
        if self.format == "text":
            return "text"
        if self.chosen or self.rejected:
            return "preference"
        return "kto" if self.label else "sft"

    def columns(self) -> dict[str, str]:
        """role -> column for every role this mapping names."""
        roles = ("prompt", "input", "response", "messages", "text", "system", "chosen", "rejected", "label", "tools")
        return {r: getattr(self, r) for r in roles if getattr(self, r)}


def _find(lower: dict, names) -> str | None:
    return next((lower[n] for n in names if n in lower), None)


def detect_mapping(df: pd.DataFrame) -> Mapping | None:
    """Propose a mapping from the column names (case-insensitive); None when no known shape matches."""
    lower = {str(c).lower(): c for c in df.columns}
    system = _find(lower, ("system", "system_prompt"))
    chosen = _find(lower, ("chosen", "chosen_messages"))  # *_messages: LLaMA-Factory's v1 DPO files
    rejected = _find(lower, ("rejected", "rejected_messages"))
    extra = dict(system=system, tools=_find(lower, ("tools", "functions")))
    if chosen and rejected:
        for fmt, roles in _PREF_SHAPES:
            found = {r: _find(lower, names) for r, names in roles.items()}
            if all(found.values()):
                m = Mapping(format=fmt, chosen=chosen, rejected=rejected, **found, **extra)
                if fmt == "alpaca":
                    m.input = _find(lower, ("input", "context"))
                return m
        return Mapping(format="messages", chosen=chosen, rejected=rejected, **extra)  # full chosen / rejected chats
    for fmt, roles in _SHAPES:
        found = {r: _find(lower, names) for r, names in roles.items()}
        if all(found.values()):
            m = Mapping(format=fmt, label=_find(lower, ("label", "kto_tag")) if fmt != "text" else None,
                        **found, **extra)
            if fmt == "alpaca":
                m.input = _find(lower, ("input", "context"))
            return m
    return None


def media_columns(df: pd.DataFrame) -> dict[str, int]:
    """Columns holding images, audio or video (by name, or binary cells), with how many rows are filled."""
    out = {}
    for c in df.columns:
        s = df[c]
        filled = ~blank_cells(s) & ~s.fillna("").astype(str).str.strip().isin(["[]", "{}", "null", "None"])
        if not filled.any():
            continue
        if str(c).lower() in MEDIA_COLUMNS or s[filled].astype(str).str.contains(_BINARY_RE, regex=True).any():
            out[str(c)] = int(filled.sum())
    return out


def check_text_only(df: pd.DataFrame) -> None:
    """BadInput when the table holds images, audio or video: a text model cannot learn from them, and training on
    the text alone would teach answers about pictures it never saw."""
    media = media_columns(df)
    if media:
        cols = ", ".join(f"'{c}' ({n:,} rows)" for c, n in media.items())
        raise BadInput(f"This dataset holds images, audio or video in {cols}. MacTuner fine-tunes text models, which "
                       "cannot see or hear them, and training on the text alone would teach answers about media the "
                       "model never saw. Use a text-only dataset (or remove those columns and the rows that refer to "
                       "them).")


def required_columns(mapping: Mapping) -> list[str]:
    """The columns that must not be empty for a row to be usable (a good default for `handle_missing`)."""
    if mapping.kind == "preference":
        return [c for c in (mapping.prompt, mapping.chosen, mapping.rejected) if c]
    return [getattr(mapping, r) for r in FORMATS[mapping.format]["required"]]


def validate_mapping(df: pd.DataFrame, mapping: Mapping) -> Mapping:
    """BadInput unless the format is known, its required roles are set and every named column is in `df`."""
    if mapping.format not in FORMATS:
        raise BadInput(f"Unknown format '{mapping.format}'; choose one of: {', '.join(FORMATS)}.")
    if bool(mapping.chosen) != bool(mapping.rejected):
        raise BadInput("Preference data needs both a 'chosen' and a 'rejected' column.")
    required = FORMATS[mapping.format]["required"]
    if mapping.kind == "preference":
        required = [r for r in required if r != "response" and not (mapping.format in ("messages", "sharegpt"))]
    for role in required:
        if not getattr(mapping, role):
            raise BadInput(f"Format '{mapping.format}' needs a column for the '{role}' role.")
    available = ", ".join(map(str, df.columns))
    for role, col in mapping.columns().items():
        if col not in df.columns:
            raise BadInput(f"Column '{col}' (the {role} role) is not in the file. Available columns: {available}.")
    return mapping


# ---------------------------------------------------------------------------------------------- conversion


class _Drop(Exception):
    """A row the mapping cannot use; the message is the reason (grouped in the report)."""


@dataclass
class Conversion:
    rows: list[dict]
    kind: str
    total: int
    dropped: dict[str, list] = field(default_factory=dict)  # reason -> row numbers (as the preview numbers them)
    placeholders: dict[str, int] = field(default_factory=dict)  # {{name}} -> rows holding it
    undesirable: int = 0  # kto rows labelled false (kept, never trained as targets by SFT)
    tool_rows: int = 0
    per_row: list = field(default_factory=list, repr=False)  # the row made from each df row, or None

    @property
    def n_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def summary(self) -> str:
        """'300 rows -> 296 usable; 4 left out: 3 have no assistant reply (rows 5, 17, 22), ...'"""
        out = f"{self.total:,} rows → {len(self.rows):,} usable ({KINDS[self.kind]})"
        if self.dropped:
            out += f"; {self.n_dropped:,} left out: " + "; ".join(
                f"{len(rows):,} {why} (row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:5]))}"
                f"{', …' if len(rows) > 5 else ''})" for why, rows in self.dropped.items())
        if self.undesirable:
            out += (f"; {self.undesirable:,} labelled undesirable (label false): kept for KTO, never trained as "
                    "targets by SFT")
        if self.placeholders:
            out += "; template placeholders " + ", ".join(f"{{{{{k}}}}} in {v:,} rows" for k, v in
                                                          self.placeholders.items())
        return out

    def report(self) -> dict:
        return {"kind": self.kind, "rows_in": self.total, "rows_out": len(self.rows),
                "dropped": {k: {"count": len(v), "first_rows": v[:10]} for k, v in self.dropped.items()},
                "undesirable": self.undesirable, "placeholders": self.placeholders, "tool_rows": self.tool_rows}


def blank_cells(s: pd.Series) -> pd.Series:
    return s.isna() | s.fillna("").astype(str).str.strip().eq("")


def system_series(df: pd.DataFrame, m: Mapping) -> pd.Series | None:
    if not m.system and not m.system_prompt:
        return None
    if not m.system:
        return pd.Series(m.system_prompt, index=df.index, dtype=str)
    s = df[m.system].astype(str)
    return s.where(~blank_cells(df[m.system]), m.system_prompt)


def user_series(df: pd.DataFrame, m: Mapping) -> pd.Series:
    p = df[m.prompt].fillna("").astype(str)
    if not m.input:
        return p
    inp = df[m.input]
    return p.where(blank_cells(inp), p + "\n\n" + inp.fillna("").astype(str))


def _json(cell: Any) -> Any:
    if isinstance(cell, str):
        s = cell.strip()
        if s[:1] in "[{":
            try:
                return json.loads(s)
            except json.JSONDecodeError as e:
                raise _Drop(f"have a cell that is not valid JSON ({e.msg})") from None
    return cell


REASONING = ("reasoning", "thinking", "thought")  # content parts of a model's reasoning: kept as <think>...</think>


def _content(c: Any, calls: list | None = None) -> str:
    """Text of a message's content: a string, or content parts [{"type": "text", "text" | "value": ...}]. Reasoning
    parts become "<think>\n...\n</think>" before the text (the convention of reasoning models' templates); tool_call
    parts ({"name", "arguments"} as JSON) are appended to `calls` as OpenAI tool calls."""
    if c is None or (isinstance(c, float) and c != c):
        return ""
    if isinstance(c, dict):
        c = [c]
    if isinstance(c, list):
        out = []
        for p in c:
            if isinstance(p, str):
                out.append(p)
                continue
            kind = p.get("type", "text") if isinstance(p, dict) else type(p).__name__
            if kind in MEDIA or (isinstance(p, dict) and any(k in p for k in ("image", "image_url", "audio"))):
                raise BadInput(f"This dataset's messages hold {kind} parts: MacTuner fine-tunes text models, which "
                               "cannot learn from images, audio or video. Use a text-only dataset.")
            value = p.get("text", p.get("value", p.get("content", ""))) if isinstance(p, dict) else None
            if kind in REASONING:
                out.append(f"<think>\n{str(value or '').strip()}\n</think>\n\n")
            elif kind in ("tool_call", "function_call") and calls is not None:
                calls.append(_tool_call(value))
            elif not isinstance(p, dict) or kind != "text":
                raise _Drop(f"have a content part of an unknown type ({kind})")
            else:
                out.append(str(value or ""))
        return "".join(out)
    return c if isinstance(c, str) else str(c)


def _tool_call(raw: Any) -> dict:
    """{"name", "arguments"} (a dict or its JSON) -> an OpenAI tool call."""
    call = _json(raw) if isinstance(raw, str) else raw
    if not isinstance(call, dict) or not call.get("name"):
        raise _Drop("have a function_call that is not JSON with a name")
    args = call.get("arguments", {})
    return {"type": "function", "function": {"name": str(call["name"]),
                                             "arguments": _json(args) if isinstance(args, str) else args}}


def _message(msg: Any) -> dict:
    if isinstance(msg, str):
        return {"role": "assistant", "content": msg}
    if not isinstance(msg, dict):
        raise _Drop(f"have a message that is a {type(msg).__name__}, not an object with a role and a content")
    raw_role = msg.get("role", msg.get("from"))
    role = ROLE_ALIASES.get(str(raw_role).lower())
    if role is None:
        raise _Drop(f"have an unknown role '{raw_role}' (known: {', '.join(sorted(ROLE_ALIASES))})")
    raw = msg.get("content", msg.get("value"))
    out = {"role": role, "content": ""}
    if str(raw_role).lower() == "function_call":  # ShareGPT: the value is the call as JSON {"name", "arguments"}
        out["tool_calls"] = [_tool_call(raw)]
    else:
        calls: list = []
        out["content"] = _content(raw, calls if role == "assistant" else None)
        if calls:
            out["tool_calls"] = calls
    if isinstance(msg.get("tool_calls"), list) and msg["tool_calls"]:
        out["tool_calls"] = msg["tool_calls"]
    if "loss_weight" in msg and msg["loss_weight"] is not None:
        try:
            out["loss_weight"] = float(msg["loss_weight"])
        except (TypeError, ValueError):
            raise _Drop("have a loss_weight that is not a number") from None
    if msg.get("name"):
        out["name"] = str(msg["name"])
    return out


def _messages(cell: Any) -> list[dict]:
    cell = _json(cell)
    if cell is None or (isinstance(cell, float) and cell != cell) or cell == "":
        return []
    if isinstance(cell, dict):
        cell = [cell]
    if isinstance(cell, str):
        return [{"role": "assistant", "content": cell}]
    if not isinstance(cell, list):
        raise _Drop(f"hold a {type(cell).__name__} where a list of messages belongs")
    return [_message(m) for m in cell]


def _merge(conv: list[dict]) -> list[dict]:
    """Consecutive assistant tool calls belong to one assistant turn (ShareGPT writes call and text apart)."""
    return [m for m in conv if m["content"].strip() or m.get("tool_calls") or m["role"] == "tool"]


def _label(v: Any) -> bool:
    s = str(v).strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise _Drop("have a label that is not true or false")


def _prompt_turns(df: pd.DataFrame, m: Mapping, system: list[str]) -> list:
    """Per row: the conversation before the answer (column formats: system + user; chat formats: the cell)."""
    if m.format in ("messages", "sharegpt"):
        cells = df[m.messages].tolist() if m.messages else [None] * len(df)
        return [("cell", c, s) for c, s in zip(cells, system)]
    return [("user", u, s) for u, s in zip(user_series(df, m).tolist(), system)]


def _row_label(i) -> Any:
    return int(i) if isinstance(i, (int, np.integer)) else i


def convert(df: pd.DataFrame, mapping: Mapping) -> Conversion:
    """Every usable row of `df` under `mapping`, and why each other row was left out (see the module docstring).
    BadInput for what makes the whole dataset unusable (image parts, a bad mapping)."""
    validate_mapping(df, mapping)
    check_text_only(df)
    m = mapping
    conv = Conversion([], m.kind, len(df))

    def drop(i, why: str):
        conv.dropped.setdefault(why, []).append(_row_label(i))
        conv.per_row.append(None)

    if m.kind == "text":
        for i, t, blank in zip(df.index, df[m.text].tolist(), blank_cells(df[m.text]).tolist()):
            if blank:
                drop(i, "have no text")
            else:
                conv.rows.append({"text": str(t)})
                conv.per_row.append(conv.rows[-1])
        count_placeholders(conv)
        return conv
    sys_series = system_series(df, m)
    system = sys_series.fillna("").tolist() if sys_series is not None else [""] * len(df)
    prompts = _prompt_turns(df, m, system)
    tools = df[m.tools].tolist() if m.tools else [None] * len(df)
    resp = df[m.response].fillna("").astype(str).tolist() if m.response else [None] * len(df)
    chosen = df[m.chosen].tolist() if m.chosen else None
    rejected = df[m.rejected].tolist() if m.rejected else None
    labels = df[m.label].tolist() if m.label else None
    for j, i in enumerate(df.index):
        try:
            kind, cell, sys_text = prompts[j]
            base = _messages(cell) if kind == "cell" else [{"role": "user", "content": str(cell)}]
            if sys_text and not any(x["role"] == "system" for x in base):
                base = [{"role": "system", "content": sys_text}] + base
            row_tools = _json(tools[j]) if tools[j] not in (None, "") and tools[j] == tools[j] else None
            if row_tools is not None and not isinstance(row_tools, list):
                raise _Drop("have tools that are not a JSON list")
            if m.kind == "preference":
                row = _preference_row(base, chosen[j], rejected[j])
            else:
                msgs = base + ([{"role": "assistant", "content": resp[j]}] if resp[j] is not None else [])
                msgs = _merge(msgs)
                roles = {x["role"] for x in msgs}
                if "user" not in roles:
                    raise _Drop("have no user message")
                if "assistant" not in roles:
                    raise _Drop("have no assistant reply")
                row = {"messages": msgs}
                if labels is not None:
                    row["label"] = _label(labels[j])
                    conv.undesirable += not row["label"]
            if row_tools:
                row["tools"] = row_tools
            if row_tools or any(x.get("tool_calls") or x["role"] == "tool" for x in row.get("messages", [])):
                conv.tool_rows += 1
        except _Drop as e:
            drop(i, str(e))
            continue
        conv.rows.append(row)
        conv.per_row.append(row)
    count_placeholders(conv)
    return conv


def _preference_row(prompt: list[dict], chosen: Any, rejected: Any) -> dict:
    c, r = _merge(_messages(chosen)), _merge(_messages(rejected))
    if prompt == [] and c and r:  # full conversations in chosen / rejected: the prompt is their common start
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        prompt, c, r = c[:k], c[k:], r[k:]
    prompt = _merge(prompt)
    if not any(x["role"] == "user" for x in prompt):
        raise _Drop("have no user message before the answers")
    if not c or not r or not any(x["role"] == "assistant" for x in c) or not any(x["role"] == "assistant" for x in r):
        raise _Drop("lack a chosen or a rejected answer")
    if c == r:
        raise _Drop("have the same chosen and rejected answer")
    return {"prompt": prompt, "chosen": c, "rejected": r}


def chosen_as_sft(rows: list[dict]) -> list[dict]:
    """Preference rows as conversations that learn the chosen answers (the rejected ones are left out)."""
    return [{"messages": r["prompt"] + r["chosen"], **({"tools": r["tools"]} if r.get("tools") else {})}
            for r in rows]


def to_rows(df: pd.DataFrame, mapping: Mapping) -> list[dict]:
    """The usable rows of `convert` (see there for the ones left out and why)."""
    return convert(df, mapping).rows


def to_messages(df: pd.DataFrame, mapping: Mapping) -> list[list[dict]]:
    """The conversations of `to_rows` (preference rows: the prompt and the chosen answer)."""
    if mapping.format == "text":
        raise BadInput("The 'text' format has no conversations; its rows are saved as {\"text\": ...} (to_rows).")
    rows = to_rows(df, mapping)
    return [r["messages"] for r in (chosen_as_sft(rows) if mapping.kind == "preference" else rows)]


def row_conversations(df: pd.DataFrame, m: Mapping) -> list[list[dict]]:
    """One conversation per df row, in order ([] for a row that cannot be used): for token counts per row."""
    out = []
    for row in convert(df, m).per_row:
        if row is None:
            out.append([])
        else:
            out.append(row["prompt"] + row["chosen"] if "chosen" in row else row["messages"])
    return out
