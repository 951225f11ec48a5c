"""Is an adapted model better for *new* patients? Cross-validation by patient of :func:`cnidose.estimation.adapt`.

The patients are split into ``folds`` groups at random (seeded); for each group the model is adapted on the
other patients and both the parent and the adapted model forecast the group's levels (iterative forecasting,
:func:`cnidose.dosing.evaluate.evaluate`: a priori for the first level, then fitted on levels 1..k for level
k + 1). Every forecast is therefore out of sample for the adaptation. The comparison is paired: the same
levels, forecast by both models; the mean change in absolute prediction error (adapted minus parent,
percentage points) with a 95 % bootstrap interval by patient, a priori and Bayesian apart; and the same change
of ``|ln(pred/obs)|``, symmetric in over- and under-prediction (see :class:`Paired`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cnidose.dosing.evaluate import Forecast, Summary, evaluate, paired_changes, summarise
from cnidose.dosing.strategies import Strategy
from cnidose.errors import InputError
from cnidose.estimation.population import Adaptation, Fitter, adapt, adapted
from cnidose.models.model import Model
from cnidose.pk.events import Individual

__all__ = ["ADAPTED_SUFFIX", "CrossValidation", "Paired", "adapted_model", "cross_validate", "paired_change"]

#: the in-memory adapted model's id is the parent's with this suffix (forecasts name it)
ADAPTED_SUFFIX = "+adapted"


@dataclass(frozen=True, slots=True)
class Paired:
    """Adapted minus parent on the same levels: mean change in |PE| (percentage points) with its interval, and
    the same on the log scale, ``|ln(pred/obs)|`` x 100, which weighs over- and under-prediction alike (|PE|
    does not: predicting half the level costs 50 points, twice the level 100, so |PE| favours forecasts that
    err low, most visibly a priori where errors are large)."""

    kind: str  # "a priori" (the first level, no level fitted) or "Bayesian" (fitted on the levels before)
    n: int
    patients: int
    change: float
    low: float
    high: float
    change_log: float = float("nan")
    low_log: float = float("nan")
    high_log: float = float("nan")
    bias_parent: float = float("nan")  # median PE, %
    bias_adapted: float = float("nan")


@dataclass(frozen=True, slots=True)
class CrossValidation:
    folds: tuple[Adaptation, ...]
    forecasts: tuple[Forecast, ...]  # parent's and adapted's (model id + ADAPTED_SUFFIX), every fold
    summaries: tuple[Summary, ...]
    paired: tuple[Paired, ...]


def adapted_model(model: Model, adaptation: Adaptation) -> Model:
    """The adapted model in memory, named ``<id>+adapted`` so that its forecasts are told from the parent's."""
    return replace(adapted(model, adaptation), id=model.id + ADAPTED_SUFFIX)


def paired_change(forecasts: Sequence[Forecast], parent: str, other: str, *, bootstrap: int = 1000,
                  seed: int = 0) -> list[Paired]:
    """Mean change in |PE| and in |ln(pred/obs)| of ``other`` against ``parent`` on the levels both forecast
    (:func:`cnidose.dosing.evaluate.paired_changes`), a priori and Bayesian."""
    rng = np.random.default_rng(seed)
    key = {(f.id, f.step, f.row, f.strategy): f for f in forecasts if f.model == parent}
    pairs = [(key[(f.id, f.step, f.row, f.strategy)], f) for f in forecasts
             if f.model == other and (f.id, f.step, f.row, f.strategy) in key]
    out = []
    for kind, bayesian in (("a priori", False), ("Bayesian", True)):
        chosen = [(a, b) for a, b in pairs if (a.step > 0) == bayesian]
        if not chosen:
            continue
        est, ci, n_patients = paired_changes(chosen, ("abs_error", "abs_log"), bootstrap=bootstrap, rng=rng)
        c, cl = est["abs_error"], est["abs_log"]
        (lo, hi), (lol, hil) = (ci["abs_error"], ci["abs_log"]) if ci is not None else ((c, c), (cl, cl))
        out.append(Paired(kind, len(chosen), n_patients, c, lo, hi, cl, lol, hil,
                          float(np.median([a.error for a, _ in chosen]) * 100.0),
                          float(np.median([b.error for _, b in chosen]) * 100.0)))
    return out


def cross_validate(model: Model, individuals: Sequence[Individual], *, folds: int = 5, seed: int = 0,
                   max_step: int | None = None, strategy: Strategy | None = None,
                   options: Mapping[str, Any] | None = None, fit: Fitter | None = None,
                   progress: Callable[[int, int], None] | None = None, bootstrap: int = 1000) -> CrossValidation:
    """Adapt on all but one fold, forecast that fold with the parent and the adapted model (module docstring).
    ``options`` are :func:`cnidose.estimation.adapt`'s keyword arguments."""
    inds = list(individuals)
    if folds < 2:
        raise InputError("cross-validation needs at least 2 folds")
    if len(inds) < folds:
        raise InputError(f"{len(inds)} patients cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(inds))
    groups = [sorted(int(k) for k in order[j::folds]) for j in range(folds)]
    adaptations: list[Adaptation] = []
    forecasts: list[Forecast] = []
    opts = dict(options or {})
    for j, held in enumerate(groups):
        held_set = set(held)
        train = [inds[k] for k in range(len(inds)) if k not in held_set]
        a = adapt(model, train, fit=fit, **opts)
        adaptations.append(a)
        candidate = adapted_model(model, a)
        forecasts += evaluate([model, candidate], [inds[k] for k in held], max_step=max_step,
                              strategies=(strategy or Strategy(),))
        if progress is not None:
            progress(j + 1, folds)
    summaries = summarise(forecasts, by_step=False, bootstrap=bootstrap, seed=seed)
    paired = paired_change(forecasts, model.id, model.id + ADAPTED_SUFFIX, bootstrap=bootstrap, seed=seed)
    return CrossValidation(tuple(adaptations), tuple(forecasts), tuple(summaries), tuple(paired))
