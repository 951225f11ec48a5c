"""The printable report as a PDF: fpdf2 (maintained, pure Python, embeds TrueType fonts as subsets with a
ToUnicode map, so text is searchable and extractable) with DejaVu Sans, the font matplotlib ships (Latin, Greek
and Cyrillic: "Dvořák, Jiří", "Παπαδόπουλος" print as typed), and the concentration plot drawn by matplotlib
(Agg, no display) as a PNG.

Chosen over ReportLab (also maintained) for fpdf2's automatic text shaping and page breaks with less code, and
over a browser's print-to-PDF because a server must not need a browser. Both libraries are imported only when a
PDF is asked for, so neither slows the app's start.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_png", "printable", "report_pdf"]


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")


@functools.cache
def _covered() -> frozenset[int]:
    """The code points both report fonts can draw (read once from their cmap tables, with fontTools, which
    fpdf2 depends on)."""
    from fontTools.ttLib import TTFont

    maps = []
    for name in FONTS:
        with TTFont(str(_font_dir() / name), lazy=True) as font:
            maps.append(set(font.getBestCmap()))
    return frozenset(set.intersection(*maps))


def printable(text: str) -> str:
    """``text`` with every character the report's font cannot draw written as [U+XXXX]: a name in a script
    DejaVu lacks (Chinese, Japanese, Korean) stays identifiable instead of vanishing from a clinical document.

    >>> printable("Dvořák, Παπαδόπουλος, 王")
    'Dvořák, Παπαδόπουλος, [U+738B]'
    """
    have = _covered()
    return "".join(ch if ord(ch) in have or ch in "\n\t" else f"[U+{ord(ch):04X}]" for ch in text)


def plot_png(plot: dict[str, Any], *, width_in: float = 7.0, height_in: float = 3.2, dpi: int = 150) -> bytes:
    """The concentration plot of the patient page (:func:`cnidose.web.app._plot_data`: wall-clock times, levels,
    doses, target band, fit and forecast) as a PNG."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend or state in the server

    def times(xs: Sequence[str]) -> Any:  # wall-clock times (no offset) as datetime64, which matplotlib draws
        return np.array([dt.datetime.fromisoformat(x) for x in xs], dtype="datetime64[s]")

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    ax = fig.add_subplot()
    allx = [times(plot["levels"]["time"]), times(plot["doses"]["time"])]
    for key, colour, label, style in (("fit", "#1f5fa8", "individual fit", "-"),):
        s = plot.get(key)
        if s:
            x = times(s["time"])
            ax.fill_between(x, s["p10"], s["p90"], color=colour, alpha=0.2, linewidth=0)
            ax.plot(x, s["p50"], style, color=colour, label=label, linewidth=1.2)
            allx.append(x)
    fc = plot.get("forecast")
    if fc:
        x = times(fc["time"])
        for name, colour, style in (("current", "#b35900", ":"), ("proposed", "#6a3d9a", "--")):
            s = fc.get(name)
            if s:
                ax.fill_between(x, s["p10"], s["p90"], color=colour, alpha=0.15, linewidth=0)
                ax.plot(x, s["p50"], style, color=colour, linewidth=1.4,
                        label=f"{name}: {s['dose']:g} mg every {s['interval']:g} h")
        allx.append(x)
    if plot["levels"]["time"]:
        ax.plot(times(plot["levels"]["time"]), plot["levels"]["value"], "o", color="#b3261e", label="measured",
                markersize=4)
    if plot["doses"]["time"]:
        ax.plot(times(plot["doses"]["time"]), [0.0] * len(plot["doses"]["time"]), "^", color="#555555",
                markersize=4, label="dose given")
    if plot.get("target") and any(x.size for x in allx):
        ax.axhspan(plot["target"][0], plot["target"][1], color="#1a7f37", alpha=0.12, linewidth=0, label="target")
    ax.set_ylabel(plot.get("unit", ""))
    ax.set_xlabel(f"time ({plot.get('timezone', 'UTC')})")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6, ncols=3, loc="upper left", frameon=False)
    ax.tick_params(labelsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def report_pdf(blocks: Sequence[tuple[str, Any]], *, title: str = "cnidose report") -> bytes:
    """A PDF of ``blocks`` = [(kind, content)]: "h1", "h2", "p", "box" (a framed paragraph: the signed regimen)
    with text, or "png" with image bytes; A4, pages break by themselves, every page numbered."""
    from fpdf import FPDF

    class Doc(FPDF):  # type: ignore[misc]
        def footer(self) -> None:
            self.set_y(-12)
            self.set_font("DejaVu", size=7)
            self.set_text_color(110, 110, 110)
            self.cell(0, 5, f"{printable(title)} - page {self.page_no()}/{{nb}}", align="C")

    pdf = Doc(format="A4", unit="mm")
    fonts = _font_dir()
    pdf.add_font("DejaVu", "", str(fonts / FONTS[0]))
    pdf.add_font("DejaVu", "B", str(fonts / FONTS[1]))
    pdf.set_title(title)
    pdf.set_creator("cnidose")
    pdf.set_auto_page_break(auto=True, margin=16)
    pdf.set_margins(18, 16, 18)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    for kind, content in blocks:
        if kind != "png":
            content = printable(str(content))
        pdf.set_text_color(0, 0, 0)
        if kind == "h1":
            pdf.set_font("DejaVu", "B", 15)
            pdf.multi_cell(width, 8, str(content), align="L", new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        elif kind == "h2":
            pdf.ln(2)
            pdf.set_font("DejaVu", "B", 11)
            pdf.multi_cell(width, 6, str(content), align="L", new_x="LMARGIN", new_y="NEXT")
        elif kind == "box":
            pdf.ln(1)
            pdf.set_font("DejaVu", "B", 10)
            pdf.multi_cell(width, 5.5, str(content), border=1, padding=2, align="L", new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        elif kind == "png":
            pdf.image(io.BytesIO(content), w=width)
        else:
            pdf.set_font("DejaVu", size=9)
            pdf.multi_cell(width, 4.6, str(content), align="L", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
