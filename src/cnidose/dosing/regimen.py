"""A-posteriori regimen recommendation: the dose, in marketed strengths, that puts a patient's
steady-state exposure in the target.

From the patient's fit (MAP, then posterior draws by :func:`cnidose.estimation.posterior.sample_posterior`)
every candidate dose (every sum of the product's strengths, up to ``max_units`` units per
administration) is simulated at steady state for every draw: the predicted metric's median and 80 %
interval, and the probability that the true level lies in the target. The choice rule is explicit
(``choice``, recorded in the inputs with the aim):

- ``"aim"`` (default, in the CLI, the API and the web app alike): among the candidates whose median lies in
  the target, the one whose median is closest to the aim -- the target's middle, or a value the clinician
  sets (``aim``) -- on the log scale; candidates within 2 % of the best distance count as equally close, and
  of those the one most likely in range is taken (then the smaller daily dose). A target is a range because
  both edges are to be avoided;
- ``"most-likely"``: among the candidates whose median lies in the target, the one most likely to be in
  it (ties: the smaller dose);
- ``"smallest"``: the smallest candidate whose median lies in the target, which aims at the low edge.

In cnidose's own virtual trial (``cnidose simulate-trial examples/trial_recommender.toml``: Andrews 2019,
100 patients, CPIC start doses, weekly recommender adjustment, 4-11 ng/mL; 2026-12-02) the share in range and
the median trough were, on day 14 and day 28: ``"aim"`` 68 % (4.56 ng/mL) and 91 % (5.82); ``"most-likely"``
60 % (4.24) and 86 % (5.22); ``"smallest"`` 28 % (3.49) and 43 % (3.88). That the median true trough stays
below the aim (7.5) even on day 28 is not yet explained (issue 15's forecasting work).

When no median is in the target, every rule gives the closest, with a warning. Predictions are for a
future dosing occasion: between-occasion effects are drawn from their prior.

Every recommendation carries its inputs, the model's identity (id, version, content hash), the package
version, the random seed and its warnings, so that it can be reproduced.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose import __version__
from cnidose.dosing.cpic import CPIC_SOURCE, MAX_MG_PER_KG_DAY
from cnidose.dosing.data import Product, Target, max_dose_mg
from cnidose.errors import InputError
from cnidose.estimation import fit_map
from cnidose.estimation.map import MapResult
from cnidose.estimation.posterior import Posterior, sample_posterior
from cnidose.models.model import EXPOSURE, Model
from cnidose.pk.events import Individual, split_individuals
from cnidose.pk.structure import LinearStructure

__all__ = ["CHOICES", "IMPLAUSIBLE_LEVEL", "Candidate", "Recommendation", "candidate_doses", "choose", "pick",
           "recommend", "regimen_text", "steady_state_metric_draws"]

CHOICES = ("aim", "most-likely", "smallest")
#: "aim": medians within this factor of the best distance to the aim count as equally close (2 %)
AIM_TIE = float(np.log(1.02))

FloatArray = NDArray[np.float64]

# Levels above these are flagged as implausible (likely a unit or sampling error), per drug.
IMPLAUSIBLE_LEVEL = {"tacrolimus": 100.0, "cyclosporine": 3000.0}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One regimen and its predicted steady-state exposure."""

    dose: float  # mg per administration
    units: dict[str, int]  # strength (mg, as text) -> units per administration
    interval: float  # h
    daily_dose: float
    median: float
    low: float  # 10th percentile
    high: float  # 90th percentile
    p_in_range: float
    in_target: bool


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The answer, with everything needed to reproduce it."""

    chosen: Candidate | None
    candidates: list[Candidate]
    target: Target
    product: str
    metric: str
    model: str  # id version sha256:...
    version: str  # cnidose version
    inputs: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    values: FloatArray | None = field(default=None, repr=False, compare=False)  # (candidates, draws)
    loading: Candidate | None = None  # a first dose that brings the next trough into the target

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "values"}
        d["target"] = asdict(self.target)
        return d

    def summary(self) -> str:
        if self.chosen is None:
            return "no recommendation"
        return (regimen_text(asdict(self.chosen), self.product, self.metric, asdict(self.target))
                + (f" (aimed at {self.inputs['aim']:g})" if self.inputs.get("choice") == "aim" else ""))


def regimen_text(candidate: Mapping[str, Any], product: str, metric: str, target: Mapping[str, Any]) -> str:
    """One candidate regimen in words, with its units and predictions (a :class:`Candidate` and a target as
    mappings, as they are stored): what a summary says and what a signature names.

    >>> print(regimen_text({"dose": 2.5, "interval": 12.0, "units": {"0.5": 1, "1": 2}, "median": 8.04, "low": 5.41,
    ...                     "high": 13.2, "p_in_range": 0.77}, "Prograf", "trough",
    ...                    {"unit": "ng/mL", "low": 4, "high": 11}))  # doctest: +NORMALIZE_WHITESPACE
    give 2.5 mg Prograf every 12 h (1 x 0.5 mg + 2 x 1 mg); predicted trough 8.04 ng/mL
    (80 % interval 5.41-13.2), 77% probability in 4-11
    """
    c = candidate
    units = " + ".join(f"{n} x {s} mg" for s, n in c["units"].items() if n)
    return (f"give {c['dose']:g} mg {product} every {c['interval']:g} h ({units}); predicted {metric} "
            f"{c['median']:.3g} {target['unit']} (80 % interval {c['low']:.3g}-{c['high']:.3g}), "
            f"{c['p_in_range']:.0%} probability in {target['low']:g}-{target['high']:g}")


def candidate_doses(strengths: tuple[float, ...], *, max_units: int = 6, max_dose: float = float("inf")
                    ) -> list[tuple[float, dict[str, int]]]:
    """Every dose that ``max_units`` or fewer units of the strengths make (fewest units per dose), sorted.

    >>> [d for d, _ in candidate_doses((0.5, 1.0, 5.0), max_units=2)][:5]
    [0.5, 1.0, 1.5, 2.0, 5.0]
    """
    best: dict[float, dict[str, int]] = {}
    s = sorted(strengths)
    for counts in itertools.product(range(max_units + 1), repeat=len(s)):
        n = sum(counts)
        if n == 0 or n > max_units:
            continue
        dose = round(sum(c * x for c, x in zip(counts, s, strict=True)), 6)
        if dose > max_dose:
            continue
        units = {f"{x:g}": c for x, c in zip(s, counts, strict=True) if c}
        if dose not in best or sum(best[dose].values()) > n:
            best[dose] = units
    return sorted(best.items())


def _covariates_now(individual: Individual) -> dict[str, float]:
    """The last value of every covariate column (the patient as now)."""
    out = {}
    for k, v in individual.covariates.items():
        if k in ("DV", "MDV", "BLQ", "LLOQ"):
            continue
        finite = v[np.isfinite(v)]
        if finite.size:
            out[k] = float(finite[-1])
    return out


def dose_linear(model: Model) -> bool:
    """Whether predictions are proportional to the doses: a linear structure (no saturable process) and no
    observation transform (e.g. Størset's saturable red-cell binding). Parameters never depend on the dose
    amount (model expressions see covariates and random effects, not AMT)."""
    return isinstance(model.structure, LinearStructure) and all(o.transform is None for o in model.observations)


def steady_state_metric_draws(model: Model, covariates: dict[str, float], doses: FloatArray, interval: float,
                              metric: str, eta: FloatArray, kappa: FloatArray | None = None,
                              start: float = 0.0) -> FloatArray:
    """Steady-state ``metric`` for each dose and each draw: (n_doses, n_draws).

    One SS=1 dose at ``start`` (the regimen at steady state), observed over the following interval.
    """
    if metric == "trough":
        times = np.array([interval])
    elif metric == "c2":
        times = np.array([2.0])
    else:
        times = np.linspace(0.0, interval, 97)
    n_d, n_e = doses.size, eta.shape[0]
    out = np.empty((n_d, n_e))
    if dose_linear(model) and n_d > 1:  # superposition: every dose is a multiple of the 1-mg prediction
        unit = steady_state_metric_draws(model, covariates, np.ones(1), interval, metric, eta, kappa, start)
        return np.asarray(doses, dtype=np.float64)[:, None] * unit
    for i, dose in enumerate(doses):
        ind = model.individual_from_covariates(covariates, start + times, dose=float(dose), tau=interval,
                                               steady_state=True)
        if start:
            ind = _shift(ind, start)
        sim = model.simulate(ind, eta, kappas=kappa)
        c = sim.prediction[:, 1:]
        if metric in ("trough", "c2"):
            out[i] = c[:, 0]
        else:
            from scipy.integrate import simpson

            auc = simpson(c, x=times, axis=1)
            out[i] = auc if metric == "auc" else auc / interval
    return out


def _shift(ind: Individual, start: float) -> Individual:
    cols: dict[str, Any] = {"ID": np.full(len(ind), ind.id), "TIME": ind.time, "EVID": ind.evid, "AMT": ind.amt,
                            "CMT": ind.cmt, "II": ind.ii, "SS": ind.ss, "RATE": ind.rate, "ADDL": ind.addl}
    cols["TIME"] = np.concatenate([[start], ind.time[1:]])
    cols.update(ind.covariates)
    return split_individuals(cols)[0]


def recommend(model: Model, individual: Individual, target: Target, product: Product, *,
              interval: float | None = None, metric: str | None = None, n_draws: int = 1000, seed: int = 0,
              max_units: int = 6, max_dose: float | None = None, intervals: list[float] | None = None,
              loading: bool = False, choice: str = "aim", aim: float | None = None, fit: MapResult | None = None,
              posterior: Posterior | None = None, occasion: str = "prior") -> Recommendation:
    """Recommend a regimen for ``individual`` (its doses and levels so far) from ``model``.

    ``choice`` is the rule (module docstring) and ``aim`` the level it aims at (default: the target's middle;
    it must lie in the target). ``fit`` is the patient's MAP fit when the caller already has
    it (it must be of ``model`` and ``individual``), and ``posterior`` its posterior sample (of ``n_draws`` draws
    with ``seed``: what this function would draw). ``intervals`` lists alternative dosing intervals to compare
    (the recommendation is then the choice, by the same rule, over all of them; of equals the smaller daily
    dose, then the product's own interval). ``loading`` also proposes a first
    dose, given from the last record on top of the current state, whose predicted level one interval later
    is in the target (by the same rule). ``occasion`` (models with between-occasion variability): "prior", the
    coming occasions' effects drawn from their prior (a new occasion); "last", each posterior draw's effect of
    the last occasion with a level carried forward (:mod:`cnidose.dosing.strategies`, ``occ-last``).

    Raises InputError on inconsistent input (another drug's product or target, a non-positive interval,
    no dose in the history); everything else clinical is reported as a warning on the result.
    """
    drug = model.meta.get("drug", "")
    if product.drug != drug:
        raise InputError(f"{product.name} is {product.drug}; model {model.id} is a {drug or 'non-drug'} model")
    if target.drug and target.drug != drug:
        raise InputError(f"the target is for {target.drug}; model {model.id} is a {drug} model")
    tau = product.interval if interval is None else float(interval)
    if not tau > 0:
        raise InputError(f"the dosing interval must be positive, got {tau:g} h")
    aim = _aim(choice, aim, target)
    if occasion not in ("prior", "last"):
        raise InputError(f"occasion is prior or last, got {occasion!r}")
    met = metric or target.metric
    if met != target.metric:
        raise InputError(f"the target is a {target.metric} range; asked to optimise {met}")
    if not np.any((individual.evid == 1) | (individual.evid == 4)):
        raise InputError(f"ID {individual.id:g}: the dose history has no dose; a recommendation needs at least one")
    warnings: list[str] = []
    if fit is None:
        fit = fit_map(model, [individual])[0]
    if fit.status == "error":
        raise InputError(f"ID {individual.id:g}: {fit.message}")
    if fit.status == "not-converged":
        warnings.append(f"the fit did not converge: {fit.message}")
    if fit.status == "prior-only":
        warnings.append("no levels in the data: this is an a-priori (population) recommendation")
    warnings += [str(n) for n in fit.notices]
    dv = individual.covariates.get("DV")
    if dv is not None:
        obs = dv[(individual.evid == 0) & (individual.mdv == 0)]
        limit = IMPLAUSIBLE_LEVEL.get(drug)
        if limit is not None and np.any(obs > limit):
            warnings.append(f"a level above {limit:g} {target.unit} is implausible for {drug}: check the unit and "
                            "whether it was drawn from the infusion line")
    post = posterior or sample_posterior(model, individual, n_draws=n_draws, seed=seed, map_result=fit)
    if post.method == "mcmc":
        warnings.append(f"the posterior was sampled by MCMC (SIR degenerated); effective sample size {post.ess:.0f}")
    eta = post.eta
    kappa = None
    if model.iov is not None:
        nk = len(model.iov)
        observed = np.flatnonzero((individual.evid == 0) & (individual.mdv == 0))
        if occasion == "last" and observed.size and post.n_occasions:
            last = int(model.prepare(individual).occasion[observed[-1]])
            seen = post.draws[:, len(model.iiv):].reshape(eta.shape[0], post.n_occasions, nk)
            kappa = seen[:, last: last + 1, :]
        else:
            rng = np.random.default_rng(seed + 1)
            kappa = (rng.standard_normal((eta.shape[0], 1, nk)) @ np.linalg.cholesky(
                model.iov.omega + 1e-300 * np.eye(nk)).T)
    limit_dose = max_dose if max_dose is not None else max_dose_mg(drug)
    cands = candidate_doses(product.strengths, max_units=max_units, max_dose=limit_dose)
    if not cands:
        raise InputError(f"no dose of {product.name} is possible with the limits given")
    doses = np.array([d for d, _ in cands])
    covs = _covariates_now(individual)
    if covs.get(EXPOSURE, 1.0) != 1.0:
        warnings.append(f"an interaction multiplies exposure by {covs[EXPOSURE]:g} at the last record (CL/F divided "
                        "by it); the regimen assumes it goes on: re-assess when the interacting drug stops")
    values = steady_state_metric_draws(model, covs, doses, tau, met, eta, kappa)
    chosen, candidates, more = choose(cands, values, target, tau, choice, aim)
    inside = [c for c in candidates if c.in_target]
    for other in intervals or []:
        if not other > 0:
            raise InputError(f"the dosing interval must be positive, got {other:g} h")
        if other == tau:
            continue
        _, cand2, _ = choose(cands, steady_state_metric_draws(model, covs, doses, other, met, eta, kappa),
                             target, other, choice, aim)
        candidates += cand2
        inside += [c for c in cand2 if c.in_target]
    if inside:
        chosen, more = pick(inside, choice, aim), []
    warnings += [w.replace("no candidate dose", f"no dose of {product.name} up to {limit_dose:g} mg") for w in more]
    assert chosen is not None
    load = _loading(post, individual, cands, chosen.interval, target, seed, choice, aim) if loading else None
    weight = covs.get("WT")
    if weight and drug == "tacrolimus" and chosen.daily_dose / weight > MAX_MG_PER_KG_DAY:
        warnings.append(f"{chosen.daily_dose / weight:.2f} mg/kg/day exceeds {MAX_MG_PER_KG_DAY:g} mg/kg/day "
                        f"(CPIC ceiling for starting doses; {CPIC_SOURCE})")
    records = np.column_stack([individual.time, individual.evid, individual.amt, individual.cmt,
                               individual.covariates.get("DV", np.full(len(individual), np.nan))])
    inputs = {
        "id": float(individual.id), "records_sha256": hashlib.sha256(records.tobytes()).hexdigest(),
        "n_records": len(individual), "covariates_now": covs, "interval": tau, "metric": met,
        "product": product.name, "strengths": list(product.strengths), "product_source": product.source,
        "max_units": max_units, "max_dose": limit_dose, "n_draws": n_draws, "seed": seed,
        "fit_status": fit.status, "eta_map": [float(x) for x in fit.eta], "derivatives": fit.derivatives,
        "posterior_method": post.method,
        "posterior_ess": post.ess, "choice": choice, "aim": aim, "occasion": occasion,
        "fitting": {"log_scale": model.fitting.log_scale, "half_life_h": model.fitting.half_life,
                    "drift_per_week": model.fitting.drift},
    }
    return Recommendation(chosen, candidates, target, product.name, met, model.ref, __version__, inputs, warnings,
                          values, load)


def _aim(choice: str, aim: float | None, target: Target) -> float:
    """The level the choice aims at: ``aim``, else the target's middle; refused outside the target."""
    if choice not in CHOICES:
        raise InputError(f"unknown choice rule {choice!r} (known: {', '.join(CHOICES)})")
    value = (target.low + target.high) / 2 if aim is None else float(aim)
    if not target.low <= value <= target.high:
        raise InputError(f"the aim {value:g} {target.unit} is outside the target {target.low:g}-{target.high:g}")
    return value


def pick(inside: list[Candidate], choice: str, aim: float) -> Candidate:
    """The rule's choice among candidates whose median is in the target (module docstring); of equals the
    smaller daily dose, then the earlier candidate."""
    if choice == "smallest":
        return min(inside, key=lambda c: c.daily_dose)
    if choice == "most-likely":
        return min(inside, key=lambda c: (-c.p_in_range, c.daily_dose))
    dist = [abs(np.log(c.median / aim)) if c.median > 0 else np.inf for c in inside]
    best = min(dist)
    close = [c for c, d in zip(inside, dist, strict=True) if d <= best + AIM_TIE]
    return min(close, key=lambda c: (-c.p_in_range, c.daily_dose))


def _loading(post: Any, individual: Individual, cands: list[tuple[float, dict[str, int]]], tau: float,
             target: Target, seed: int, choice: str = "aim", aim: float | None = None) -> Candidate | None:
    """The first dose, given at the last record time on top of the current state, whose predicted level one
    interval later has its median in the target, chosen by the same rule (``pick``)."""
    aim = _aim(choice, aim, target)
    t0 = float(individual.time[-1])
    occ = post.model.iov.occasion if post.model.iov is not None else None
    tail: dict[str, list[float]] = {"ID": [individual.id] * 2, "TIME": [t0, t0 + tau], "EVID": [1, 2],
                                    "AMT": [0.0, 0.0], "RATE": [0.0, 0.0], "II": [0.0, 0.0], "ADDL": [0, 0],
                                    "SS": [0, 0], "CMT": [0, 0], "MDV": [1, 1]}
    # additional doses (ADDL) scheduled at or after the decision time are not assumed given
    ii = np.where(individual.ii > 0, individual.ii, 1.0)
    given = np.ceil((t0 - individual.time) / ii) - 1
    addl = np.where(individual.ii > 0, np.clip(np.minimum(individual.addl, given), 0, None), individual.addl)
    head: dict[str, Any] = {"ID": np.full(len(individual), individual.id), "TIME": individual.time,
                            "EVID": individual.evid, "AMT": individual.amt, "RATE": individual.rate,
                            "II": individual.ii, "ADDL": addl, "SS": individual.ss,
                            "CMT": individual.cmt, "MDV": individual.mdv}
    for k, v in individual.covariates.items():
        finite = v[np.isfinite(v)]
        last = (float(np.max(finite)) + 1.0 if k == occ else float(finite[-1])) if finite.size else np.nan
        head[k] = v
        tail[k] = [last, last]
    inside: list[Candidate] = []
    for dose, units in cands:
        tail["AMT"] = [dose, 0.0]
        cols = {k: np.concatenate([np.asarray(head[k], dtype=np.float64), np.asarray(tail[k], dtype=np.float64)])
                for k in head}
        ind = split_individuals(cols)[0]
        level = post.predict(ind, seed=seed)[:, -1]
        med = float(np.median(level))
        if med > target.high:
            break  # the level rises with the dose: no larger dose has its median in the target
        if target.low <= med:
            lo, hi = np.percentile(level, [10, 90])
            p_in = float(np.mean((level >= target.low) & (level <= target.high)))
            inside.append(Candidate(dose, units, tau, dose, med, float(lo), float(hi), p_in, True))
            if choice == "smallest":
                break
    return pick(inside, choice, aim) if inside else None


def choose(cands: list[tuple[float, dict[str, int]]], values: FloatArray, target: Target, tau: float,
           choice: str = "aim", aim: float | None = None) -> tuple[Candidate | None, list[Candidate], list[str]]:
    """Summaries of every candidate and the choice among those whose median is in the target by the rule
    (``pick``); when there is none, the closest median, with a warning."""
    aim = _aim(choice, aim, target)
    med = np.median(values, axis=1)
    lo, hi = np.percentile(values, [10, 90], axis=1)
    p_in = np.mean((values >= target.low) & (values <= target.high), axis=1)
    per_day = 24.0 / tau
    candidates = [Candidate(float(d), u, tau, float(d * per_day), float(m), float(a), float(b), float(p),
                            bool(target.low <= m <= target.high))
                  for (d, u), m, a, b, p in zip(cands, med, lo, hi, p_in, strict=True)]
    warnings: list[str] = []
    inside = [c for c in candidates if c.in_target]
    chosen = pick(inside, choice, aim) if inside else None
    if chosen is None and candidates:
        dist = [min(abs(np.log(c.median / target.low)), abs(np.log(c.median / target.high))) if c.median > 0
                else np.inf for c in candidates]
        chosen = candidates[int(np.argmin(dist))]
        warnings.append(f"no candidate dose puts the predicted median {target.metric} in "
                        f"{target.low:g}-{target.high:g}; the closest is shown")
    return chosen, candidates, warnings
