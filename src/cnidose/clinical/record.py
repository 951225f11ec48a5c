"""The patient record the clinical engine reads: a versioned JSON document, validated field by field.

Schema ``cnidose.patient/1``::

    {
      "schema": "cnidose.patient/1",
      "id": "P-001",
      "birth_date": "1971-04-02",            ISO dates throughout
      "sex": "female" | "male",
      "weight_kg": 72, "height_cm": 168,      optional
      "agent": "tacrolimus" | "cyclosporine" | "voclosporin",
      "indication": "psoriasis" | "kidney transplant" | ...,
      "region": "EU" | "US",                  optional, selects label variants (default EU)
      "route": "oral" | "topical" | "intravenous",   optional (default oral)
      "strength_percent": 0.1,                optional, topical products
      "therapy_start": "2026-01-10",
      "conditions": ["..."],                   optional, free text matched against contraindications
      "medications": [{"name": "voriconazole", "start": "2026-01-20", "stop": null, "daily_mg": 400}],
      "labs": [{"name": "creatinine", "value": 80, "unit": "umol/L", "date": "2026-01-02"}],
      "blood_pressure": [{"date": "2026-01-02", "systolic": 128, "diastolic": 82}]
    }

Labs and units (UCUM): creatinine (umol/L, mg/dL), fasting glucose and ogtt 2h glucose (mmol/L,
mg/dL), hba1c (%, mmol/mol), potassium (mmol/L), magnesium (mmol/L, mg/dL). Values are converted to the
first unit listed; an impossible value or an unknown unit is an error naming the field.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnidose.clinical.codes import loinc_names
from cnidose.errors import InputError

__all__ = ["BP", "BP_RANGE", "SCHEMA", "Lab", "Medication", "PatientRecord", "convert_lab", "load_record",
           "parse_record"]

SCHEMA = "cnidose.patient/1"

# lab -> (canonical unit, {unit: factor to canonical}, plausible range in canonical units)
_LABS: dict[str, tuple[str, dict[str, float], tuple[float, float]]] = {
    "creatinine": ("umol/L", {"umol/L": 1.0, "µmol/L": 1.0, "mg/dL": 88.4}, (10.0, 3000.0)),
    "fasting glucose": ("mmol/L", {"mmol/L": 1.0, "mg/dL": 1 / 18.016}, (0.5, 60.0)),
    "ogtt 2h glucose": ("mmol/L", {"mmol/L": 1.0, "mg/dL": 1 / 18.016}, (0.5, 60.0)),
    "potassium": ("mmol/L", {"mmol/L": 1.0, "mEq/L": 1.0}, (1.0, 10.0)),
    "magnesium": ("mmol/L", {"mmol/L": 1.0, "mg/dL": 0.4114}, (0.1, 5.0)),
    "bk virus nat": ("copies/mL", {"copies/mL": 1.0, "copies/L": 1e-3}, (0.0, 1e12)),
}
_HBA1C_RANGE = (3.0, 20.0)  # %
# physiologically possible blood pressure (mmHg): outside, a typing or unit error
BP_RANGE = {"systolic": (50.0, 300.0), "diastolic": (20.0, 200.0)}


class RecordError(InputError):
    """A patient record field is invalid; the message names the field."""

    def __init__(self, message: str, *, field: str):
        self.field = field
        super().__init__(f"[{field}] {message}")


@dataclass(frozen=True, slots=True)
class Lab:
    name: str
    value: float  # canonical unit
    unit: str
    date: dt.date


@dataclass(frozen=True, slots=True)
class Medication:
    name: str
    start: dt.date
    stop: dt.date | None
    daily_mg: float | None = None


@dataclass(frozen=True, slots=True)
class BP:
    date: dt.date
    systolic: float
    diastolic: float


@dataclass(frozen=True, slots=True)
class PatientRecord:
    id: str
    birth_date: dt.date
    sex: str
    agent: str
    indication: str
    therapy_start: dt.date
    region: str = "EU"
    route: str = "oral"
    strength_percent: float | None = None
    weight_kg: float | None = None
    height_cm: float | None = None
    conditions: tuple[str, ...] = ()
    medications: tuple[Medication, ...] = ()
    labs: tuple[Lab, ...] = ()
    blood_pressure: tuple[BP, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def age(self, on: dt.date) -> float:
        return (on - self.birth_date).days / 365.25

    def lab(self, name: str) -> list[Lab]:
        return sorted((x for x in self.labs if x.name == name), key=lambda x: x.date)


def _date(v: Any, where: str, as_of: dt.date | None) -> dt.date:
    if not isinstance(v, str):
        raise RecordError(f"expected an ISO date (YYYY-MM-DD), got {v!r}", field=where)
    try:
        d = dt.date.fromisoformat(v)
    except ValueError:
        raise RecordError(f"not a date: {v!r}", field=where) from None
    if as_of is not None and d > as_of:
        raise RecordError(f"{d.isoformat()} is in the future (assessment date {as_of.isoformat()})", field=where)
    return d


def _number(v: Any, where: str, lo: float, hi: float, unit: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordError(f"expected a number, got {v!r}", field=where)
    if not lo <= float(v) <= hi:
        raise RecordError(f"{v:g} {unit} is not a possible value (expected {lo:g}-{hi:g} {unit})", field=where)
    return float(v)


def convert_lab(name: Any, value: Any, unit: Any, where: str = "lab") -> tuple[str, float, str]:
    """A lab result in its canonical unit: (name, value, unit). ``name`` may be a verified LOINC code.

    RecordError (naming ``where`` and the sub-field) for an unknown lab or unit, a non-number, or a value
    that is not possible in the stated unit -- the usual sign of a unit mix-up.

    >>> convert_lab("creatinine", 1.2, "mg/dL")
    ('creatinine', 106.08, 'umol/L')
    """
    name = str(name).lower()
    name = loinc_names().get(name, name)  # a verified LOINC code (clinical/data/codes.toml) may stand for the name
    if name == "hba1c":
        if unit == "mmol/mol":
            return name, _number(value, where + ".value", 10.0, 200.0, unit) * 0.09148 + 2.152, "%"
        if unit == "%":
            return name, _number(value, where + ".value", *_HBA1C_RANGE, "%"), "%"
        raise RecordError(f"unit {unit!r} for hba1c (use % or mmol/mol)", field=where + ".unit")
    if name not in _LABS:
        raise RecordError(f"unknown lab {name!r} (known: {', '.join([*_LABS, 'hba1c'])})", field=where + ".name")
    canon, factors, (lo, hi) = _LABS[name]
    if unit not in factors:
        raise RecordError(f"unit {unit!r} for {name} (use {', '.join(factors)})", field=where + ".unit")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"expected a number, got {value!r}", field=where + ".value")
    v = float(value) * factors[unit]
    if not lo <= v <= hi:
        raise RecordError(f"{value:g} {unit} is not a possible {name} (expected {lo / factors[unit]:g}-"
                          f"{hi / factors[unit]:g} {unit})", field=where + ".value")
    return name, v, canon


def parse_record(doc: Any, *, as_of: dt.date) -> PatientRecord:
    """Validate a record (already parsed JSON) as of ``as_of``; RecordError names the first bad field."""
    if not isinstance(doc, dict):
        raise RecordError("a patient record is a JSON object", field="$")
    if doc.get("schema") != SCHEMA:
        raise RecordError(f"expected schema {SCHEMA!r}, got {doc.get('schema')!r}", field="schema")
    for key in ("id", "birth_date", "sex", "agent", "indication", "therapy_start"):
        if key not in doc:
            raise RecordError("missing", field=key)
    sex = doc["sex"]
    if sex not in ("female", "male"):
        raise RecordError(f"expected female or male, got {sex!r}", field="sex")
    agent = str(doc["agent"]).lower()
    if agent not in ("tacrolimus", "cyclosporine", "voclosporin", "pimecrolimus"):
        raise RecordError(f"unknown agent {agent!r}", field="agent")
    region = doc.get("region", "EU")
    if region not in ("EU", "US"):
        raise RecordError("expected EU or US", field="region")
    labs = []
    for k, x in enumerate(doc.get("labs", [])):
        where = f"labs[{k}]"
        if not isinstance(x, dict) or "name" not in x or "value" not in x or "date" not in x:
            raise RecordError("a lab is {name, value, unit, date}", field=where)
        name, value, canon = convert_lab(x["name"], x["value"], x.get("unit", ""), where)
        labs.append(Lab(name, value, canon, _date(x["date"], where + ".date", as_of)))
    meds = []
    for k, x in enumerate(doc.get("medications", [])):
        where = f"medications[{k}]"
        if not isinstance(x, dict) or "name" not in x or "start" not in x:
            raise RecordError("a medication is {name, start, stop, daily_mg}", field=where)
        start = _date(x["start"], where + ".start", as_of)
        stop = None if x.get("stop") in (None, "") else _date(x["stop"], where + ".stop", None)
        if stop is not None and stop < start:
            raise RecordError("stops before it starts", field=where + ".stop")
        daily = x.get("daily_mg")
        meds.append(Medication(str(x["name"]).strip().lower(), start, stop,
                               None if daily is None else _number(daily, where + ".daily_mg", 0, 1e5, "mg")))
    bps = []
    for k, x in enumerate(doc.get("blood_pressure", [])):
        where = f"blood_pressure[{k}]"
        if not isinstance(x, dict):
            raise RecordError("a reading is {date, systolic, diastolic}", field=where)
        bps.append(BP(_date(x.get("date"), where + ".date", as_of),
                      _number(x.get("systolic"), where + ".systolic", *BP_RANGE["systolic"], "mmHg"),
                      _number(x.get("diastolic"), where + ".diastolic", *BP_RANGE["diastolic"], "mmHg")))
    return PatientRecord(
        id=str(doc["id"]), birth_date=_date(doc["birth_date"], "birth_date", as_of), sex=sex, agent=agent,
        indication=str(doc["indication"]).lower(), therapy_start=_date(doc["therapy_start"], "therapy_start", None),
        region=region, route=_route(doc.get("route", "oral")),
        strength_percent=None if doc.get("strength_percent") is None else _number(
            doc["strength_percent"], "strength_percent", 0.001, 10.0, "%"),
        weight_kg=None if doc.get("weight_kg") is None else _number(doc["weight_kg"], "weight_kg", 0.3, 400, "kg"),
        height_cm=None if doc.get("height_cm") is None else _number(doc["height_cm"], "height_cm", 30, 250, "cm"),
        conditions=tuple(str(c).lower() for c in doc.get("conditions", [])), medications=tuple(meds),
        labs=tuple(labs), blood_pressure=tuple(bps), raw=doc)


def _route(v: Any) -> str:
    if v not in ("oral", "topical", "intravenous"):
        raise RecordError(f"expected oral, topical or intravenous, got {v!r}", field="route")
    return str(v)


def load_record(path: str | Path, *, as_of: dt.date) -> PatientRecord:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the patient record: {exc}") from None
    return parse_record(doc, as_of=as_of)
