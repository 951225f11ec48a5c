"""The use cases, below the web app and the command line: assess, fit and recommend for one patient record as
of a date. ``cnidose assess``, ``cnidose recommend --patient``, the JSON API and the pages all call these with
the same :class:`~cnidose.clinical.record.PatientRecord`, so every face gives the same answer -- interactions,
flags and warnings included.

Nothing clinical is guessed: without a recorded regimen or (for a transplant) its date there is no
recommendation, and the result says what is missing. An entry the model cannot use (a level dated before the
transplant, a covariate outside what is possible) is named and left out, and the fit goes on without it; entries
confirmed despite a plausibility warning are listed in the result's ``flagged`` inputs and its warnings.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import numpy as np

from cnidose import __version__
from cnidose.clinical.record import PatientRecord
from cnidose.errors import CnidoseError, DataError, InputError
from cnidose.pk.events import split_individuals
from cnidose.records.exchange import medication_spans, record_to_nonmem

if TYPE_CHECKING:
    from cnidose.models.library import ModelChoice

__all__ = ["MODEL_FOR", "analyse", "choose_model", "clinical_assessment", "flagged_inputs"]

#: (agent, indication, age group) -> the curated default(s), in order of preference, among library models that fit
#: the patient equally (choose_model: drug, organ, age group, formulation and route first; a centre's adaptation
#: before it)
MODEL_FOR: dict[tuple[str, str, str], str | tuple[str, ...]] = {
    # Prograf: Andrews 2019 (primary-confirmed); Advagraf: Woillard 2011 (Benkali 2010's 41 patients and more,
    # with haematocrit; benkali2010_tac_advagraf's own note)
    ("tacrolimus", "kidney transplant", "adult"): ("andrews2019_tac_adult_kidney",
                                                   "woillard2011_tac_prograf_advagraf"),
    ("tacrolimus", "kidney transplant", "paediatric"): "andrews2017_tac_paed_kidney",
    ("cyclosporine", "kidney transplant", "adult"): "press2010_csa_adult_kidney",
}


def age_group(birth_date: dt.date, as_of: dt.date) -> str:
    """"adult" from 18 years (the age groups of the model library), else "paediatric"."""
    return "adult" if (as_of - birth_date).days / 365.25 >= 18 else "paediatric"


def choose_model(record: PatientRecord, as_of: dt.date) -> ModelChoice:
    """The library's model for this patient, with its reasons (:func:`cnidose.models.library.choose_model`): by
    drug, organ (the transplanted organ, else the indication's), age group and the formulation of the regimen in
    force, and a model with an intravenous route where the record has intravenous doses; among equals a centre's
    adaptation, then the curated default MODEL_FOR, then a model checked against its publication."""
    from cnidose.models.library import choose_model as choose

    prefer = {(a, _organ_of(ind), g): mid for (a, ind, g), mid in MODEL_FOR.items()}
    reg = record.current_regimen(as_of)
    iv = record.given_by("intravenous", as_of) > 0
    return choose(record.agent, record.organ or _organ_of(record.indication), age_group(record.birth_date, as_of),
                  reg.product if reg is not None else None, intravenous=iv, prefer=prefer)


def _organ_of(indication: str) -> str:
    """"kidney transplant" -> "kidney"; an indication that is not a transplant stands for itself."""
    return indication.replace(" transplant", "")


def clinical_assessment(record: PatientRecord, as_of: dt.date) -> dict[str, Any]:
    """The rule base's view (selection, alerts with sources, due follow-ups); errors are reported, not raised."""
    from cnidose.clinical import assess

    try:
        a = assess(record, as_of)
    except CnidoseError as exc:
        return {"error": str(exc), "alerts": [], "due": [], "exposure": [], "selection": "unknown",
                "selection_reasons": [], "notes": []}
    return {"selection": a.selection, "selection_reasons": a.selection_reasons,
            "alerts": [{"rule": x.rule, "severity": x.severity, "message": x.message, "source": x.source,
                        "date": x.date.isoformat() if x.date else None, "dose": x.dose} for x in a.alerts],
            "due": [{"what": d.what, "date": d.date.isoformat(), "source": d.source} for d in a.due],
            "exposure": [{"drug": x.drug, "agent": x.agent, "factor": x.factor, "start": x.start.isoformat(),
                          "end": x.end.isoformat() if x.end else None, "source": x.source} for x in a.exposure],
            "notes": a.notes}


def flagged_inputs(record: PatientRecord) -> list[dict[str, Any]]:
    """Final entries that were stored despite a plausibility warning (confirmed by whoever entered them)."""
    out = []
    for kind, entries in (("level", record.levels), ("dose", record.administrations), ("regimen", record.regimens),
                          ("covariate", record.covariates), ("lab", record.labs)):
        for e in entries:
            if e.final and e.flags:
                when = getattr(e, "time", None) or getattr(e, "start", None)
                out.append({"entry": e.id, "kind": kind, "when": when.isoformat() if when else None,
                            "flags": list(e.flags), "confirmed_by": e.entered_by})
    return out


def _inputs(record: PatientRecord, as_of: dt.date) -> dict[str, Any]:
    """What the analysis read, in view: the regimen in force, the latest covariates (value, time, source), the
    genotypes."""
    reg = record.current_regimen(as_of)
    covs: dict[str, Any] = {}
    for c in sorted((c for c in record.covariates if c.final), key=lambda c: c.time):
        covs[c.name] = {"value": c.value, "unit": c.unit, "time": c.time.isoformat(), "source": c.source or "entered"}
    return {"regimen": None if reg is None else {"product": reg.product, "dose_mg": reg.dose_mg,
                                                 "interval_h": reg.interval_h, "route": reg.route,
                                                 "start": reg.start.isoformat()},
            "covariates": covs,
            "genotypes": [{"gene": g.gene, "result": g.result, "source": g.source} for g in record.genotypes
                          if g.final],
            "levels": len(record.final_levels()), "doses": len(record.final_administrations()),
            "region": record.region, "indication": record.indication,
            "indication_code": None if record.indication_code is None else
            f"{record.indication_code.system} {record.indication_code.code}"}


def analyse(record: PatientRecord, as_of: dt.date, *, model_id: str | None = None, n_draws: int = 500,
            seed: int = 0, choice: str = "aim", aim: float | None = None, strategy: str = "map") -> dict[str, Any]:
    """Fit, curve with 80 % band, recommendation and the clinical assessment for one patient.

    ``aim`` is the level the dose choice aims at (default: the middle of the patient's target); one outside the
    target is refused (FieldError on ``aim``) before any fit -- it is the caller's input, not the record's.
    ``strategy`` is how the levels are fitted and the next occasion is treated (:mod:`cnidose.dosing.strategies`;
    an unknown one: FieldError on ``strategy``)."""
    from cnidose.clinical.engine import concomitants, find_trough_target
    from cnidose.dosing import find_target, product, recommend
    from cnidose.dosing.strategies import strategy as parse_strategy
    from cnidose.estimation.posterior import sample_posterior
    from cnidose.models.library import resolve_model
    from cnidose.records.units import FieldError

    try:
        strat = parse_strategy(strategy)
    except InputError as exc:
        raise FieldError(str(exc), field="strategy") from None
    out: dict[str, Any] = {"as_of": as_of.isoformat(), "version": __version__,
                           "strategy": {"name": strat.name, "description": strat.describe()},
                           "clinical": clinical_assessment(record, as_of), "warnings": [],
                           "inputs": _inputs(record, as_of), "flagged": flagged_inputs(record), "excluded": []}
    for f in out["flagged"]:
        out["warnings"].append(f"input flagged at entry and confirmed: {f['kind']} {f['when'] or ''} "
                               f"({'; '.join(f['flags'])})")
    group = age_group(record.birth_date, as_of)
    why_model = "chosen by the caller"
    if model_id:
        mid: str | None = model_id
    else:
        picked = choose_model(record, as_of)
        out["model_choice"] = {"id": picked.id, "reasons": list(picked.reasons),
                               "alternatives": list(picked.alternatives)}
        mid, why_model = picked.id, picked.explanation()
    if mid is None:
        out["warnings"].append(f"no model, so no fit: {why_model}")
        return out
    exposure = out["clinical"].get("exposure", [])
    try:
        from_meds = _medication_covariates(resolve_model(mid))
    except CnidoseError:
        from_meds = {}  # the fit below reports the model's error
    covered = {n for names, _ in from_meds.values() for n in names}
    for x in exposure:
        if x["agent"] == record.agent and x["drug"].lower() in covered:
            out["warnings"].append(f"{x['drug']}: in the model as a covariate "
                                   f"({', '.join(k for k, (n, _) in from_meds.items() if x['drug'].lower() in n)}), "
                                   f"so the rule base's exposure x{x['factor']:g} is not applied as well")
    exposure = [x for x in exposure if x["drug"].lower() not in covered]
    exp = record_to_nonmem(record, ident=1, exposure=exposure, medication_covariates=from_meds, as_of=as_of)
    out["export_notes"] = exp.notes
    sub = record.given_by("sublingual", as_of)
    if sub:  # said, not guessed silently: no library model has a sublingual route
        out["warnings"].append(f"{sub} sublingual dose(s) read as oral: no library model describes the sublingual "
                               "route, whose absorption and bioavailability differ")
    if not exp.rows:
        out["warnings"].append("no doses or levels recorded: no fit")
        return out
    if out["clinical"].get("error"):  # said, not silently assumed
        out["warnings"].append("the rule base could not read the record: interactions are unknown and the fit "
                               "assumes none")
    reg = record.current_regimen(as_of)
    missing = ([] if reg is not None else ["the current regimen (product and interval)"]) + (
        [] if record.transplant_date or not record.indication.endswith("transplant")
        else ["the transplant date (the target depends on the time since it)"])
    if missing:  # nothing guessed: the recommendation needs them
        out["warnings"].append("no recommendation: record " + " and ".join(missing))
        return out
    assert reg is not None
    try:
        model = strat.apply(resolve_model(mid))
        prod = product(reg.product, record.agent)
        interval = reg.interval_h
        if record.transplant is not None:  # the label's regimen the patient is on (clinical.find_trough_target)
            target = find_trough_target(record, as_of)
        else:
            target = find_target(record.agent, record.organ or _organ_of(record.indication), group, 0.0,
                                 concomitant=concomitants(record, as_of)[0])
        if aim is not None and not target.low <= aim <= target.high:
            raise FieldError(f"the aim {aim:g} {target.unit} is outside the target {target.low:g}-{target.high:g} "
                             f"{target.unit} ({target.source})", field="aim")
        ind, fit = _fit_with_exclusions(model, record, exp, out)
        out["model_inputs"] = _model_inputs(model, ind, record, exp.notes, why_model)
        first = exp.origin + dt.timedelta(hours=float(ind.time[0])) if exp.origin else None
        applied = [x for x in exposure if x["agent"] == record.agent and first is not None
                   and (x["end"] is None or dt.date.fromisoformat(x["end"]) > first.date())]
        out["exposure"] = applied
        out["warnings"] += [f"{x['drug']}: {record.agent} exposure x{x['factor']:g} from {x['start']}"
                            + (f" to {x['end']}" if x["end"] else " (ongoing)")
                            + f" applied to the model (CL/F divided by {x['factor']:g}) [{x['source']}]"
                            for x in applied]
        out["warnings"] += _medication_covariates_at_end(model, record, ind, from_meds)
        out["warnings"] += _unmodelled_interactions(record, first, applied, from_meds)
        post = None if fit.status == "error" else sample_posterior(model, ind, n_draws=n_draws, seed=seed,
                                                                   map_result=fit)
        rec = recommend(model, ind, target, prod, interval=interval, n_draws=n_draws, seed=seed, choice=choice,
                        aim=aim, fit=fit, posterior=post, occasion=strat.occasion)
        rec.inputs["strategy"] = strat.name
    except FieldError:
        raise
    except CnidoseError as exc:
        out["warnings"].append(f"{type(exc).__name__}: {exc}")
        return out
    out["curve"] = _curve(ind, post, exp.origin, interval, target, seed)
    if rec.chosen is not None and post is not None:
        out["forecast"] = _forecast(ind, post, [("current", reg.dose_mg, reg.interval_h),
                                                ("proposed", rec.chosen.dose, rec.chosen.interval)], seed,
                                    occasion=strat.occasion)
    out.update(_mechanism(record.agent, model, out["curve"], out.get("forecast"), interval))
    out["recommendation"] = rec.to_dict()
    summary = rec.summary()
    if out["flagged"] or out["excluded"]:
        summary = "Inputs flagged or left out (see warnings). " + summary
    out["recommendation"]["summary"] = summary
    out["model"] = rec.model
    out["target"] = str(target)
    out["warnings"] += rec.warnings
    return out


def _medication_covariates(model: Any) -> dict[str, tuple[tuple[str, ...], float]]:
    """The model's covariates read from the medication list: name -> (medications, days after)."""
    return {c.name: (c.medications, c.after_days) for c in model.covariates.values() if c.medications}


def _medication_covariates_at_end(model: Any, record: PatientRecord, ind: Any,
                                  from_meds: dict[str, tuple[tuple[str, ...], float]]) -> list[str]:
    """A warning for each medication-list covariate that is 1 at the last record: the forecasts carry it on, and the
    model's parameters change when it ends (Kirubakaran 2023: CL/F about five times higher without an azole)."""
    out = []
    for name, (names, after) in from_meds.items():
        col = ind.covariates.get(name)
        if col is None or col.size == 0 or col[-1] != 1:
            continue
        meds = [m for m in record.final_medications() if m.name.strip().lower() in names]
        ends = [end for _, end in medication_spans(record, names, after)]
        when = "ongoing" if None in ends or not ends else f"{name} 0 from {max(e for e in ends if e).date()}"
        out.append(f"{name} is 1 at the last record ({', '.join(sorted({m.name for m in meds}))}; {when}): the "
                   f"forecasts and the recommended dose assume it stays 1, and the model's parameters change when it "
                   f"ends ({model.covariates[name].description}): check the level after that")
    return out


def _unmodelled_interactions(record: PatientRecord, first: dt.datetime | None, applied: list[dict[str, Any]],
                             from_meds: dict[str, tuple[tuple[str, ...], float]]) -> list[str]:
    """A warning for each drug on the medication list that changes the agent's pharmacokinetics (an inhibitor, an
    inducer or a food of the interaction knowledge base) but reaches the model neither as an exposure multiplier nor
    as a model covariate (posaconazole with a model whose AZOLE names other azoles): the forecasts then assume it is
    not there, and the first levels will show otherwise."""
    from cnidose.clinical.engine import knowledge

    interactions, _ = knowledge()
    index = {n.lower(): d for d in interactions.get("drugs", []) for n in [d["name"], *d.get("synonyms", [])]}
    multiplied = {x["drug"] for x in applied}
    out = []
    for m in record.final_medications():
        d = index.get(m.name.strip().lower())
        if d is None or d.get("kind") not in ("inhibitor", "inducer", "food") or record.agent not in d.get(
                "effects", {}):
            continue
        if first is not None and m.stop is not None and m.stop < first.date():
            continue
        if d["name"] in multiplied:
            continue
        covered = [c for c, (names, _) in from_meds.items() if {m.name.strip().lower(), d["name"]} & set(names)]
        if covered:
            continue
        others = "; ".join(f"its {c} covariate names {', '.join(names)}" for c, (names, _) in from_meds.items())
        out.append(f"{m.name} ({d['kind']}) is on the medication list, but the model has no term for it (the rule "
                   f"base has no exposure multiplier for it{'; ' + others if others else ''}): the forecasts and the "
                   f"recommended dose assume it is not given -- follow the interaction alert and check levels sooner")
    return out


def _fit_with_exclusions(model: Any, record: PatientRecord, exp: Any, out: dict[str, Any]) -> tuple[Any, Any]:
    """The individual (interactions in its EXPOSURE column) and its MAP fit; an entry the model refuses is left
    out, named, and the fit goes on (at most 10 entries)."""
    from cnidose.estimation import fit_map

    excluded: set[str] = set()
    for _ in range(11):
        rows = [r for r, e in zip(exp.rows, exp.entries, strict=True) if e not in excluded]
        entries = [e for e in exp.entries if e not in excluded]
        if not rows:
            raise DataError("no usable dose or level is left")
        ds = exp.dataset(f"record {record.id}") if not excluded else _dataset(exp, rows)
        ind = ds.individuals()[0]
        fit = fit_map(model, [ind])[0]
        if fit.status != "error":
            return ind, fit
        line = _row_of(fit.message)
        entry = entries[line - 2] if line is not None and 2 <= line < len(entries) + 2 else None
        if entry is None or entry in excluded:
            raise DataError(fit.message)
        excluded.add(entry)
        out["excluded"].append({"entry": entry, "reason": fit.message})
        out["warnings"].append(f"entry {entry} could not be used and is left out of the fit: {fit.message} -- "
                               "correct it or mark it entered in error")
    raise DataError("too many entries could not be used")


def _dataset(exp: Any, rows: list[list[Any]]) -> Any:
    from cnidose.records.nonmem import DataSet

    cells = tuple(tuple(str(c) for c in r) for r in rows)
    return DataSet(tuple(exp.header), cells, tuple(range(2, len(cells) + 2)), "record")


def _row_of(message: str) -> int | None:
    import re

    m = re.search(r"\brow (\d+)\b", message)
    return int(m.group(1)) if m else None


def _curve(ind: Any, post: Any, origin: dt.datetime | None, interval: float, target: Any, seed: int
           ) -> dict[str, Any]:
    """The fitted curve from the first record to one dosing interval after the last: every 15 min over the last
    7 days (peaks and troughs of the current regimen), hourly before them; 80 % band."""
    t_end = float(ind.time[-1]) + interval
    recent = max(0.0, np.floor(t_end - 7 * 24.0))
    grid = np.concatenate([np.arange(0.0, recent, 1.0), np.arange(recent, t_end + 1e-9, 0.25)])
    # a grid point takes the covariates of the interval it lies in: those of the next record (a record's values
    # hold over the interval ending at it), the last record's beyond it
    nxt = np.minimum(np.searchsorted(ind.time, grid, side="left"), len(ind) - 1)
    g, on_grid, times = _with_grid(ind, {}, grid, {k: (v, v[nxt]) for k, v in _covariates(ind).items()})
    assert post is not None  # recommend() refuses a fit that failed
    pred = post.predict(g, seed=seed)
    band = np.percentile(pred[:, on_grid], [10, 50, 90], axis=0)
    assert origin is not None

    obs = (ind.evid == 0) & (ind.mdv == 0)
    # times as hours after ``origin`` (UTC): the page turns them into clock times
    return {"origin": origin.isoformat(), "hours": _hours(times[on_grid]),
            "p10": _sig(band[0]), "p50": _sig(band[1]), "p90": _sig(band[2]),
            "observed_hours": _hours(ind.time[obs]),
            "observed": ind.covariates["DV"][obs].tolist(), "target": [target.low, target.high],
            "unit": target.unit}


#: how far ahead the current and the proposed regimens are forecast: the days until the next levels are usually
#: drawn (a choice of this app, not a published figure; the candidate table gives steady state, which a model with
#: a slow peripheral compartment -- Andrews 2019: V2/F 5340 L -- approaches only over weeks)
FORECAST_DAYS = 5.0


def _forecast(ind: Any, post: Any, regimens: list[tuple[str, float, float]], seed: int, *,
              occasion: str = "prior") -> dict[str, Any]:
    """The patient's posterior forecast (median, 80 % band) over the next ``FORECAST_DAYS`` under each regimen
    ``(name, dose mg, interval h)``, continued from the next dose due after the last record (the last dose plus
    the new interval, or the last record if later). The doses copy the last recorded dose's compartment and
    infusion duration; covariates keep their last values, except the post-operative day, which advances with
    the clock. Where the model has between-occasion variability the forecast is a new occasion, treated as the
    recommendation treats it (``occasion``, the strategy's): "prior", its effect drawn from its prior; "last",
    each draw's effect of the last occasion with a level carried forward (occ-last) -- so curve and candidate
    table agree. The same posterior draws and occasion effects serve every regimen: the curves differ only by the
    regimen."""
    dosed = np.flatnonzero((ind.evid == 1) | (ind.evid == 4))
    last = int(dosed[-1])
    t_last_record = float(ind.time[-1])
    covs = _covariates(ind)
    iov = post.model.iov
    occ = iov.occasion if iov is not None else None
    if occ is not None and occ not in covs:
        covs[occ] = np.zeros(len(ind))
    grid = np.arange(t_last_record, t_last_record + FORECAST_DAYS * 24.0 + 1e-9, 0.25)
    levels = np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))
    carry_from = (int(post.model.prepare(ind).occasion[levels[-1]])  # occ-last: the last occasion with a level
                  if occ is not None and occasion == "last" and levels.size else None)
    out: dict[str, Any] = {"days": FORECAST_DAYS}
    for name, dose, tau in regimens:
        start = float(ind.time[last]) + tau
        while start < t_last_record:
            start += tau
        dose_t = start + tau * np.arange(max(int(np.ceil((grid[-1] - start) / tau)), 1))
        new_t = np.concatenate([dose_t, grid])
        rate = 0.0 if ind.rate[last] <= 0 else float(ind.rate[last]) * dose / float(ind.amt[last])
        doses = {"TIME": dose_t, "AMT": np.full(dose_t.size, dose), "RATE": np.full(dose_t.size, rate),
                 "CMT": np.full(dose_t.size, ind.cmt[last])}
        future: dict[str, tuple[Any, Any]] = {}
        for k, v in covs.items():
            if k == "POD":
                future[k] = (v, v[-1] + np.floor((new_t - t_last_record) / 24.0))
            elif k == occ:
                future[k] = (v, np.full(new_t.size, np.max(v) + 1.0))
            else:
                future[k] = (v, np.full(new_t.size, v[-1]))
        g, on_grid, times = _with_grid(ind, doses, grid, future)
        carry = None if carry_from is None else (carry_from, int(post.model.prepare(g).occasion[-1]))
        band = np.percentile(post.predict(g, seed=seed, carry=carry)[:, on_grid], [10, 50, 90], axis=0)
        out.setdefault("hours", _hours(times[on_grid]))
        out[name] = {"dose": float(dose), "interval": float(tau), "dose_hours": _hours(dose_t),
                     **{q: _sig(band[i]) for i, q in enumerate(("p10", "p50", "p90"))}}
    return out


