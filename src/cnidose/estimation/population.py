"""Adapting a published model to a centre's patients: typical values (and optionally Omega) re-estimated on the
centre's data with the published estimates as the prior.

The method is the iterative two-stage Bayesian algorithm (ITS; Prevost 1977, Steimer et al. 1984; the
population method of ADAPT 5, D'Argenio et al. 2009) with a normal prior on the log typical values and an
inverse-Wishart prior on Omega, the roles of NONMEM's ``$PRIOR NWPRI`` (Gisleskog et al. 2002). Each iteration:

* E-step (:func:`conditional_moments`): each patient's MAP fit under the current values centres an
  importance-sampling proposal; the weighted draws give the conditional mean ``E[eta_i]`` and covariance
  ``C_i`` of the random effects, and the patient's marginal likelihood (NONMEM's IMP does the same). The mode
  alone is not enough: where the levels say little and the model is nonlinear in an effect, an update on
  modes drifts (a volume fell to half its true value on troughs alone).
* M-step, typical values (``delta``, the log ratios to the published values, T the adapted effects): a
  Fisher-scoring step on the marginal posterior, gradient ``(A sum E[eta_i])_T - delta_T / s^2`` (Fisher's
  identity) over the information ``sum_i (A - A C_i A)_TT + I / s^2`` (Louis), ``A = Omega^-1``; a step that
  makes the penalised objective worse is halved. (The plain EM step divides by ``N A`` and crawls where the
  levels say little about an effect.)
* M-step, Omega (``omega=True``): ``omega_k^2 = (nu omega0_k^2 + sum_i ((delta_k + E[eta_ik] - delta'_k)^2
  + C_i,kk)) / (nu + N)`` (EM; correlations kept). Residual error (``residual=True``): one factor ``r`` on
  every residual SD, ``r^2 = (nu_r + r^2 sum_i E[z_i^2]) / (nu_r + n)`` with ``z`` the standardised
  residuals of the levels (EM with an inverse-gamma prior worth ``residual_df`` levels at the published
  error).

A random effect is adapted through the one typical value it multiplies: the parameter ``P`` for which
scaling ``P`` by a factor is exactly the same model as shifting the effect by the log of that factor, for
every record of the data (``P * ... * exp(ETA)``). A random effect with no such parameter keeps its
typical value, and the result says so. Covariate effects and parameters without between-subject variability
stay as published; the residual error too unless ``residual=True`` (one EM-estimated factor on every residual
SD parameter).

The standard error of each adapted log typical value is from that information, so a patient with little
information adds little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from math import lgamma, log, pi
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import CnidoseError, DataError
from cnidose.estimation.cohort import build_groups
from cnidose.estimation.map import MapResult, _ofv, fit_map
from cnidose.estimation.observations import scaled_prediction_and_variance
from cnidose.estimation.posterior import mr_theta
from cnidose.models.model import Model
from cnidose.pk.events import Individual

__all__ = [
    "Adaptation",
    "AdaptedValue",
    "Moments",
    "adapt",
    "adapted",
    "conditional_moments",
    "laplace_criterion",
    "typical_values",
]

FloatArray = NDArray[np.float64]
Fitter = Callable[[Model, Sequence[Individual]], list[MapResult]]
#: objective differences below this (-2 ln L units, summed over patients) are the MAP optimiser's noise
_NOISE = 0.05


@dataclass(frozen=True, slots=True)
class AdaptedValue:
    """One typical value: the published value, the centre's estimate and its standard error (log scale)."""

    parameter: str
    effect: str  # the random effect it carries
    published: float
    estimate: float
    se_log: float  # standard error of ln(estimate)
    unit: str = ""

    @property
    def ratio(self) -> float:
        return self.estimate / self.published


@dataclass(frozen=True, slots=True)
class Adaptation:
    """The result of :func:`adapt`: what was re-estimated, from what, and how the fit went."""

    parent: str  # the parent model's ref (id version sha256)
    values: tuple[AdaptedValue, ...]
    effects: tuple[str, ...]  # the model's random-effect names (Omega's order)
    omega_published: FloatArray
    omega: FloatArray
    omega_adapted: bool
    prior_sd: float
    omega_df: float
    iterations: int
    converged: bool
    n_subjects: int
    n_observations: int
    objective: float  # -2 ln L of the centre's levels (Laplace, summed over patients) at the estimate
    objective_published: float  # the same under the published model
    history: tuple[tuple[float, ...], ...] = ()  # per iteration: objective, then each delta
    not_adapted: tuple[str, ...] = ()  # random effects whose typical value could not be identified, and why
    excluded: tuple[str, ...] = ()  # patients left out of the fit, and why
    warnings: tuple[str, ...] = field(default_factory=tuple)


