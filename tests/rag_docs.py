"""Documents the RAG tests make themselves (importable as a module): PDFs with known text page by page (fpdf2), an
encrypted one (pypdf's writer), one with images only (no text layer), a truncated one, a decompression bomb."""

from __future__ import annotations

import zlib
from pathlib import Path

TOPICS = [
    ("lighthouse", "The lighthouse keeper climbs one hundred and twelve steps every evening to light the great lamp."),
    ("bread", "Bread rises because the yeast in the dough produces bubbles of carbon dioxide gas."),
    ("volcano", "A volcano erupts when the pressure of the magma below exceeds the strength of the rock above."),
    ("glacier", "Glaciers carve wide valleys as the slow moving ice grinds the bedrock beneath it."),
    ("honeybee", "Honeybees tell each other where flowers are by dancing in a figure of eight inside the hive."),
    ("comet", "A comet grows a glowing tail of gas and dust whenever its orbit carries it close to the sun."),
]


def page_text(i: int, topic: str, fact: str) -> str:
    return (f"Chapter {i + 1}: the {topic}.\n\n{fact} "
            + f"This page is about the {topic} and nothing else. " * 3
            + f"\n\nIn short: {fact}")


def make_pdf(path: Path, pages: list[str]) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    return path


def topic_pdf(path: Path, topics=TOPICS, repeat: int = 1) -> Path:
    """One page per topic (page i+1 is about topics[i]), the whole list `repeat` times."""
    return make_pdf(path, [page_text(i, t, f) for _ in range(repeat) for i, (t, f) in enumerate(topics)])


def encrypted_pdf(path: Path, password: str, src: Path) -> Path:
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter()
    for page in PdfReader(str(src)).pages:
        w.add_page(page)
    w.encrypt(user_password=password, owner_password=password + "-owner", algorithm="RC4-128")
    with open(path, "wb") as fh:
        w.write(fh)
    return path


def image_only_pdf(path: Path, pages: int = 2) -> Path:
    """Pages with drawings and no text: what a scan looks like to a text extractor."""
    from fpdf import FPDF

    pdf = FPDF()
    for _ in range(pages):
        pdf.add_page()
        pdf.set_fill_color(120, 120, 120)
        pdf.rect(20, 20, 170, 250, style="F")
    pdf.output(str(path))
    return path


def truncated_pdf(path: Path, src: Path) -> Path:
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def bomb_pdf(path: Path, megabytes: int = 300) -> Path:
    """One page whose content stream inflates from ~0.3 MB to `megabytes` MB."""
    content = b"BT /F1 12 Tf 72 712 Td (" + b"A" * 200 + b") Tj ET\n" + b" " * (megabytes * 1024 * 1024)
    comp = zlib.compress(content, 9)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(comp) + comp + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offs = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offs.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offs)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))
    return path