def _sig(x: Any) -> list[float]:
    """Four significant digits: the plots need no more, and the stored result stays small."""
    return [float(f"{v:.4g}") for v in np.atleast_1d(x)]


def _hours(x: Any) -> list[float]:
    return [round(float(h), 4) for h in x]


def _covariates(ind: Any) -> dict[str, Any]:
    """The individual's covariate columns that carry over to added records (not its levels)."""
    return {k: v for k, v in ind.covariates.items() if k not in ("DV", "BLQ", "LLOQ")}


def _with_grid(ind: Any, doses: dict[str, Any], grid: Any, covs: dict[str, tuple[Any, Any]]
               ) -> tuple[Any, Any, Any]:
    """``ind``'s records plus added doses (TIME, AMT, RATE, CMT) and prediction-only grid records, in time order
    with a grid point after any record at its time; ``covs`` gives each covariate column as (its values on
    ``ind``'s records, its values on the added doses then the grid points). Returns the individual, which of its
    records are the grid points, and its times."""
    n_d = doses["TIME"].size if doses else 0
    n_new = n_d + grid.size

    def added(key: str) -> Any:
        return np.concatenate([doses[key], np.zeros(grid.size)]) if doses else np.zeros(grid.size)

    cols = {"ID": np.full(len(ind) + n_new, float(ind.id)),
            "TIME": np.concatenate([ind.time, doses["TIME"] if doses else [], grid]),
            "EVID": np.concatenate([ind.evid, np.ones(n_d), np.full(grid.size, 2.0)]),
            "AMT": np.concatenate([ind.amt, added("AMT")]), "RATE": np.concatenate([ind.rate, added("RATE")]),
            "CMT": np.concatenate([ind.cmt, added("CMT")]), "MDV": np.ones(len(ind) + n_new)}
    for k, (old, new) in covs.items():
        cols[k] = np.concatenate([old, new])
    mark = np.concatenate([np.zeros(len(ind) + n_d, bool), np.ones(grid.size, bool)])
    order = np.lexsort((mark, cols["TIME"]))
    cols = {k: v[order] for k, v in cols.items()}
    return split_individuals(cols)[0], mark[order], cols["TIME"]


