"""The patient record: one versioned JSON document, and the one domain value every face reads.

``cnidose.patient/2`` (JSON Schema: ``clinical/data/patient.schema.json``) holds everything the therapy loop
needs -- selection, start, measure, individualise, watch, follow up::

    {
      "schema": "cnidose.patient/2",
      "id": "P-001", "birth_date": "1968-03-14", "sex": "male", "region": "EU",
      "indication": "kidney transplant"   or {"system": "ICD-10-CM", "code": "Z94.0"},
      "severity": "severe",                                         optional
      "transplant": {"organ": "kidney", "date": "2026-11-11",
                     "donor_type": "deceased", "donor_cyp3a5": "non-expresser"},
      "therapy": {"agent": "tacrolimus", "product": "Prograf", "route": "oral",
                  "strength_percent": null, "start": "2026-11-11"},
      "genotypes": [{"gene": "CYP3A5", "result": "*3/*3", "source": "lab report", "date": "2026-11-12"}],
      "regimens": [{"product": "Prograf", "dose": 5, "unit": "mg", "interval_h": 12, "route": "oral",
                    "start": "2026-11-11T08:00:00Z", "stop": null}],
      "administrations": [{"time": "...Z", "dose": 5, "unit": "mg", "product": "Prograf", "route": "oral",
                           "infusion_h": null}],
      "levels": [{"time": "...Z", "value": 12.6, "unit": "ng/mL", "matrix": "whole blood",
                  "assay": "LC-MS/MS", "sample": "trough", "blq": false, "lloq": null}],
      "labs": [{"name": "creatinine", "value": 118, "unit": "umol/L", "time": "...Z"}],
      "blood_pressure": [{"time": "...Z", "systolic": 146, "diastolic": 92}],
      "covariates": [{"name": "WT", "value": 82, "unit": "kg", "time": "...Z"}],
      "medications": [{"name": "voriconazole", "start": "2026-11-20", "stop": null, "daily_mg": 400}],
      "conditions": ["..."]
    }

Every entry may carry ``id``, ``status`` (``final`` or ``entered-in-error``, with ``status_reason``,
``entered_by``, ``entered_at``) and ``flags`` (plausibility warnings confirmed at entry). Entries marked
entered-in-error stay in the record and are left out of rules and fits. ``cnidose.patient/1`` documents are
still read (upgraded: see :func:`upgrade_v1`).

Validation names the field at fault (``levels[2].value``): unknown indication (the error lists the known
ones), a route missing where the agent has several, impossible values per unit, dates in the future.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cnidose.clinical.codes import loinc_names
from cnidose.errors import InputError
from cnidose.models.covariates import STANDARD_COVARIATES

__all__ = ["BP", "BP_RANGE", "SCHEMA", "SCHEMA_V1", "Administration", "CovariateValue", "Genotype", "Lab", "Level",
           "Medication", "PatientRecord", "RecordError", "Regimen", "Transplant", "convert_lab", "department_for",
           "indications", "lab_units", "load_record", "parse_record", "resolve_indication", "upgrade_v1"]

SCHEMA = "cnidose.patient/2"
SCHEMA_V1 = "cnidose.patient/1"
AGENTS = ("tacrolimus", "cyclosporine", "voclosporin", "pimecrolimus")
STATUSES = ("final", "entered-in-error")

# lab -> (canonical unit, {unit: factor to canonical}, plausible range in canonical units)
_LABS: dict[str, tuple[str, dict[str, float], tuple[float, float]]] = {
    "creatinine": ("umol/L", {"umol/L": 1.0, "µmol/L": 1.0, "mg/dL": 88.4}, (10.0, 3000.0)),
    "fasting glucose": ("mmol/L", {"mmol/L": 1.0, "mg/dL": 1 / 18.016}, (0.5, 60.0)),
    "ogtt 2h glucose": ("mmol/L", {"mmol/L": 1.0, "mg/dL": 1 / 18.016}, (0.5, 60.0)),
    "potassium": ("mmol/L", {"mmol/L": 1.0, "mEq/L": 1.0}, (1.0, 10.0)),
    "magnesium": ("mmol/L", {"mmol/L": 1.0, "mg/dL": 0.4114}, (0.1, 5.0)),
    "bk virus nat": ("copies/mL", {"copies/mL": 1.0, "copies/L": 1e-3}, (0.0, 1e12)),
    "egfr": ("mL/min/{1.73_m2}", {"mL/min/{1.73_m2}": 1.0, "mL/min/1.73m2": 1.0}, (1.0, 200.0)),
}
_HBA1C_RANGE = (3.0, 20.0)  # %
# physiologically possible blood pressure (mmHg): outside, a typing or unit error
BP_RANGE = {"systolic": (50.0, 300.0), "diastolic": (20.0, 200.0)}
# covariates over time: the models' standard vocabulary (cnidose.models.covariates), in its data units; the values
# computed per record from the rest of the record are not entered (AZOLE: from the medication list, by the model's
# own definition of which azoles and how long after)
#: standard covariates a record does not take as entries, and where their value comes from instead
NOT_ENTERED: dict[str, str] = {
    "AGE": "computed from the birth date", "SEX": "the patient's sex", "POD": "computed from the transplant date",
    "IMMUNOASSAY": "the assay of each level",
    "AZOLE": "read from the medication list (record the azole antifungal there, with its start and stop)"}
_COVARIATES: dict[str, tuple[str, tuple[float, float]]] = {
    k: (c.unit, c.plausible) for k, c in STANDARD_COVARIATES.items() if k not in NOT_ENTERED}
GENES = {"CYP3A5": "*1 functional; *3, *6, *7 non-functional (CPIC, Birdwell 2015)",
         "CYP3A4": "*22 reduced function"}
_LEVEL_UNITS = {"ng/mL": 1.0, "ug/L": 1.0, "µg/L": 1.0, "mcg/L": 1.0}
_EPOCH = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)  # dataclass defaults only: every parsed entry has its own time


class RecordError(InputError):
    """A patient record field is invalid; the message names the field."""

    def __init__(self, message: str, *, field: str):
        self.field = field
        super().__init__(f"[{field}] {message}")


@dataclass(frozen=True, slots=True)
class Entry:
    """What every entry has: an id, whether it stands, and the plausibility flags confirmed at entry."""

    id: str | None = None
    status: str = "final"
    status_reason: str | None = None
    entered_by: str | None = None
    entered_at: str | None = None
    flags: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        return self.status == "final"


@dataclass(frozen=True, slots=True)
class Lab(Entry):
    name: str = ""
    value: float = 0.0  # canonical unit
    unit: str = ""
    time: dt.datetime | None = None  # None: a date only
    date: dt.date = dt.date.min


@dataclass(frozen=True, slots=True)
class Medication(Entry):
    name: str = ""
    start: dt.date = dt.date.min
    stop: dt.date | None = None
    daily_mg: float | None = None


@dataclass(frozen=True, slots=True)
class BP(Entry):
    date: dt.date = dt.date.min
    systolic: float = 0.0
    diastolic: float = 0.0
    time: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Regimen(Entry):
    product: str = ""
    dose_mg: float = 0.0
    interval_h: float = 0.0
    route: str = "oral"
    start: dt.datetime = _EPOCH
    stop: dt.datetime | None = None

    @property
    def daily_mg(self) -> float:
        return self.dose_mg * 24.0 / self.interval_h


@dataclass(frozen=True, slots=True)
class Administration(Entry):
    time: dt.datetime = _EPOCH
    dose_mg: float = 0.0
    product: str = ""
    route: str = "oral"
    infusion_h: float | None = None


@dataclass(frozen=True, slots=True)
class Level(Entry):
    time: dt.datetime = _EPOCH
    value: float = 0.0  # ng/mL
    unit: str = "ng/mL"
    matrix: str = "whole blood"
    assay: str | None = None
    sample: str = "trough"  # trough | c2 | other
    blq: bool = False
    lloq: float | None = None


@dataclass(frozen=True, slots=True)
class CovariateValue(Entry):
    name: str = ""
    value: float = 0.0
    unit: str = ""
    time: dt.datetime = _EPOCH
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Genotype(Entry):
    gene: str = ""
    result: str = ""  # a diplotype (*1/*3) or a phenotype word
    expresser: bool | None = None  # CYP3A5: at least one functional allele (*1)
    source: str = ""
    date: dt.date | None = None


@dataclass(frozen=True, slots=True)
class Transplant:
    organ: str
    date: dt.date
    donor_type: str | None = None  # deceased | living
    donor_cyp3a5: str | None = None  # expresser | non-expresser | a diplotype


@dataclass(frozen=True, slots=True)
class Code:
    system: str
    code: str
    label: str
    verified: bool


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """One patient, as the rules, the models and the pages read them (entries of every status are kept;
    the accessors give the final ones)."""

    id: str
    birth_date: dt.date
    sex: str
    agent: str
    indication: str  # the canonical key (clinical/data/indications.toml)
    therapy_start: dt.date | None
    region: str = "EU"
    route: str = "oral"
    product: str | None = None
    strength_percent: float | None = None
    severity: str | None = None
    indication_code: Code | None = None
    transplant: Transplant | None = None
    weight_kg: float | None = None  # the latest final weight (or the document's shortcut)
    height_cm: float | None = None
    genotypes: tuple[Genotype, ...] = ()
    regimens: tuple[Regimen, ...] = ()
    administrations: tuple[Administration, ...] = ()
    levels: tuple[Level, ...] = ()
    labs: tuple[Lab, ...] = ()
    blood_pressure: tuple[BP, ...] = ()
    covariates: tuple[CovariateValue, ...] = ()
    medications: tuple[Medication, ...] = ()
    conditions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what reading the document assumed (a patient/1 default), said
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def age(self, on: dt.date) -> float:
        return (on - self.birth_date).days / 365.25

    @property
    def organ(self) -> str | None:
        return self.transplant.organ if self.transplant else None

    @property
    def transplant_date(self) -> dt.date | None:
        return self.transplant.date if self.transplant else None

    def lab(self, name: str) -> list[Lab]:
        return sorted((x for x in self.labs if x.name == name and x.final), key=lambda x: (x.date, x.time or
                                                                                          _midnight(x.date)))

    def final_levels(self) -> list[Level]:
        return sorted((x for x in self.levels if x.final), key=lambda x: x.time)

    def final_administrations(self) -> list[Administration]:
        return sorted((x for x in self.administrations if x.final), key=lambda x: x.time)

    def given_by(self, route: str, as_of: dt.date) -> int:
        """How many final administrations by ``route`` (oral, intravenous, sublingual, ...) were given by ``as_of``."""
        return sum(x.route == route and x.time.date() <= as_of for x in self.administrations if x.final)

    def final_regimens(self) -> list[Regimen]:
        return sorted((x for x in self.regimens if x.final), key=lambda x: x.start)

    def final_bp(self) -> list[BP]:
        return sorted((x for x in self.blood_pressure if x.final), key=lambda x: (x.date, x.time or
                                                                                  _midnight(x.date)))

    def final_medications(self) -> list[Medication]:
        return [m for m in self.medications if m.final]

    def current_regimen(self, at: dt.datetime | dt.date | None = None) -> Regimen | None:
        """The final regimen in force at ``at`` (default: the newest that has not stopped)."""
        regs = self.final_regimens()
        if not regs:
            return None
        if at is None:
            live = [r for r in regs if r.stop is None]
            return (live or regs)[-1]
        t = at if isinstance(at, dt.datetime) else _midnight(at) + dt.timedelta(days=1)
        live = [r for r in regs if r.start <= t and (r.stop is None or r.stop > t)]
        return live[-1] if live else None

    def genotype(self, gene: str) -> Genotype | None:
        g = [x for x in self.genotypes if x.gene == gene and x.final]
        return g[-1] if g else None

    def to_document(self) -> dict[str, Any]:
        """The ``cnidose.patient/2`` document (every entry, of every status): ``parse_record`` of it gives this
        record back."""
        return to_document(self)


def _midnight(d: dt.date) -> dt.datetime:
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)


# -- vocabulary ------------------------------------------------------------------------------------------------------
@functools.cache
def indications() -> dict[str, Any]:
    """The indication vocabulary (clinical/data/indications.toml), read once."""
    return tomllib.loads((resources.files("cnidose.clinical") / "data" / "indications.toml").read_text("utf-8"))


def department_for(indication: str) -> str:
    """The department whose calendar an indication's follow-up visits go to (clinical/data/indications.toml);
    an indication not in the vocabulary goes to "clinic".

    >>> department_for("psoriasis"), department_for("kidney transplant")
    ('dermatology', 'transplant clinic')
    """
    return next((str(i.get("department", "clinic")) for i in indications()["indications"] if i["key"] == indication),
                "clinic")


def resolve_indication(value: Any, where: str = "indication") -> tuple[str, Code, str | None]:
    """(canonical key, code, severity) for a typed indication or a code; RecordError listing the known ones.

    >>> resolve_indication("severe plaque psoriasis")[0::2]
    ('psoriasis', 'severe')
    """
    vocab = indications()
    known = vocab["indications"]
    if isinstance(value, dict):
        system, code = str(value.get("system", "")), str(value.get("code", "")).upper()
        for ind in known:
            if ind["code"].upper() == code and (not system or system == ind["system"]):
                return ind["key"], Code(ind["system"], ind["code"], ind["label"], bool(ind["code_verified"])), None
        text = value.get("text")
        if not text:
            raise RecordError(f"unknown indication code {system} {code}; known: "
                              + ", ".join(f"{i['code']} ({i['key']})" for i in known), field=where)
        value = text
    if not isinstance(value, str) or not value.strip():
        raise RecordError("expected an indication (text or {system, code})", field=where)
    text = re.sub(r"\s+", " ", value.strip().lower())
    severity = None
    for word in sorted(vocab["severity_words"], key=len, reverse=True):
        if text.startswith(word + " "):
            severity = severity or word
            text = text[len(word) + 1:]
    for ind in known:
        if text == ind["key"] or text in ind["synonyms"]:
            return ind["key"], Code(ind["system"], ind["code"], ind["label"], bool(ind["code_verified"])), severity
    raise RecordError(f"unknown indication {value!r}; known: " + ", ".join(i["key"] for i in known)
                      + " (or their codes, e.g. {\"system\": \"ICD-10-CM\", \"code\": \"L40.0\"})", field=where)


def routes(agent: str) -> list[str]:
    return list(indications()["routes"].get(agent, ["oral"]))


# -- field parsers ---------------------------------------------------------------------------------------------------
def _date(v: Any, where: str, as_of: dt.date | None) -> dt.date:
    if not isinstance(v, str):
        raise RecordError(f"expected an ISO date (YYYY-MM-DD), got {v!r}", field=where)
    try:
        d = dt.date.fromisoformat(v[:10]) if "T" in v else dt.date.fromisoformat(v)
    except ValueError:
        raise RecordError(f"not a date: {v!r}", field=where) from None
    if not 1900 <= d.year <= 2100:
        raise RecordError(f"{d.isoformat()} is outside 1900-2100", field=where)
    if as_of is not None and d > as_of:
        raise RecordError(f"{d.isoformat()} is in the future (assessment date {as_of.isoformat()})", field=where)
    return d


def _time(v: Any, where: str, as_of: dt.date | None) -> dt.datetime:
    """An instant with a time zone (a bare date is 00:00 UTC)."""
    if not isinstance(v, str):
        raise RecordError(f"expected an ISO date-time with a time zone, got {v!r}", field=where)
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00")) if "T" in v else _midnight(dt.date.fromisoformat(v))
    except ValueError:
        raise RecordError(f"not a date-time: {v!r}", field=where) from None
    if t.tzinfo is None or t.utcoffset() is None:
        raise RecordError(f"{v!r} has no time zone (add Z or an offset)", field=where)
    if not 1900 <= t.year <= 2100:
        raise RecordError(f"{v!r} is outside 1900-2100", field=where)
    t = t.astimezone(dt.UTC)
    if as_of is not None and t.date() > as_of:
        raise RecordError(f"{t.isoformat()} is in the future (assessment date {as_of.isoformat()})", field=where)
    return t


def _number(v: Any, where: str, lo: float, hi: float, unit: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordError(f"expected a number, got {v!r}", field=where)
    if not lo <= float(v) <= hi:
        raise RecordError(f"{v:g} {unit} is not a possible value (expected {lo:g}-{hi:g} {unit})", field=where)
    return float(v)


def _text(v: Any, where: str, max_len: int = 200) -> str:
    if not isinstance(v, str) or not v.strip():
        raise RecordError("expected text", field=where)
    if len(v) > max_len:
        raise RecordError(f"longer than {max_len} characters", field=where)
    return v.strip()


def lab_units() -> dict[str, list[str]]:
    """Every lab and the units it is accepted in, its canonical unit first (what entry forms offer).

    >>> lab_units()["potassium"], lab_units()["hba1c"]
    (['mmol/L', 'mEq/L'], ['%', 'mmol/mol'])
    """
    out = {name: [canon, *(u for u in factors if u != canon and u != "µmol/L")]
           for name, (canon, factors, _) in _LABS.items()}
    out["hba1c"] = ["%", "mmol/mol"]
    return out


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


def _entry(x: dict[str, Any], where: str) -> dict[str, Any]:
    """The common entry fields, checked."""
    status = x.get("status", "final")
    if status not in STATUSES:
        raise RecordError(f"expected final or entered-in-error, got {status!r}", field=where + ".status")
    reason = x.get("status_reason")
    if status == "entered-in-error" and not (isinstance(reason, str) and reason.strip()):
        raise RecordError("an entry marked entered-in-error needs its reason", field=where + ".status_reason")
    flags = x.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise RecordError("expected a list of texts", field=where + ".flags")
    ident = x.get("id")
    # an entry without an id is named by its place in the document, so a fit or a rule can say which one it means
    return {"id": where if ident is None else str(ident), "status": status, "status_reason": reason,
            "entered_by": x.get("entered_by"), "entered_at": x.get("entered_at"), "flags": tuple(flags)}


def _items(doc: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    v = doc.get(key, [])
    if not isinstance(v, list):
        raise RecordError("expected a list", field=key)
    out = []
    for k, x in enumerate(v):
        if not isinstance(x, dict):
            raise RecordError("expected an object", field=f"{key}[{k}]")
        out.append((f"{key}[{k}]", x))
    return out


# -- the document ----------------------------------------------------------------------------------------------------
def upgrade_v1(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A ``cnidose.patient/1`` document as ``/2`` (nothing dropped), and what was assumed.

    /1 defaulted the route to oral; /2 requires it where the agent has several routes, so an upgraded record
    keeps oral and says so (pimecrolimus, topical only, gets topical)."""
    notes: list[str] = []
    agent = str(doc.get("agent", "")).lower()
    route = doc.get("route")
    if route is None:
        options = routes(agent) if agent in AGENTS else ["oral"]
        route = options[0] if len(options) == 1 else "oral"
        if len(options) > 1:
            notes.append(f"route not given: {route} assumed (the patient/1 default); give therapy.route")
    new: dict[str, Any] = {k: v for k, v in doc.items() if k not in (
        "schema", "agent", "route", "strength_percent", "therapy_start", "labs", "blood_pressure")}
    new["schema"] = SCHEMA
    new["therapy"] = {"agent": doc.get("agent"), "route": route, "start": doc.get("therapy_start")}
    if doc.get("strength_percent") is not None:
        new["therapy"]["strength_percent"] = doc["strength_percent"]
    new["labs"] = list(doc.get("labs", []))  # /2 reads their "date" as it reads "time"
    new["blood_pressure"] = list(doc.get("blood_pressure", []))
    return new, notes


