"""From the stored chart to what the engines read, and back: NONMEM-format rows (for ``fit``, ``recommend``,
``evaluate``) and the ``cnidose.patient/1`` document (for ``assess``); NONMEM-format import of a
patient's doses and levels.

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
from dataclasses import dataclass, field
from typing import Any

from cnidose.records.nonmem import DataSet
from cnidose.records.store import Actor, Chart, Store, make_dose, make_level
from cnidose.records.units import FieldError

__all__ = ["NonmemExport", "chart_to_document", "chart_to_nonmem", "import_nonmem_rows"]

_BASE = ["ID", "TIME", "EVID", "AMT", "RATE", "CMT", "DV", "MDV", "BLQ", "LLOQ"]


@dataclass(frozen=True, slots=True)
class NonmemExport:
    header: list[str]
    rows: list[list[float | str]]
    origin: dt.datetime | None  # the instant TIME = 0
    notes: list[str] = field(default_factory=list)

    def dataset(self, source: str = "chart") -> DataSet:
        """The rows as a NONMEM data set, read exactly as a CSV file would be (``.individuals()``)."""
        cells = tuple(tuple(str(c) for c in r) for r in self.rows)  # str(float) round-trips exactly
        return DataSet(tuple(self.header), cells, tuple(range(2, len(cells) + 2)), source)


def _final(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("status", "final") == "final"]


def _years(born: dt.date, at: dt.datetime) -> float:
    return round((at.date() - born).days / 365.25, 4)


def chart_to_nonmem(chart: Chart, drug: str | None = None, *, ident: int | float | None = None) -> NonmemExport:
    """The patient's doses and levels of ``drug`` (default: the patient's agent) as NONMEM-format rows."""
    p = chart.patient
    drug = (drug or p["agent"]).lower()
    doses = [d for d in _final(chart.doses) if d["drug"] == drug]
    levels = [o for o in _final(chart.observations) if o["category"] == "level" and o["name"] == f"{drug} level"]
    events: list[tuple[dt.datetime, int, dict[str, Any]]] = [(o["observed_at"], 0, o) for o in levels]
    events += [(d["given_at"], 1, d) for d in doses]
    events.sort(key=lambda e: (e[0], e[1]))  # a level drawn at a dose's time is a trough: before the dose
    notes: list[str] = []
    if not events:
        return NonmemExport(list(_BASE), [], None, [f"no {drug} doses or levels"])
    origin = next((t for t, kind, _ in events if kind == 1), events[0][0])
    covs: dict[str, list[tuple[dt.datetime, float]]] = {}
    for c in _final(chart.covariates):
        covs.setdefault(c["name"], []).append((c["measured_at"], float(c["value"])))
    for series in covs.values():
        series.sort(key=lambda x: x[0])
    names = sorted(covs)
    extra = ["AGE", "SEX"] + (["POD"] if p.get("transplant_date") else []) + ["IMMUNOASSAY"]
    header = _BASE + [n for n in extra if n not in names] + names
    pid = ident if ident is not None else p["id"]
    age = _years(p["birth_date"], origin)  # at the start of the record: constant over the course
    rows: list[list[float | str]] = []
    early: set[str] = set()
    for t, kind, e in events:
        hours = round((t - origin).total_seconds() / 3600.0, 6)
        row: dict[str, float | str] = {"ID": pid, "TIME": hours, "CMT": "."}
        if kind == 1:
            dur = e.get("infusion_h")
            row |= {"EVID": 1, "AMT": e["amount_mg"], "RATE": e["amount_mg"] / dur if dur else 0, "DV": ".",
                    "MDV": 1, "BLQ": 0, "LLOQ": "."}
        else:
            row |= {"EVID": 0, "AMT": 0, "RATE": 0, "DV": e["value"], "MDV": 0, "BLQ": int(bool(e["blq"])),
                    "LLOQ": e["lloq"] if e["lloq"] is not None else "."}
        row["AGE"] = age
        row["SEX"] = {"male": 0, "female": 1}.get(p["sex"], ".")
        if p.get("transplant_date"):
            row["POD"] = round((t.date() - p["transplant_date"]).days, 0)
        assay = (e.get("assay") or "").lower() if kind == 0 else ""
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
    for n in sorted(early):
        notes.append(f"{n}: no value before {covs[n][0][0].isoformat()}; its first value is used for earlier records")
    return NonmemExport(header, rows, origin, notes)


def chart_to_document(chart: Chart, *, region: str = "EU") -> dict[str, Any]:
    """The ``cnidose.patient/1`` document :func:`cnidose.clinical.assess` reads."""
    p = chart.patient
    covs = {c["name"]: c for c in sorted(_final(chart.covariates), key=lambda c: c["measured_at"])}
    doc: dict[str, Any] = {
        "schema": "cnidose.patient/1", "id": p["mrn"], "birth_date": p["birth_date"].isoformat(),
        "sex": p["sex"], "agent": p["agent"], "indication": p["indication"], "region": region,
    }
    # a transplant recipient's calcineurin inhibitor starts at the transplant; otherwise the start must be
    # recorded (the rule base then reports it missing rather than taking the record's creation date)
    start = p["therapy_start"] or p["transplant_date"]
    if start is not None:
        doc["therapy_start"] = start.isoformat()
    if "WT" in covs:
        doc["weight_kg"] = covs["WT"]["value"]
    if "HT" in covs:
        doc["height_cm"] = covs["HT"]["value"]
    doc["medications"] = [{"name": m["name"], "start": m["start_on"].isoformat(),
                           "stop": m["stop_on"].isoformat() if m["stop_on"] else None,
                           **({"daily_mg": m["daily_mg"]} if m["daily_mg"] is not None else {})}
                          for m in _final(chart.medications)]
    doc["labs"] = [{"name": o["name"], "value": o["value"], "unit": o["unit"],
                    "date": o["observed_at"].date().isoformat()}
                   for o in _final(chart.observations) if o["category"] == "lab"]
    bp: dict[dt.datetime, dict[str, Any]] = {}
    for o in _final(chart.observations):
        if o["category"] == "vital" and o["name"] in ("systolic blood pressure", "diastolic blood pressure"):
            bp.setdefault(o["observed_at"], {"date": o["observed_at"].date().isoformat()})[
                o["name"].split()[0]] = o["value"]
    doc["blood_pressure"] = [v for _, v in sorted(bp.items()) if "systolic" in v and "diastolic" in v]
    return doc


def import_nonmem_rows(store: Store, actor: Actor, patient_id: int, header: list[str], rows: list[list[str]],
                       *, origin: dt.datetime, drug: str, product: str, lines: list[int] | None = None
                       ) -> tuple[int, int]:
    """Store a patient's NONMEM-format doses (EVID 1, AMT in mg) and levels (EVID 0, DV in ng/mL) with TIME in
    hours from ``origin``. Every row is checked before anything is stored; an error names the line and
    column. Returns (doses, levels) stored."""
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