def _model_inputs(model: Any, ind: Any, record: PatientRecord, export_notes: list[str], why: str) -> dict[str, Any]:
    """The model and every covariate it read, as the fit saw it at the last record: value (model unit), the
    time of the entry it came from, and its source -- entered (with the entry's own source), derived (the
    formula and its citation) or the model's default (said, never silent)."""
    prep = model.prepare(ind)
    notices = {(n.kind, n.covariate): n.message for n in prep.notices}
    entered: dict[str, Any] = {}
    for c in sorted((c for c in record.covariates if c.final), key=lambda c: c.time):
        entered[c.name] = c
    geno = record.genotype("CYP3A5")
    rows = []
    for name, cov in model.covariates.items():
        values = prep.covariates.get(name)
        if values is None or (cov.domain_only and name not in ind.covariates):
            continue
        value = float(values[-1])
        at: str | None = None
        if ("default", name) in notices:
            source = "model default: " + notices[("default", name)]
        elif ("derived", name) in notices:
            source = "derived: " + notices[("derived", name)]
        elif name in entered:
            c = entered[name]
            at, source = c.time.isoformat(), "entered" + (f" ({c.source})" if c.source else "")
        elif name == "CYP3A5" and geno is not None:
            at, source = (None if geno.date is None else geno.date.isoformat(),
                          f"genotype {geno.result} ({geno.source})")
        elif name in ("AGE", "SEX"):
            source = "the record's birth date" if name == "AGE" else "the record's sex"
        elif name == "POD":
            source = f"days since the transplant date ({record.transplant_date})"
        else:
            source = next((n for n in export_notes if n.startswith(f"{name}: ")), "the record")
            source = source.split(": ", 1)[-1] if source.startswith(f"{name}: ") else source
        shown = cov.levels.get(int(value), f"{value:g}") if cov.levels else f"{value:.4g}"
        rows.append({"name": name, "description": cov.description, "value": value, "shown": shown,
                     "unit": "" if cov.levels or cov.unit == "1" else cov.unit, "at": at, "source": source,
                     "outside_domain": ("domain", name) in notices})
    meta, cit = model.meta, model.citation
    return {"model": {"ref": model.ref, "title": model.title, "population": meta.get("population"),
                      "citation": ", ".join(x for x in (str(cit.get("authors", "")).split(",")[0] + " et al."
                                                         if cit.get("authors") else "", str(cit.get("journal", "")))
                                            if x) or None,
                      "confirmed": meta.get("confirmed"), "why": why},
            "covariates": rows}