def parse_record(doc: Any, *, as_of: dt.date | None) -> PatientRecord:
    """Validate a record (already parsed JSON) as of ``as_of`` (None: no date is in the future -- a stored chart,
    whose entries were checked when entered); RecordError names the first bad field."""
    if not isinstance(doc, dict):
        raise RecordError("a patient record is a JSON object", field="$")
    notes: list[str] = []
    raw = doc
    if doc.get("schema") == SCHEMA_V1:
        for key in ("id", "birth_date", "sex", "agent", "indication", "therapy_start"):
            if key not in doc:
                raise RecordError("missing", field=key)
        doc, notes = upgrade_v1(doc)
    elif doc.get("schema") != SCHEMA:
        raise RecordError(f"expected schema {SCHEMA!r} (or {SCHEMA_V1!r}), got {doc.get('schema')!r}",
                          field="schema")
    for key in ("id", "birth_date", "sex", "indication", "therapy"):
        if key not in doc:
            raise RecordError("missing", field=key)
    sex = doc["sex"]
    if sex not in ("female", "male"):
        raise RecordError(f"expected female or male, got {sex!r}", field="sex")
    region = doc.get("region", "EU")
    if region not in ("EU", "US"):
        raise RecordError("expected EU or US", field="region")
    therapy = doc["therapy"]
    if not isinstance(therapy, dict):
        raise RecordError("expected {agent, product, route, start}", field="therapy")
    agent = str(therapy.get("agent", "")).lower()
    if agent not in AGENTS:
        raise RecordError(f"unknown agent {therapy.get('agent')!r} (known: {', '.join(AGENTS)})",
                          field="therapy.agent")
    options = routes(agent)
    route = therapy.get("route")
    if route is None:
        if len(options) > 1:
            raise RecordError(f"{agent} is given {', '.join(options)}: say which", field="therapy.route")
        route = options[0]
    if route not in options:
        raise RecordError(f"{agent} is not given {route!r} (routes: {', '.join(options)})", field="therapy.route")
    key, code, severity = resolve_indication(doc["indication"])
    if doc.get("severity") is not None:
        severity = _text(doc["severity"], "severity", 64).lower()
    start = None if therapy.get("start") in (None, "") else _date(therapy["start"], "therapy.start", None)
    transplant = None
    organ = next((i.get("organ") for i in indications()["indications"] if i["key"] == key), None)
    if doc.get("transplant") is not None:
        t = doc["transplant"]
        if not isinstance(t, dict) or "date" not in t:
            raise RecordError("expected {organ, date, donor_type, donor_cyp3a5}", field="transplant")
        t_organ = str(t.get("organ") or organ or "")
        if organ is not None and t_organ != organ:
            raise RecordError(f"the indication is a {organ} transplant, not {t_organ}", field="transplant.organ")
        donor = t.get("donor_type")
        if donor not in (None, "deceased", "living"):
            raise RecordError("expected deceased or living", field="transplant.donor_type")
        transplant = Transplant(t_organ, _date(t["date"], "transplant.date", as_of), donor, t.get("donor_cyp3a5"))
    elif doc.get("transplant_date") is not None and organ is not None:  # a flat shortcut
        transplant = Transplant(organ, _date(doc["transplant_date"], "transplant_date", as_of))
    if start is None and transplant is not None:
        start = transplant.date  # a transplant recipient's calcineurin inhibitor starts at the transplant
    product = None if therapy.get("product") in (None, "") else _text(therapy["product"], "therapy.product", 64)
    strength = None if therapy.get("strength_percent") is None else _number(
        therapy["strength_percent"], "therapy.strength_percent", 0.001, 10.0, "%")

    labs = []
    for where, x in _items(doc, "labs"):
        if "name" not in x or "value" not in x or ("time" not in x and "date" not in x):
            raise RecordError("a lab is {name, value, unit, time}", field=where)
        name, value, canon = convert_lab(x["name"], x["value"], x.get("unit", ""), where)
        t, d = _when(x, where, as_of)
        labs.append(Lab(**_entry(x, where), name=name, value=value, unit=canon, time=t, date=d))
    meds = []
    for where, x in _items(doc, "medications"):
        if "name" not in x or "start" not in x:
            raise RecordError("a medication is {name, start, stop, daily_mg}", field=where)
        m_start = _date(x["start"], where + ".start", as_of)
        stop = None if x.get("stop") in (None, "") else _date(x["stop"], where + ".stop", None)
        if stop is not None and stop < m_start:
            raise RecordError("stops before it starts", field=where + ".stop")
        daily = x.get("daily_mg")
        meds.append(Medication(**_entry(x, where), name=_text(x["name"], where + ".name", 64).lower(), start=m_start,
                               stop=stop, daily_mg=None if daily is None else _number(
                                   daily, where + ".daily_mg", 0, 1e5, "mg")))
    bps = []
    for where, x in _items(doc, "blood_pressure"):
        t, d = _when(x, where, as_of)
        bps.append(BP(**_entry(x, where), date=d, time=t,
                      systolic=_number(x.get("systolic"), where + ".systolic", *BP_RANGE["systolic"], "mmHg"),
                      diastolic=_number(x.get("diastolic"), where + ".diastolic", *BP_RANGE["diastolic"], "mmHg")))
    regimens = []
    for where, x in _items(doc, "regimens"):
        _unit(x, where, "mg")
        r_start = _time(x.get("start"), where + ".start", None)
        r_stop = None if x.get("stop") in (None, "") else _time(x["stop"], where + ".stop", None)
        if r_stop is not None and r_stop <= r_start:
            raise RecordError("stops before it starts", field=where + ".stop")
        regimens.append(Regimen(**_entry(x, where), product=_text(x.get("product"), where + ".product", 64),
                                dose_mg=_number(x.get("dose"), where + ".dose", 1e-3, 5000, "mg"),
                                interval_h=_number(x.get("interval_h"), where + ".interval_h", 1, 24 * 7, "h"),
                                route=_route(x.get("route", route), options, where + ".route"),
                                start=r_start, stop=r_stop))
    admins = []
    for where, x in _items(doc, "administrations"):
        _unit(x, where, "mg")
        inf = x.get("infusion_h")
        admins.append(Administration(**_entry(x, where), time=_time(x.get("time"), where + ".time", as_of),
                                     dose_mg=_number(x.get("dose"), where + ".dose", 1e-3, 5000, "mg"),
                                     product=_text(x.get("product", product or agent), where + ".product", 64),
                                     route=_route(x.get("route", route), options, where + ".route"),
                                     infusion_h=None if inf is None else _number(inf, where + ".infusion_h", 1e-3, 168,
                                                                                 "h")))
    levels = []
    for where, x in _items(doc, "levels"):
        unit = x.get("unit", "ng/mL")
        if unit not in _LEVEL_UNITS:
            raise RecordError(f"unit {unit!r} for a drug level (use {', '.join(_LEVEL_UNITS)})", field=where + ".unit")
        sample = x.get("sample", "trough")
        if sample not in ("trough", "c2", "other"):
            raise RecordError("expected trough, c2 or other", field=where + ".sample")
        blq = x.get("blq", False)
        if not isinstance(blq, bool):
            raise RecordError("expected true or false", field=where + ".blq")
        lloq = x.get("lloq")
        levels.append(Level(**_entry(x, where), time=_time(x.get("time"), where + ".time", as_of),
                            value=_number(x.get("value"), where + ".value", 0, 1e5, unit) * _LEVEL_UNITS[unit],
                            unit="ng/mL", matrix=str(x.get("matrix", "whole blood")), assay=x.get("assay"),
                            sample=sample, blq=blq,
                            lloq=None if lloq is None else _number(lloq, where + ".lloq", 0, 1e4, unit)))
    covs = []
    for where, x in _items(doc, "covariates"):
        name = str(x.get("name", "")).upper()
        if name in NOT_ENTERED:
            raise RecordError(f"{name} is not entered: it is {NOT_ENTERED[name]}", field=where + ".name")
        if name not in _COVARIATES:
            raise RecordError(f"unknown covariate {x.get('name')!r} (known: {', '.join(_COVARIATES)}; genotypes go "
                              "in genotypes)", field=where + ".name")
        unit, (lo, hi) = _COVARIATES[name]
        given = x.get("unit", unit)
        if given != unit:
            raise RecordError(f"unit {given!r} for {name} (use {unit})", field=where + ".unit")
        covs.append(CovariateValue(**_entry(x, where), name=name, value=_number(x.get("value"), where + ".value", lo,
                                                                                hi, unit),
                                   unit=unit, time=_time(x.get("time"), where + ".time", as_of),
                                   source=x.get("source")))
    genotypes = []
    for where, x in _items(doc, "genotypes"):
        gene = str(x.get("gene", "")).upper()
        if gene not in GENES:
            raise RecordError(f"unknown gene {x.get('gene')!r} (known: {', '.join(GENES)})", field=where + ".gene")
        result = _text(x.get("result"), where + ".result", 64)
        genotypes.append(Genotype(**_entry(x, where), gene=gene, result=result,
                                  expresser=cyp3a5_expresser(result, where) if gene == "CYP3A5" else None,
                                  source=_text(x.get("source", "not stated"), where + ".source", 200),
                                  date=None if x.get("date") is None else _date(x["date"], where + ".date", as_of)))
    notes += [str(n) for n in doc.get("notes", []) if isinstance(n, str)]
    weight = _latest(covs, "WT")
    height = _latest(covs, "HT")
    if doc.get("weight_kg") is not None:
        weight = _number(doc["weight_kg"], "weight_kg", 0.3, 400, "kg")
    if doc.get("height_cm") is not None:
        height = _number(doc["height_cm"], "height_cm", 30, 250, "cm")
    return PatientRecord(
        id=_text(str(doc["id"]), "id", 64), birth_date=_date(doc["birth_date"], "birth_date", as_of), sex=sex,
        agent=agent, indication=key, therapy_start=start, region=region, route=str(route), product=product,
        strength_percent=strength, severity=severity, indication_code=code, transplant=transplant,
        weight_kg=weight, height_cm=height, genotypes=tuple(genotypes), regimens=tuple(regimens),
        administrations=tuple(admins), levels=tuple(levels), labs=tuple(labs), blood_pressure=tuple(bps),
        covariates=tuple(covs), medications=tuple(meds),
        conditions=tuple(str(c).lower() for c in doc.get("conditions", [])), notes=tuple(notes), raw=raw)


