"""Several models for one patient: weights, and a recommendation from their weighted forecasts.

Each model is fitted (MAP); its weight is proportional to its marginal likelihood by the Laplace
approximation, ``exp(-L/2)`` with ``L = OFV(eta_hat) + ln|Omega| - ln|Sigma_post|`` (equal prior
probabilities; the constant terms of the objective are common to all models fitted to the same levels).
A model that cannot fit the patient (missing covariate, bad record) gets weight 0 and says why.
The averaged recommendation pools every model's posterior draws in proportion to its weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cnidose import __version__
from cnidose.dosing.data import Product, Target
from cnidose.dosing.regimen import Recommendation, candidate_doses, choose, recommend
from cnidose.errors import InputError
from cnidose.estimation import fit_map
from cnidose.estimation.population import laplace_criterion
from cnidose.models.model import Model
from cnidose.pk.events import Individual

__all__ = ["ModelWeight", "laplace_criterion", "model_weights", "recommend_averaged", "weights_from"]


@dataclass(frozen=True, slots=True)
class ModelWeight:
    model: str
    weight: float
    criterion: float  # L above; NaN when the model could not fit
    status: str
    message: str = ""


def weights_from(criteria: Sequence[float] | NDArray[np.float64],
                 prior: Sequence[float] | None = None) -> NDArray[np.float64]:
    """Normalised ``prior * exp(-L/2)``; zero where L is not finite; all zero when none is."""
    c = np.asarray(criteria, dtype=np.float64)
    p = np.ones(c.size) if prior is None else np.asarray(prior, dtype=np.float64)
    ok = np.isfinite(c) & (p > 0)
    w = np.zeros(c.size)
    if ok.any():
        w[ok] = p[ok] * np.exp(-0.5 * (c[ok] - c[ok].min()))
        w /= w.sum()
    return w


def model_weights(models: Sequence[Model], individual: Individual) -> list[ModelWeight]:
    crit, info = [], []
    for m in models:
        r = fit_map(m, [individual])[0]
        crit.append(laplace_criterion(m, r))
        if not np.isfinite(crit[-1]):
            info.append((m.ref, r.status, r.message or "no levels to weigh the model by"))
        else:
            info.append((m.ref, r.status, r.message))
    w = weights_from(crit)
    return [ModelWeight(ref, float(wi), float(ci), st, msg)
            for (ref, st, msg), wi, ci in zip(info, w, crit, strict=True)]


def recommend_averaged(models: Sequence[Model], individual: Individual, target: Target, product: Product, *,
                       n_draws: int = 1000, seed: int = 0, interval: float | None = None,
                       max_units: int = 6, choice: str = "aim", aim: float | None = None,
                       occasion: str = "prior") -> tuple[Recommendation, list[ModelWeight]]:
    weights = model_weights(models, individual)
    if not any(w.weight > 0 for w in weights):
        raise InputError("no model could fit this patient: " + "; ".join(f"{w.model}: {w.message}" for w in weights))
    parts, warnings, refs = [], [], []
    tau = product.interval if interval is None else float(interval)
    cands = None
    for m, w in zip(models, weights, strict=True):
        if w.weight < 0.005:
            continue
        k = max(50, round(w.weight * n_draws))
        r = recommend(m, individual, target, product, interval=tau, n_draws=k, seed=seed, max_units=max_units,
                      choice=choice, aim=aim, occasion=occasion)
        assert r.values is not None
        parts.append(r.values)
        warnings += [f"{m.id}: {x}" for x in r.warnings if "closest" not in x]
        refs.append(f"{m.ref} (weight {w.weight:.2f})")
        cands = candidate_doses(product.strengths, max_units=max_units, max_dose=r.inputs["max_dose"])
    assert cands is not None
    values = np.concatenate(parts, axis=1)
    chosen, candidates, more = choose(cands, values, target, tau, choice, aim)
    inputs = {"id": float(individual.id), "models": refs, "weights": [w.weight for w in weights], "n_draws": n_draws,
              "seed": seed, "interval": tau, "product": product.name, "choice": choice,
              "aim": (target.low + target.high) / 2 if aim is None else float(aim)}
    rec = Recommendation(chosen, candidates, target, product.name, target.metric, " + ".join(refs), __version__,
                         inputs, warnings + more, values)
    return rec, weights