def _mechanism(drug: str, model: Any, curve: dict[str, Any], forecast: dict[str, Any] | None, interval: float
               ) -> dict[str, Any]:
    """What the concentrations do to the drug's target, by each published concentration-effect model of the drug
    (:mod:`cnidose.models.pd`), from the median curves: over the last dosing interval of the fit and of each
    forecast regimen, the fraction of the maximal effect at the trough, at the peak and on average. ``pd`` holds
    these figures with each model's source; ``pd_curve`` the effect over time for the plot (fit: its last 2 days;
    forecast: all). Only for models of whole-blood concentrations (the matrix the effect models were estimated
    on)."""
    from cnidose.models.pd import EDUCATIONAL, MECHANISM, effects_for

    effects = effects_for(drug)
    if not effects or model.meta.get("matrix", "whole blood") != "whole blood":
        return {}
    hours = np.asarray(curve["hours"])
    p50 = np.asarray(curve["p50"])

    def interval_summary(h: np.ndarray, c: np.ndarray, m: Any, tau: float) -> dict[str, float]:
        last = h >= h[-1] - tau - 1e-9
        e = m.fraction(c[last])
        return dict(zip(("trough", "peak", "mean", "c_trough", "c_peak"),
                        _sig([e[-1], e.max(), e.mean(), c[last][-1], c[last].max()]), strict=True))

    models, series = [], []
    recent = hours >= hours[-1] - 48.0
    for m in effects:
        row: dict[str, Any] = {**m.describe(), "fit": interval_summary(hours, p50, m, interval)}
        ser: dict[str, Any] = {"id": m.id, "effect": m.effect,
                               "fit": {"hours": _hours(hours[recent]), "fraction": _sig(m.fraction(p50[recent]))}}
        if forecast:
            fh = np.asarray(forecast["hours"])
            for name in ("current", "proposed"):
                if name in forecast:
                    c = np.asarray(forecast[name]["p50"])
                    tau = forecast[name]["interval"]
                    row[name] = {**interval_summary(fh, c, m, tau), "dose": forecast[name]["dose"], "interval": tau}
                    ser[name] = _sig(m.fraction(c))
            ser["forecast_hours"] = forecast["hours"]
        models.append(row)
        series.append(ser)
    how, source = MECHANISM.get(drug, ("", ""))
    return {"pd": {"models": models, "note": EDUCATIONAL, "mechanism": how, "mechanism_source": source},
            "pd_curve": {"origin": curve["origin"], "series": series}}