def _when(x: dict[str, Any], where: str, as_of: dt.date | None) -> tuple[dt.datetime | None, dt.date]:
    """An entry's ``time`` (an instant) or ``date`` (a day), whichever it has."""
    key = "time" if "time" in x else "date"
    v = x.get(key)
    if isinstance(v, str) and "T" in v:
        t = _time(v, f"{where}.{key}", as_of)
        return t, t.date()
    return None, _date(v, f"{where}.{key}", as_of)


def _unit(x: dict[str, Any], where: str, unit: str) -> None:
    if x.get("unit", unit) != unit:
        raise RecordError(f"unit {x.get('unit')!r}: doses are in mg", field=where + ".unit")


def _route(v: Any, options: list[str], where: str) -> str:
    if v not in options:
        raise RecordError(f"expected {', '.join(options)}, got {v!r}", field=where)
    return str(v)


def _latest(covs: list[CovariateValue], name: str) -> float | None:
    vals = sorted((c for c in covs if c.name == name and c.final), key=lambda c: c.time)
    return vals[-1].value if vals else None


def cyp3a5_expresser(result: str, where: str) -> bool | None:
    """CPIC (Birdwell 2015): *1 is functional; *3, *6, *7 are not. An expresser has at least one *1."""
    r = result.lower().replace(" ", "")
    if r in ("expresser", "normalmetabolizer", "intermediatemetabolizer", "extensivemetabolizer"):
        return True
    if r in ("non-expresser", "nonexpresser", "poormetabolizer"):
        return False
    if r in ("indeterminate", "unknown"):
        return None
    m = re.fullmatch(r"\*?(\d+)/\*?(\d+)", r)
    if not m:
        raise RecordError(f"CYP3A5 result {result!r}: give a diplotype (*1/*3) or expresser / non-expresser",
                          field=where + ".result")
    alleles = {m.group(1), m.group(2)}
    unknown = alleles - {"1", "3", "6", "7"}
    if unknown:
        raise RecordError(f"CYP3A5 *{', *'.join(sorted(unknown))}: allele function not in cnidose's table "
                          "(*1 functional; *3, *6, *7 non-functional)", field=where + ".result")
    return "1" in alleles