def laplace_criterion(model: Model, result: MapResult) -> float:
    """``-2 ln`` of a patient's marginal likelihood under ``model`` by the Laplace approximation,
    ``OFV(eta_hat) + ln|Omega| - ln|Sigma_post|`` (over every estimated effect, the between-occasion ones too)
    plus the Jacobian ``2 ln y`` of levels fitted on the log
    scale, so that fits on different scales compare. NaN without a fit.

    It is also the patient's own past forecasting performance: the marginal likelihood of levels 1..k is the
    product of the one-step-ahead predictive densities of each level given the levels before it (Dawid's
    prequential principle).
    """
    if result.status in ("error", "prior-only") or result.covariance is None:
        return float("nan")
    if np.isfinite(result.prior_logdet):
        logdet_omega = result.prior_logdet
    else:
        _, logdet_omega = np.linalg.slogdet(prior_covariance(model, result.names))
    _, logdet_post = np.linalg.slogdet(result.covariance)
    return float(result.ofv + logdet_omega - logdet_post + 2.0 * result.log_levels)


def prior_covariance(model: Model, names: Sequence[str]) -> FloatArray:
    """The prior covariance of the estimated effects ``names`` (a fit's order): Omega for the between-subject
    effects, the between-occasion block for each occasion's ``<KAPPA>_OCC<k>``, independent across blocks."""
    iiv = {n: k for k, n in enumerate(model.iiv.names)}
    iov = {n: k for k, n in enumerate(model.iov.names)} if model.iov is not None else {}
    where: list[tuple[str, int, int]] = []  # (block, occasion, index)
    for n in names:
        if n in iiv:
            where.append(("iiv", 0, iiv[n]))
            continue
        base, _, occ = n.rpartition("_OCC")
        if base not in iov or not occ.isdigit():
            raise ValueError(f"{n} is not a random effect of model {model.id}")
        where.append(("iov", int(occ), iov[base]))
    out = np.zeros((len(names), len(names)))
    for a, (ba, oa, ia) in enumerate(where):
        for b, (bb, ob, ib) in enumerate(where):
            if ba == bb == "iiv":
                out[a, b] = model.iiv.omega[ia, ib]
            elif ba == bb == "iov" and oa == ob:
                assert model.iov is not None
                out[a, b] = model.iov.omega[ia, ib]
    return out


def _scaled(model: Model, name: str, factor: float) -> Model:
    params = dict(model.parameters)
    params[name] = replace(params[name], value=params[name].value * factor)
    return replace(model, parameters=params)


