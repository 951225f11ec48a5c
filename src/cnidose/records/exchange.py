"""From the stored chart to the one patient record, and from the record to what the engines read: the
``cnidose.patient/2`` document and its domain value (:class:`cnidose.clinical.record.PatientRecord`, read by the
rules, the models and the pages), NONMEM-format rows (for ``fit``, ``recommend``, ``evaluate``); NONMEM-format
import of a patient's doses and levels.

NONMEM rows: TIME in hours from the patient's first dose (or first record), doses (EVID 1, AMT in mg,
RATE = AMT / infusion duration for intravenous infusions), levels (EVID 0, DV in ng/mL, BLQ, LLOQ), CMT left
empty so that each model uses its own dose and observation compartments. Covariates are the values in
force at each record (the latest at or before it); before the first measurement the first value is used
and the export says so. AGE (years, from the birth date, at the first record: constant over the course, so
that a model's parameters do not change daily for it), SEX (0 male, 1 female), POD (days since
transplantation, per record) and IMMUNOASSAY (from the level's assay) are computed. Entries marked
entered-in-error are left out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cnidose.clinical.record import PatientRecord, cyp3a5_expresser, parse_record
from cnidose.records.nonmem import DataSet
from cnidose.records.units import FieldError

if TYPE_CHECKING:  # the store (SQLAlchemy, 0.4 s to import) only where a function stores: not for a record's analysis
    from cnidose.records.store import Actor, Chart, Store

__all__ = ["NonmemExport", "chart_to_document", "chart_to_nonmem", "chart_to_record", "chart_to_record_document",
           "import_nonmem_rows", "import_record", "record_to_nonmem"]

_BASE = ["ID", "TIME", "EVID", "AMT", "RATE", "CMT", "DV", "MDV", "BLQ", "LLOQ"]


@dataclass(frozen=True, slots=True)
class NonmemExport:
    header: list[str]
    rows: list[list[float | str]]
    origin: dt.datetime | None  # the instant TIME = 0
    notes: list[str] = field(default_factory=list)
    entries: list[str | None] = field(default_factory=list)  # the record entry (kind:id) of each row

    def entry_at(self, line: int | None) -> str | None:
        """The entry of a data line (the numbering of :meth:`dataset`: the header is line 1)."""
        if line is None or not 2 <= line < len(self.entries) + 2:
            return None
        return self.entries[line - 2]

    def dataset(self, source: str = "chart") -> DataSet:
        """The rows as a NONMEM data set, read exactly as a CSV file would be (``.individuals()``)."""
        cells = tuple(tuple(str(c) for c in r) for r in self.rows)  # str(float) round-trips exactly
        return DataSet(tuple(self.header), cells, tuple(range(2, len(cells) + 2)), source)


def _final(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("status", "final") == "final"]


def _years(born: dt.date, at: dt.datetime) -> float:
    return round((at.date() - born).days / 365.25, 4)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _meta(e: dict[str, Any], kind: str, ident: str | None = None) -> dict[str, Any]:
    """The entry fields every record entry carries: id (kind:row id), status, reason, who and when, flags."""
    out: dict[str, Any] = {"id": ident or f"{kind}:{e['id']}"}
    if e.get("status", "final") != "final":
        out["status"] = e["status"]
        out["status_reason"] = e.get("status_reason") or "no reason recorded"
    if e.get("entered_by") is not None:
        out["entered_by"] = f"user:{e['entered_by']}"
    if e.get("entered_at") is not None:
        out["entered_at"] = _iso(e["entered_at"])
    if e.get("flags"):
        out["flags"] = list(e["flags"])
    return out


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def chart_to_record_document(chart: Chart) -> dict[str, Any]:
    """The stored chart as a ``cnidose.patient/2`` document: every entry, of every status, with its id."""
    p = chart.patient
    agent = p["agent"]
    doc: dict[str, Any] = {"schema": "cnidose.patient/2", "id": p["mrn"], "birth_date": p["birth_date"].isoformat(),
                           "sex": p["sex"], "region": p.get("region") or "EU"}
    if p.get("indication_code"):
        doc["indication"] = {"system": p.get("indication_system") or "ICD-10-CM", "code": p["indication_code"],
                             "text": p["indication"]}
    else:
        doc["indication"] = p["indication"]
    if p.get("severity"):
        doc["severity"] = p["severity"]
    if p.get("transplant_date"):
        doc["transplant"] = {"date": p["transplant_date"].isoformat(),
                             **({"donor_type": p["donor_type"]} if p.get("donor_type") else {}),
                             **({"donor_cyp3a5": p["donor_cyp3a5"]} if p.get("donor_cyp3a5") else {})}
    therapy: dict[str, Any] = {"agent": agent}
    regimens = [r for r in chart.regimens if r["drug"] == agent]
    doses = [d for d in chart.doses if d["drug"] == agent]
    route = p.get("route") or (regimens[-1]["route"] if regimens else doses[-1]["route"] if doses else None)
    if route is None and agent == "pimecrolimus":
        route = "topical"
    if route is None and p["indication"].endswith("transplant"):
        route = "oral"
        doc["notes"] = ["route not recorded (no regimen or dose yet): oral assumed for a transplant recipient"]
    if route is not None:
        therapy["route"] = route
    product = p.get("product") or (regimens[-1]["product"] if regimens else None)
    if product:
        therapy["product"] = product
    if p.get("strength_percent") is not None:
        therapy["strength_percent"] = p["strength_percent"]
    # a transplant recipient's calcineurin inhibitor starts at the transplant; otherwise the start must be
    # recorded (the rule base then says it is missing rather than taking the record's creation date)
    start = p["therapy_start"] or p["transplant_date"]
    if start is not None:
        therapy["start"] = start.isoformat()
    doc["therapy"] = therapy
    doc["genotypes"] = [{**_meta(g, "genotype"), "gene": g["gene"], "result": g["result"], "source": g["source"],
                         **({"date": g["tested_on"].isoformat()} if g.get("tested_on") else {})}
                        for g in chart.genotypes]
    doc["regimens"] = [{**_meta(r, "regimen"), "product": r["product"], "dose": r["dose_mg"], "unit": "mg",
                        "interval_h": r["interval_h"], "route": r["route"], "start": _iso(r["start_at"]),
                        "stop": _iso(r["stop_at"]) if r["stop_at"] else None} for r in regimens]
    doc["administrations"] = [{**_meta(d, "dose"), "time": _iso(d["given_at"]), "dose": d["amount_mg"], "unit": "mg",
                               "product": d["product"], "route": d["route"],
                               **({"infusion_h": d["infusion_h"]} if d["infusion_h"] else {})} for d in doses]
    doc["levels"] = [{**_meta(o, "observation"), "time": _iso(o["observed_at"]), "value": o["value"], "unit": "ng/mL",
                      "matrix": o.get("matrix") or "whole blood", **({"assay": o["assay"]} if o["assay"] else {}),
                      "sample": o.get("sample") or "trough", "blq": bool(o["blq"]),
                      **({"lloq": o["lloq"]} if o["lloq"] is not None else {})}
                     for o in chart.observations if o["category"] == "level" and o["name"] == f"{agent} level"]
    doc["labs"] = [{**_meta(o, "observation"), "name": o["name"], "value": o["value"], "unit": o["unit"],
                    "time": _iso(o["observed_at"])} for o in chart.observations if o["category"] == "lab"]
    bp: dict[dt.datetime, dict[str, Any]] = {}
    for o in chart.observations:
        if o["category"] == "vital" and o["name"] in ("systolic blood pressure", "diastolic blood pressure"):
            bp.setdefault(o["observed_at"], {})[o["name"].split()[0]] = o
    doc["blood_pressure"] = []
    for at, pair in sorted(bp.items()):
        if "systolic" not in pair or "diastolic" not in pair:
            continue
        sys_, dia = pair["systolic"], pair["diastolic"]
        meta = _meta(sys_, "observation", f"observation:{sys_['id']},{dia['id']}")
        if dia.get("status") != "final" and sys_.get("status") == "final":  # either withdrawn withdraws the pair
            meta |= {"status": dia["status"], "status_reason": dia.get("status_reason") or "no reason recorded"}
        doc["blood_pressure"].append({**meta, "time": _iso(at), "systolic": sys_["value"], "diastolic": dia["value"]})
    doc["covariates"] = [{**_meta(c, "covariate"), "name": c["name"], "value": c["value"], "unit": c["unit"],
                          "time": _iso(c["measured_at"]), **({"source": c["source"]} if c.get("source") else {})}
                         for c in chart.covariates]
    doc["medications"] = [{**_meta(m, "medication"), "name": m["name"], "start": m["start_on"].isoformat(),
                           "stop": m["stop_on"].isoformat() if m["stop_on"] else None,
                           **({"daily_mg": m["daily_mg"]} if m["daily_mg"] is not None else {})}
                          for m in chart.medications]
    doc["conditions"] = list(p.get("conditions") or [])
    return doc


#: the old name (the document is now ``cnidose.patient/2``)
chart_to_document = chart_to_record_document


def chart_to_record(chart: Chart) -> PatientRecord:
    """The chart as the domain record every face reads (validated as any patient/2 document)."""
    return parse_record(chart_to_record_document(chart), as_of=None)


def chart_to_nonmem(chart: Chart, *, ident: int | float | None = None) -> NonmemExport:
    """The patient's doses and levels of their agent as NONMEM-format rows (through the domain record)."""
    return record_to_nonmem(chart_to_record(chart), ident=ident)


