"""A minimal PDF writer for text reports (PDF 1.4, the standard Helvetica fonts, A4, automatic page breaks).

No dependency: a report is lines of text (optionally bold headings); characters outside WinAnsi (Latin-1)
are replaced by close equivalents (≤ -> <=, µ kept, – -> -).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

__all__ = ["text_pdf"]

_A4 = (595.28, 841.89)
_MARGIN = 56.0
_SUBST = {"≤": "<=", "≥": ">=", "–": "-", "—": "-", "×": "x", "→": "->", "’": "'", "‘": "'", "“": '"', "”": '"',
          "…": "...", "²": "2", "·": "-", "Ω": "Omega", "η": "eta"}


def _latin1(s: str) -> str:
    s = "".join(_SUBST.get(ch, ch) for ch in s)
    return s.encode("latin-1", "replace").decode("latin-1")


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def text_pdf(lines: Sequence[tuple[str, str]], *, title: str = "cnidose report") -> bytes:
    """A PDF of ``lines`` = [(style, text)], style "h1", "h2" or "p"; long lines wrap, pages break."""
    sizes = {"h1": (16.0, "F2"), "h2": (12.0, "F2"), "p": (10.0, "F1")}
    width_chars = {"h1": 60, "h2": 80, "p": 100}
    pages: list[list[str]] = [[]]
    y = _A4[1] - _MARGIN
    for style, text in lines:
        size, font = sizes.get(style, sizes["p"])
        wrapped = textwrap.wrap(_latin1(text), width_chars.get(style, 100), break_on_hyphens=False) or [""]
        if style != "p":
            y -= size * 0.6
        for part in wrapped:
            if y < _MARGIN + size:
                pages.append([])
                y = _A4[1] - _MARGIN
            pages[-1].append(f"BT /{font} {size:g} Tf {_MARGIN:.2f} {y:.2f} Td ({_escape(part)}) Tj ET")
            y -= size * 1.35
    objects: list[bytes] = []

    def add(body: str | bytes) -> int:
        objects.append(body.encode("latin-1") if isinstance(body, str) else body)
        return len(objects)

    catalog = add("")  # placeholders filled below
    pages_obj = add("")
    f1 = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    f2 = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>")
    kids = []
    for k, content in enumerate(pages, start=1):
        footer = f"BT /F1 8 Tf {_MARGIN:.2f} 30 Td ({_escape(_latin1(title))} - page {k} of {len(pages)}) Tj ET"
        stream = "\n".join([*content, footer]).encode("latin-1")
        cid = add(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
        kids.append(add(f"<< /Type /Page /Parent {pages_obj} 0 R /MediaBox [0 0 {_A4[0]} {_A4[1]}] "
                        f"/Resources << /Font << /F1 {f1} 0 R /F2 {f2} 0 R >> >> /Contents {cid} 0 R >>"))
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_obj} 0 R >>".encode()
    objects[pages_obj - 1] = (f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] "
                              f"/Count {len(kids)} >>").encode()
    info = add(f"<< /Title ({_escape(_latin1(title))}) /Producer (cnidose) >>")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root {catalog} 0 R /Info {info} 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)
