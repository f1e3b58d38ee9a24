"""Exploring a dataset: token counts with the model's tokenizer (cached), column and length statistics, plotly charts
(token lengths per role, turns, role balance), and one example rendered through the chat template with the trained
tokens marked (`preview_example`; `assistant_spans` is what training masks with too).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import BadInput, NotFound
from ..templates import FALLBACK_CHAT_TEMPLATE, TemplateTimeout, bounded, reply_spans
from ..workspace import Workspace
from .map import Mapping, blank_cells, row_conversations, system_series, user_series, validate_mapping
from .read import SPACE_CLASS, ProgressFn, no_progress

PREVIEW_CSS = (".mt-preview{white-space:pre-wrap;font-family:monospace;line-height:1.6}"
               ".mt-trained{background:#c8f7c5}.mt-masked{background:#eee;color:#777}")


def default_tokenizer_path(ws: Workspace) -> Path | None:
    """The default model's HF folder (holds Gemma 3's tokenizer) when it has been prepared, else None."""
    from ..models import default_hf_path

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

    def count(self, texts: Iterable[str | None], progress: ProgressFn = no_progress) -> np.ndarray:
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
        for i, conv in enumerate(row_conversations(df, m)):
            for x in conv:
                rows.append(i)
                trained.append(x["role"] == "assistant" and x.get("loss_weight", 1.0) != 0)
                texts.append(x["content"])
        return np.array(rows, dtype=np.int64), np.array(trained, dtype=bool), texts
    parts = [(user_series(df, m), False), (df[m.response].fillna("").astype(str), True)]
    system = system_series(df, m)
    if system is not None:
        parts.insert(0, (system.fillna(""), False))
    return (np.concatenate([n] * len(parts)), np.concatenate([np.full(len(df), t) for _, t in parts]),
            [x for s, _ in parts for x in s.tolist()])


def token_lengths(df: pd.DataFrame, mapping: Mapping, tokenizer, progress: ProgressFn = no_progress) -> pd.DataFrame:
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


def _column_type(s: pd.Series) -> str:
    v = s.dropna()
    if v.empty:
        return "empty"
    if pd.to_numeric(v.head(100), errors="coerce").notna().all() and pd.to_numeric(v, errors="coerce").notna().all():
        return "number"
    if v.astype(str).str.match(f"{SPACE_CLASS}*[\\[{{]").all():
        return "json"
    return "text"


def column_summary(df: pd.DataFrame, examples: int = 3) -> pd.DataFrame:
    """One row per column: type (text/number/json/empty), non-null (not missing/blank), unique, duplicates
    (non-null values seen before), example values."""
    rows = []
    for c in df.columns:
        s = df[c]
        filled = s[~blank_cells(s)]
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


@dataclass
class Preview:
    html: str = field(metadata={"help": "escaped rendering; tokens in <span class='mt-trained'> or 'mt-masked'"})
    text: str = field(metadata={"help": "the rendered template text"})
    trained_tokens: int = field(metadata={"help": "tokens the loss is computed on (assistant turns)"})
    masked_tokens: int = field(metadata={"help": "tokens only read as context"})
    mask: list[int] = field(metadata={"help": "1 = trained, per token"})
    template: str = field(metadata={"help": "'tokenizer' (its own chat template), 'fallback' or 'none' (text)"})


def render_chat(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                tools: list | None = None) -> str:
    """The conversation rendered by transformers' apply_chat_template (sandboxed, time-bounded) with `template` or the
    tokenizer's own; any failure of the template is BadInput saying what went wrong."""
    from jinja2.exceptions import TemplateError

    try:
        with bounded():
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=tools or None,
                                                 add_generation_prompt=add_generation_prompt)
    except TemplateTimeout as e:
        raise BadInput(str(e)) from None
    except TemplateError as e:  # SecurityError (sandbox) is a TemplateError
        raise BadInput(f"The chat template failed on this example: {e}") from None
    except OverflowError as e:  # the sandbox's range() refuses more than 100,000 items
        raise BadInput(f"The chat template tried to loop too far ({e}).") from None


def assistant_spans(tokenizer, messages: list[dict], template: str | None = None,
                    tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies, each from where the generation
    prompt leaves off through the reply's end-of-turn markup (so the model learns to stop), for any chat template:
    `templates.reply_spans` locates each reply by rendering it between unique markers, never by assuming a rendered
    prefix is a prefix of the whole text. ReplyNotFound (a BadInput) says why when a reply cannot be located."""
    atoms = list(getattr(tokenizer, "all_special_tokens", [])) + list(tokenizer.get_added_vocab()) \
        if hasattr(tokenizer, "get_added_vocab") else []
    return reply_spans(lambda msgs, gen: render_chat(tokenizer, msgs, template, gen, tools), messages, atoms)


def trained_spans(messages: list[dict], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The assistant spans the loss is computed on: all but those of replies with `loss_weight` 0."""
    weights = [m.get("loss_weight", 1.0) for m in messages if m["role"] == "assistant"]
    return [sp for sp, w in zip(spans, weights) if w is None or float(w) > 0]


def span_mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token (character offsets (a, b) in the rendered text) that the loss is computed on: any token that
    overlaps a span, so the first token of a reply is trained even when it also holds the space before it (as a
    SentencePiece "▁word" does); a zero-width token counts where it stands. Training and the preview both use this."""
    return [1 if any((a < e and b > s) or (a == b and s <= a < e) for s, e in spans) else 0 for a, b in offsets]


def preview_example(example: list[dict] | dict, tokenizer) -> Preview:
    """Render one example (a conversation, or a saved row: {"text"}, {"messages", "tools"?, "label"?} or a
    preference pair) and mark the trained tokens exactly as training masks them: assistant replies, not those with
    `loss_weight` 0, nothing of a row labelled undesirable; a preference pair shows its prompt and chosen answer.

    Uses the tokenizer's chat template, or FALLBACK_CHAT_TEMPLATE when it has none (both rendered by transformers in
    its sandboxed Jinja environment). Text rows are trained in full."""
    row = example if isinstance(example, dict) else {"messages": example}
    if "text" in row and "messages" not in row:
        text, spans, kind = str(row["text"]), None, "none"
    else:
        messages = list(row["prompt"]) + list(row["chosen"]) if "chosen" in row else list(row["messages"])
        template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        text, spans = assistant_spans(tokenizer, messages, template, tools=row.get("tools"))
        spans = [] if row.get("label") is False else trained_spans(messages, spans)
        kind = "fallback" if template else "tokenizer"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [1] * len(ids) if spans is None else span_mask(offsets, spans)
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