def typical_values(model: Model, individuals: Sequence[Individual]) -> tuple[dict[str, str], dict[str, str]]:
    """For each random effect with a variance, the parameter that is its typical value (``P * ... * exp(ETA)``),
    found by checking on the individuals' own records (and with each binary covariate flipped) that scaling ``P``
    and shifting the effect give the same model. Returns (effect -> parameter, effect -> why none)."""
    preps = []
    first_error = ""
    for ind in individuals[:25]:
        try:
            preps.append(model.prepare(ind))
        except DataError as exc:
            first_error = first_error or f"ID {ind.id:g}: {exc}"
            continue
    if not preps:
        raise CnidoseError(f"no individual of the data can be bound to model {model.id} (the first: "
                           f"{first_error})")
    # a binary covariate flipped as well (a formulation, a genotype): a factor applied only to one group
    # (``PROGRAF_KTR if PROGRAF == 1 else 1``) is no typical value even where the data hold one group alone
    flipped = []
    for prep in preps[:3]:
        for name, v in prep.covariates.items():
            if v.size and np.all(np.isin(v, (0.0, 1.0))):
                flipped.append(replace(prep, covariates={**prep.covariates, name: 1.0 - v}))
    preps += flipped
    elsewhere: set[str] = set()  # parameters the residual error or a transform reads: never a typical value
    for ob in model.observations:
        for ex in (ob.transform, *((ob.error.proportional, ob.error.additive, ob.error.exponential)
                                   if ob.error else ())):
            if ex is not None:
                elsewhere |= ex.names
    rng = np.random.default_rng(7)
    n = len(model.eta_names)
    factor = 1.25
    found: dict[str, str] = {}
    missing: dict[str, str] = {}
    variances = np.diag(model.omega)
    for k, eff in enumerate(model.eta_names):
        if variances[k] <= 0:
            continue
        matches = []
        for pname, par in model.parameters.items():
            if par.fixed or not (np.isfinite(par.value) and par.value > 0) or pname in elsewhere:
                continue
            scaled = _scaled(model, pname, factor)
            same = True
            changed = False
            for prep in preps:
                eta = rng.normal(0.0, 0.3, size=(2, n))
                shifted = eta.copy()
                shifted[:, k] += log(factor)
                a = scaled.individual_parameters(prep, eta)
                b = model.individual_parameters(prep, shifted)
                base = model.individual_parameters(prep, eta)
                for key in a:
                    if not np.allclose(a[key], b[key], rtol=1e-10, atol=0.0):
                        same = False
                        break
                    changed = changed or not np.allclose(a[key], base[key], rtol=1e-12, atol=0.0)
                if not same:
                    break
            if same and changed:
                matches.append(pname)
        if len(matches) == 1:
            found[eff] = matches[0]
        elif not matches:
            missing[eff] = "no parameter multiplies exp(" + eff + ") alone"
        else:
            missing[eff] = f"several parameters multiply exp({eff}) alike ({', '.join(matches)}): ambiguous"
    return found, missing