def _utc_day(day: str | dt.date) -> dt.datetime:
    d = dt.date.fromisoformat(day) if isinstance(day, str) else day
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)


def record_to_nonmem(record: PatientRecord, *, ident: int | float | str | None = None,
                     exposure: list[dict[str, Any]] | None = None,
                     medication_covariates: Mapping[str, tuple[tuple[str, ...], float]] | None = None,
                     as_of: dt.date | None = None) -> NonmemExport:
    """The record's final administrations and levels as NONMEM-format rows, each row naming its entry.

    ``exposure``: the rule base's adjustments for the record's agent (``{agent, factor, start, end}``, dates from
    00:00 UTC), written as the reserved ``EXPOSURE`` column -- the product of the factors in force over the
    interval each row ends -- with an EVID 2 row at each start or end inside the span, so the change happens
    then (:mod:`cnidose.models.exposure`).

    ``medication_covariates``: covariate name -> (medication names, days after): a model's 0/1 covariate read
    from the medication list (:attr:`cnidose.models.model.Covariate.medications`), 1 from 00:00 UTC of the first
    day one of them is taken until the end of its last day plus the days after, 0 otherwise; written only where
    the record lists one of them (otherwise the model's default says so). Like ``EXPOSURE``, a row holds the value
    in force over the interval it ends, with an EVID 2 row at each change inside the span, so a change takes
    effect at its time and not up to a dosing interval early.

    ``as_of``: the date the rows describe the patient as of. A change after the last dose or level and not after
    that day (an interacting drug started or stopped since) gets its EVID 2 row too, so the last row holds what is
    in force now and the forecasts from it see it; without ``as_of`` the rows end at the last dose or level."""
    levels = record.final_levels()
    doses = record.final_administrations()
    events: list[tuple[dt.datetime, int, Any]] = [(x.time, 0, x) for x in levels]
    events += [(d.time, 1, d) for d in doses]
    events.sort(key=lambda e: (e[0], e[1]))  # a level drawn at a dose's time is a trough: before the dose
    notes: list[str] = []
    if not events:
        return NonmemExport(list(_BASE), [], None, [f"no {record.agent} doses or levels"])
    last_event = events[-1][0]
    mine = [(_utc_day(x["start"]), None if x["end"] is None else _utc_day(x["end"]), float(x["factor"]))
            for x in exposure or [] if x["agent"] == record.agent]
    entered = {c.name for c in record.covariates if c.final}
    # a model's covariates read from the medication list: their spans, exact in time as the exposure's are
    med_spans = {name: spans for name, (names_, after) in (medication_covariates or {}).items()
                 if name not in entered and (spans := medication_spans(record, names_, after))}
    edges = [(s, e) for s, e, _ in mine] + [span for spans in med_spans.values() for span in spans]
    if edges:
        have = {t for t, _, _ in events}
        until = events[-1][0] if as_of is None else max(events[-1][0], _utc_day(as_of) + dt.timedelta(days=1))
        bounds = {t for s, e in edges for t in (s, e) if t is not None and events[0][0] < t < until}
        events += [(t, 2, None) for t in sorted(bounds - have)]
        events.sort(key=lambda e: (e[0], e[1] == 1, e[1] == 0))  # boundaries first, then levels, then doses
    origin = next((t for t, kind, _ in events if kind == 1), events[0][0])
    covs: dict[str, list[tuple[dt.datetime, float]]] = {}
    for c in record.covariates:
        if c.final:
            covs.setdefault(c.name, []).append((c.time, float(c.value)))
    geno = record.genotype("CYP3A5")
    if "CYP3A5" not in covs and geno is not None and geno.expresser is not None:
        covs["CYP3A5"] = [(origin, 1.0 if geno.expresser else 0.0)]  # the genotype holds over the whole course
    tx_rec = record.transplant
    if tx_rec is not None and tx_rec.donor_cyp3a5 and "DONOR_CYP3A5" not in covs:
        donor = cyp3a5_expresser(tx_rec.donor_cyp3a5, "transplant.donor_cyp3a5")
        if donor is not None:
            covs["DONOR_CYP3A5"] = [(origin, 1.0 if donor else 0.0)]
    if tx_rec is not None and tx_rec.donor_type in ("living", "deceased") and "LIVING_DONOR" not in covs:
        covs["LIVING_DONOR"] = [(origin, 1.0 if tx_rec.donor_type == "living" else 0.0)]
    # one value, one place: the models' serum creatinine is the record's creatinine results, and their prednisolone
    # dose the prednisolone on the medication list (from 00:00 UTC of its start; 0 after its stop)
    if "SCR" not in covs:
        scr = [(x.time or dt.datetime(x.date.year, x.date.month, x.date.day, tzinfo=dt.UTC), x.value)
               for x in record.lab("creatinine")]
        if scr:
            covs["SCR"] = scr
            notes.append("SCR: the creatinine results")
    if "PRED" not in covs:
        pred: list[tuple[dt.datetime, float]] = []
        for m in record.final_medications():
            if m.name in ("prednisolone", "prednisone") and m.daily_mg is not None:
                pred.append((dt.datetime(m.start.year, m.start.month, m.start.day, tzinfo=dt.UTC), m.daily_mg))
                if m.stop is not None:
                    pred.append((dt.datetime(m.stop.year, m.stop.month, m.stop.day, tzinfo=dt.UTC)
                                 + dt.timedelta(days=1), 0.0))
        if pred:
            covs["PRED"] = [(min(t for t, _ in pred) - dt.timedelta(days=36500), 0.0), *sorted(pred)]
            notes.append("PRED: the prednisolone daily dose on the medication list (0 before and after it)")
    for cname in med_spans:
        names_, after = (medication_covariates or {})[cname]
        notes.append(f"{cname}: 1 while {', '.join(names_)} is on the medication list"
                     + (f" and {after:g} days after it stops" if after else "") + ", else 0")
    for series in covs.values():
        series.sort(key=lambda x: x[0])
    names = sorted(covs)
    tx = record.transplant_date
    iv = any(d.route == "intravenous" for d in doses)  # the reserved IV column (cnidose.models.model.IV)
    extra = (["AGE", "SEX"] + (["POD"] if tx else []) + ["IMMUNOASSAY"] + (["EXPOSURE"] if mine else [])
             + sorted(med_spans)
             + (["IV"] if iv else []))
    header = _BASE + [n for n in extra if n not in names] + names
    # NONMEM IDs are numbers: a text record id (an MRN) becomes 1
    pid: float | str = ident if ident is not None else (record.id if _numeric(record.id) else 1)
    age = _years(record.birth_date, origin)  # at the start of the record: constant over the course
    rows: list[list[float | str]] = []
    entries: list[str | None] = []
    early: set[str] = set()
    for t, kind, e in events:
        hours = round((t - origin).total_seconds() / 3600.0, 6)
        row: dict[str, float | str] = {"ID": pid, "TIME": hours, "CMT": "."}
        if kind == 1:
            dur = e.infusion_h
            row |= {"EVID": 1, "AMT": e.dose_mg, "RATE": e.dose_mg / dur if dur else 0, "DV": ".", "MDV": 1, "BLQ": 0,
                    "LLOQ": "."}
            if iv:
                row["IV"] = 1 if e.route == "intravenous" else 0
        elif kind == 2:  # an exposure boundary: no dose, no level
            row |= {"EVID": 2, "AMT": 0, "RATE": 0, "DV": ".", "MDV": 1, "BLQ": 0, "LLOQ": "."}
        else:
            row |= {"EVID": 0, "AMT": 0, "RATE": 0, "DV": e.value, "MDV": 0, "BLQ": int(bool(e.blq)),
                    "LLOQ": e.lloq if e.lloq is not None else "."}
        # a row holds what is in force over the interval it ends; a change after the last dose or level (since then,
        # up to as_of) holds from its own row on: the last row is what the forecasts carry
        now = kind == 2 and t > last_event
        if mine:
            factor = 1.0
            for start, end, f in mine:
                if _in_force(start, end, t, now):
                    factor *= f
            row["EXPOSURE"] = factor
        for n, spans in med_spans.items():
            row[n] = 1.0 if any(_in_force(start, end, t, now) for start, end in spans) else 0.0
        row["AGE"] = age
        row["SEX"] = {"male": 0, "female": 1}.get(record.sex, ".")
        if tx:
            row["POD"] = round((t.date() - tx).days, 0)
        assay = (e.assay or "").lower() if kind == 0 and e is not None else ""
        row["IMMUNOASSAY"] = 1 if "immuno" in assay else (0 if assay else ".")
        for n in names:
            series = covs[n]
            before = [v for at, v in series if at <= t]
            if before:
                row[n] = before[-1]
            else:
                row[n] = series[0][1]
                early.add(n)
        rows.append([row.get(h, ".") for h in header])
        entries.append(None if e is None else e.id)
    for n in sorted(early):
        notes.append(f"{n}: no value before {covs[n][0][0].isoformat()}; its first value is used for earlier records")
    return NonmemExport(header, rows, origin, notes, entries)


