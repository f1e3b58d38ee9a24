"""Chunking: each page's text cut into passages of at most `size` tokens of the embedder's own tokenizer (so every
chunk fits what it reads - 256 word pieces for all-MiniLM-L6-v2), at paragraph and sentence boundaries where
possible, with `overlap` tokens of the previous passage repeated. A chunk never spans two pages: its origin is one
page and an exact character span of that page's text; Markdown headings travel with the chunks under them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadInput
from .extract import Document

_PARA = re.compile(r"\n[ \t]*\n+")
_SENT = re.compile(r"(?<=[.!?;:。！？])\s+|\n")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


@dataclass
class Chunk:
    page: int
    start: int  # character offsets in the page's text
    end: int
    heading: str | None
    text: str
    tokens: int


def _spans(text: str) -> list[tuple[int, int]]:
    """Sentence spans (start, end) of `text`, paragraph by paragraph, whitespace trimmed."""
    out = []
    pos = 0
    for para in [*_PARA.finditer(text), None]:
        p_end = para.start() if para else len(text)
        seg_start = pos
        for m in [*_SENT.finditer(text, pos, p_end), None]:
            s_end = m.start() if m else p_end
            a, b = seg_start, s_end
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                out.append((a, b))
            if m:
                seg_start = m.end()
        pos = para.end() if para else len(text)
    return out


def _split_long(tokenizer, text: str, a: int, b: int, size: int) -> list[tuple[int, int]]:
    """A span longer than `size` tokens cut at token boundaries (character offsets from the fast tokenizer)."""
    enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    out = []
    for i in range(0, len(offs), size):
        piece = offs[i: i + size]
        out.append((a + piece[0][0], a + piece[-1][1]))
    return out


def chunk_document(doc: Document, embedder, size: int = 200, overlap: int = 40) -> list[Chunk]:
    """The chunks of every page of `doc`, in order."""
    if size < 16:
        raise BadInput(f"The chunk size must be at least 16 tokens (got {size}).")
    if size > embedder.max_tokens:
        raise BadInput(f"The chunk size {size} is more than the embedding model reads ({embedder.max_tokens} "
                       "tokens): choose a smaller one.")
    if not 0 <= overlap < size:
        raise BadInput(f"The overlap must be at least 0 and below the chunk size (got {overlap}).")
    out: list[Chunk] = []
    heading = None
    for page in doc.pages:
        text = page.text
        headings = [(m.start(), m.group(2).strip()) for m in _HEADING.finditer(text)] if doc.kind == "markdown" else []
        spans = _spans(text)
        counts = embedder.count_tokens([text[a:b] for a, b in spans])
        units: list[tuple[int, int, int]] = []
        for (a, b), n in zip(spans, counts):
            if n > size:
                pieces = _split_long(embedder.tokenizer, text, a, b, size)
                units += [(x, y, k) for (x, y), k in zip(pieces, embedder.count_tokens([text[x:y] for x, y in pieces]))]
            else:
                units.append((a, b, n))
        cur: list[tuple[int, int, int]] = []

        def emit():
            nonlocal heading
            a, b = cur[0][0], cur[-1][1]
            for pos, h in headings:
                if pos <= a:
                    heading = h
            out.append(Chunk(page.number, a, b, heading, text[a:b], sum(u[2] for u in cur)))

        for u in units:
            if cur and sum(x[2] for x in cur) + u[2] > size:
                emit()
                keep, total = [], 0
                for x in reversed(cur):  # the overlap: the last units that fit in `overlap` tokens
                    if total + x[2] > overlap:
                        break
                    keep.insert(0, x)
                    total += x[2]
                cur = keep if total + u[2] <= size else []
            cur.append(u)
        if cur:
            emit()
    return out
