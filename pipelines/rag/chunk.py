"""Chunking: each page's text cut into passages of at most `size` tokens of the embedder's own tokenizer (so every
chunk fits what it reads - 256 word pieces for all-MiniLM-L6-v2), at paragraph and sentence boundaries where
possible, with `overlap` tokens of the previous passage repeated. A chunk never spans two pages: its origin is one
page and an exact character span of that page's text; Markdown headings travel with the chunks under them.

Time is linear in the text (headings are passed once, in order, however many there are); `deadline` (a
time.monotonic() value) and `max_chunks` bound a document that would still take too long or make too many passages.
"""

from __future__ import annotations

import re
import time
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


MAX_CHUNKS = 100_000  # passages per document


def _check_bounds(doc: Document, out: list, max_chunks: int, deadline: float | None, page: int) -> None:
    if len(out) > max_chunks:
        raise BadInput(f"{doc.name} makes more than {max_chunks:,} passages (at page {page}); split it into smaller "
                       "documents, or use a knowledge base with bigger chunks.")
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"cutting it into passages (page {page} of {len(doc.pages)})")


def _units(text: str, embedder, size: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of the page's sentences, a sentence longer than `size` cut at token boundaries."""
    spans = _spans(text)
    counts = embedder.count_tokens([text[a:b] for a, b in spans])
    units: list[tuple[int, int, int]] = []
    for (a, b), n in zip(spans, counts):
        if n > size:
            pieces = _split_long(embedder.tokenizer, text, a, b, size)
            units += [(x, y, k) for (x, y), k in zip(pieces, embedder.count_tokens([text[x:y] for x, y in pieces]))]
        else:
            units.append((a, b, n))
    return units


def _pack(units: list[tuple[int, int, int]], size: int, overlap: int):
    """Groups of consecutive units of at most `size` tokens (each group: (start, end, tokens)), the next group
    starting with the last units of the previous one that fit in `overlap` tokens. Linear: running totals."""
    cur: list[tuple[int, int, int]] = []
    total = 0
    for u in units:
        if cur and total + u[2] > size:
            yield cur[0][0], cur[-1][1], total
            keep, kept = [], 0
            for x in reversed(cur):  # the overlap: the last units that fit in `overlap` tokens
                if kept + x[2] > overlap:
                    break
                keep.append(x)
                kept += x[2]
            cur, total = (keep[::-1], kept) if kept + u[2] <= size else ([], 0)
        cur.append(u)
        total += u[2]
    if cur:
        yield cur[0][0], cur[-1][1], total


def chunk_document(doc: Document, embedder, size: int = 200, overlap: int = 40, max_chunks: int | None = None,
                   deadline: float | None = None) -> list[Chunk]:
    """The chunks of every page of `doc`, in order. BadInput past `max_chunks` (default MAX_CHUNKS); TimeoutError
    (saying where it stopped) past `deadline`."""
    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks
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
        _check_bounds(doc, out, max_chunks, deadline, page.number)
        text = page.text
        headings = [(m.start(), m.group(2).strip()) for m in _HEADING.finditer(text)] if doc.kind == "markdown" else []
        next_heading = 0  # chunks start in order: each heading is passed once
        for a, b, tokens in _pack(_units(text, embedder, size), size, overlap):
            while next_heading < len(headings) and headings[next_heading][0] <= a:
                heading = headings[next_heading][1]
                next_heading += 1
            out.append(Chunk(page.number, a, b, heading, text[a:b], tokens))
            if len(out) % 1000 == 0:
                _check_bounds(doc, out, max_chunks, deadline, page.number)
    _check_bounds(doc, out, max_chunks, deadline, len(doc.pages))
    return out