def _in_force(start: dt.datetime, end: dt.datetime | None, t: dt.datetime, now: bool) -> bool:
    """Whether [start, end) holds over the interval a row at ``t`` ends (start < t <= end), or, for a row after the
    last dose or level (``now``), from ``t`` on (start <= t < end)."""
    if now:
        return start <= t and (end is None or t < end)
    return start < t and (end is None or t <= end)


def medication_spans(record: PatientRecord, names: tuple[str, ...], after_days: float
                      ) -> list[tuple[dt.datetime, dt.datetime | None]]:
    """[start, end) in UTC of every final medication named in ``names`` (case aside): from 00:00 of its first day
    to the end of its last day plus ``after_days`` (None: not stopped)."""
    wanted = {n.lower() for n in names}
    spans: list[tuple[dt.datetime, dt.datetime | None]] = []
    for m in record.final_medications():
        if m.name.strip().lower() in wanted:  # as the model's covariate names them
            end = None if m.stop is None else _utc_day(m.stop) + dt.timedelta(days=1 + after_days)
            spans.append((_utc_day(m.start), end))
    return spans


def import_record(store: Store, actor: Actor, doc: Any, *, family_name: str, given_name: str) -> int:
    """Store a ``cnidose.patient/2`` (or /1) document as a new patient, every entry with its status and flags, in
    one transaction; returns the patient's id. The document is validated first (errors name its field)."""
    from cnidose.records import schema as S
    from cnidose.records.store import (
        make_blood_pressure,
        make_covariate,
        make_dose,
        make_genotype,
        make_lab,
        make_level,
        make_medication,
        make_patient,
        make_regimen,
    )

    store.authorize(actor, "write", "import")
    rec = parse_record(doc, as_of=dt.datetime.now(dt.UTC).date())
    patient = make_patient(mrn=rec.id, family_name=family_name, given_name=given_name, birth_date=rec.birth_date,
                           sex=rec.sex, agent=rec.agent, indication=rec.indication, therapy_start=rec.therapy_start,
                           transplant_date=rec.transplant_date)
    patient.region, patient.severity, patient.route, patient.product = rec.region, rec.severity, rec.route, rec.product
    patient.strength_percent = rec.strength_percent
    patient.conditions = list(rec.conditions) or None
    if rec.indication_code is not None:
        patient.indication_code, patient.indication_system = rec.indication_code.code, rec.indication_code.system
    if rec.transplant is not None:
        patient.donor_type, patient.donor_cyp3a5 = rec.transplant.donor_type, rec.transplant.donor_cyp3a5
    entries: list[tuple[str, Any]] = []

    def keep(kind: str, obj: Any, e: Any) -> None:
        obj.status, obj.status_reason, obj.flags = e.status, e.status_reason, list(e.flags) or None
        entries.append((kind, obj))

    for g in rec.genotypes:
        keep("genotype", make_genotype(gene=g.gene, result=g.result, source=g.source, tested_on=g.date), g)
    for r in rec.regimens:
        keep("regimen", make_regimen(drug=rec.agent, product=r.product, dose=r.dose_mg, unit="mg",
                                     interval_h=r.interval_h, start_at=r.start, stop_at=r.stop, route=r.route), r)
    for d in rec.administrations:
        keep("dose", make_dose(drug=rec.agent, product=d.product, amount=d.dose_mg, unit="mg", given_at=d.time,
                               route=d.route, infusion_h=d.infusion_h), d)
    for lv in rec.levels:
        keep("observation", make_level(drug=rec.agent, value=lv.value, unit="ng/mL", observed_at=lv.time, blq=lv.blq,
                                       lloq=lv.lloq, assay=lv.assay, sample=lv.sample, matrix=lv.matrix), lv)
    for x in rec.labs:
        at = x.time or dt.datetime(x.date.year, x.date.month, x.date.day, tzinfo=dt.UTC)
        keep("observation", make_lab(name=x.name, value=x.value, unit=x.unit, observed_at=at), x)
    for b in rec.blood_pressure:
        at = b.time or dt.datetime(b.date.year, b.date.month, b.date.day, tzinfo=dt.UTC)
        for obj in make_blood_pressure(systolic=b.systolic, diastolic=b.diastolic, observed_at=at):
            keep("observation", obj, b)
    for c in rec.covariates:
        cov = make_covariate(name=c.name, value=c.value, unit=c.unit, measured_at=c.time)
        cov.source = c.source
        keep("covariate", cov, c)
    for m in rec.medications:
        keep("medication", make_medication(name=m.name, start_on=m.start, stop_on=m.stop, daily_mg=m.daily_mg), m)
    appointments: list[S.Appointment] = []
    return store.import_patient(actor, patient, entries, appointments, "cnidose.patient/2 document")


