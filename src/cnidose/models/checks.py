"""Run a model's reference checks (the ``[[checks]]`` of its file).

Kinds:

``value``
    ``expr`` (any ``[pk]`` name or expression of them) at ``covariates``
    equals ``expected`` within ``rtol``.
``ratio``
    ``expr`` at ``covariates`` divided by ``expr`` at ``versus``.
``steady_state``
    the typical steady-state ``metric`` (trough, cavg or cmax) of ``dose``
    every ``tau`` hours into the default dose compartment, simulated by the
    engine, on the observation scale of ``observation``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnidose.errors import CnidoseError
from cnidose.models.model import Check, Model, Notice

__all__ = ["CheckResult", "evaluate_expression", "run_checks", "steady_state_metric"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check."""

    model: str
    name: str
    statement: str
    source: str
    expected: float
    actual: float
    rtol: float
    passed: bool
    notices: tuple[Notice, ...] = ()
    error: str = ""

    @property
    def relative_error(self) -> float:
        return abs(self.actual - self.expected) / abs(self.expected) if self.expected else abs(self.actual)


def evaluate_expression(model: Model, check: Check,
                        covariates: Mapping[str, float]) -> tuple[float, tuple[Notice, ...]]:
    """Value of ``check.expr`` for a typical individual with constant ``covariates`` (data units)."""
    assert check.expr is not None
    ind = model.individual_from_covariates(covariates, [1.0])
    prep = model.prepare(ind)
    params = model.individual_parameters(prep)
    env: dict[str, Any] = {n: p.value for n, p in model.parameters.items()}
    env.update({n: float(v[0]) for n, v in prep.covariates.items()})
    env.update({n: float(v[0, 0]) for n, v in params.items()})
    for n in model.iiv.names + (model.iov.names if model.iov else ()):
        env[n] = 0.0
    return float(np.asarray(check.expr(env))), prep.notices


def steady_state_metric(model: Model, covariates: Mapping[str, float], dose: float, tau: float, metric: str,
                        observation: str | None = None, *, points: int = 2401) -> tuple[float, tuple[Notice, ...]]:
    """Typical steady-state trough, average or maximum concentration over one dosing interval."""
    times = np.array([tau]) if metric == "trough" else np.linspace(0.0, tau, points)
    ind = model.individual_from_covariates(covariates, times, dose=dose, tau=tau, steady_state=True,
                                           observation=observation)
    sim = model.simulate(ind)
    c = sim.prediction[0, 1:]
    if metric == "trough":
        return float(c[-1]), sim.notices
    if metric == "cmax":
        return float(c.max()), sim.notices
    from scipy.integrate import simpson

    return float(simpson(c, x=times) / tau), sim.notices


def run_checks(model: Model) -> list[CheckResult]:
    """Evaluate every check of ``model``; an exception inside one check is reported as its failure."""
    out = []
    for ch in model.checks:
        notices: tuple[Notice, ...] = ()
        try:
            if ch.kind == "value":
                actual, notices = evaluate_expression(model, ch, ch.covariates)
            elif ch.kind == "ratio":
                num, notices = evaluate_expression(model, ch, ch.covariates)
                den, n2 = evaluate_expression(model, ch, ch.versus)
                notices += n2
                actual = num / den
            else:
                actual, notices = steady_state_metric(model, ch.covariates, ch.dose, ch.tau, ch.metric,
                                                      ch.observation or None)
            passed = bool(np.isfinite(actual) and abs(actual - ch.expected) <= ch.rtol * abs(ch.expected))
            out.append(CheckResult(model.id, ch.name, ch.statement, ch.source, ch.expected, actual, ch.rtol, passed,
                                   notices))
        except (CnidoseError, ValueError) as exc:
            out.append(CheckResult(model.id, ch.name, ch.statement, ch.source, ch.expected, float("nan"), ch.rtol,
                                   False, notices, str(exc)))
    return out
