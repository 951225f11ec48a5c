"""Forecasting evaluation: how well would a model have predicted a centre's own patients?

Iterative Bayesian forecasting over a data set: for every individual and every k, fit on levels 1..k
(later levels hidden), predict level k+1 (IPRED at the MAP estimate), and compare with what was measured.
A forecast with k = 0 is the a-priori (population) prediction of the first level. Each step fits every
individual at once (:func:`cnidose.estimation.fit_map`).

Metrics (prediction error PE = (predicted − observed) / observed): median PE (bias), median absolute PE
(MAPE), relative RMSE, and the share of forecasts within ±20 %; per model and per step k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import CnidoseError
from cnidose.estimation import fit_map
from cnidose.models.model import Model, Notice
from cnidose.pk.events import Individual, split_individuals

__all__ = ["Forecast", "Summary", "evaluate", "plot_svg", "summarise"]


@dataclass(frozen=True, slots=True)
class Forecast:
    model: str
    id: float
    step: int  # number of levels the fit saw
    row: int  # source row of the forecast level
    observed: float
    predicted: float

    @property
    def error(self) -> float:
        return (self.predicted - self.observed) / self.observed


@dataclass(frozen=True, slots=True)
class Summary:
    model: str
    step: int | None  # None: every step
    n: int
    median_pe: float  # %
    mape: float  # median absolute PE, %
    rmse: float  # relative RMSE, %
    within_20: float  # %


def _hide_after(ind: Individual, keep: int) -> Individual:
    """The individual with every level after the first ``keep`` marked MDV=1 (kept as prediction records)."""
    obs = np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))
    mdv = ind.mdv.copy()
    mdv[obs[keep:]] = 1
    cols: dict[str, Any] = {"ID": np.full(len(ind), ind.id), "TIME": ind.time, "EVID": ind.evid, "AMT": ind.amt,
                            "RATE": ind.rate, "II": ind.ii, "ADDL": ind.addl, "SS": ind.ss, "CMT": ind.cmt,
                            "MDV": mdv}
    cols.update(ind.covariates)
    return split_individuals(cols, rows=ind.rows)[0]


def evaluate(models: Sequence[Model], individuals: Sequence[Individual], *, max_step: int | None = None,
             problems: list[str] | None = None, notices: list[Notice] | None = None) -> list[Forecast]:
    """Every forecast of every model (k = 0 .. n-1 levels seen).

    Individuals a model cannot fit (missing covariate, bad record) are skipped; their messages are
    appended to ``problems`` (one per model and individual). What each fit must show (a covariate outside
    the model's domain, defaulted or derived) is appended to ``notices``, once per model and individual.
    """
    out: list[Forecast] = []
    seen_problem: set[tuple[str, float]] = set()
    obs_idx = [np.flatnonzero((i.evid == 0) & (i.mdv == 0) & ~(np.nan_to_num(i.covariates.get(
        "BLQ", np.zeros(len(i)))) == 1)) for i in individuals]
    n_max = max((o.size for o in obs_idx), default=0)
    steps = range(n_max if max_step is None else min(n_max, max_step + 1))
    for model in models:
        for k in steps:
            who = [j for j, o in enumerate(obs_idx) if o.size > k]
            if not who:
                break
            trimmed = [_hide_after(individuals[j], k) for j in who]
            fits = fit_map(model, trimmed)
            if notices is not None and k == 0:
                notices.extend(n for r in fits for n in r.notices)
            for j, ind, r in zip(who, trimmed, fits, strict=True):
                if r.status == "error":
                    if problems is not None and (model.id, float(ind.id)) not in seen_problem:
                        seen_problem.add((model.id, float(ind.id)))
                        problems.append(f"{model.id}: ID {ind.id:g}: {r.message}")
                    continue
                target = int(obs_idx[j][k])
                eta = r.eta[None]
                kap = None
                if model.iov is not None and r.kappa is not None:
                    kap = r.kappa[None]
                try:
                    pred = model.simulate(ind, eta, kappas=kap).prediction[0, target]
                except (CnidoseError, ValueError):  # a forecast that cannot be computed is skipped, not fatal
                    continue
                dv = float(individuals[j].covariates["DV"][target])
                if dv > 0 and np.isfinite(pred):
                    out.append(Forecast(model.id, float(ind.id), k, int(ind.rows[target]), dv, float(pred)))
    return out


def summarise(forecasts: Sequence[Forecast], *, by_step: bool = True) -> list[Summary]:
    """Summaries per model (all steps), and per model and step when ``by_step``."""
    out: list[Summary] = []
    for model in sorted({f.model for f in forecasts}):
        fm = [f for f in forecasts if f.model == model]
        groups: list[tuple[int | None, list[Forecast]]] = [(None, fm)]
        if by_step:
            groups += [(k, [f for f in fm if f.step == k]) for k in sorted({f.step for f in fm})]
        for k, fs in groups:
            pe: NDArray[np.float64] = np.array([f.error for f in fs]) * 100.0
            out.append(Summary(model, k, len(fs), float(np.median(pe)), float(np.median(np.abs(pe))),
                               float(np.sqrt(np.mean(pe**2))), float(np.mean(np.abs(pe) <= 20.0) * 100.0)))
    return out


def plot_svg(forecasts: Sequence[Forecast], *, size: int = 420) -> str:
    """Predicted against observed levels (log-log, one colour per model, the identity and ±20 % lines) as SVG."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    models = sorted({f.model for f in forecasts})
    vals = [v for f in forecasts for v in (f.observed, f.predicted) if v > 0]
    lo, hi = (min(vals), max(vals)) if vals else (1.0, 10.0)
    lo, hi = np.log10(lo) - 0.05, np.log10(hi) + 0.05
    pad = 50

    def xy(obs: float, pred: float) -> tuple[float, float]:
        x = pad + (np.log10(obs) - lo) / (hi - lo) * (size - 2 * pad)
        y = size - pad - (np.log10(pred) - lo) / (hi - lo) * (size - 2 * pad)
        return float(x), float(y)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for factor, dash in ((1.0, ""), (1.2, ' stroke-dasharray="4 3"'), (1 / 1.2, ' stroke-dasharray="4 3"')):
        a, b = xy(10**lo, 10**lo * factor), xy(10**hi, 10**hi * factor)
        parts.append(f'<line x1="{a[0]:.1f}" y1="{a[1]:.1f}" x2="{b[0]:.1f}" y2="{b[1]:.1f}" stroke="#888"{dash}/>')
    for k, model in enumerate(models):
        c = colours[k % len(colours)]
        for f in forecasts:
            if f.model == model and f.observed > 0 and f.predicted > 0:
                x, y = xy(f.observed, f.predicted)
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{c}" fill-opacity="0.6"/>')
        parts.append(f'<text x="{pad}" y="{16 + 13 * k}" fill="{c}">{model}</text>')
    parts.append(f'<text x="{size / 2:.0f}" y="{size - 12}" text-anchor="middle">observed (log scale)</text>')
    parts.append(f'<text x="14" y="{size / 2:.0f}" transform="rotate(-90 14 {size / 2:.0f})" '
                 'text-anchor="middle">forecast (log scale)</text>')
    parts.append("</svg>")
    return "\n".join(parts)