def import_nonmem_rows(store: Store, actor: Actor, patient_id: int, header: list[str], rows: list[list[str]],
                       *, origin: dt.datetime, drug: str, product: str, lines: list[int] | None = None
                       ) -> tuple[int, int]:
    """Store a patient's NONMEM-format doses (EVID 1, AMT in mg) and levels (EVID 0, DV in ng/mL) with TIME in
    hours from ``origin``. Every row is checked before anything is stored; an error names the line and
    column. Returns (doses, levels) stored."""
    from cnidose.records.store import make_dose, make_level

    store.authorize(actor, "write", "import", patient_id)
    names = [h.strip().upper() for h in header]
    missing = {"TIME", "EVID", "AMT", "DV"} - set(names)
    if missing:
        raise FieldError(f"missing column(s) {', '.join(sorted(missing))}", field="header")
    if origin.tzinfo is None:
        raise FieldError("the origin (TIME = 0) needs a time zone", field="origin")
    col = {n: k for k, n in enumerate(names)}
    entries: list[tuple[str, Any]] = []
    for k, r in enumerate(rows):
        line = lines[k] if lines else k + 2

        def num(name: str, r: list[str] = r, line: int = line) -> float | None:
            text = r[col[name]].strip() if name in col and col[name] < len(r) else ""
            if text in ("", "."):
                return None
            try:
                return float(text)
            except ValueError:
                raise FieldError(f"line {line}: expected a number, got {text!r}", field=name) from None

        t, evid = num("TIME"), num("EVID")
        if t is None or evid is None:
            raise FieldError(f"line {line}: TIME and EVID are required", field="TIME" if t is None else "EVID")
        at = origin + dt.timedelta(hours=t)
        column = "AMT" if evid == 1 else "DV"
        try:
            if evid == 1:
                amt, rate = num("AMT"), num("RATE") or 0.0
                if amt is None:
                    raise FieldError("a dose needs AMT", field="AMT")
                entries.append(("dose", make_dose(drug=drug, product=product, amount=amt, unit="mg", given_at=at,
                                                  route="intravenous" if rate > 0 else "oral",
                                                  infusion_h=amt / rate if rate > 0 else None)))
            elif evid == 0 and (num("MDV") or 0) == 0:
                dv = num("DV")
                if dv is None:
                    raise FieldError("an observation needs DV", field="DV")
                blq = (num("BLQ") or 0) == 1
                entries.append(("observation", make_level(drug=drug, value=dv, unit="ng/mL", observed_at=at,
                                                          blq=blq, lloq=num("LLOQ"))))
        except FieldError as exc:
            if exc.args and str(exc).startswith(f"[{exc.field}] line "):
                raise
            raise FieldError(f"line {line}: {str(exc).split('] ', 1)[-1]}", field=column) from None
    store.add_entries(actor, patient_id, entries, via="NONMEM import")
    return sum(kind == "dose" for kind, _ in entries), sum(kind == "observation" for kind, _ in entries)
