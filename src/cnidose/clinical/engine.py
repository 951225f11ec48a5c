"""The clinical engine: ``assess(record, as_of)`` -> selection, interactions, alerts, exposure
adjustments and the follow-up schedule. Pure and deterministic: the same record and date give the
same assessment. The knowledge is data (``clinical/data/*.toml``), each item with its source, and every
alert carries the source of the rule that raised it.

Exposure adjustments (interactions with a published effect size) are intervals ``[start + onset,
stop + offset)`` with a multiplier on the agent's exposure (AUC). They enter a PK model as a divisor of
the apparent clearance over that interval (CL/F / factor), i.e. as a time-varying covariate on the
records of the interval: the reserved data column ``EXPOSURE`` (``cnidose.models.exposure``), which every
model's ``CL`` is divided by in the prior, the MAP fit, the posterior and the forecasts. The web app's
analysis applies them from the medication list (dates from 00:00 UTC).
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import numpy as np

from cnidose.clinical.record import PatientRecord
from cnidose.errors import InputError
from cnidose.models.covariates import DERIVATIONS

__all__ = ["Alert", "Assessment", "Due", "ExposureAdjustment", "assess", "egfr", "knowledge"]

Severity = Literal["info", "warning", "critical"]
_RANK = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    severity: Severity
    message: str
    source: str
    date: dt.date | None = None


@dataclass(frozen=True, slots=True)
class ExposureAdjustment:
    drug: str
    agent: str
    factor: float
    start: dt.date
    end: dt.date | None  # None: still active
    source: str


@dataclass(frozen=True, slots=True)
class Due:
    what: str
    date: dt.date
    source: str


@dataclass(frozen=True, slots=True)
class Assessment:
    patient: str
    as_of: dt.date
    selection: Literal["pass", "caution", "stop"]
    selection_reasons: list[str]
    alerts: list[Alert]
    exposure: list[ExposureAdjustment]
    due: list[Due]
    egfr: list[tuple[dt.date, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@functools.cache
def knowledge() -> tuple[dict[str, Any], dict[str, Any]]:
    """The interaction and protocol knowledge bases (parsed TOML, read once; callers must not modify them)."""
    def read(name: str) -> dict[str, Any]:
        return tomllib.loads((resources.files("cnidose.clinical") / "data" / name).read_text(encoding="utf-8"))
    return read("interactions.toml"), read("protocols.toml")


def egfr(record: PatientRecord) -> list[tuple[dt.date, float]]:
    """eGFR (mL/min/1.73 m2) at every creatinine: CKD-EPI 2021 for adults, bedside Schwartz for children."""
    out = []
    sex = np.array([1.0 if record.sex == "female" else 0.0])
    for lab in record.lab("creatinine"):
        age = record.age(lab.date)
        scr = np.array([lab.value])
        if age >= 18:
            v = DERIVATIONS["egfr_ckd_epi_2021"](scr, np.array([age]), sex)
        else:
            if record.height_cm is None:
                raise InputError("a child's eGFR (bedside Schwartz) needs height_cm")
            v = DERIVATIONS["egfr_schwartz_bedside"](np.array([record.height_cm]), scr)
        out.append((lab.date, float(v[0])))
    return out


def _drug_index(interactions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    idx: dict[str, dict[str, Any]] = {}
    for d in interactions.get("drugs", []):
        for n in [d["name"], *d.get("synonyms", [])]:
            idx[n.lower()] = d
    return idx


def _lookup_drug(name: str, idx: dict[str, dict[str, Any]], where: str) -> dict[str, Any] | None:
    if name in idx:
        return idx[name]
    close = difflib.get_close_matches(name, list(idx), n=3, cutoff=0.8)
    if close:
        raise InputError(f"[{where}] unknown drug {name!r}: did you mean {', '.join(close)}?")
    return None


def assess(record: PatientRecord, as_of: dt.date) -> Assessment:
    """Selection, interactions, monitoring alerts, exposure adjustments and what is due, as of ``as_of``."""
    interactions, protocols = knowledge()
    idx = _drug_index(interactions)
    alerts: list[Alert] = []
    notes: list[str] = []
    exposure: list[ExposureAdjustment] = []
    reasons: list[str] = []
    selection: Literal["pass", "caution", "stop"] = "pass"
    agent = record.agent
    # -- interactions
    for k, med in enumerate(record.medications):
        d = _lookup_drug(med.name, idx, f"medications[{k}].name")
        if d is None:
            notes.append(f"{med.name}: not in the interaction knowledge base")
            continue
        eff = d.get("effects", {}).get(agent)
        if eff is None:
            continue
        active = med.stop is None or med.stop >= record.therapy_start
        if not active:
            continue
        msg = f"{med.name} ({d['kind']}): {eff['action']}"
        alerts.append(Alert(f"interaction:{d['name']}", eff["severity"], msg, eff["source"], med.start))
        if "max_daily_mg" in d and med.daily_mg is not None and med.daily_mg > d["max_daily_mg"]:
            alerts.append(Alert(f"interaction:{d['name']}:dose", "critical",
                                f"{med.name} {med.daily_mg:g} mg/day exceeds {d['max_daily_mg']:g} mg/day with {agent}",
                                eff["source"], med.start))
        if "exposure" in eff:
            start = med.start + dt.timedelta(days=int(d.get("onset_days", 0)))
            end = None if med.stop is None else med.stop + dt.timedelta(days=int(d.get("offset_days", 0)))
            exposure.append(ExposureAdjustment(d["name"], agent, float(eff["exposure"]), start, end,
                                               f"{eff['source']}; offset: {d.get('offset_source', '')}"))
    # -- protocols
    series = egfr(record) if record.lab("creatinine") else []
    for p in protocols.get("protocols", []):
        if not _applies(p, record):
            continue
        selection, reasons = _selection(record, p, selection, reasons, as_of, series)
        if "counselling" in p:
            alerts.append(Alert(f"{p['id']}:counselling", "info", p["counselling"], p["counselling_source"]))
        for rule in p.get("rules", []):
            alerts += _rule(record, rule, series, as_of)
    alerts.sort(key=lambda a: (-_RANK[a.severity], a.date or as_of))
    if any(a.severity == "critical" and a.rule.startswith("interaction") for a in alerts) and selection == "pass":
        selection = "caution"
        reasons.append("a critical interaction is active (see alerts)")
    due = _due(record, protocols, as_of)
    return Assessment(record.id, as_of, selection, reasons, alerts, exposure, due, series, notes)


def _applies(p: dict[str, Any], record: PatientRecord) -> bool:
    if p["agent"] not in (record.agent, "any"):
        return False
    if "route" in p and p["route"] != record.route:
        return False
    if p["indication"] == "transplant":
        return "transplant" in record.indication
    return bool(p["indication"] == record.indication)


def _selection(record: PatientRecord, p: dict[str, Any], selection: Any, reasons: list[str], as_of: dt.date,
               series: list[tuple[dt.date, float]]) -> tuple[Any, list[str]]:
    age = record.age(record.therapy_start)
    if "min_age_years" in p and age < p["min_age_years"]:
        selection = "stop"
        reasons.append(f"{p['title']}: not for patients under {p['min_age_years']:g} years ({p['age_source']})")
    for lo, hi, allowed in p.get("age_strengths", []):
        if lo <= age < hi and record.strength_percent is not None and record.strength_percent not in allowed:
            selection = "stop"
            reasons.append(f"{record.strength_percent:g} % is not for ages {lo:g}-{hi:g} (allowed: "
                           f"{', '.join(f'{a:g} %' for a in allowed)}) ({p['age_source']})")
    if "baseline_bp_max" in p:
        s_max, d_max = p["baseline_bp_max"]
        high = [b for b in record.blood_pressure if b.date <= record.therapy_start
                and (b.systolic > s_max or b.diastolic > d_max)]
        if high:
            selection = "stop"
            reasons.append(f"blood pressure {high[-1].systolic:g}/{high[-1].diastolic:g} mmHg above {s_max:g}/"
                           f"{d_max:g} before starting ({p['baseline_bp_source']})")
    if "baseline_egfr_min" in p:
        pre = [v for d, v in series if d <= record.therapy_start]
        if pre and float(np.mean(pre)) <= p["baseline_egfr_min"]:
            if selection == "pass":
                selection = "caution"
            reasons.append(f"baseline eGFR {float(np.mean(pre)):.0f} <= {p['baseline_egfr_min']:g} "
                           f"({p['baseline_egfr_source']})")
    contra = [c for c in p.get("contraindications", [])
              if any(c in cond for cond in record.conditions)
              or any(c in m.name and (m.stop is None or m.stop >= as_of) for m in record.medications)]
    if contra:
        selection = "stop"
        reasons.append(f"contraindicated for {p['title']}: {', '.join(contra)} ({p['contraindications_source']})")
    if "baseline" in p:
        before = [x for x in record.lab("creatinine") if x.date <= record.therapy_start]
        bps = [b for b in record.blood_pressure if b.date <= record.therapy_start]
        missing = []
        if len(before) < 2:
            missing.append(f"serum creatinine on 2 occasions ({len(before)} found)")
        if len(bps) < 2:
            missing.append(f"blood pressure on 2 occasions ({len(bps)} found)")
        if missing:
            if selection == "pass":
                selection = "caution"
            reasons.append(f"baseline work-up incomplete: {'; '.join(missing)} ({p['baseline_source']})")
    return selection, reasons


def _baseline_egfr(record: PatientRecord, series: list[tuple[dt.date, float]]) -> float | None:
    pre = [v for d, v in series if d <= record.therapy_start]
    return float(np.mean(pre)) if len(pre) >= 2 else None


def _rule(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]], as_of: dt.date
          ) -> list[Alert]:
    kind = rule["type"]
    rid = rule["id"]
    after = [(d, v) for d, v in series if d > record.therapy_start and d <= as_of]
    if kind in ("egfr_fall", "egfr_not_improved"):
        base = _baseline_egfr(record, series)
        if base is None:
            return []
        falls = [(d, 100.0 * (1 - v / base)) for d, v in after]
        hits = [(d, f) for d, f in falls if f > rule["threshold_percent"]]
        if kind == "egfr_fall":
            if len(hits) >= rule["min_readings"]:
                d, f = hits[rule["min_readings"] - 1]
                return [Alert(rid, rule["severity"], f"eGFR {f:.0f} % below baseline ({base:.0f}) on {len(hits)} "
                              f"measurements: {rule['action']}", rule["source"], d)]
            return []
        # not improved: a reduction was due at the second raised reading; still raised >= after_days later
        if len(hits) >= 2:
            t1 = hits[1][0]
            later = [(d, f) for d, f in falls if d >= t1 + dt.timedelta(days=rule["after_days"])]
            if later and later[-1][1] > rule["threshold_percent"]:
                d, f = later[-1]
                return [Alert(rid, rule["severity"], f"eGFR still {f:.0f} % below baseline {(d - t1).days} days after "
                              f"the reduction: {rule['action']}", rule["source"], d)]
        return []
    if kind == "egfr_fall_band":
        pre = [v for d, v in series if d <= record.therapy_start]
        if not pre or not after:
            return []
        base = float(np.mean(pre))
        d, v = after[-1]
        fall = 100.0 * (1 - v / base)
        low_ok = fall >= rule["fall_above"] if rule.get("inclusive") else fall > rule["fall_above"]
        if v < rule["egfr_below"] and low_ok and fall < rule["fall_below"]:
            return [Alert(rid, rule["severity"], f"eGFR {v:.0f} (< {rule['egfr_below']:g}), {fall:.0f} % below "
                          f"baseline {base:.0f}: {rule['action']}", rule["source"], d)]
        return []
    if kind == "creatinine_rise":
        scr = record.lab("creatinine")
        pre = [x.value for x in scr if x.date <= record.therapy_start]
        post = [x for x in scr if record.therapy_start < x.date <= as_of]
        if len(pre) >= 1 and post:
            base = float(np.mean(pre))
            rise = 100.0 * (post[-1].value / base - 1)
            if rise >= rule["threshold_percent"]:
                msg = f"serum creatinine {rise:.0f} % above pretreatment: {rule['action']}"
                return [Alert(rid, rule["severity"], msg, rule["source"], post[-1].date)]
        return []
    if kind == "hypertension":
        high = [b for b in record.blood_pressure if record.therapy_start < b.date <= as_of
                and (b.systolic > rule["systolic"] or b.diastolic > rule["diastolic"])]
        if len(high) >= rule["min_readings"]:
            b = high[-1]
            msg = (f"{len(high)} readings above {rule['systolic']:g}/{rule['diastolic']:g} mmHg "
                   f"(latest {b.systolic:g}/{b.diastolic:g}): {rule['action']}")
            return [Alert(rid, rule["severity"], msg, rule["source"], b.date)]
        return []
    if kind == "duration":
        days = (as_of - record.therapy_start).days
        if days > rule["max_days"]:
            return [Alert(rid, rule["severity"], f"treated for {days} days: {rule['action']}", rule["source"], as_of)]
        return []
    if kind == "lab_threshold":
        labs = [x for x in record.lab(rule["lab"]) if x.date <= as_of]
        found = [x for x in labs if x.value >= rule["at_least"]]
        if rule.get("consecutive", 1) > 1:  # "persistently": the last n readings all at or above
            n = int(rule["consecutive"])
            found = labs[-n:] if len(labs) >= n and all(x.value >= rule["at_least"] for x in labs[-n:]) else []
        if found:
            last = found[-1]
            return [Alert(rid, rule["severity"], f"{rule['lab']} {last.value:.3g} {last.unit}: {rule['action']}",
                          rule["source"], last.date)]
        return []
    raise InputError(f"unknown rule type {kind!r} in the protocols data (rule {rid})")


def _due(record: PatientRecord, protocols: dict[str, Any], as_of: dt.date) -> list[Due]:
    out: list[Due] = []
    for p in protocols.get("protocols", []):
        if not _applies(p, record):
            continue
        for item in p.get("schedule", []):
            start = record.therapy_start + dt.timedelta(days=int(item.get("from_days", 0)))
            until = item.get("until_days")
            every = int(item["every_days"])
            n = max(0, -(-(as_of - start).days // every))  # first visit on or after as_of
            date = start + dt.timedelta(days=n * every)
            if until is not None and date > record.therapy_start + dt.timedelta(days=int(until)):
                continue
            out.append(Due(", ".join(item["what"]), date, item["source"]))
    return sorted(out, key=lambda d: d.date)