def adapt(model: Model, individuals: Sequence[Individual], *, prior_sd: float = 0.3, omega: bool = False,
          omega_df: float = 10.0, residual: bool = False, residual_df: float = 20.0, max_iter: int = 30,
          tol: float = 1e-3,
          fit: Fitter | None = None,
          n_draws: int = 500, seed: int = 0,
          progress: Callable[[int, float, float], None] | None = None) -> Adaptation:
    """Re-estimate ``model``'s typical values (and Omega with ``omega=True``) on ``individuals`` (module
    docstring).

    Parameters
    ----------
    prior_sd : float
        SD of the normal prior on each log typical value about the published one (0.3: about 30 %). Smaller
        keeps the published values; larger lets the centre's data decide alone.
    omega, omega_df : bool, float
        Adapt the variances of the random effects, with an inverse-Wishart prior worth ``omega_df`` patients
        centred on the published Omega.
    residual : bool
        Adapt the residual error by one common factor on its standard deviations (every parameter the error
        expressions read is multiplied by it; the EM update is the conditional mean of the squared standardised
        residuals of the levels, BLQ ones left out), with an inverse-gamma prior worth ``residual_df`` levels at
        the published error (with few levels and an occasion effect per level the two are barely told apart, and
        without a prior the residual SD collapses). A model whose error is written as numbers is refused.
    max_iter, tol :
        iterations; converged when no log typical value moves by more than ``tol`` (or the objective's
        predicted fall is below the optimiser's noise) and no variance by more than ``10 tol`` relative.
    n_draws, seed : int
        Importance-sampling draws per patient for the E-step (the conditional mean and covariance of the
        random effects; see :func:`conditional_moments`) and their seed.
    fit : callable(model, individuals) -> list of MapResult, optional
        The E-step's fitter (default :func:`cnidose.estimation.fit_map`; a parallel one for big data).
    progress : callable(iteration, objective, penalised objective), optional
    """
    if not (prior_sd > 0 and np.isfinite(prior_sd)):
        raise ValueError("prior_sd must be a positive number")
    if not (omega_df >= 0 and np.isfinite(omega_df)) or not (residual_df >= 0 and np.isfinite(residual_df)):
        raise ValueError("omega_df and residual_df must be non-negative numbers")
    # after the first iteration each patient's optimum is near the last one: the global search for distant
    # optima (wide priors) is not repeated; a poorer mode only makes the proposal poorer, the weights correct it
    first: list[bool] = [True]

    def default_fit(m: Model, group: Sequence[Individual]) -> list[MapResult]:
        out = fit_map(m, group, restarts=first[0])
        first[0] = False
        return out

    fitter: Fitter = fit or default_fit
    inds = list(individuals)
    names = model.eta_names
    omega0 = np.asarray(model.omega, dtype=np.float64)
    est = np.flatnonzero(np.diag(omega0) > 0)
    if est.size == 0:
        raise CnidoseError(f"model {model.id} has no between-subject random effects: nothing to adapt")
    found, missing = typical_values(model, inds)
    error_params = residual_parameters(model) if residual else ()
    targets = np.array([k for k in est if names[k] in found], dtype=np.int64)
    if targets.size == 0 and not omega:
        raise CnidoseError(f"no typical value of model {model.id} can be adapted: " +
                           "; ".join(f"{e}: {why}" for e, why in missing.items()))
    corr = omega0[np.ix_(est, est)] / np.sqrt(np.outer(np.diag(omega0)[est], np.diag(omega0)[est]))
    t_in_est = np.searchsorted(est, targets)
    delta = np.zeros(len(names))
    om = omega0.copy()
    history: list[tuple[float, ...]] = []
    converged = False
    published_objective = float("nan")
    log_r = 0.0  # log of the factor on the residual SDs
    # the last accepted point: penalised objective, delta, omega, objective, information, log_r
    best: tuple[float, FloatArray, FloatArray, float, FloatArray, float] | None = None
    n_resid = 0
    excluded: list[str] = []
    info = np.zeros((est.size, est.size))
    n_obs = N = it = 0
    halvings = 0
    for it in range(1, max_iter + 1):
        current = _with(model, found, delta, om, error_params, log_r)
        results = fitter(current, inds)
        A = np.linalg.inv(om[np.ix_(est, est)])
        moments = conditional_moments(current, inds, results, n_draws=n_draws, seed=seed)
        eta_l, cov_l, crit = [], [], []
        excluded = []
        n_obs = 0
        info = np.zeros((est.size, est.size))
        sq_resid, n_resid = 0.0, 0
        mc_var = 0.0
        for ind, r, mo in zip(inds, results, moments, strict=True):
            if mo is None:
                if r.status != "prior-only":
                    excluded.append(f"ID {ind.id:g}: {r.status}" + (f": {r.message}" if r.message else ""))
                continue
            c = mo.cov[np.ix_(est, est)]
            eta_l.append(mo.mean[est])
            cov_l.append(c)
            info += A - A @ c @ A
            crit.append(mo.minus2ll)
            sq_resid += mo.resid
            n_resid += mo.n_resid
            mc_var += mo.mc_var
            n_obs += r.n_observations - r.n_blq
        if not eta_l:
            raise CnidoseError("no patient could be fitted: " + "; ".join(excluded[:5]))
        eta_hat, cov = np.array(eta_l), np.array(cov_l)
        N = eta_hat.shape[0]
        objective = float(np.sum(crit))
        penalised = objective + float(np.sum(delta[targets] ** 2)) / prior_sd**2
        if it == 1:
            published_objective = objective
        history.append((objective, *(float(delta[k]) for k in targets)))
        if progress is not None:
            progress(it, objective, penalised)
        if best is not None and penalised > best[0] + _NOISE:
            if halvings >= 4:
                # four halvings of the step found nothing better: the best point is the optimum to within the
                # objective's noise (the optimiser's, and the draws': see Moments.mc_var)
                converged = True
                break
            # worse than the last accepted point: halve the step (the scoring step overshot)
            halvings += 1
            delta = 0.5 * (delta + best[1])
            om = 0.5 * (om + best[2])
            log_r = 0.5 * (log_r + best[5])
            if np.max(np.abs(delta - best[1])) < tol and np.max(np.abs(np.diag(om)[est] / np.diag(best[2])[est]
                                                                       - 1.0)) < 10 * tol and \
                    abs(log_r - best[5]) < tol:
                converged = True  # no step from the best point improves it beyond the optimiser's noise
                break
            continue
        halvings = 0
        best = (penalised, delta.copy(), om.copy(), objective, info.copy(), log_r)
        new_delta = delta.copy()
        decrement = 0.0
        if targets.size:
            # Fisher scoring on the marginal posterior: the gradient is A sum(eta_hat) (Fisher's identity at the
            # Laplace mode) less the prior's; the information is sum(A - A C_i A) + S^-1. (The plain EM step
            # divides by N A instead and crawls when the levels say little about an effect.)
            grad = (A @ eta_hat.sum(axis=0))[t_in_est] - delta[targets] / prior_sd**2
            hess = info[np.ix_(t_in_est, t_in_est)] + np.eye(targets.size) / prior_sd**2
            move = np.linalg.solve(hess, grad)
            decrement = float(grad @ move)  # the objective's predicted fall (-2 ln units) by the full step
            new_delta[targets] = delta[targets] + np.clip(move, -1.0, 1.0)  # at most e-fold per iteration
        new_om = om.copy()
        if omega:
            dev = delta[est] + eta_hat - new_delta[est]
            var = (omega_df * np.diag(omega0)[est] + np.sum(dev**2, axis=0) +
                   np.einsum("nkk->k", cov)) / (omega_df + N)
            sd = np.sqrt(var)
            new_om[np.ix_(est, est)] = corr * np.outer(sd, sd)
        new_log_r = log_r
        if error_params and n_resid:
            # EM for a common variance factor, the prior worth residual_df levels at r = 1
            r2 = (residual_df + np.exp(2 * log_r) * sq_resid) / (residual_df + n_resid)
            new_log_r = 0.5 * float(np.log(max(r2, 1e-12)))
        step = float(np.max(np.abs(new_delta - delta))) if targets.size else 0.0
        rel = float(np.max(np.abs(np.diag(new_om)[est] / np.diag(om)[est] - 1.0)))
        if (step < tol or decrement < 2 * _NOISE) and rel < 10 * tol and abs(new_log_r - log_r) < tol:
            converged = True
            break
        delta, om, log_r = new_delta, new_om, new_log_r
    assert best is not None
    if not (converged and halvings == 0):
        # stopped on max_iter or by halving back to the best point: report the best point seen
        delta, om, objective, info, log_r = best[1], best[2], best[3], best[4], best[5]
    values = []
    if targets.size:
        i_tt = info[np.ix_(t_in_est, t_in_est)] + np.eye(targets.size) / prior_sd**2
        se = np.sqrt(np.diag(np.linalg.inv(i_tt)))
        for j, k in enumerate(targets):
            par = model.parameters[found[names[k]]]
            values.append(AdaptedValue(par.name, names[k], par.value, par.value * float(np.exp(delta[k])),
                                       float(se[j]), par.unit))
    for name in error_params:
        par = model.parameters[name]
        # the SD of a log variance estimated from n residuals is about sqrt(2 / n): of the log SD, sqrt(1 / 2n)
        values.append(AdaptedValue(name, "residual", par.value, par.value * float(np.exp(log_r)),
                                   float(np.sqrt(0.5 / max(n_resid + residual_df, 1.0))), par.unit))
    warnings = []
    if not converged:
        warnings.append(f"not converged in {max_iter} iterations (last change above {tol:g}); the estimates are "
                        "the best point reached")
    if N < 10:
        warnings.append(f"only {N} patients: the estimates lean on the prior")
    if excluded:
        warnings.append(f"{len(excluded)} patients left out (not fitted; see excluded)")
    return Adaptation(
        parent=model.ref, values=tuple(values), effects=names, omega_published=omega0, omega=om,
        omega_adapted=omega, prior_sd=prior_sd, omega_df=omega_df, iterations=it, converged=converged,
        n_subjects=N, n_observations=n_obs, objective=objective, objective_published=published_objective,
        history=tuple(history), not_adapted=tuple(f"{e}: {why}" for e, why in missing.items()),
        excluded=tuple(excluded), warnings=tuple(warnings))


