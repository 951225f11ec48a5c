"""The clinical engine: ``assess(record, as_of)`` -> selection, interactions, alerts, exposure
adjustments and the follow-up schedule. Pure and deterministic: the same record and date give the
same assessment. The knowledge is data (``clinical/data/*.toml``), each item with its source, and every
alert carries the source of the rule that raised it.

Alerts state the patient's own numbers: a dose change is computed from the regimen in force (one third of
9 mg/day is 3 mg/day; 23.7 -> 15.8 mg twice daily; a 25-50 % reduction as a mg range) and rounded to the
marketed strengths of the regimen's product (``cnidose.dosing`` products). Rules carry a ``region`` (EU
SmPC or US label) where the labels differ; the record's region chooses.

Exposure adjustments (interactions with a published effect size) are intervals ``[start + onset,
stop + offset)`` with a multiplier on the agent's exposure (AUC). They enter a PK model as a divisor of
the apparent clearance over that interval (CL/F / factor), i.e. as a time-varying covariate on the
records of the interval: the reserved data column ``EXPOSURE`` (``cnidose.models.exposure``), which every
model's ``CL`` is divided by in the prior, the MAP fit, the posterior and the forecasts.
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

from cnidose.clinical.record import Level, PatientRecord, Regimen
from cnidose.dosing.data import find_target, load_products
from cnidose.dosing.regimen import candidate_doses
from cnidose.errors import InputError
from cnidose.models.covariates import DERIVATIONS

__all__ = ["Alert", "Assessment", "Due", "ExposureAdjustment", "assess", "concomitants", "dose_change", "egfr",
           "find_trough_target", "knowledge", "trough_target"]

Severity = Literal["info", "warning", "critical"]
_RANK = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    severity: Severity
    message: str
    source: str
    date: dt.date | None = None
    dose: str | None = None  # the patient's new dose, when the action changes it


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


# -- the patient's own numbers -------------------------------------------------------------------------------------
def _strengths(record: PatientRecord, reg: Regimen) -> tuple[tuple[float, ...], str]:
    prods, _ = load_products()
    for p in prods:
        if p.name.lower() == reg.product.lower() and p.drug == record.agent:
            return p.strengths, p.name
    return (), reg.product


def _per_admin(daily: float, reg: Regimen) -> float:
    return daily * reg.interval_h / 24.0


def _every(reg: Regimen) -> str:
    return "twice daily" if reg.interval_h == 12 else "once daily" if reg.interval_h == 24 else \
        f"every {reg.interval_h:g} h"


def _units(units: dict[str, int]) -> str:
    return " + ".join(f"{n} x {s} mg" for s, n in sorted(units.items(), key=lambda kv: -float(kv[0])))


def _achievable(strengths: tuple[float, ...], lo: float, hi: float) -> list[tuple[float, dict[str, int]]]:
    return [(d, u) for d, u in candidate_doses(strengths, max_units=8) if lo - 1e-9 <= d <= hi + 1e-9]


def dose_change(record: PatientRecord, change: dict[str, Any], as_of: dt.date) -> str | None:
    """The patient's new dose for a rule's ``dose_change`` (from the regimen in force at ``as_of``), in the
    product's marketed strengths; None when no regimen is recorded.

    Kinds: ``reduce_percent`` (low..high %), ``fraction`` (of the current dose), ``step_mg`` (per
    administration, e.g. -7.9), ``per_kg_day`` (mg/kg/day, needs the weight).
    """
    reg = record.current_regimen(as_of)
    if reg is None:
        return None
    strengths, name = _strengths(record, reg)
    every = _every(reg)
    now = f"{reg.dose_mg:g} mg {every} ({reg.daily_mg:g} mg/day)"
    kind = change["kind"]
    if kind == "reduce_percent":
        lo_d, hi_d = reg.daily_mg * (1 - change["high"] / 100), reg.daily_mg * (1 - change["low"] / 100)
        lo_a, hi_a = _per_admin(lo_d, reg), _per_admin(hi_d, reg)
        text = (f"a {change['low']:g}-{change['high']:g} % reduction of {now} is {lo_d:.3g}-{hi_d:.3g} mg/day, "
                f"{lo_a:.3g}-{hi_a:.3g} mg {every}")
        doses = _achievable(strengths, lo_a, hi_a) if strengths else []
        if doses:
            text += "; in " + name + " strengths: " + ", ".join(f"{d:g} mg ({_units(u)})" for d, u in doses[:4])
        elif strengths:
            text += f"; no combination of {name} {', '.join(f'{s:g}' for s in strengths)} mg falls in it"
        return text
    if kind == "fraction":
        new_daily = reg.daily_mg * float(change["fraction"])
        target = _per_admin(new_daily, reg)
        frac = change.get("label") or f"{change['fraction']:.2g}"
        text = f"{frac} of {reg.daily_mg:g} mg/day is {new_daily:.3g} mg/day: {target:.3g} mg {every}"
        if strengths:
            best = min(candidate_doses(strengths, max_units=8), key=lambda du: (abs(du[0] - target), du[0]))
            text += f" ({_units(best[1])} {name})" if abs(best[0] - target) < 1e-6 else \
                f"; nearest in {name} strengths {best[0]:g} mg ({_units(best[1])})"
        return text
    if kind == "step_mg":
        new = reg.dose_mg + float(change["mg"])
        if new <= 0:
            return f"a change of {change['mg']:g} mg from {reg.dose_mg:g} mg {every} leaves no dose: stop"
        return f"from {reg.dose_mg:g} to {new:.3g} mg {every} ({new * 24 / reg.interval_h:.3g} mg/day)"
    if kind == "per_kg_day":
        if record.weight_kg is None:
            return f"{change['mg_per_kg_day']:+g} mg/kg/day from {now}: record the weight to compute it"
        new_daily = reg.daily_mg + float(change["mg_per_kg_day"]) * record.weight_kg
        target = _per_admin(new_daily, reg)
        text = (f"{change['mg_per_kg_day']:+g} mg/kg/day at {record.weight_kg:g} kg: from {now} to "
                f"{max(new_daily, 0):.3g} mg/day, {max(target, 0):.3g} mg {every}")
        if strengths and target > 0:
            best = min(candidate_doses(strengths, max_units=8), key=lambda du: (abs(du[0] - target), du[0]))
            text += f" (nearest in {name} strengths {best[0]:g} mg: {_units(best[1])})"
        return text
    raise InputError(f"unknown dose_change kind {kind!r} in the protocols data")


# -- interactions ----------------------------------------------------------------------------------------------------
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


_FRACTION_WORDS = {0.3333333333333333: "one third", 0.5: "one half", 0.75: "three quarters"}


def _interactions(record: PatientRecord, as_of: dt.date, alerts: list[Alert], notes: list[str]
                  ) -> list[ExposureAdjustment]:
    interactions, _ = knowledge()
    idx = _drug_index(interactions)
    agent = record.agent
    exposure: list[ExposureAdjustment] = []
    start0 = record.therapy_start or as_of
    for k, med in enumerate(record.medications):
        if not med.final:
            continue
        d = _lookup_drug(med.name, idx, f"medications[{k}].name")
        if d is None:
            notes.append(f"{med.name}: not in the interaction knowledge base")
            continue
        eff = d.get("effects", {}).get(agent)
        if eff is None:
            continue
        if not (med.stop is None or med.stop >= start0):
            continue
        msg = f"{med.name} ({d['kind']}): {eff['action']}"
        dose = None
        if "dose_fraction" in eff and (med.stop is None or med.stop >= as_of):
            frac = float(eff["dose_fraction"])
            dose = dose_change(record, {"kind": "fraction", "fraction": frac,
                                        "label": _FRACTION_WORDS.get(frac)}, as_of)
            msg += f" For this patient: {dose}." if dose else " Record the current regimen to have the dose computed."
        alerts.append(Alert(f"interaction:{d['name']}", eff["severity"], msg, eff["source"], med.start, dose))
        if "max_daily_mg" in d and med.daily_mg is not None and med.daily_mg > d["max_daily_mg"]:
            alerts.append(Alert(f"interaction:{d['name']}:dose", "critical",
                                f"{med.name} {med.daily_mg:g} mg/day exceeds {d['max_daily_mg']:g} mg/day with {agent}",
                                eff["source"], med.start))
        if "exposure" in eff:
            start = med.start + dt.timedelta(days=int(d.get("onset_days", 0)))
            end = None if med.stop is None else med.stop + dt.timedelta(days=int(d.get("offset_days", 0)))
            exposure.append(ExposureAdjustment(d["name"], agent, float(eff["exposure"]), start, end,
                                               f"{eff['source']}; offset: {d.get('offset_source', '')}"))
    return exposure


# -- the assessment --------------------------------------------------------------------------------------------------
def assess(record: PatientRecord, as_of: dt.date) -> Assessment:
    """Selection, interactions, monitoring alerts, exposure adjustments and what is due, as of ``as_of``."""
    _, protocols = knowledge()
    alerts: list[Alert] = []
    notes: list[str] = list(record.notes)
    reasons: list[str] = []
    selection: Literal["pass", "caution", "stop"] = "pass"
    exposure = _interactions(record, as_of, alerts, notes)
    if record.therapy_start is None:
        notes.append("therapy start not recorded: rules measured from it (baselines, durations, schedules) are not "
                     "evaluated")
    series = egfr(record) if record.lab("creatinine") else []
    applied = 0
    for p in protocols.get("protocols", []):
        if not _applies(p, record):
            continue
        applied += 1
        selection, reasons = _selection(record, p, selection, reasons, as_of, series)
        if "counselling" in p:
            alerts.append(Alert(f"{p['id']}:counselling", "info", p["counselling"], p["counselling_source"]))
        for rule in p.get("rules", []):
            if rule.get("region") not in (None, record.region):
                continue
            alerts += _rule(record, rule, series, as_of)
    if applied == 0:
        notes.append(f"no protocol in the rule base covers {record.agent} for {record.indication}"
                     + (f" ({record.route})" if record.route else ""))
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
        return record.indication.endswith("transplant")
    return bool(p["indication"] == record.indication)


def _selection(record: PatientRecord, p: dict[str, Any], selection: Any, reasons: list[str], as_of: dt.date,
               series: list[tuple[dt.date, float]]) -> tuple[Any, list[str]]:
    start = record.therapy_start or as_of
    age = record.age(start)
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
        high = [b for b in record.final_bp() if b.date <= start and (b.systolic > s_max or b.diastolic > d_max)]
        if high:
            selection = "stop"
            reasons.append(f"blood pressure {high[-1].systolic:g}/{high[-1].diastolic:g} mmHg above {s_max:g}/"
                           f"{d_max:g} before starting ({p['baseline_bp_source']})")
    if "baseline_egfr_min" in p:
        pre = [v for d, v in series if d <= start]
        if pre and float(np.mean(pre)) <= p["baseline_egfr_min"]:
            if selection == "pass":
                selection = "caution"
            reasons.append(f"baseline eGFR {float(np.mean(pre)):.0f} <= {p['baseline_egfr_min']:g} "
                           f"({p['baseline_egfr_source']})")
    contra = [c for c in p.get("contraindications", [])
              if any(c in cond for cond in record.conditions)
              or any(c in m.name and (m.stop is None or m.stop >= as_of) for m in record.final_medications())]
    if contra:
        selection = "stop"
        reasons.append(f"contraindicated for {p['title']}: {', '.join(contra)} ({p['contraindications_source']})")
    if "baseline" in p:
        before = [x for x in record.lab("creatinine") if x.date <= start]
        bps = [b for b in record.final_bp() if b.date <= start]
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


def _baseline_egfr(record: PatientRecord, series: list[tuple[dt.date, float]]) -> tuple[float, int] | None:
    """Mean pre-treatment eGFR and how many measurements it rests on (the SmPC asks for at least 2)."""
    if record.therapy_start is None:
        return None
    pre = [v for d, v in series if d <= record.therapy_start]
    return (float(np.mean(pre)), len(pre)) if pre else None


def _with_dose(record: PatientRecord, rule: dict[str, Any], as_of: dt.date, msg: str) -> tuple[str, str | None]:
    if "dose_change" not in rule:
        return msg, None
    dose = dose_change(record, rule["dose_change"], as_of)
    if dose is None:
        return msg + " (record the current regimen to have the new dose computed).", None
    return f"{msg}: {dose}.", dose


_CORTICOSTEROIDS = ("prednis", "methylpred", "hydrocortison", "dexametha", "budesonid")


def concomitants(record: PatientRecord, on: dt.date) -> list[str]:
    """The immunosuppressants given with the agent on ``on``, as the target table names them (``mmf``,
    ``azathioprine``, ``corticosteroids``), most specific first; ``["any"]`` when none is recorded."""
    meds = " ".join(m.name.lower() for m in record.final_medications()
                    if m.start <= on and (m.stop is None or m.stop >= on))
    out = [key for key, words in (("mmf", ("mycophenol",)), ("azathioprine", ("azathioprine",)),
                                  ("corticosteroids", _CORTICOSTEROIDS)) if any(w in meds for w in words)]
    return out or ["any"]


def find_trough_target(record: PatientRecord, on: dt.date) -> Any:
    """The target trough range for the patient on ``on`` (cnidose.dosing targets): the label's regimen that
    matches a co-medication the record has (an MMF target before a corticosteroid one: the US Prograf label
    gives kidney targets with MMF or azathioprine and liver targets with corticosteroids), else one for any
    regimen. InputError (naming what exists) when none applies or the transplant date is missing."""
    if record.transplant is None:
        raise InputError("no transplant date: the target depends on the time since transplantation")
    months = (on - record.transplant.date).days / 30.4375
    group = "adult" if record.age(on) >= 18 else "paediatric"
    cands = concomitants(record, on)
    for c in cands:
        try:
            t = find_target(record.agent, record.transplant.organ, group, months, concomitant=c)
        except InputError:
            continue
        if t.concomitant == c:
            return t
    # a target for any regimen, or the error naming what exists
    return find_target(record.agent, record.transplant.organ, group, months, concomitant=cands[0])


def trough_target(record: PatientRecord, on: dt.date) -> Any:
    """:func:`find_trough_target`, or None where there is none."""
    try:
        return find_trough_target(record, on)
    except InputError:
        return None


def _troughs(record: PatientRecord, as_of: dt.date) -> list[Level]:
    return [x for x in record.final_levels() if x.sample == "trough" and not x.blq and x.time.date() <= as_of]


def _rule(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]], as_of: dt.date
          ) -> list[Alert]:
    kind = rule["type"]
    rid = rule["id"]
    start = record.therapy_start
    handler = _RULES.get(kind)
    if handler is None:
        raise InputError(f"unknown rule type {kind!r} in the protocols data (rule {rid})")
    if kind in _NEEDS_START and start is None:
        return []
    return handler(record, rule, series, as_of)


def _egfr_fall(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]], as_of: dt.date
               ) -> list[Alert]:
    assert record.therapy_start is not None
    after = [(d, v) for d, v in series if record.therapy_start < d <= as_of]
    b = _baseline_egfr(record, series)
    if b is None:
        return []
    base, n_base = b
    falls = [(d, 100.0 * (1 - v / base)) for d, v in after]
    hits = [(d, f) for d, f in falls if f > rule["threshold_percent"]]
    on_one = "" if n_base >= 2 else "; baseline from 1 measurement (the SmPC asks for at least 2)"
    if rule["type"] == "egfr_fall":
        if len(hits) >= rule["min_readings"]:
            d, f = hits[rule["min_readings"] - 1]
            msg, dose = _with_dose(record, rule, as_of, f"eGFR {f:.0f} % below baseline ({base:.0f}{on_one}) on "
                                                        f"{len(hits)} measurements: {rule['action']}")
            return [Alert(rule["id"], rule["severity"], msg, rule["source"], d, dose)]
        return []
    # not improved: a reduction was due at the second raised reading; still raised >= after_days later
    if len(hits) >= 2:
        t1 = hits[1][0]
        later = [(d, f) for d, f in falls if d >= t1 + dt.timedelta(days=rule["after_days"])]
        if later and later[-1][1] > rule["threshold_percent"]:
            d, f = later[-1]
            return [Alert(rule["id"], rule["severity"], f"eGFR still {f:.0f} % below baseline {(d - t1).days} days "
                          f"after the reduction: {rule['action']}", rule["source"], d)]
    return []


def _egfr_fall_band(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                    as_of: dt.date) -> list[Alert]:
    assert record.therapy_start is not None
    start = record.therapy_start
    pre = [v for d, v in series if d <= start]
    after = [(d, v) for d, v in series if start < d <= as_of]
    if not pre or not after:
        return []
    base = float(np.mean(pre))
    d, v = after[-1]
    fall = 100.0 * (1 - v / base)
    low_ok = fall >= rule["fall_above"] if rule.get("inclusive") else fall > rule["fall_above"]
    if v < rule["egfr_below"] and low_ok and fall < rule["fall_below"]:
        msg, dose = _with_dose(record, rule, as_of, f"eGFR {v:.0f} (< {rule['egfr_below']:g}), {fall:.0f} % below "
                                                    f"baseline {base:.0f}: {rule['action']}")
        return [Alert(rule["id"], rule["severity"], msg, rule["source"], d, dose)]
    return []


def _creatinine_raised(record: PatientRecord, rule: dict[str, Any], as_of: dt.date
                       ) -> tuple[float, list[tuple[Any, float]]] | None:
    """Pre-treatment mean creatinine and (reading, % above it) for the readings after the start."""
    assert record.therapy_start is not None
    scr = record.lab("creatinine")
    pre = [x.value for x in scr if x.date <= record.therapy_start]
    post = [x for x in scr if record.therapy_start < x.date <= as_of]
    if not pre or not post:
        return None
    base = float(np.mean(pre))
    return base, [(x, 100.0 * (x.value / base - 1)) for x in post]


def _over(rise: float, rule: dict[str, Any]) -> bool:
    return rise > rule["threshold_percent"] if rule.get("strict") else rise >= rule["threshold_percent"]


def _creatinine_rise(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                     as_of: dt.date) -> list[Alert]:
    got = _creatinine_raised(record, rule, as_of)
    if got is None:
        return []
    base, rises = got
    last, rise = rises[-1]
    if not _over(rise, rule):
        return []
    msg, dose = _with_dose(record, rule, as_of, f"serum creatinine {last.value:.0f} umol/L, {rise:.0f} % above "
                                                f"pretreatment ({base:.0f}): {rule['action']}")
    return [Alert(rule["id"], rule["severity"], msg, rule["source"], last.date, dose)]


def _creatinine_not_improved(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                             as_of: dt.date) -> list[Alert]:
    """Still raised after a dose reduction made once it was raised: the stop step."""
    got = _creatinine_raised(record, rule, as_of)
    if got is None:
        return []
    base, rises = got
    raised = [x for x, r in rises if _over(r, rule)]
    if not raised:
        return []
    first = raised[0].date
    regs = record.final_regimens()
    reductions = [r for k, r in enumerate(regs) if k > 0 and r.start.date() >= first
                  and r.daily_mg < regs[k - 1].daily_mg]
    if not reductions:
        return []
    after = [(x, r) for x, r in rises if x.date > reductions[0].start.date()]
    if after and _over(after[-1][1], rule):
        x, r = after[-1]
        return [Alert(rule["id"], rule["severity"], f"serum creatinine still {r:.0f} % above pretreatment "
                      f"({base:.0f}) after the reduction of {reductions[0].start.date()}: {rule['action']}",
                      rule["source"], x.date)]
    return []


def _bp_high(b: Any, rule: dict[str, Any]) -> bool:
    if rule.get("inclusive"):
        return bool(b.systolic >= rule["systolic"] or b.diastolic >= rule["diastolic"])
    return bool(b.systolic > rule["systolic"] or b.diastolic > rule["diastolic"])


def _hypertension(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                  as_of: dt.date) -> list[Alert]:
    since = record.transplant_date if rule.get("after_transplant") else record.therapy_start
    if since is None:
        return []
    high = [b for b in record.final_bp() if since < b.date <= as_of and _bp_high(b, rule)]
    if len(high) < rule["min_readings"]:
        return []
    b = high[-1]
    word = "at or above" if rule.get("inclusive") else "above"
    msg, dose = _with_dose(record, rule, as_of, f"{len(high)} readings {word} {rule['systolic']:g}/"
                                                f"{rule['diastolic']:g} mmHg (latest {b.systolic:g}/{b.diastolic:g}): "
                                                f"{rule['action']}")
    return [Alert(rule["id"], rule["severity"], msg, rule["source"], b.date, dose)]


def _duration(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]], as_of: dt.date
              ) -> list[Alert]:
    assert record.therapy_start is not None
    days = (as_of - record.therapy_start).days
    if days > rule["max_days"]:
        return [Alert(rule["id"], rule["severity"], f"treated for {days} days: {rule['action']}", rule["source"],
                      as_of)]
    return []


def _lab_threshold(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                   as_of: dt.date) -> list[Alert]:
    labs = [x for x in record.lab(rule["lab"]) if x.date <= as_of]
    found = [x for x in labs if x.value >= rule["at_least"]]
    if rule.get("consecutive", 1) > 1:  # "persistently": the last n readings all at or above
        n = int(rule["consecutive"])
        found = labs[-n:] if len(labs) >= n and all(x.value >= rule["at_least"] for x in labs[-n:]) else []
    elif rule.get("grades"):  # graded thresholds act on the latest reading
        found = [labs[-1]] if labs and labs[-1].value >= rule["at_least"] else []
    if not found:
        return []
    last = found[-1]
    grade = ""
    for cut, name in rule.get("grades", []):
        if last.value >= cut:
            grade = f" ({name})"
    return [Alert(rule["id"], rule["severity"], f"{rule['lab']} {last.value:.3g} {last.unit}{grade}: {rule['action']}",
                  rule["source"], last.date)]


def _lab_below(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]], as_of: dt.date
               ) -> list[Alert]:
    labs = [x for x in record.lab(rule["lab"]) if x.date <= as_of]
    if labs and labs[-1].value < rule["below"]:
        last = labs[-1]
        return [Alert(rule["id"], rule["severity"], f"{rule['lab']} {last.value:.3g} {last.unit} "
                      f"(< {rule['below']:g}): {rule['action']}", rule["source"], last.date)]
    return []


def _proportional(record: PatientRecord, level: Level, target: Any, as_of: dt.date) -> str | None:
    """A proportional (linear-kinetics) estimate of the dose that puts the trough mid-range."""
    reg = record.current_regimen(level.time)
    if reg is None or level.value <= 0:
        return None
    mid = (target.low + target.high) / 2
    frac = mid / level.value
    est = dose_change(record, {"kind": "fraction", "fraction": frac, "label": f"{mid:g}/{level.value:g}"}, as_of)
    return (f"a proportional estimate to reach {mid:g} ng/mL is {est} (the model-based recommendation accounts "
            "for the time course)") if est else None


def _level_target(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                  as_of: dt.date) -> list[Alert]:
    troughs = _troughs(record, as_of)
    if not troughs:
        return []
    last = troughs[-1]
    target = trough_target(record, last.time.date())
    if target is None:
        return [Alert(rule["id"], "info", f"trough {last.value:.3g} ng/mL: no target range for {record.agent} in "
                      f"{record.organ} transplantation in the targets data (give a centre targets file)",
                      rule["source"], last.time.date())]
    if target.low <= last.value <= target.high:
        return []
    side = "above" if last.value > target.high else "below"
    run = 0
    for x in reversed(troughs):
        t = trough_target(record, x.time.date())
        if t is None or not ((x.value > t.high) if side == "above" else (x.value < t.low)):
            break
        run += 1
    ago = (as_of - record.transplant_date).days if record.transplant_date else None
    msg = (f"trough {last.value:.3g} ng/mL {side} the target {target.low:g}-{target.high:g} ng/mL"
           + (f" (day {ago} after transplantation)" if ago is not None else "")
           + (f"; {run} consecutive troughs {side}" if run > 1 else "") + f": {rule['action']}")
    est = _proportional(record, last, target, as_of)
    if est:
        msg += f"; {est}"
    severity: Severity = rule["severity"] if run > 1 or side == "below" else "info"
    return [Alert(rule["id"], severity, msg, f"{rule['source']}; target: {target.source}", last.time.date(), est)]


def _level_timing(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                  as_of: dt.date) -> list[Alert]:
    doses = record.final_administrations()
    out = []
    for lv in _troughs(record, as_of)[-3:]:  # the recent ones: older samples were judged when they came
        before = [d for d in doses if d.time < lv.time]
        reg = record.current_regimen(lv.time)
        if not before or reg is None:
            continue
        since = (lv.time - before[-1].time).total_seconds() / 3600.0
        off = since - reg.interval_h
        if abs(off) > rule["tolerance_h"]:
            out.append(Alert(rule["id"], rule["severity"],
                             f"the level of {lv.time:%Y-%m-%d %H:%M} UTC ({lv.value:.3g} ng/mL) was drawn "
                             f"{since:.1f} h after the last dose; a trough on {reg.interval_h:g}-hourly dosing is "
                             f"drawn at {reg.interval_h:g} h: {rule['action']}", rule["source"], lv.time.date()))
    return out


def _level_variability(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                       as_of: dt.date) -> list[Alert]:
    if record.transplant_date is None:
        return []
    stable_from = record.transplant_date + dt.timedelta(days=int(rule["from_days"]))
    reg = record.current_regimen(as_of)
    if reg is None:
        return []
    # troughs on the current (unchanged) dose, in the stable phase
    xs = [x.value for x in _troughs(record, as_of) if x.time.date() >= stable_from and x.time >= reg.start]
    xs = xs[-int(rule["max_troughs"]):]
    if len(xs) < rule["min_troughs"]:
        return []
    cv = 100.0 * float(np.std(xs, ddof=1) / np.mean(xs))
    if cv <= rule["cv_percent"]:
        return []
    return [Alert(rule["id"], rule["severity"], f"CV of the last {len(xs)} troughs on {reg.dose_mg:g} mg "
                  f"{_every(reg)} is {cv:.0f} % (> {rule['cv_percent']:g} %): {rule['action']}", rule["source"],
                  as_of)]


def _creatinine_transplant(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]],
                           as_of: dt.date) -> list[Alert]:
    if record.transplant_date is None:
        return []
    scr = [x for x in record.lab("creatinine") if record.transplant_date <= x.date <= as_of]
    if len(scr) < 2:
        return []
    last = scr[-1]
    t_last = last.time or dt.datetime(last.date.year, last.date.month, last.date.day, tzinfo=dt.UTC)

    def when(x: Any) -> dt.datetime:
        return x.time or dt.datetime(x.date.year, x.date.month, x.date.day, tzinfo=dt.UTC)

    earlier = scr[:-1]
    if rule["mode"] == "aki":
        within48 = [x for x in earlier if t_last - when(x) <= dt.timedelta(hours=48)]
        within7 = [x for x in earlier if t_last - when(x) <= dt.timedelta(days=7)]
        why = None
        if within48 and last.value - min(x.value for x in within48) >= 26.5:
            why = f"+{last.value - min(x.value for x in within48):.0f} umol/L within 48 h"
        elif within7 and last.value >= 1.5 * min(x.value for x in within7):
            why = f"{last.value / min(x.value for x in within7):.2f} x the lowest value of the prior 7 days"
        if why is None:
            return []
        msg = f"serum creatinine {last.value:.0f} umol/L ({why}): {rule['action']}"
    else:
        base = min(x.value for x in earlier)
        rise = 100.0 * (last.value / base - 1)
        if rise < rule["threshold_percent"]:
            return []
        msg = (f"serum creatinine {last.value:.0f} umol/L, {rise:.0f} % above the post-transplant baseline "
               f"({base:.0f}, the lowest since transplantation): {rule['action']}")
    troughs = _troughs(record, as_of)
    if troughs:
        lv = troughs[-1]
        target = trough_target(record, lv.time.date())
        tgt = f" (target {target.low:g}-{target.high:g})" if target is not None else ""
        msg += f"; latest trough {lv.value:.3g} ng/mL on {lv.time.date()}{tgt}"
    else:
        msg += "; no drug level recorded: measure one"
    return [Alert(rule["id"], rule["severity"], msg, rule["source"], last.date)]


def _advice(record: PatientRecord, rule: dict[str, Any], series: list[tuple[dt.date, float]], as_of: dt.date
            ) -> list[Alert]:
    text = rule["action"]
    if "{strength_for_age}" in text:
        age = record.age(as_of)
        allowed = "0.03 % (ages 2-15)" if age < 16 else "0.03 % or 0.1 % (16 years and older)"
        given = f"; recorded {record.strength_percent:g} %" if record.strength_percent is not None else \
            "; no strength recorded"
        text = text.replace("{strength_for_age}", allowed + given)
    return [Alert(rule["id"], rule["severity"], text, rule["source"])]


_RULES: dict[str, Any] = {
    "egfr_fall": _egfr_fall, "egfr_not_improved": _egfr_fall, "egfr_fall_band": _egfr_fall_band,
    "creatinine_rise": _creatinine_rise, "creatinine_not_improved": _creatinine_not_improved,
    "hypertension": _hypertension, "duration": _duration, "lab_threshold": _lab_threshold, "lab_below": _lab_below,
    "level_target": _level_target, "level_timing": _level_timing, "level_variability": _level_variability,
    "creatinine_transplant": _creatinine_transplant, "advice": _advice,
}
_NEEDS_START = {"egfr_fall", "egfr_not_improved", "egfr_fall_band", "creatinine_rise", "creatinine_not_improved",
                "duration"}


def _due(record: PatientRecord, protocols: dict[str, Any], as_of: dt.date) -> list[Due]:
    out: list[Due] = []
    if record.therapy_start is None:
        return out
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
