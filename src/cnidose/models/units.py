"""Units of measure: parse, compare and convert.

A unit is a scale factor and a dimension vector over mass, length, time and
amount of substance. Text is a product of symbols separated by ``/`` (divide
by what follows), ``*`` or ``·``; a symbol may carry a leading number and an
exponent (``m2``, ``m^2``, ``1.73m2``)::

    mg, ug (= µg = mcg), ng, g, kg       mass
    L, dL, mL, uL; m, cm                 volume and length
    h, min, s, d, wk, y                  time (y = 365.25 d)
    mol, mmol, umol, nmol                amount
    1, %                                 dimensionless (L/L and kg/kg cancel)

Examples
--------
>>> convert(1.0, "mg/L", "ng/mL")
1000.0
>>> round(convert(35.0, "%", "L/L"), 12)
0.35
>>> parse_unit("L/h").per(parse_unit("L")) == parse_unit("1/h")
True
>>> parse_unit("mL/min/1.73m2").dims
(0, 1, -1, 0)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Unit", "UnitError", "convert", "parse_unit"]

Dims = tuple[int, int, int, int]  # mass, length, time, amount

_SYMBOLS: dict[str, tuple[float, Dims]] = {
    "g": (1.0, (1, 0, 0, 0)),
    "kg": (1e3, (1, 0, 0, 0)),
    "mg": (1e-3, (1, 0, 0, 0)),
    "ug": (1e-6, (1, 0, 0, 0)),
    "µg": (1e-6, (1, 0, 0, 0)),
    "mcg": (1e-6, (1, 0, 0, 0)),
    "ng": (1e-9, (1, 0, 0, 0)),
    "m": (1.0, (0, 1, 0, 0)),
    "cm": (1e-2, (0, 1, 0, 0)),
    "L": (1e-3, (0, 3, 0, 0)),
    "dL": (1e-4, (0, 3, 0, 0)),
    "mL": (1e-6, (0, 3, 0, 0)),
    "uL": (1e-9, (0, 3, 0, 0)),
    "µL": (1e-9, (0, 3, 0, 0)),
    "s": (1.0, (0, 0, 1, 0)),
    "min": (60.0, (0, 0, 1, 0)),
    "h": (3600.0, (0, 0, 1, 0)),
    "d": (86400.0, (0, 0, 1, 0)),
    "wk": (7 * 86400.0, (0, 0, 1, 0)),
    "y": (365.25 * 86400.0, (0, 0, 1, 0)),
    "mol": (1.0, (0, 0, 0, 1)),
    "mmol": (1e-3, (0, 0, 0, 1)),
    "umol": (1e-6, (0, 0, 0, 1)),
    "µmol": (1e-6, (0, 0, 0, 1)),
    "nmol": (1e-9, (0, 0, 0, 1)),
    "%": (1e-2, (0, 0, 0, 0)),
}
_TOKEN = re.compile(r"^(?P<num>\d+(?:\.\d*)?)?(?P<sym>[A-Za-zµ%]+)?\^?(?P<exp>-?\d+)?$")


class UnitError(ValueError):
    """A unit text cannot be parsed, or two units are not convertible."""


@dataclass(frozen=True, slots=True)
class Unit:
    """A parsed unit: ``value_in_base = value * factor``; ``dims`` over (mass, length, time, amount)."""

    factor: float
    dims: Dims

    def __mul__(self, other: Unit) -> Unit:
        return Unit(self.factor * other.factor, _add(self.dims, other.dims, 1))

    def per(self, other: Unit) -> Unit:
        """This unit divided by ``other``."""
        return Unit(self.factor / other.factor, _add(self.dims, other.dims, -1))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Unit) and self.dims == other.dims
                and math.isclose(self.factor, other.factor, rel_tol=1e-12))

    def __hash__(self) -> int:
        return hash(self.dims)

    @property
    def dimensionless(self) -> bool:
        return self.dims == (0, 0, 0, 0)

    def to(self, other: Unit) -> float:
        """Factor that converts a value in this unit to ``other``; UnitError if dimensions differ."""
        if self.dims != other.dims:
            raise UnitError("dimensions differ")
        return self.factor / other.factor


def _add(a: Dims, b: Dims, sign: int) -> Dims:
    return (a[0] + sign * b[0], a[1] + sign * b[1], a[2] + sign * b[2], a[3] + sign * b[3])


@lru_cache(maxsize=512)
def parse_unit(text: str) -> Unit:
    """Parse unit text; raise :class:`UnitError` naming the part that is not understood."""
    if not isinstance(text, str):
        raise UnitError(f"expected unit text, got {text!r}")
    s = text.strip().replace("·", "*").replace(" ", "")
    if s in ("", "1", "-"):
        return Unit(1.0, (0, 0, 0, 0))
    unit = Unit(1.0, (0, 0, 0, 0))
    # split keeping the operators: a/b/c means a per b per c
    parts = re.split(r"([/*])", s)
    op = "*"
    for part in parts:
        if part in ("/", "*"):
            op = part
            continue
        if not part:
            raise UnitError(f"cannot parse unit {text!r}")
        m = _TOKEN.match(part)
        if m is None or (m.group("num") is None and m.group("sym") is None):
            raise UnitError(f"cannot parse {part!r} in unit {text!r}")
        factor = float(m.group("num")) if m.group("num") else 1.0
        sym = m.group("sym")
        if sym is None:
            term = Unit(factor, (0, 0, 0, 0))
        else:
            if sym not in _SYMBOLS:
                known = ", ".join(k for k in _SYMBOLS if k.isascii())
                raise UnitError(f"unknown unit symbol {sym!r} in {text!r} (known: {known})")
            f, d = _SYMBOLS[sym]
            e = int(m.group("exp")) if m.group("exp") else 1
            term = Unit(factor * f**e, (d[0] * e, d[1] * e, d[2] * e, d[3] * e))
        unit = unit * term if op == "*" else unit.per(term)
    return unit


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert ``value`` between two unit texts of the same dimension."""
    a, b = parse_unit(from_unit), parse_unit(to_unit)
    if a.dims != b.dims:
        raise UnitError(f"cannot convert {from_unit!r} to {to_unit!r}: different dimensions")
    return value * a.to(b)
