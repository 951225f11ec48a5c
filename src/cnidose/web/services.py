"""What the pages and the API compute from a stored chart: the clinical assessment (alerts, what is due), the
individual fit with its curve and 80 % band, and the regimen recommendation -- each with its inputs, model,
version and warnings."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from cnidose import __version__
from cnidose.errors import CnidoseError
from cnidose.pk.events import split_individuals
from cnidose.records.exchange import chart_to_document, chart_to_nonmem
from cnidose.records.store import Chart

__all__ = ["MODEL_FOR", "analyse", "clinical_assessment", "trends"]

#: (agent, indication, age group) -> library model used by default (all are in cnidose.models.library)
MODEL_FOR = {("tacrolimus", "kidney transplant", "adult"): "andrews2019_tac_adult_kidney",
             ("tacrolimus", "kidney transplant", "paediatric"): "andrews2017_tac_paed_kidney",
             ("cyclosporine", "kidney transplant", "adult"): "press2010_csa_adult_kidney"}


def clinical_assessment(chart: Chart, as_of: dt.date) -> dict[str, Any]:
    """The rule base's view (selection, alerts with sources, due follow-ups); errors are reported, not raised."""
    from cnidose.clinical import assess, parse_record

    try:
        a = assess(parse_record(chart_to_document(chart), as_of=as_of), as_of)
    except CnidoseError as exc:
        return {"error": str(exc), "alerts": [], "due": [], "selection": "unknown", "selection_reasons": []}
    return {"selection": a.selection, "selection_reasons": a.selection_reasons,
            "alerts": [{"rule": x.rule, "severity": x.severity, "message": x.message, "source": x.source,
                        "date": x.date.isoformat() if x.date else None} for x in a.alerts],
            "due": [{"what": d.what, "date": d.date.isoformat(), "source": d.source} for d in a.due],
            "notes": a.notes}


def _individual(chart: Chart) -> tuple[Any, Any]:
    exp = chart_to_nonmem(chart, ident=1)
    if not exp.rows:
        return None, exp
    return exp.dataset(f"chart of {chart.patient['mrn']}").individuals()[0], exp


