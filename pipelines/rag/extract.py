"""Documents to text, page by page: PDF (pypdf), plain text and Markdown. Every way a document can be unusable is a
clear BadInput naming the file - encrypted (and the password missing or wrong), corrupt or truncated, not a PDF
though named .pdf, scanned with no text layer, empty, or past the limits on pages, characters and time that keep a
decompression bomb or an absurd page count from hanging the ingest.

    doc = extract(Path("report.pdf"), password=None)   # Document(name, kind, pages=[Page(number, text)], ...)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput

KINDS = {".pdf": "pdf", ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown"}
MAX_PAGES = 2000
MAX_CHARS = 20_000_000  # extracted characters per document
MAX_SECONDS = 300.0  # extraction time per document
MAX_BYTES = 200 * 1024 * 1024


@dataclass
class Page:
    number: int  # 1-based; a text file is one page
    text: str


@dataclass
class Document:
    name: str
    kind: str  # pdf | text | markdown
    pages: list[Page]
    bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return sum(len(p.text) for p in self.pages)


def kind_of(name: str) -> str:
    kind = KINDS.get(Path(name).suffix.lower())
    if kind is None:
        raise BadInput(f"{Path(name).name}: unsupported document type '{Path(name).suffix or Path(name).name}' "
                       f"(PDF, .txt and .md are read).")
    return kind


def extract(path: Path, password: str | None = None, name: str | None = None,
            max_pages: int = MAX_PAGES, max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS) -> Document:
    """The text of one document, page by page; BadInput (one line, naming the file) when it cannot be used."""
    path = Path(path)
    name = name or path.name
    kind = kind_of(name)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise BadInput(f"{name} is {size / 2**20:.0f} MB; documents up to {MAX_BYTES // 2**20} MB are read.")
    if size == 0:
        raise BadInput(f"{name} is empty.")
    doc = _pdf(path, name, size, password, max_pages, max_chars, max_seconds) if kind == "pdf" else \
        _text(path, name, kind, size, max_chars)
    if not any(p.text.strip() for p in doc.pages):
        if kind == "pdf":
            raise BadInput(f"{name} has no text layer ({len(doc.pages)} page(s) of images, probably a scan): "
                           "MacTuner reads the text of PDFs and does not include OCR. Run it through an OCR tool "
                           "first, or add a text version.")
        raise BadInput(f"{name} holds no text.")
    return doc


def _text(path: Path, name: str, kind: str, size: int, max_chars: int) -> Document:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise BadInput(f"{name} is not a text file (it holds binary data).")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes  # noqa: PLC0415 - requests' own dependency

        best = from_bytes(raw[:1_000_000]).best()
        if best is None:
            raise BadInput(f"{name}: the text encoding could not be recognised; save it as UTF-8.") from None
        text = raw.decode(best.encoding, errors="replace")
    if len(text) > max_chars:
        raise BadInput(f"{name} has {len(text):,} characters; at most {max_chars:,} per document are read.")
    return Document(name, kind, [Page(1, text)], size)


def _decrypt(reader, name: str, password: str | None) -> None:
    """Open an encrypted PDF with `password`, else with the empty user password (a PDF that only restricts printing
    or copying opens with it, and the form cannot send an empty password); BadInput when neither opens it."""
    from pypdf import errors as pe  # noqa: PLC0415

    for candidate in ([password] if password else []) + [""]:
        try:
            if reader.decrypt(candidate):
                return
        except pe.DependencyError:
            raise BadInput(f"{name} uses an encryption pypdf cannot open without the 'cryptography' package.") from None
    raise BadInput(f"{name}: the password is wrong." if password else
                   f"{name} is encrypted: give its password to read it.")


def _pdf(path: Path, name: str, size: int, password: str | None, max_pages: int, max_chars: int,
         max_seconds: float) -> Document:
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if b"%PDF-" not in head:
        raise BadInput(f"{name} is not a PDF (it is named .pdf, but does not start like one).")
    from pypdf import PdfReader  # noqa: PLC0415
    from pypdf import errors as pe  # noqa: PLC0415

    t0 = time.monotonic()
    try:
        reader = PdfReader(str(path), strict=False)
        if reader.is_encrypted:
            _decrypt(reader, name, password)
        n = len(reader.pages)
        if n == 0:
            raise BadInput(f"{name} has no pages.")
        if n > max_pages:
            raise BadInput(f"{name} has {n:,} pages; at most {max_pages:,} per document are read (split it).")
        pages, chars, warnings = [], 0, []
        for i, page in enumerate(reader.pages, 1):
            if time.monotonic() - t0 > max_seconds:
                raise BadInput(f"{name}: reading its text took over {max_seconds:.0f} s (stopped at page {i} of "
                               f"{n}); it may be damaged or built to be slow. Split it or convert it to text.")
            try:
                text = page.extract_text() or ""
            except pe.LimitReachedError:
                raise BadInput(f"{name}: page {i} expands to more data than pypdf's safety limits allow (a "
                               "decompression bomb?); not read.") from None
            except (pe.PdfReadError, ValueError, KeyError, TypeError) as e:
                warnings.append(f"page {i}: its text could not be read ({type(e).__name__})")
                text = ""
            chars += len(text)
            if chars > max_chars:
                raise BadInput(f"{name} has over {max_chars:,} characters of text (at page {i}); at most "
                               f"{max_chars:,} per document are read.")
            pages.append(Page(i, text))
    except BadInput:
        raise
    except pe.FileNotDecryptedError:
        raise BadInput(f"{name} is encrypted: give its password to read it.") from None
    except pe.LimitReachedError:
        raise BadInput(f"{name} expands to more data than pypdf's safety limits allow (a decompression bomb?); "
                       "not read.") from None
    except (pe.PyPdfError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        raise BadInput(f"{name} is not a readable PDF (corrupt or truncated: {type(e).__name__}"
                       + (f": {str(e).splitlines()[0][:120]}" if str(e) else "") + ").") from None
    if warnings:
        warnings = [f"{name}: {len(warnings)} page(s) unreadable, e.g. {warnings[0]}"]
    return Document(name, "pdf", pages, size, warnings)
