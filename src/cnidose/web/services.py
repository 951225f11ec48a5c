"""What the pages and the API compute from a stored chart: the chart is turned into the one patient record
(:func:`cnidose.records.exchange.chart_to_record`) and handed to the use cases of
:mod:`cnidose.records.analysis` -- the same ones the command line runs on a patient/2 document."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from cnidose.errors import CnidoseError
from cnidose.records import analysis
from cnidose.records.exchange import chart_to_record
from cnidose.records.store import Chart

if TYPE_CHECKING:
    from cnidose.models.library import ModelChoice

__all__ = ["analyse", "clinical_assessment", "model_choice", "trends"]


def _record(chart: Chart) -> Any:
    return chart_to_record(chart)


def clinical_assessment(chart: Chart, as_of: dt.date) -> dict[str, Any]:
    """The rule base's view of the chart (errors are reported, not raised)."""
    try:
        record = _record(chart)
    except CnidoseError as exc:
        return {"error": str(exc), "alerts": [], "due": [], "exposure": [], "selection": "unknown",
                "selection_reasons": [], "notes": []}
    return analysis.clinical_assessment(record, as_of)


def model_choice(chart: Chart, as_of: dt.date) -> ModelChoice | None:
    """The library model the analysis would use for the chart's patient, with its reasons
    (:func:`cnidose.records.analysis.choose_model`); None where the record cannot be read."""
    try:
        record = _record(chart)
    except CnidoseError:
        return None
    return analysis.choose_model(record, as_of)


def analyse(chart: Chart, as_of: dt.date, *, model_id: str | None = None, n_draws: int = 500,
            seed: int = 0, choice: str = "aim", aim: float | None = None, strategy: str = "map") -> dict[str, Any]:
    """Fit, curve with 80 % band, recommendation and the clinical assessment for the chart's patient."""
    try:
        record = _record(chart)
    except CnidoseError as exc:
        return {"as_of": as_of.isoformat(), "warnings": [f"the record cannot be read: {exc}"],
                "clinical": {"error": str(exc), "alerts": [], "due": [], "exposure": [], "selection": "unknown",
                             "selection_reasons": [], "notes": []}}
    return analysis.analyse(record, as_of, model_id=model_id, n_draws=n_draws, seed=seed, choice=choice, aim=aim,
                            strategy=strategy)


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