def analyse(chart: Chart, as_of: dt.date, *, model_id: str | None = None, n_draws: int = 500,
            seed: int = 0, choice: str = "most-likely") -> dict[str, Any]:
    """Fit, curve with 80 % band, recommendation and the clinical assessment for one patient."""
    from cnidose.dosing import find_target, product, recommend
    from cnidose.estimation import fit_map
    from cnidose.estimation.posterior import sample_posterior
    from cnidose.models.library import resolve_model

    p = chart.patient
    out: dict[str, Any] = {"as_of": as_of.isoformat(), "version": __version__,
                           "clinical": clinical_assessment(chart, as_of), "warnings": []}
    age = (as_of - p["birth_date"]).days / 365.25
    group = "adult" if age >= 18 else "paediatric"
    mid = model_id or MODEL_FOR.get((p["agent"], p["indication"], group))
    ind, exp = _individual(chart)
    out["export_notes"] = exp.notes
    if mid is None:
        out["warnings"].append(f"no default model for {p['agent']} / {p['indication']} / {group}: no fit")
        return out
    if ind is None:
        out["warnings"].append("no doses or levels recorded: no fit")
        return out
    regimens = [r for r in chart.regimens if r["status"] == "final" and r["drug"] == p["agent"]]
    missing = ([] if regimens else ["the current regimen (product and interval)"]) + (
        [] if p.get("transplant_date") else ["the transplant date (the target depends on the time since it)"])
    if missing:  # nothing guessed: the recommendation needs them
        out["warnings"].append("no recommendation: record " + " and ".join(missing))
        return out
    try:
        model = resolve_model(mid)
        prod = product(regimens[-1]["product"], p["agent"])
        interval = regimens[-1]["interval_h"]
        months = (as_of - p["transplant_date"]).days / 30.4375
        meds = {m["name"] for m in chart.medications if m["status"] == "final"}
        concomitant = "mmf" if any("mycophenol" in m for m in meds) else "any"
        organ = p["indication"].replace(" transplant", "")
        target = find_target(p["agent"], organ, group, months, concomitant=concomitant)
        # the dose most likely in range rather than the smallest in range (which aims at the low edge);
        # recorded in the recommendation's inputs
        fit = fit_map(model, [ind])[0]  # once, for the recommendation and for the curve's band
        rec = recommend(model, ind, target, prod, interval=interval, n_draws=n_draws, seed=seed, choice=choice,
                        fit=fit)
        post = sample_posterior(model, ind, n_draws=300, seed=seed, map_result=fit)
    except CnidoseError as exc:
        out["warnings"].append(f"{type(exc).__name__}: {exc}")
        return out
    # the fitted curve: every 15 min from the first record to 12 h after the last
    t_end = float(ind.time[-1]) + interval
    grid = np.arange(0.0, t_end + 1e-9, 0.25)
    cols = {"ID": np.concatenate([np.ones(len(ind)), np.ones(grid.size)]),
            "TIME": np.concatenate([ind.time, grid]),
            "EVID": np.concatenate([ind.evid, np.full(grid.size, 2.0)]),
            "AMT": np.concatenate([ind.amt, np.zeros(grid.size)]),
            "RATE": np.concatenate([ind.rate, np.zeros(grid.size)]),
            "CMT": np.concatenate([ind.cmt, np.zeros(grid.size)]),
            "MDV": np.ones(len(ind) + grid.size)}
    for k, v in ind.covariates.items():
        if k in ("DV", "BLQ", "LLOQ"):
            continue
        cols[k] = np.concatenate([v, np.full(grid.size, v[-1])])
    order = np.lexsort((cols["EVID"] == 2, cols["TIME"]))
    cols = {k: v[order] for k, v in cols.items()}
    g = split_individuals(cols)[0]
    pred = post.predict(g, seed=seed)
    on_grid = cols["EVID"] == 2
    band = np.percentile(pred[:, on_grid], [10, 50, 90], axis=0)
    origin = exp.origin
    assert origin is not None

    def clock(h: float) -> str:
        return (origin + dt.timedelta(hours=float(h))).isoformat()

    obs = (ind.evid == 0) & (ind.mdv == 0)
    out["curve"] = {"time": [clock(h) for h in cols["TIME"][on_grid]], "p10": band[0].tolist(),
                    "p50": band[1].tolist(), "p90": band[2].tolist(),
                    "observed_time": [clock(h) for h in ind.time[obs]],
                    "observed": ind.covariates["DV"][obs].tolist(), "target": [target.low, target.high],
                    "unit": target.unit}
    out["recommendation"] = rec.to_dict()
    out["recommendation"]["summary"] = rec.summary()
    out["model"] = rec.model
    out["target"] = str(target)
    out["warnings"] += rec.warnings
    return out


def trends(chart: Chart) -> dict[str, Any]:
    """eGFR (CKD-EPI 2021 from creatinine, adults) and blood pressure over time."""
    from cnidose.clinical.calculators import egfr_ckd_epi_2021

    p = chart.patient
    egfr = []
    for o in chart.observations:
        if o["status"] == "final" and o["name"] == "creatinine":
            age = (o["observed_at"].date() - p["birth_date"]).days / 365.25
            if age >= 18 and p["sex"] in ("female", "male"):
                egfr.append((o["observed_at"].isoformat(), round(egfr_ckd_epi_2021(o["value"], "umol/L", age,
                                                                                   p["sex"]), 1)))
    bp: dict[str, dict[str, float]] = {}
    for o in chart.observations:
        if o["status"] == "final" and o["category"] == "vital":
            bp.setdefault(o["observed_at"].isoformat(), {})[o["name"].split()[0]] = o["value"]
    return {"egfr": egfr, "bp": sorted((t, v.get("systolic"), v.get("diastolic")) for t, v in bp.items())}