# -- back to the document --------------------------------------------------------------------------------------------
def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _entry_doc(e: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if e.id is not None:
        out["id"] = e.id
    if e.status != "final":
        out["status"] = e.status
    for k in ("status_reason", "entered_by", "entered_at"):
        v = getattr(e, k)
        if v is not None:
            out[k] = v
    if e.flags:
        out["flags"] = list(e.flags)
    return out


def to_document(r: PatientRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": SCHEMA, "id": r.id, "birth_date": r.birth_date.isoformat(), "sex": r.sex,
                           "region": r.region}
    code = r.indication_code
    doc["indication"] = {"system": code.system, "code": code.code, "text": r.indication} if code else r.indication
    if r.severity:
        doc["severity"] = r.severity
    if r.transplant:
        t = r.transplant
        doc["transplant"] = {"organ": t.organ, "date": t.date.isoformat(),
                             **({"donor_type": t.donor_type} if t.donor_type else {}),
                             **({"donor_cyp3a5": t.donor_cyp3a5} if t.donor_cyp3a5 else {})}
    therapy: dict[str, Any] = {"agent": r.agent, "route": r.route}
    if r.product:
        therapy["product"] = r.product
    if r.strength_percent is not None:
        therapy["strength_percent"] = r.strength_percent
    if r.therapy_start:
        therapy["start"] = r.therapy_start.isoformat()
    doc["therapy"] = therapy
    if r.weight_kg is not None and not any(c.name == "WT" for c in r.covariates):
        doc["weight_kg"] = r.weight_kg
    if r.height_cm is not None and not any(c.name == "HT" for c in r.covariates):
        doc["height_cm"] = r.height_cm
    doc["genotypes"] = [{**_entry_doc(g), "gene": g.gene, "result": g.result, "source": g.source,
                         **({"date": g.date.isoformat()} if g.date else {})} for g in r.genotypes]
    doc["regimens"] = [{**_entry_doc(x), "product": x.product, "dose": x.dose_mg, "unit": "mg",
                        "interval_h": x.interval_h, "route": x.route, "start": _iso(x.start),
                        "stop": _iso(x.stop) if x.stop else None} for x in r.regimens]
    doc["administrations"] = [{**_entry_doc(x), "time": _iso(x.time), "dose": x.dose_mg, "unit": "mg",
                               "product": x.product, "route": x.route,
                               **({"infusion_h": x.infusion_h} if x.infusion_h else {})} for x in r.administrations]
    doc["levels"] = [{**_entry_doc(x), "time": _iso(x.time), "value": x.value, "unit": "ng/mL", "matrix": x.matrix,
                      **({"assay": x.assay} if x.assay else {}), "sample": x.sample, "blq": x.blq,
                      **({"lloq": x.lloq} if x.lloq is not None else {})} for x in r.levels]
    doc["labs"] = [{**_entry_doc(x), "name": x.name, "value": x.value, "unit": x.unit,
                    "time": _iso(x.time) if x.time else x.date.isoformat()} for x in r.labs]
    doc["blood_pressure"] = [{**_entry_doc(x), "time": _iso(x.time) if x.time else x.date.isoformat(),
                              "systolic": x.systolic, "diastolic": x.diastolic} for x in r.blood_pressure]
    doc["covariates"] = [{**_entry_doc(x), "name": x.name, "value": x.value, "unit": x.unit, "time": _iso(x.time),
                          **({"source": x.source} if x.source else {})} for x in r.covariates]
    doc["medications"] = [{**_entry_doc(x), "name": x.name, "start": x.start.isoformat(),
                           "stop": x.stop.isoformat() if x.stop else None,
                           **({"daily_mg": x.daily_mg} if x.daily_mg is not None else {})} for x in r.medications]
    doc["conditions"] = list(r.conditions)
    return doc


def load_record(path: str | Path, *, as_of: dt.date) -> PatientRecord:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the patient record: {exc}") from None
    return parse_record(doc, as_of=as_of)