def residual_parameters(model: Model) -> tuple[str, ...]:
    """The parameters the residual-error expressions read (all magnitudes: one factor scales every SD); refused
    where an error is written with numbers alone or a parameter is also read by the equations."""
    names: set[str] = set()
    pk_names: set[str] = set()
    for _, pk_expr in model.pk:
        pk_names |= pk_expr.names
    for ob in model.observations:
        if ob.error is None:
            continue
        for ex in (ob.error.proportional, ob.error.additive, ob.error.exponential):
            if ex is None:
                continue
            used = {n for n in ex.names if n in model.parameters}
            if not used:
                try:
                    zero = float(np.asarray(ex({})))
                except (KeyError, NameError, TypeError):
                    zero = float("nan")
                if zero == 0.0:  # e.g. additive = "0": nothing to scale
                    continue
                raise CnidoseError(f"the residual error of {ob.name} ({ex.source}) is written without parameters: "
                                   "it cannot be adapted")
            names |= used
    shared = sorted(names & pk_names)
    if shared:
        raise CnidoseError(f"{', '.join(shared)} are read by the residual error and by the equations: the residual "
                           "error cannot be adapted alone")
    if not names:
        raise CnidoseError(f"model {model.id} has no residual error to adapt")
    return tuple(n for n in model.parameters if n in names)


