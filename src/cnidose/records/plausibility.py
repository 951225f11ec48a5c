"""Plausibility at entry: never silent, never blocking.

An entry that is possible but suspicious -- a level before the first dose or before the transplant, a
duplicate, a dose far from the regimen in force, a product that is not the regimen's, a level implausible for
the regimen -- is stored only after an explicit confirmation and keeps the warning as a flag, which the fit and
the recommendation show. What is impossible (a date in the future, a value impossible in its unit, a misspelt
product) is refused with the field named.

Thresholds are engineering defaults, named here once (not clinical rules): a dose is "far" from the regimen
when it is 3 times larger or smaller; a tacrolimus level is implausible for the regimen when the trough per
mg/day of dose (C0/D) exceeds 10 ng/mL per mg/day (typical values are about 0.5-3), or above the level the
recommender already calls implausible.
"""

from __future__ import annotations

import datetime as dt
import difflib
from typing import Any

from cnidose.dosing.data import load_products
from cnidose.dosing.regimen import IMPLAUSIBLE_LEVEL
from cnidose.records.units import FieldError

__all__ = ["FAR_FROM_REGIMEN", "FUTURE_SLACK", "MAX_C0_PER_MG_DAY", "NeedsConfirmation", "check_dose", "check_level",
           "check_not_future", "check_product"]

FAR_FROM_REGIMEN = 3.0  # a dose 3x above or below the regimen's
MAX_C0_PER_MG_DAY = {"tacrolimus": 10.0}  # ng/mL per mg/day
FUTURE_SLACK = dt.timedelta(minutes=5)  # clocks differ a little


class NeedsConfirmation(FieldError):
    """The entry is possible but suspicious: store it only with ``confirm`` (its flags are kept with it)."""

    def __init__(self, flags: list[str], *, field: str):
        self.flags = flags
        super().__init__("please confirm: " + "; ".join(flags), field=field)


def check_not_future(at: dt.datetime, field: str, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.UTC)
    if at > now + FUTURE_SLACK:
        raise FieldError(f"{at.isoformat()} is in the future", field=field)


def check_product(drug: str, name: str, field: str = "product") -> list[str]:
    """A misspelt product is refused (with the likely name); one cnidose does not list is a flag."""
    prods, _ = load_products()
    names = [p.name for p in prods if p.drug == drug]
    if any(name.lower() == n.lower() for n in names):
        return []
    close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=1, cutoff=0.75)
    if close:
        right = next(n for n in names if n.lower() == close[0])
        raise FieldError(f"unknown product {name!r}: did you mean {right}?", field=field)
    return [f"product {name!r} is not among cnidose's {drug} products ({', '.join(names) or 'none'})"]


def _regimen_at(regimens: list[dict[str, Any]], drug: str, at: dt.datetime) -> dict[str, Any] | None:
    live = [r for r in regimens if r["status"] == "final" and r["drug"] == drug and r["start_at"] <= at
            and (r["stop_at"] is None or r["stop_at"] > at)]
    return live[-1] if live else None


def check_dose(chart: Any, drug: str, product: str, amount_mg: float, given_at: dt.datetime) -> list[str]:
    flags = check_product(drug, product)
    reg = _regimen_at(chart.regimens, drug, given_at)
    if reg is not None:
        ratio = amount_mg / reg["dose_mg"]
        if ratio >= FAR_FROM_REGIMEN or ratio <= 1 / FAR_FROM_REGIMEN:
            flags.append(f"{amount_mg:g} mg is {ratio:.3g} times the regimen's {reg['dose_mg']:g} mg")
        if reg["product"].lower() != product.lower():
            flags.append(f"product {product} is not the regimen's ({reg['product']})")
    if any(d["status"] == "final" and d["drug"] == drug and d["given_at"] == given_at and d["amount_mg"] == amount_mg
           for d in chart.doses):
        flags.append(f"a dose of {amount_mg:g} mg at {given_at.isoformat()} is already recorded (duplicate?)")
    return flags


def check_level(chart: Any, drug: str, value: float, observed_at: dt.datetime) -> list[str]:
    flags = []
    p = chart.patient
    doses = [d for d in chart.doses if d["status"] == "final" and d["drug"] == drug and d["given_at"] < observed_at]
    if not doses:
        flags.append(f"no {drug} dose is recorded before {observed_at.isoformat()}")
    tx = p.get("transplant_date")
    if tx is not None and observed_at.date() < tx:
        flags.append(f"drawn before the transplant ({tx.isoformat()})")
    if any(o["status"] == "final" and o["category"] == "level" and o["observed_at"] == observed_at
           and o["value"] == value for o in chart.observations):
        flags.append(f"a level of {value:g} ng/mL at {observed_at.isoformat()} is already recorded (duplicate?)")
    limit = IMPLAUSIBLE_LEVEL.get(drug)
    if limit is not None and value > limit:
        flags.append(f"{value:g} ng/mL is above {limit:g} ng/mL, implausible for {drug} (unit? sampling line?)")
    reg = _regimen_at(chart.regimens, drug, observed_at)
    ratio_max = MAX_C0_PER_MG_DAY.get(drug)
    if reg is not None and ratio_max is not None:
        daily = reg["dose_mg"] * 24.0 / reg["interval_h"]
        ratio = value / daily
        if ratio > ratio_max:
            flags.append(f"{value:g} ng/mL on {daily:g} mg/day is {ratio:.3g} ng/mL per mg/day, implausible for the "
                         f"regimen (above {ratio_max:g})")
    return flags
