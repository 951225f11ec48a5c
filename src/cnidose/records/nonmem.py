"""NONMEM-format CSV data sets: read, validate, write.

Column names are case-insensitive (stored upper-case); ``.`` and empty
fields are missing values; a row whose first field starts with ``C`` or
``#`` followed by text other than ``.`` is a comment (NONMEM ``IGNORE=C``/
``IGNORE=#``) only when the first column is named ``C``. Columns the engine
does not know are kept and written back unchanged.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import DataError
from cnidose.models.model import Model, Notice
from cnidose.pk.engine import Method
from cnidose.pk.events import EVENT_COLUMNS, Individual, split_individuals
from cnidose.records.units import check_data_doses

__all__ = ["DataSet", "SimulatedTable", "check_doses", "read_nonmem_csv", "simulate_dataset", "write_csv"]

_MISSING = {"", "."}


@dataclass(frozen=True, slots=True)
class DataSet:
    """A CSV data set as read: header (original spelling), text cells, file lines."""

    header: tuple[str, ...]
    cells: tuple[tuple[str, ...], ...]
    lines: tuple[int, ...]  # 1-based file line of each row (header is line 1)
    source: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.strip().upper() for h in self.header)

    def numeric(self, name: str) -> NDArray[np.float64]:
        """Column ``name`` (case-insensitive) as floats; NaN where missing."""
        j = self.names.index(name.upper())
        texts = [row[j].strip() for row in self.cells]
        cleaned = ["nan" if t in _MISSING else t for t in texts]
        try:
            out = np.array(cleaned, dtype=np.float64)
        except ValueError:
            out = np.empty(len(cleaned))
            for i, text in enumerate(cleaned):
                try:
                    out[i] = float(text)
                except ValueError:
                    raise DataError(f"expected a number, got {texts[i]!r}", row=self.lines[i],
                                    column=name.upper()) from None
        bad = np.isinf(out) | (np.isnan(out) & np.array([t not in _MISSING for t in texts], dtype=bool))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"expected a finite number, got {texts[i]!r}", row=self.lines[i], column=name.upper())
        return out

    def individuals(self, extra: Iterable[str] = ()) -> tuple[Individual, ...]:
        """Validate the event columns and ``extra`` columns (numeric) into individuals.

        Other numeric columns are carried as covariates; text columns are
        ignored here (they are still written back by :func:`write_csv`).
        """
        names = self.names
        wanted = {n.upper() for n in extra}
        for w in sorted(wanted):
            if w not in names:
                raise DataError(f"column {w} is required and missing from {self.source}", column=w)
        cols = {}
        for name in names:
            if name in EVENT_COLUMNS or name in wanted:
                cols[name] = self.numeric(name)
            elif name != "C":
                with contextlib.suppress(DataError):  # a text column: kept for output, not a covariate
                    cols[name] = self.numeric(name)
        return split_individuals(cols, rows=self.lines)


def read_nonmem_csv(path: str | Path) -> DataSet:
    """Read a NONMEM-format CSV file (header required).

    Raises
    ------
    DataError
        Unreadable file, no header, duplicate columns (ignoring case), or a
        row with the wrong number of fields.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read data file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"data file {p} is not UTF-8 text") from None
    reader = csv.reader(text.splitlines())
    rows = list(reader)
    if not rows or not any(h.strip() for h in rows[0]):
        raise DataError(f"data file {p} is empty or has no header line", row=1)
    header = tuple(h.strip() for h in rows[0])
    upper = [h.upper() for h in header]
    for j, h in enumerate(upper):
        if not h:
            raise DataError(f"column {j + 1} has no name", row=1)
        if upper.index(h) != j:
            raise DataError(f"column {h} appears twice (names are case-insensitive)", row=1, column=h)
    cells: list[tuple[str, ...]] = []
    lines: list[int] = []
    comment_col = upper[0] == "C"
    for k, row in enumerate(rows[1:], start=2):
        if not "".join(row).strip():  # an empty line, or only separators and blanks
            continue
        if comment_col and row[0].strip()[:1] in ("C", "#", "@"):
            continue
        if len(row) != len(header):
            raise DataError(f"has {len(row)} fields, the header has {len(header)}", row=k)
        cells.append(tuple(row))
        lines.append(k)
    return DataSet(header, tuple(cells), tuple(lines), str(p))


def write_csv(path: str | Path | None, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Write rows as CSV to ``path`` (or return the text when ``path`` is None)."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([_fmt(v) for v in r])
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "." if v != v else repr(v)  # NaN: missing (v != v, not np.isnan: 36,000 cells of a cohort's estimates)
    return str(v)


@dataclass(frozen=True, slots=True)
class SimulatedTable:
    """Predictions for every row of a data set (row order preserved)."""

    pred: NDArray[np.float64]
    ipred: NDArray[np.float64]
    eta_columns: tuple[str, ...]  # the data columns IPRED used, empty when IPRED == PRED
    methods: tuple[str, ...]
    individuals: tuple[Individual, ...]  # the validated records the predictions belong to
    notices: tuple[Notice, ...] = ()  # covariate domain, defaults and derivations, per individual


def check_doses(model: Model, individuals: Sequence[Individual]) -> None:
    """Refuse a dose (AMT) impossible for the model's drug in its dose unit, naming the row (a dose left in ug)."""
    check_data_doses(str(model.meta.get("drug", "")), str(model.units.get("dose", "")), individuals)


def simulate_dataset(model: Model, data: DataSet, *, method: Method = "auto") -> SimulatedTable:
    """PRED (random effects zero) and IPRED (random effects from ETA columns) per row.

    ETA columns are ``ETA1..ETAn`` (in the model's random-effect order) or
    the model's own names; when the data carry none, IPRED equals PRED.
    """
    names = set(data.names)
    positional = [f"ETA{k + 1}" for k in range(len(model.eta_names))]
    eta_cols: list[str] = []
    for style in (positional, [n.upper() for n in model.eta_names]):
        present = [c for c in style if c in names]
        if present and len(present) < len(style):
            missing = [c for c in style if c not in names]
            raise DataError(f"data carry {', '.join(present)} but not {', '.join(missing)}; "
                            f"model {model.id} has {len(style)} random effects", column=missing[0])
        if present and style:
            eta_cols = style
            break
    inds = data.individuals(extra=eta_cols)
    check_doses(model, inds)
    pred_parts, ipred_parts, methods = [], [], []
    notices: list[Notice] = []
    for ind in inds:
        if eta_cols:
            eta = np.stack([ind.covariates[c] for c in eta_cols], axis=-1)
            bad = np.argwhere(np.isnan(eta))
            if bad.size:
                r, k = bad[0]
                raise DataError("missing random-effect value", row=int(ind.rows[r]), column=eta_cols[k])
            etas = np.concatenate([np.zeros((1, len(ind), len(eta_cols))), eta[None]], axis=0)
        else:
            etas = None
        sim = model.simulate(ind, etas, method=method)
        notices.extend(sim.notices)
        pred_parts.append(sim.prediction[0])
        ipred_parts.append(sim.prediction[-1])
        methods.append(sim.method)
    empty = np.zeros(0)
    return SimulatedTable(np.concatenate(pred_parts) if pred_parts else empty,
                          np.concatenate(ipred_parts) if ipred_parts else empty,
                          tuple(eta_cols), tuple(methods), inds, tuple(notices))
