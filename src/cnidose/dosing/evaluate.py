"""Forecasting evaluation: how well would a model have predicted a centre's own patients?

Iterative Bayesian forecasting over a data set: for every individual and every k, fit on levels 1..k
(later levels hidden), predict level k+1 (IPRED at the MAP estimate), and compare with what was measured.
A forecast with k = 0 is the a-priori (population) prediction of the first level. Each step fits every
individual at once (:func:`cnidose.estimation.fit_map`).

Metrics (prediction error PE = (predicted − observed) / observed): median PE (bias), median absolute PE
(MAPE), relative RMSE, and the shares of forecasts within ±20 % and ±30 %; per model, strategy and step k, with
bootstrap confidence intervals by patient (resampling patients, not forecasts: a patient's forecasts are
correlated). :func:`compare` sets every model and strategy against a reference on the same forecasts (paired
changes of the mean |PE|, of the mean |ln(pred/obs)| and of the share within ±20 %, with intervals by patient and
a verdict); with ``calibration``, each forecast also says how the model saw the level in advance (its posterior
predictive: the share within ±20 % it expects, and whether the level fell inside its 80 % interval).

Forecasting strategies: :mod:`cnidose.dosing.strategies`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.dosing.strategies import STRATEGY_HELP, Strategy, strategy
from cnidose.errors import CnidoseError, InputError
from cnidose.estimation import MapResult, fit_map
from cnidose.estimation.posterior import sample_posterior
from cnidose.models.model import Model, Notice
from cnidose.pk.events import Individual, split_individuals

__all__ = [
    "COMBINE",
    "LOG_ERROR_CAP",
    "PAIRED_METRICS",
    "STRATEGY_HELP",
    "Comparison",
    "Forecast",
    "Strategy",
    "Summary",
    "calibration_of",
    "check_combine",
    "compare",
    "days_since_transplant",
    "evaluate",
    "paired_changes",
    "plot_svg",
    "strategy",
    "summarise",
]


@dataclass(frozen=True, slots=True)
class Forecast:
    model: str
    id: float
    step: int  # number of levels the fit saw
    row: int  # source row of the forecast level
    observed: float
    predicted: float
    strategy: str = "map"
    #: combined forecasts ("average", "select"): each model's weight for this patient at this step
    weights: tuple[tuple[str, float], ...] = ()
    #: days since transplantation at the forecast level (:func:`days_since_transplant`)
    day: float = float("nan")
    #: with ``calibration``: the probability, under the model's posterior predictive of the level (the patient's
    #: posterior draws, a new occasion's effect from its prior, the residual error), that the level lies within
    #: ±20 % of this forecast; and 1 or 0 as the level lay inside the central 80 % predictive interval or not (None:
    #: not computed). A combined forecast reads the mixture of its models' predictive distributions with their
    #: weights ("average") or its chosen model's ("select") (:func:`calibration_of`)
    expected_20: float | None = None
    in_pi80: float | None = None

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
    strategy: str = "map"
    within_30: float = float("nan")  # %
    patients: int = 0
    #: 95 % bootstrap intervals by patient (None without a bootstrap): (low, high) for each metric
    ci: dict[str, tuple[float, float]] | None = None
    #: a period since transplantation ("days 0-7", ...): this summary is of the forecasts in it (None: all); with a
    #: period, step None means the Bayesian forecasts (k >= 1) and step 0 the a-priori ones
    period: str | None = None
    #: with ``calibration`` (%): the share within ±20 % the model itself expects of these forecasts (the mean of
    #: :attr:`Forecast.expected_20`), and the share of levels inside their 80 % predictive interval (80 if the
    #: model's variability describes these patients); None where not every forecast has them
    expected_20: float | None = None
    coverage_80: float | None = None


#: the periods since transplantation forecasts are summarised by, in days [from, to)
PERIODS: tuple[tuple[float, float], ...] = ((0, 7), (7, 14), (14, 30), (30, 90), (90, 365), (365, float("inf")))


def _period(day: float) -> str | None:
    for lo, hi in PERIODS:
        if lo <= day < hi:
            return f"days {lo:g}-{hi:g}" if np.isfinite(hi) else f"days {lo:g}+"
    return None


def days_since_transplant(ind: Individual, record: int) -> float:
    """Days since transplantation at ``record``: the data's ``POD`` (post-operative day) or ``TSFT`` (days since
    transplantation) column when there is one (one value for every record of the individual: a baseline value,
    counted on by TIME from the first record), else TIME (hours) / 24 -- the data's time origin taken as the
    day of transplantation (a centre's data set usually counts from it)."""
    for name in ("POD", "TSFT"):
        col = ind.covariates.get(name)
        if col is not None and np.isfinite(col[record]):
            finite = col[np.isfinite(col)]
            if np.ptp(finite) == 0 and np.ptp(ind.time) > 0:  # a baseline value: counted on from the first record
                return float(col[record]) + float(ind.time[record] - ind.time[0]) / 24.0
            return float(col[record])
    return float(ind.time[record]) / 24.0


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


#: posterior draws of a ``post`` forecast (SIR; seed 0): the median's Monte Carlo error is about 1.25 SD/sqrt(ESS),
#: about 1 % of the level for a posterior SD of 15 % and an effective sample size of 300
POSTERIOR_DRAWS = 300

COMBINE = ("average", "select")


def check_combine(ways: Sequence[str], n_models: int) -> None:
    """InputError unless every way is one of COMBINE and there are models to combine."""
    for c in ways:
        if c not in COMBINE:
            raise InputError(f"unknown way to combine models {c!r} (known: {', '.join(COMBINE)})")
    if ways and n_models < 2:
        raise InputError("average and select combine two models or more: give two or more models (-m a,b)")


def evaluate(models: Sequence[Model], individuals: Sequence[Individual], *, max_step: int | None = None,
             problems: list[str] | None = None, notices: list[Notice] | None = None,
             strategies: Sequence[Strategy] = (Strategy(),), combine: Sequence[str] = (),
             calibration: bool = False) -> list[Forecast]:
    """Every forecast of every model and strategy (k = 0 .. n-1 levels seen).

    ``calibration``: each forecast of a model also says how the model itself saw that level in advance
    (:attr:`Forecast.expected_20`, :attr:`Forecast.in_pi80`; :data:`POSTERIOR_DRAWS` posterior draws per forecast,
    about doubling the cost). If the model's variability (between occasions, residual) describes the centre's
    patients, 80 % of levels lie inside their 80 % interval and the share within ±20 % is about what the model
    expects; a share far below it points to a bias or a misspecification, one near it to variability that no
    forecast removes (the ceiling of ±20 % that the model's own residual and occasion variability leave). Combined
    forecasts are calibrated too: "average" by the mixture of the models' predictive distributions with their
    weights, "select" by its chosen model's.

    ``combine`` adds forecasts that use every model at once, as model ``"average"`` or ``"select"`` (Uster et
    al. 2021, Clin Pharmacol Ther 109:175: model averaging and selection): each model's weight for a patient
    at step k is its Laplace marginal likelihood of levels 1..k (:func:`cnidose.dosing.averaging.
    laplace_criterion`, which is also the product of its one-step-ahead forecast densities for those levels:
    the patient's past forecasting performance); equal weights a priori (k = 0). ``average`` forecasts the
    weighted mean of the models' forecasts, ``select`` the forecast of the largest weight; each forecast
    carries the weights.

    Individuals a model cannot fit (missing covariate, bad record) are skipped; their messages are
    appended to ``problems`` (one per model and individual). What each fit must show (a covariate outside
    the model's domain, defaulted or derived) is appended to ``notices``, once per model and individual.
    """
    from cnidose.dosing.averaging import laplace_criterion, weights_from

    check_combine(combine, len(models))
    out: list[Forecast] = []
    seen_problem: set[tuple[str, float]] = set()
    obs_idx = [np.flatnonzero((i.evid == 0) & (i.mdv == 0) & ~(np.nan_to_num(i.covariates.get(
        "BLQ", np.zeros(len(i)))) == 1)) for i in individuals]
    n_max = max((o.size for o in obs_idx), default=0)
    steps = range(n_max if max_step is None else min(n_max, max_step + 1))
    per_model: dict[tuple[str, str], list[Forecast]] = {}
    combined: list[Forecast] = []
    for strat in strategies:
        fitted = [strat.apply(m) for m in models]
        # each step starts every patient's fit at its estimate of the step before (one more level): a shorter
        # descent to the same optimum; restarts and the wide-prior search are unchanged
        last: dict[tuple[int, int], MapResult] = {}
        for k in steps:
            who = [j for j, o in enumerate(obs_idx) if o.size > k]
            if not who:
                break
            trimmed = [_hide_after(individuals[j], k) for j in who]
            preds = np.full((len(models), len(who)), np.nan)
            crit = np.full((len(models), len(who)), np.nan)
            draws: dict[tuple[int, int], NDArray[np.float64]] = {}  # (model, patient): predictive draws of the level
            for a, (published, model) in enumerate(zip(models, fitted, strict=True)):
                fits = fit_map(model, trimmed, start=[last.get((a, j)) for j in who])
                last.update({(a, j): r for j, r in zip(who, fits, strict=True)})
                if notices is not None and k == 0 and strat is strategies[0]:
                    notices.extend(n for r in fits for n in r.notices)
                for b, (j, ind, r) in enumerate(zip(who, trimmed, fits, strict=True)):
                    if r.status == "error":
                        if problems is not None and (model.id, float(ind.id)) not in seen_problem:
                            seen_problem.add((model.id, float(ind.id)))
                            problems.append(f"{model.id}: ID {ind.id:g}: {r.message}")
                        continue
                    target = int(obs_idx[j][k])
                    dv = float(individuals[j].covariates["DV"][target])
                    pred, level = _forecast(model, strat, ind, r, obs_idx[j], k, predictive=calibration)
                    if not (dv > 0 and np.isfinite(pred)):
                        continue
                    p20, in80 = calibration_of(pred, dv, [level]) if level is not None else (None, None)
                    if level is not None:
                        draws[a, b] = level
                    preds[a, b] = pred
                    crit[a, b] = 0.0 if k == 0 else (laplace_criterion(model, r) if combine else np.nan)
                    per_model.setdefault((published.id, strat.name), []).append(Forecast(
                        published.id, float(ind.id), k, int(ind.rows[target]), dv, float(pred), strat.name,
                        day=days_since_transplant(ind, target), expected_20=p20, in_pi80=in80))
            for b, (j, ind) in enumerate(zip(who, trimmed, strict=True)):
                if not combine:
                    break
                ok = np.isfinite(preds[:, b])
                w = weights_from(np.where(ok, crit[:, b], np.nan))
                if not w.any():
                    continue
                target = int(obs_idx[j][k])
                dv = float(individuals[j].covariates["DV"][target])
                weights = tuple((m.id, float(x)) for m, x in zip(models, w, strict=True))
                for c in combine:
                    # select: the largest weight's model alone (its forecast and predictive distribution); average:
                    # the weighted mean of the forecasts, and the mixture of the predictive distributions
                    used = np.flatnonzero(ok & (w > 0)) if c == "average" else np.array([int(np.argmax(w))])
                    value = float(np.sum(w[ok] * preds[ok, b])) if c == "average" else float(preds[used[0], b])
                    p20, in80 = (calibration_of(value, dv, [draws[a, b] for a in used.tolist()], w[used])
                                 if calibration and all((a, b) in draws for a in used.tolist()) else (None, None))
                    combined.append(Forecast(c, float(ind.id), k, int(ind.rows[target]), dv, value, strat.name,
                                             weights, days_since_transplant(ind, target), p20, in80))
    for m in models:
        for strat in strategies:
            out += sorted(per_model.get((m.id, strat.name), []), key=lambda f: f.step)
    for c in combine:
        for strat in strategies:
            out += [f for f in combined if f.model == c and f.strategy == strat.name]
    return out


def _forecast(model: Model, strat: Strategy, ind: Individual, r: Any, obs: NDArray[np.int64], k: int, *,
              predictive: bool = False) -> tuple[float, NDArray[np.float64] | None]:
    """The fit's prediction of level k (record ``obs[k]``); NaN when it cannot be computed. With ``predictive``,
    also draws of the model's posterior predictive of the level (:data:`POSTERIOR_DRAWS`: the patient's posterior,
    a new occasion's effect from its prior, the residual error; finite ones only), else None."""
    target = int(obs[k])
    carry = None  # occ-last: (the last seen occasion, the new occasion of level k)
    if model.iov is not None and r.kappa is not None and strat.occasion == "last" and k > 0:
        occ = model.prepare(ind).occasion
        if occ[target] not in occ[obs[:k]]:
            carry = (int(occ[obs[k - 1]]), int(occ[target]))
    try:
        posterior = strat.forecast == "posterior" and r.status != "prior-only"
        post = sample_posterior(model, ind, n_draws=POSTERIOR_DRAWS, seed=0, map_result=r) \
            if posterior or predictive else None
        if posterior:
            assert post is not None
            value = float(np.median(post.predict(ind, seed=0, carry=carry)[:, target]))
        else:
            kap = None
            if model.iov is not None and r.kappa is not None:
                kap = np.array(r.kappa, dtype=np.float64)
                if carry is not None:
                    kap[carry[1]] = kap[carry[0]]
                kap = kap[None]
            value = float(model.simulate(ind, r.eta[None], kappas=kap).prediction[0, target])
        if post is None or not predictive or not np.isfinite(value):
            return value, None
        level = post.predict(ind, seed=1, carry=carry, residual=True)[:, target]
        level = level[np.isfinite(level)]
        return value, (level if level.size else None)
    except (CnidoseError, ValueError):  # a forecast that cannot be computed is skipped, not fatal
        return float("nan"), None


def calibration_of(value: float, observed: float, draws: Sequence[NDArray[np.float64]],
                   weights: Sequence[float] | None = None) -> tuple[float, float]:
    """How a predictive distribution saw a level in advance: (:attr:`Forecast.expected_20`,
    :attr:`Forecast.in_pi80`) for the forecast ``value`` and the measured level ``observed``.

    The predictive distribution is the mixture of the draws of each model (``draws``, one array per model) with
    ``weights`` (default: one model, or equal): a combined forecast's models with their weights for the patient,
    as Bayesian model averaging predicts (Hoeting et al. 1999, Stat Sci 14:382). ``expected_20`` is its
    probability that the level lies within ±20 % of ``value``; ``in_pi80`` is 1 where the level lay inside its
    central 80 % interval, i.e. where its probability integral transform, the predictive probability of a level
    at or below the one measured, lies in [0.1, 0.9] (Gneiting et al. 2007, J R Stat Soc B 69:243)."""
    w = np.full(len(draws), 1.0 / len(draws)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    p20 = pit = 0.0
    for wa, level in zip(w.tolist(), draws, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):  # a drawn level <= 0 is never within ±20 %
            within = (level > 0) & (np.abs(value / level - 1.0) <= 0.2)
        p20 += wa * float(np.mean(within))
        pit += wa * float(np.mean(level <= observed))
    return p20, float(0.1 <= pit <= 0.9)


def _metrics(pe: NDArray[np.float64]) -> dict[str, float]:
    a = np.abs(pe)
    return {"median_pe": float(np.median(pe)), "mape": float(np.median(a)), "rmse": float(np.sqrt(np.mean(pe**2))),
            "within_20": float(np.mean(a <= 20.0) * 100.0), "within_30": float(np.mean(a <= 30.0) * 100.0)}


def _percent(values: Sequence[float | None]) -> float | None:
    """The mean of per-forecast probabilities or indicators, in %; None unless every forecast has one."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(np.asarray(values, dtype=np.float64)) * 100.0)


def summarise(forecasts: Sequence[Forecast], *, by_step: bool = True, bootstrap: int = 0,
              seed: int = 0, by_period: bool = False) -> list[Summary]:
    """Summaries per model and strategy (all steps), and per step when ``by_step``, and per period since
    transplantation (:data:`PERIODS`; Bayesian and a priori apart) when ``by_period``; with ``bootstrap`` > 0, 95 %
    percentile intervals of every metric from that many resamples of the patients (with replacement; each
    resampled patient brings all its forecasts of the group)."""
    out: list[Summary] = []
    rng = np.random.default_rng(seed)
    order = {name: k for k, name in enumerate(dict.fromkeys(f.strategy for f in forecasts))}
    for model in sorted({f.model for f in forecasts}):
        for strat in sorted({f.strategy for f in forecasts if f.model == model}, key=order.__getitem__):
            fm = [f for f in forecasts if f.model == model and f.strategy == strat]
            groups: list[tuple[int | None, str | None, list[Forecast]]] = [(None, None, fm)]
            if by_step:
                groups += [(k, None, [f for f in fm if f.step == k]) for k in sorted({f.step for f in fm})]
            if by_period:
                labels = [_period(f.day) for f in fm]
                for lo, _hi in PERIODS:
                    label = _period(lo)
                    part = [f for f, x in zip(fm, labels, strict=True) if x == label]
                    bayes, prior = [f for f in part if f.step > 0], [f for f in part if f.step == 0]
                    groups += [(None, label, bayes)] if bayes else []
                    groups += [(0, label, prior)] if prior else []
            for k, period, fs in groups:
                pe: NDArray[np.float64] = np.array([f.error for f in fs]) * 100.0
                ids = np.array([f.id for f in fs])
                patients = np.unique(ids)
                m = _metrics(pe)
                ci = None
                if bootstrap > 0 and patients.size > 1:
                    by_patient = [pe[ids == i] for i in patients]
                    draws: dict[str, list[float]] = {key: [] for key in m}
                    for _ in range(bootstrap):
                        pick = rng.integers(0, patients.size, patients.size)
                        got = _metrics(np.concatenate([by_patient[i] for i in pick]))
                        for key, v in got.items():
                            draws[key].append(v)
                    ci = {key: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
                          for key, v in draws.items()}
                p20 = [f.expected_20 for f in fs]
                in80 = [f.in_pi80 for f in fs]
                out.append(Summary(model, k, len(fs), m["median_pe"], m["mape"], m["rmse"], m["within_20"], strat,
                                   m["within_30"], int(patients.size), ci, period,
                                   _percent(p20), _percent(in80)))
    return out


@dataclass(frozen=True, slots=True)
class Comparison:
    """One model and strategy against the reference, on the same Bayesian forecasts (:func:`compare`). Each change
    is the other's mean less the reference's, over the paired forecasts, in points (:data:`PAIRED_METRICS`)."""

    model: str
    strategy: str
    reference: tuple[str, str]  # (model, strategy)
    n: int  # forecasts both made (the same patient and step)
    patients: int
    abs_error: float  # mean |PE| (negative: closer to the levels)
    abs_log: float  # mean |ln(predicted / observed)| x 100 (negative: closer)
    within_20: float  # share within ±20 % (positive: more within)
    #: 95 % bootstrap intervals by patient of each change (None without a bootstrap)
    ci: dict[str, tuple[float, float]] | None = None
    #: "better" or "worse" (the interval of |ln(pred/obs)| or of the share within ±20 % excludes no change, and the
    #: other's does not point the other way), "mixed" (both exclude it, in opposite directions), "no difference
    #: shown", "too few patients" (fewer than :data:`VERDICT_PATIENTS`), or "" without a bootstrap
    verdict: str = ""


#: the largest |ln(predicted / observed)| a paired comparison counts: a forecast 1,000 times too low or too high
#: (691 points). A forecast of 0 (a level before any dose the model sees, a lag not yet over) has an infinite log
#: error: uncapped, one such forecast makes every mean and interval infinite or undefined
LOG_ERROR_CAP = math.log(1000.0)

#: what a paired comparison measures of each forecast, from its PE (predicted / observed - 1), in points: |PE|;
#: |ln(predicted / observed)| x 100 (at most :data:`LOG_ERROR_CAP`), which weighs over- and under-prediction alike
#: (|PE| does not: a forecast of half the level costs 50, of twice the level 100, so |PE| favours forecasts that err
#: low); and 100 within ±20 %
PAIRED_METRICS: dict[str, Callable[[float], float]] = {
    "abs_error": lambda pe: abs(pe) * 100.0,
    "abs_log": lambda pe: min(abs(math.log1p(pe)) if pe > -1.0 else math.inf, LOG_ERROR_CAP) * 100.0,
    "within_20": lambda pe: 100.0 * (abs(pe) <= 0.2),
}

#: the fewest patients a verdict is given for: a bootstrap over fewer clusters gives intervals too narrow (with 2
#: patients every resample is one of 3 sets)
VERDICT_PATIENTS = 10


def paired_changes(pairs: Sequence[tuple[Forecast, Forecast]], metrics: Sequence[str], *, bootstrap: int = 0,
                   rng: np.random.Generator | None = None
                   ) -> tuple[dict[str, float], dict[str, tuple[float, float]] | None, int]:
    """``(reference, other)`` forecasts of the same levels: for each of ``metrics`` (:data:`PAIRED_METRICS`) the
    other's mean less the reference's over the pairs; with ``bootstrap`` > 0 and two patients or more, the 95 %
    percentile interval from that many resamples of the patients (each brings all its pairs: a patient's forecasts
    are correlated); and the number of patients."""
    ids = np.array([a.id for a, _ in pairs])
    patients, which = np.unique(ids, return_inverse=True)
    n_of = np.bincount(which, minlength=patients.size).astype(np.float64)
    sums = np.stack([np.bincount(which, weights=np.array([PAIRED_METRICS[k](b.error) - PAIRED_METRICS[k](a.error)
                                                          for a, b in pairs]), minlength=patients.size)
                     for k in metrics])
    est = {k: float(v) for k, v in zip(metrics, sums.sum(axis=1) / n_of.sum(), strict=True)}
    if bootstrap <= 0 or patients.size < 2:
        return est, None, int(patients.size)
    rng = rng if rng is not None else np.random.default_rng(0)
    pick = rng.integers(0, patients.size, (bootstrap, patients.size))
    draws = sums[:, pick].sum(axis=2) / n_of[pick].sum(axis=1)[None]
    lo, hi = np.percentile(draws, 2.5, axis=1), np.percentile(draws, 97.5, axis=1)
    return est, {k: (float(lo[j]), float(hi[j])) for j, k in enumerate(metrics)}, int(patients.size)


def compare(forecasts: Sequence[Forecast], *, reference: tuple[str, str] | None = None, bootstrap: int = 0,
            seed: int = 0) -> list[Comparison]:
    """Every other model and strategy against ``reference`` ((model, strategy); default: the first forecast's),
    paired on the Bayesian forecasts (k >= 1) both made for the same patient and step (:func:`paired_changes` of
    every metric of :data:`PAIRED_METRICS`), with a verdict.

    Paired differences on the same levels are far more precise than comparing each side's own interval (the
    levels' own variability cancels): the way to tell whether a strategy or a model forecasts a centre's patients
    better than its reference. The verdicts are per comparison: with many strategies, one may pass by chance (at
    95 %, about one in twenty where nothing differs).
    """
    bayes = [f for f in forecasts if f.step > 0]
    if not bayes:
        return []
    ref = reference if reference is not None else (bayes[0].model, bayes[0].strategy)
    base = {(f.id, f.step): f for f in bayes if (f.model, f.strategy) == ref}
    if not base:
        raise InputError(f"no Bayesian forecast of the reference {ref[0]} {ref[1]} to compare with")
    rng = np.random.default_rng(seed)
    out: list[Comparison] = []
    for model, strat in dict.fromkeys((f.model, f.strategy) for f in bayes if (f.model, f.strategy) != ref):
        pairs = [(base[f.id, f.step], f) for f in bayes
                 if f.model == model and f.strategy == strat and (f.id, f.step) in base]
        if not pairs:
            continue
        est, ci, n_patients = paired_changes(pairs, tuple(PAIRED_METRICS), bootstrap=bootstrap, rng=rng)
        verdict = ""
        if ci is not None:
            # +1: shown better, -1: shown worse, 0: not shown (|ln| lower is better, the share higher)
            signs = (int(ci["abs_log"][1] < 0) - int(ci["abs_log"][0] > 0),
                     int(ci["within_20"][0] > 0) - int(ci["within_20"][1] < 0))
            verdict = ("too few patients" if n_patients < VERDICT_PATIENTS else "mixed" if -1 in signs and 1 in
                       signs else "better" if 1 in signs else "worse" if -1 in signs else "no difference shown")
        out.append(Comparison(model, strat, ref, len(pairs), n_patients, est["abs_error"], est["abs_log"],
                              est["within_20"], ci, verdict))
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


def plot_by_time_svg(forecasts: Sequence[Forecast], *, width: int = 560, height: int = 360) -> str:
    """Bias by time since transplantation as SVG: for each model and strategy, the median prediction error of
    its Bayesian forecasts in each period of :data:`PERIODS` (points joined by a line, the interquartile range as
    a whisker, the count below), a priori forecasts as hollow points, the ±20 % band dashed. Periods without
    a forecast are left out; errors beyond -60/+60 % are drawn at the edge."""
    import html

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    labelled = [(f, _period(f.day)) for f in forecasts]
    periods = [p for p in (_period(lo) for lo, _ in PERIODS) if p is not None and any(x == p for _, x in labelled)]
    series = list(dict.fromkeys((f.model, f.strategy) for f in forecasts))
    pad_l, pad_r, pad_t, pad_b = 56, 16, 24 + 13 * len(series), 44
    plot_w, plot_h = width - pad_l - pad_r, max(height - pad_t - pad_b, 120)
    height = plot_h + pad_t + pad_b
    lim = 60.0

    def y_of(pe: float) -> float:
        return pad_t + (lim - float(np.clip(pe, -lim, lim))) / (2 * lim) * plot_h

    def x_of(k: int, j: float) -> float:
        step = plot_w / max(len(periods), 1)
        return pad_l + step * (k + 0.5) + (j - (len(series) - 1) / 2) * min(10.0, step / (2 * len(series) + 1))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for pe, dash in ((0.0, ""), (20.0, ' stroke-dasharray="4 3"'), (-20.0, ' stroke-dasharray="4 3"')):
        parts.append(f'<line x1="{pad_l}" y1="{y_of(pe):.1f}" x2="{width - pad_r}" y2="{y_of(pe):.1f}" '
                     f'stroke="#888"{dash}/>')
    for pe in (-60, -40, -20, 0, 20, 40, 60):
        parts.append(f'<text x="{pad_l - 6}" y="{y_of(pe) + 4:.1f}" text-anchor="end">{pe:+d}</text>')
    for k, p in enumerate(periods):
        parts.append(f'<text x="{x_of(k, (len(series) - 1) / 2):.1f}" y="{pad_t + plot_h + 16}" '
                     f'text-anchor="middle">{html.escape(p[5:])}</text>')
    for j, (model, strat) in enumerate(series):
        c = colours[j % len(colours)]
        points = []
        for k, p in enumerate(periods):
            bayes = np.array([f.error for f, x in labelled if x == p and f.model == model and f.strategy == strat
                              and f.step > 0]) * 100.0
            prior = np.array([f.error for f, x in labelled if x == p and f.model == model and f.strategy == strat
                              and f.step == 0]) * 100.0
            x = x_of(k, j)
            if bayes.size:
                q1, med, q3 = np.percentile(bayes, [25, 50, 75])
                points.append((x, y_of(med)))
                parts.append(f'<line x1="{x:.1f}" y1="{y_of(q1):.1f}" x2="{x:.1f}" y2="{y_of(q3):.1f}" stroke="{c}"/>')
                parts.append(f'<circle cx="{x:.1f}" cy="{y_of(med):.1f}" r="3.5" fill="{c}"><title>'
                             f'{html.escape(model)} {html.escape(strat)}, {html.escape(p)}: median PE {med:+.1f} %, '
                             f'n {bayes.size}</title></circle>')
                if j == 0:
                    parts.append(f'<text x="{x:.1f}" y="{pad_t + plot_h + 30}" text-anchor="middle" '
                                 f'font-size="9" fill="{c}">{bayes.size}</text>')
            if prior.size:
                med0 = float(np.median(prior))
                parts.append(f'<circle cx="{x:.1f}" cy="{y_of(med0):.1f}" r="3.5" fill="none" stroke="{c}"><title>'
                             f'{html.escape(model)}, {html.escape(p)}: a priori median PE {med0:+.1f} %, '
                             f'n {prior.size}</title></circle>')
        if len(points) > 1:
            parts.append('<polyline fill="none" stroke="' + c + '" points="' +
                         " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
        parts.append(f'<text x="{pad_l}" y="{16 + 13 * j}" fill="{c}">{html.escape(model)} ({html.escape(strat)})'
                     "</text>")
    parts.append(f'<text x="{pad_l + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle">days since '
                 "transplantation (count of Bayesian forecasts of the first series below)</text>")
    parts.append(f'<text x="14" y="{pad_t + plot_h / 2:.0f}" transform="rotate(-90 14 {pad_t + plot_h / 2:.0f})" '
                 'text-anchor="middle">median prediction error, % (IQR)</text>')
    parts.append("</svg>")
    return "\n".join(parts)