def _with(model: Model, found: dict[str, str], delta: FloatArray, omega: FloatArray,
          error_params: Sequence[str] = (), log_r: float = 0.0) -> Model:
    params = dict(model.parameters)
    for name in error_params:
        if log_r != 0.0:
            params[name] = replace(params[name], value=model.parameters[name].value * float(np.exp(log_r)))
    for k, eff in enumerate(model.eta_names):
        if eff in found and delta[k] != 0.0:
            p = params[found[eff]]
            params[p.name] = replace(p, value=model.parameters[p.name].value * float(np.exp(delta[k])))
    out = replace(model, parameters=params)
    if not np.array_equal(omega, model.omega):
        out = replace(out, iiv=replace(model.iiv, omega=omega.copy()))
    return out


def adapted(model: Model, adaptation: Adaptation) -> Model:
    """``model`` with the adaptation's typical values and Omega (in memory; see
    :func:`cnidose.models.fileformat.rewrite_model` for the file)."""
    params = dict(model.parameters)
    for v in adaptation.values:
        params[v.parameter] = replace(params[v.parameter], value=v.estimate)
    out = replace(model, parameters=params)
    if adaptation.omega_adapted:
        out = replace(out, iiv=replace(model.iiv, omega=np.asarray(adaptation.omega, dtype=np.float64).copy()))
    return out


@dataclass(frozen=True, slots=True)
class Moments:
    """A patient's conditional mean and covariance of the random effects given its levels, and ``-2 ln`` of
    its marginal likelihood, by importance sampling about its MAP estimate."""

    mean: FloatArray  # (n_eta,) between-subject effects, the model's order (zeros where not estimated)
    cov: FloatArray  # (n_eta, n_eta)
    minus2ll: float
    ess: float  # effective sample size of the weights
    sampled: bool  # False: too few effective draws, the Laplace values (mode, MAP covariance) are used
    resid: float = 0.0  # conditional mean of the sum of squared standardised residuals (levels not BLQ)
    n_resid: int = 0
    mc_var: float = 0.0  # Monte Carlo variance of minus2ll (delta method: 4 (1/ESS - 1/draws))


