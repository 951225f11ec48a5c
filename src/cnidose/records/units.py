"""Units at the record's boundary: doses to mg, drug levels to ng/mL, covariates to the standard data units.

A value that is impossible in the unit it came with, but would be ordinary in the neighbouring unit (a
tacrolimus dose of 500 "mg", a level of 8,000 "ng/mL"), is refused with the likely mix-up named -- never
converted silently.

Levels reported in nmol/L are converted with the molar masses below (sources next to them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from cnidose.dosing.regimen import IMPLAUSIBLE_LEVEL
from cnidose.errors import DataError, InputError
from cnidose.models.covariates import STANDARD_COVARIATES
from cnidose.pk.events import Individual

__all__ = ["DRUGS", "FieldError", "check_data_doses", "covariate_text", "covariate_value", "dose_mg", "level_ng_ml"]


class FieldError(InputError):
    """A value that cannot be stored; ``field`` names it (a form field, an API attribute or a CSV column)."""

    def __init__(self, message: str, *, field: str):
        self.field = field
        super().__init__(f"[{field}] {message}")


DRUGS = ("tacrolimus", "cyclosporine", "voclosporin")
# mg per administration accepted at all (oral or intravenous): engineering bounds, wide around the labelled
# doses, to catch a unit mix-up or a typo -- not clinical limits. Voclosporin's lower bound is one capsule
# (7.9 mg, Lupkynis label).
_DOSE_RANGE = {"tacrolimus": (0.05, 50.0), "cyclosporine": (5.0, 2000.0), "voclosporin": (7.9, 100.0)}
# ng/mL above which a level is refused: 10x the level the recommender already flags as implausible
# (cnidose.dosing.regimen.IMPLAUSIBLE_LEVEL); voclosporin, which has none, 1000 ng/mL (engineering bound)
_LEVEL_MAX = {"voclosporin": 1000.0, **{d: 10.0 * v for d, v in IMPLAUSIBLE_LEVEL.items()}}
# g/mol: tacrolimus C44H69NO12 804.02 (Merck Index; anhydrous), cyclosporine C62H111N11O12 1202.61 (Merck
# Index), voclosporin C63H111N11O12 1214.65 (PubChem CID 6918486)
_MOLAR_MASS = {"tacrolimus": 804.02, "cyclosporine": 1202.61, "voclosporin": 1214.65}
_MASS = {"mg": 1.0, "g": 1000.0, "ug": 1e-3, "µg": 1e-3, "mcg": 1e-3}
_CONC = {"ng/mL": 1.0, "ug/L": 1.0, "µg/L": 1.0, "mcg/L": 1.0, "ng/L": 1e-3, "mg/L": 1000.0, "ug/mL": 1000.0}
# covariate unit alternatives -> factor to the standard data unit
_COV_UNITS: dict[str, dict[str, float]] = {
    "WT": {"lb": 0.45359237}, "HT": {"m": 100.0, "in": 2.54}, "HCT": {"%": 0.01},
    "SCR": {"mg/dL": 88.4}, "ALB": {"g/dL": 10.0},
}


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(f"expected a finite number, got {value!r}", field=field)
    return float(value)


def _drug(drug: str, field: str) -> str:
    d = str(drug).strip().lower()
    if d not in DRUGS:
        raise FieldError(f"unknown drug {drug!r} (known: {', '.join(DRUGS)})", field=field)
    return d


def dose_mg(drug: str, amount: Any, unit: str, *, field: str = "amount") -> float:
    """One administration in mg; refuses an impossible amount and names a likely mg/ug mix-up.

    >>> dose_mg("tacrolimus", 1500, "ug")
    1.5
    """
    d = _drug(drug, "drug")
    v = _number(amount, field)
    if unit not in _MASS:
        raise FieldError(f"unit {unit!r} for a dose (use mg, g or ug)", field=field + "_unit")
    mg = v * _MASS[unit]
    lo, hi = _DOSE_RANGE[d]
    if lo <= mg <= hi:
        return mg
    hint = ""
    if unit == "mg" and lo <= mg / 1000 <= hi:
        hint = f"; {v:g} ug would be an ordinary dose -- check the unit"
    elif unit in ("ug", "µg", "mcg") and lo <= mg * 1000 <= hi:
        hint = f"; {v:g} mg would be an ordinary dose -- check the unit"
    raise FieldError(f"{v:g} {unit} is not a possible {d} dose (expected {lo:g}-{hi:g} mg per administration){hint}",
                     field=field)


def check_data_doses(drug: str, dose_unit: str, individuals: Iterable[Individual]) -> None:
    """Refuse a data set's dose (AMT of an EVID 1/4 record) that is not a possible administration of ``drug``
    in the model's dose unit -- a dose left in ug (3000 "mg" of tacrolimus) -- naming its row and AMT.

    The bounds are those of an entered dose (:func:`dose_mg`); a constant steady-state infusion (AMT 0) has no
    amount to check; drugs without bounds are not checked.
    """
    if drug not in _DOSE_RANGE or dose_unit not in _MASS:
        return
    lo, hi = _DOSE_RANGE[drug]
    factor = _MASS[dose_unit]
    for ind in individuals:
        mg = ind.amt * factor
        bad = ((ind.evid == 1) | (ind.evid == 4)) & (ind.amt > 0) & ((mg < lo) | (mg > hi))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            v = float(ind.amt[j])
            hint = (f"; {v:g} ug would be an ordinary dose -- the data look like micrograms" if lo <= mg[j] / 1000 <= hi
                    else f"; {v:g} g would be an ordinary dose -- check the unit" if lo <= mg[j] * 1000 <= hi else "")
            raise DataError(f"dose {v:g} {dose_unit} is not a possible {drug} administration (expected {lo:g}-{hi:g} "
                            f"mg){hint}", row=int(ind.rows[j]), column="AMT")


def level_ng_ml(drug: str, value: Any, unit: str, *, field: str = "value") -> float:
    """A whole-blood level in ng/mL (= ug/L); refuses negative or impossible levels, naming the unit.

    >>> round(level_ng_ml("tacrolimus", 9.95, "nmol/L"), 4)  # 9.95 nmol/L x 804.02 g/mol
    8.0
    """
    d = _drug(drug, "drug")
    v = _number(value, field)
    if v < 0:
        raise FieldError(f"a level cannot be negative ({v:g} {unit})", field=field)
    if unit == "nmol/L":
        ng = v * _MOLAR_MASS[d] / 1000.0
    elif unit in _CONC:
        ng = v * _CONC[unit]
    else:
        raise FieldError(f"unit {unit!r} for a {d} level (use ng/mL, ug/L, mg/L, ng/L or nmol/L)",
                         field=field + "_unit")
    top = _LEVEL_MAX[d]
    if ng > top:
        hint = f"; if the unit is ng/L, {v:g} ng/L is {ng / 1000:g} ng/mL" if unit in ("ng/mL", "ug/L") else ""
        raise FieldError(f"{v:g} {unit} is not a possible {d} level (refused above {top:g} ng/mL){hint}", field=field)
    return ng


def covariate_value(name: str, value: Any, unit: str, *, field: str = "value") -> tuple[str, float, str]:
    """(standard name, value in its data unit, unit) for a covariate of the standard vocabulary.

    >>> covariate_value("hct", 33, "%")
    ('HCT', 0.33, 'L/L')
    """
    key = str(name).strip().upper()
    std = STANDARD_COVARIATES.get(key)
    if std is None:
        raise FieldError(f"unknown covariate {name!r} (known: {', '.join(STANDARD_COVARIATES)})", field="name")
    from cnidose.clinical.record import NOT_ENTERED  # here: reading a data set (cnidose fit) needs no clinical code

    if key in NOT_ENTERED:  # the record computes it: an entry would be a second value, and the record refuses it
        raise FieldError(f"{key} is not entered: it is {NOT_ENTERED[key]}", field="name")
    v = _number(value, field)
    if unit != std.unit:
        factor = _COV_UNITS.get(key, {}).get(unit)
        if factor is None:
            alts = ", ".join([std.unit, *_COV_UNITS.get(key, {})])
            raise FieldError(f"unit {unit!r} for {key} (use {alts})", field=field + "_unit")
        v = round(v * factor, 12)
    if std.levels:
        if int(v) != v or int(v) not in std.levels:
            codes = ", ".join(f"{k} = {t}" for k, t in std.levels.items())
            raise FieldError(f"{v:g} is not a code of {key} ({codes})", field=field)
        return key, v, std.unit
    lo, hi = std.plausible
    if not lo <= v <= hi:
        raise FieldError(f"{value:g} {unit} is not a plausible {std.description} (expected {lo:g}-{hi:g} "
                         f"{std.unit}; check the unit)", field=field)
    return key, v, std.unit


def covariate_text(name: str, value: float, unit: str) -> str:
    """A stored covariate as a page shows it: a coded one (genotype, sex) by its meaning and code, a dimensionless
    one without the unit "1", the others with their unit.

    >>> covariate_text("CYP3A5", 0.0, "1")
    'non-expresser (*3/*3, *3/*6) (0)'
    >>> covariate_text("WT", 82.0, "kg")
    '82 kg'
    """
    std = STANDARD_COVARIATES.get(name)
    if std is not None and std.levels and float(value).is_integer() and int(value) in std.levels:
        return f"{std.levels[int(value)]} ({int(value)})"
    return f"{value:g}" if unit in ("1", "") else f"{value:g} {unit}"
