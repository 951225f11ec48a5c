"""Starting doses: the label's weight-based dose, and the model-based a-priori dose; formulation conversion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnidose.dosing.data import Product, Target, load_products, load_start_doses, max_dose_mg
from cnidose.dosing.regimen import candidate_doses, steady_state_metric_draws
from cnidose.errors import InputError
from cnidose.models.model import Model

__all__ = ["AprioriDose", "LabelDose", "apriori_dose", "convert_daily_dose", "label_start_dose"]


@dataclass(frozen=True, slots=True)
class LabelDose:
    mg_per_day: float
    mg_per_kg_day: float
    mg_per_kg_day_high: float | None
    product: str
    source: str


def label_start_dose(drug: str, organ: str, age_group: str, weight_kg: float, *,
                     concomitant: str = "any") -> LabelDose:
    """The label's weight-based starting dose for an indication (actual body weight)."""
    if not weight_kg > 0:
        raise InputError(f"weight must be positive, got {weight_kg:g} kg")
    table = load_start_doses()
    rows = [r for r in table if r["drug"] == drug and r["organ"] == organ
            and r["age_group"] == age_group and r["concomitant"] in (concomitant, "any")]
    rows.sort(key=lambda r: r["concomitant"] != concomitant)
    if not rows:
        have = sorted({f"{r['organ']}/{r['age_group']}/{r['concomitant']}" for r in table if r["drug"] == drug})
        raise InputError(f"no label starting dose for {drug}, {organ}, {age_group} ({concomitant}); known: "
                         f"{', '.join(have)}")
    r = rows[0]
    per = float(r["mg_per_kg_day"])
    return LabelDose(per * weight_kg, per, r.get("mg_per_kg_day_high"), r["product"], r["source"])


@dataclass(frozen=True, slots=True)
class AprioriDose:
    dose: float  # mg per administration
    interval: float
    percentile: float
    predicted: float  # the percentile of the population's steady-state metric at that dose
    p_in_range: float
    model: str
    warning: str = ""


def apriori_dose(model: Model, covariates: dict[str, float], target: Target, product: Product, *,
                 percentile: float = 50.0, n_draws: int = 2000, seed: int = 0, max_units: int = 6,
                 max_dose: float | None = None) -> AprioriDose:
    """The smallest marketed-strength dose whose population ``percentile`` of the steady-state metric lies in
    the target, for a patient with these covariates (random effects drawn from the model's prior)."""
    if product.drug != model.meta.get("drug"):
        raise InputError(f"{product.name} is {product.drug}; model {model.id} is not")
    rng = np.random.default_rng(seed)
    eta = rng.multivariate_normal(np.zeros(len(model.eta_names)), model.omega, size=n_draws)
    kappa = None
    if model.iov is not None:
        kappa = rng.multivariate_normal(np.zeros(len(model.iov)), model.iov.omega, size=(n_draws, 1))
    limit = max_dose if max_dose is not None else max_dose_mg(product.drug)
    cands = candidate_doses(product.strengths, max_units=max_units, max_dose=limit)
    doses = np.array([d for d, _ in cands])
    values = steady_state_metric_draws(model, covariates, doses, product.interval, target.metric, eta, kappa)
    q = np.percentile(values, percentile, axis=1)
    p_in = np.mean((values >= target.low) & (values <= target.high), axis=1)
    ok = np.flatnonzero((q >= target.low) & (q <= target.high))
    warning = ""
    if ok.size:
        k = int(ok[0])
    else:
        k = int(np.argmin(np.minimum(np.abs(np.log(q / target.low)), np.abs(np.log(q / target.high)))))
        warning = "no marketed-strength dose puts the population percentile in the target; the closest is shown"
    return AprioriDose(float(doses[k]), product.interval, percentile, float(q[k]), float(p_in[k]), model.ref, warning)


def convert_daily_dose(daily_mg: float, source: str, target: str) -> tuple[float, str]:
    """Total daily dose after a published formulation conversion (e.g. Prograf -> Envarsus XR x0.8)."""
    _, convs = load_products()
    for c in convs:
        if c.source_product.lower() == source.lower() and c.target_product.lower() == target.lower():
            return daily_mg * c.factor, c.source
    known = ", ".join(f"{c.source_product} -> {c.target_product}" for c in convs)
    raise InputError(f"no published conversion {source} -> {target} (known: {known})")