def conditional_moments(model: Model, individuals: Sequence[Individual], results: Sequence[MapResult], *,
                        n_draws: int = 500, seed: int = 0, df: float = 4.0, inflate: float = 1.5,
                        min_ess: float = 20.0) -> list[Moments | None]:
    """E-step of :func:`adapt`: for each converged MAP fit, draws from a multivariate t proposal (``df``
    degrees of freedom, the MAP covariance inflated by ``inflate``) weighted by ``p(y | eta) p(eta) / q(eta)``;
    the weighted mean and covariance of the between-subject effects (the between-occasion ones integrated
    out), and the marginal likelihood ``mean(w)`` (NONMEM's importance sampling, IMP, does the same). The
    mode is not the conditional mean where the levels say little and the model is nonlinear in the effect:
    an M-step on modes (the Laplace shortcut) drifts (a volume fell to half its true value on troughs
    alone). The draws of each patient are fixed by ``seed`` and the patient's position (common random
    numbers: successive iterations compare). None where the patient was not fitted."""
    out: list[Moments | None] = [None] * len(individuals)
    n_eta = len(model.iiv)
    groups, _ = build_groups(model, list(individuals))
    for g in groups:
        rows = [k for k, m in enumerate(g.members)
                if results[m.index].status == "converged" and results[m.index].covariance is not None]
        if not rows or g.dim == 0:
            continue
        which = np.array(rows, dtype=np.int64)
        d = g.dim
        modes = np.array([mr_theta(results[g.members[k].index], g) for k in rows])
        covs = np.array([results[g.members[k].index].covariance for k in rows]) * inflate**2
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2)) + 1e-12 * np.eye(d)
        try:
            L = np.linalg.cholesky(covs)
        except np.linalg.LinAlgError:
            continue
        z = np.empty((len(rows), n_draws, d))
        w = np.empty((len(rows), n_draws))
        for j, k in enumerate(rows):
            rng = np.random.default_rng([seed, g.members[k].index])
            z[j] = rng.standard_normal((n_draws, d))
            w[j] = rng.chisquare(df, size=n_draws) / df
        theta = modes[:, None, :] + np.einsum("gij,gmj->gmi", L, z) / np.sqrt(w)[..., None]
        u2 = np.sum(z * z, axis=2) / w  # Mahalanobis distance^2 of each draw in the proposal's metric
        log_det_l = np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)
        log_q = (lgamma((df + d) / 2) - lgamma(df / 2) - 0.5 * d * log(df * pi) - log_det_l[:, None]
                 - 0.5 * (df + d) * np.log1p(u2 / df))
        with np.errstate(all="ignore"):
            f = g.predict(theta, which)
            ofv = _ofv(g, which, theta, f)
            obs = g.observations(which)
            idx_o, starts_o = obs.idx, obs.starts
            z2 = _standardised_sq(g, idx_o, f)  # (O', M)
        _, logdet_prior = np.linalg.slogdet(2 * pi * np.linalg.inv(g.precision))
        lw = np.where(np.isfinite(ofv), -0.5 * ofv - 0.5 * logdet_prior - log_q, -np.inf)
        top = np.max(lw, axis=1, keepdims=True)
        wts = np.exp(lw - top)
        total = wts.sum(axis=1)
        eta_pos = [int(np.flatnonzero(g.estimated == e)[0]) if e in g.estimated else -1 for e in range(n_eta)]
        for j, k in enumerate(rows):
            r = results[g.members[k].index]
            wn = wts[j] / total[j]
            ess = float(1.0 / np.sum(wn * wn)) if total[j] > 0 else 0.0
            mean = np.zeros(n_eta)
            cov = np.zeros((n_eta, n_eta))
            pos = np.array([p for p in eta_pos if p >= 0])
            idx = np.array([e for e, p in enumerate(eta_pos) if p >= 0])
            if ess >= min_ess:
                th = theta[j][:, pos]
                mu = wn @ th
                dev = th - mu
                mean[idx] = mu
                cov[np.ix_(idx, idx)] = (wn[:, None] * dev).T @ dev
                m2ll = float(-2.0 * (top[j, 0] + np.log(total[j] / n_draws)))
                sampled = True
            else:  # the Laplace approximation rather than a few draws' say
                mean[idx] = r.eta[idx]
                cov[np.ix_(idx, idx)] = np.asarray(r.covariance)[np.ix_(pos, pos)]
                m2ll = laplace_criterion(model, r) - 2.0 * r.log_levels
                sampled = False
            seg = slice(int(starts_o[j]), int(starts_o[j + 1]))
            ok_obs = ~g.blq[idx_o[seg]]
            if sampled:  # draws of zero weight (parameters the model cannot use) may have NaN residuals
                resid = float(np.sum(np.where(wn > 0, z2[seg][ok_obs], 0.0) @ wn))
            else:
                resid = float(np.sum(_standardised_sq(g, idx_o[seg][ok_obs], r.ipred[ok_obs, None])))
            mc_var = 4.0 * max(1.0 / ess - 1.0 / n_draws, 0.0) if sampled else 0.0
            out[g.members[k].index] = Moments(mean, cov, m2ll, ess, sampled, resid, int(ok_obs.sum()), mc_var)
    return out


def _standardised_sq(g: Any, idx: NDArray[np.int64], f: FloatArray) -> FloatArray:
    """Squared standardised residuals ``(y' - f')^2 / V`` of observations ``idx`` for predictions ``f`` (O, M), on
    the scale each is fitted on."""
    col = (slice(None), None)
    fp, V = scaled_prediction_and_variance(f, g.log[idx][col], g.prop[idx][col], g.add[idx][col],
                                           g.sd_log[idx][col], g.if_zero[idx][col])
    with np.errstate(all="ignore"):
        return np.asarray((g.y[idx][col] - fp) ** 2 / V, dtype=np.float64)
