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
        return {"error": str(exc), "alerts": [], "due": [], "exposure": [], "selection": "unknown",
                "selection_reasons": []}
    return {"selection": a.selection, "selection_reasons": a.selection_reasons,
            "alerts": [{"rule": x.rule, "severity": x.severity, "message": x.message, "source": x.source,
                        "date": x.date.isoformat() if x.date else None} for x in a.alerts],
            "due": [{"what": d.what, "date": d.date.isoformat(), "source": d.source} for d in a.due],
            "exposure": [{"drug": x.drug, "agent": x.agent, "factor": x.factor, "start": x.start.isoformat(),
                          "end": x.end.isoformat() if x.end else None, "source": x.source} for x in a.exposure],
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
    if out["clinical"].get("error"):  # said, not silently assumed
        out["warnings"].append("the rule base could not read the record: interactions are unknown and the fit "
                               "assumes none")
    ind, applied = _with_interactions(ind, out["clinical"]["exposure"], p["agent"], exp.origin)
    out["exposure"] = applied
    out["warnings"] += [f"{x['drug']}: {p['agent']} exposure x{x['factor']:g} from {x['start']}"
                        + (f" to {x['end']}" if x["end"] else " (ongoing)")
                        + f" applied to the model (CL/F divided by {x['factor']:g}) [{x['source']}]" for x in applied]
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
        # the fit and its posterior once, for the recommendation and for the curve's band
        fit = fit_map(model, [ind])[0]
        post = None if fit.status == "error" else sample_posterior(model, ind, n_draws=n_draws, seed=seed,
                                                                   map_result=fit)
        rec = recommend(model, ind, target, prod, interval=interval, n_draws=n_draws, seed=seed, choice=choice,
                        fit=fit, posterior=post)
    except CnidoseError as exc:
        out["warnings"].append(f"{type(exc).__name__}: {exc}")
        return out
    # the fitted curve from the first record to one dosing interval after the last: every 15 min over the last
    # 7 days (peaks and troughs of the current regimen), hourly before them
    t_end = float(ind.time[-1]) + interval
    recent = max(0.0, np.floor(t_end - 7 * 24.0))
    grid = np.concatenate([np.arange(0.0, recent, 1.0), np.arange(recent, t_end + 1e-9, 0.25)])
    cols = {"ID": np.concatenate([np.ones(len(ind)), np.ones(grid.size)]),
            "TIME": np.concatenate([ind.time, grid]),
            "EVID": np.concatenate([ind.evid, np.full(grid.size, 2.0)]),
            "AMT": np.concatenate([ind.amt, np.zeros(grid.size)]),
            "RATE": np.concatenate([ind.rate, np.zeros(grid.size)]),
            "CMT": np.concatenate([ind.cmt, np.zeros(grid.size)]),
            "MDV": np.ones(len(ind) + grid.size)}
    # a grid point takes the covariates of the interval it lies in: those of the next record (a record's values
    # hold over the interval ending at it), the last record's beyond it
    nxt = np.minimum(np.searchsorted(ind.time, grid, side="left"), len(ind) - 1)
    for k, v in ind.covariates.items():
        if k in ("DV", "BLQ", "LLOQ"):
            continue
        cols[k] = np.concatenate([v, v[nxt]])
    order = np.lexsort((cols["EVID"] == 2, cols["TIME"]))
    cols = {k: v[order] for k, v in cols.items()}
    g = split_individuals(cols)[0]
    assert post is not None  # recommend() refuses a fit that failed
    pred = post.predict(g, seed=seed)
    on_grid = cols["EVID"] == 2
    band = np.percentile(pred[:, on_grid], [10, 50, 90], axis=0)
    origin = exp.origin
    assert origin is not None

    def sig(x: Any) -> list[float]:  # four significant digits: the plot needs no more, the stored result stays small
        return [float(f"{v:.4g}") for v in x]

    obs = (ind.evid == 0) & (ind.mdv == 0)
    # times as hours after ``origin`` (UTC): the page turns them into clock times
    out["curve"] = {"origin": origin.isoformat(), "hours": [round(float(h), 4) for h in cols["TIME"][on_grid]],
                    "p10": sig(band[0]), "p50": sig(band[1]), "p90": sig(band[2]),
                    "observed_hours": [round(float(h), 4) for h in ind.time[obs]],
                    "observed": ind.covariates["DV"][obs].tolist(), "target": [target.low, target.high],
                    "unit": target.unit}
    out["recommendation"] = rec.to_dict()
    out["recommendation"]["summary"] = rec.summary()
    out["model"] = rec.model
    out["target"] = str(target)
    out["warnings"] += rec.warnings
    return out


def _with_interactions(ind: Any, exposure: list[dict[str, Any]], agent: str, origin: dt.datetime | None
                       ) -> tuple[Any, list[dict[str, Any]]]:
    """The individual with the rule base's exposure adjustments for ``agent`` (``EXPOSURE`` column; dates are
    taken from 00:00 UTC) and the adjustments applied."""
    from cnidose.models.exposure import with_exposure

    mine = [x for x in exposure if x["agent"] == agent]
    if not mine or origin is None:
        return ind, []

    def hours(day: str) -> float:
        d = dt.date.fromisoformat(day)
        return (dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC) - origin).total_seconds() / 3600.0

    intervals = [(hours(x["start"]), None if x["end"] is None else hours(x["end"]), float(x["factor"]))
                 for x in mine]
    kept = [(iv, x) for iv, x in zip(intervals, mine, strict=True)
            if iv[1] is None or iv[1] > float(ind.time[0])]  # over before the first record: nothing to apply
    return with_exposure(ind, [iv for iv, _ in kept]), [x for _, x in kept]


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
