"""The full posterior of an individual's random effects, by sampling.

Default: sampling-importance resampling (SIR). Proposals come from a multivariate t distribution (4
degrees of freedom) centred on the MAP estimate with its covariance inflated 1.5-fold; each proposal is
weighted by posterior density / proposal density, and the draws are resampled (systematic resampling)
in proportion to the weights. The posterior density is ``exp(-OFV/2)`` with NONMEM's objective
(:mod:`cnidose.estimation.observations`, BLQ terms included).

SIR degenerates when the posterior is far from the proposal (multimodal, strongly skewed). Then the
effective sample size is low, and the sampler switches to adaptive random-walk Metropolis (several
chains in parallel, burn-in discarded); the result says which method ran and its effective sample size.

Predictions from the posterior (:meth:`Posterior.predict`) run the event engine for every draw, on any
records (past and future doses, future sampling times). Between-occasion effects of occasions not seen
in the data are drawn from their prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cnidose.errors import InputError
from cnidose.estimation.cohort import Group, build_groups, occasion_prior, occasion_times
from cnidose.estimation.map import MapResult, _ofv, fit_map
from cnidose.models.model import Model, Prepared
from cnidose.pk.events import Individual

__all__ = ["Posterior", "sample_posterior"]

FloatArray = NDArray[np.float64]
Method = Literal["auto", "sir", "mcmc"]


@dataclass(frozen=True, slots=True)
class Posterior:
    """Posterior draws of one individual's random effects."""

    model: Model
    individual: Individual
    map: MapResult
    draws: FloatArray  # (n, full_dim): every random effect of the model (IIV, then IOV per occasion)
    method: Literal["sir", "mcmc", "prior"]
    ess: float  # effective sample size (importance weights for SIR; autocorrelation-based for MCMC)
    names: tuple[str, ...]  # of the estimated effects
    n_occasions: int

    @property
    def eta(self) -> FloatArray:
        """Draws of the between-subject effects, (n, n_eta)."""
        return self.draws[:, : len(self.model.iiv)]

    def predict(self, individual: Individual | None = None, *, seed: int | None = 0,
                residual: bool = False, carry: tuple[int, int] | None = None) -> FloatArray:
        """Predictions of every record of ``individual`` (default: the fitted one) for every draw, (n, R).

        ``individual`` may add future doses and sampling times to the fitted records. With ``residual``,
        residual error is added to each prediction (a future measured level rather than the true one).
        Occasions (IOV) that the fit did not see -- after the fitted records, or among them without a level -- get
        between-occasion effects drawn from their prior (the posterior predictive of a new occasion). ``carry``
        ``(a, b)``: occasion ``b`` (0-based) takes each draw's effect of occasion ``a`` instead.
        """
        ind = self.individual if individual is None else individual
        model = self.model
        rng = np.random.default_rng(seed)
        n = self.draws.shape[0]
        n_eta = len(model.iiv)
        prep = model.prepare(ind)
        kappas = None
        if model.iov is not None:
            n_k = len(model.iov)
            seen = self.draws[:, n_eta:].reshape(n, self.n_occasions, n_k).copy()
            chol = np.linalg.cholesky(model.iov.omega + 1e-300 * np.eye(n_k))
            # an occasion of the fitted records without a level was not estimated: its effect is a new occasion's
            unseen = [k for k in range(self.n_occasions)
                      if not any(f"{nm}_OCC{k + 1}" in self.names for nm in model.iov.names)]
            if unseen:
                seen[:, unseen] = rng.standard_normal((n, len(unseen), n_k)) @ chol.T
            extra = prep.n_occasions - self.n_occasions
            if extra > 0 and model.fitting.drift is not None:
                kappas = np.concatenate([seen, self._drifted(prep, seen, extra, rng)], axis=1)
            elif extra > 0:
                new = rng.standard_normal((n, extra, n_k)) @ chol.T
                kappas = np.concatenate([seen, new], axis=1)
            else:
                kappas = seen[:, : prep.n_occasions]
            if carry is not None:
                kappas[:, carry[1]] = kappas[:, carry[0]]
        sim = model.simulate(prep, self.draws[:, :n_eta], kappas=kappas)
        pred = sim.prediction
        if residual:
            var, log_scale = model.residual_variance(prep, sim.parameters, pred)
            eps = rng.standard_normal(pred.shape) * np.sqrt(np.nan_to_num(var))
            pred = np.where(log_scale[None, :], pred * np.exp(eps), pred + eps)
        return pred

    def _drifted(self, prep: Prepared, seen: FloatArray, extra: int, rng: np.random.Generator) -> FloatArray:
        """Each draw's effects of ``extra`` occasions after the fitted ones under a drifting occasion prior
        (:class:`cnidose.models.model.Fitting`): drawn from their prior conditional on the draw's effects of the
        fitted occasions (the Gaussian conditional of :func:`cnidose.estimation.cohort.occasion_prior`)."""
        model = self.model
        assert model.iov is not None
        n, n_seen, n_k = seen.shape
        C = occasion_prior(model, occasion_times(prep))
        s_ix = np.arange(n_seen * n_k)
        n_ix = np.arange(n_seen * n_k, (n_seen + extra) * n_k)
        keep = np.diag(C)[s_ix] > 0  # effects without variance are zero, not conditioned on
        css = C[np.ix_(s_ix[keep], s_ix[keep])]
        cns = C[np.ix_(n_ix, s_ix[keep])]
        gain = cns @ np.linalg.inv(css) if keep.any() else np.zeros((n_ix.size, 0))
        cond = C[np.ix_(n_ix, n_ix)] - gain @ cns.T
        w, V = np.linalg.eigh(0.5 * (cond + cond.T))
        root = V * np.sqrt(np.maximum(w, 0.0))
        mean = seen.reshape(n, -1)[:, keep] @ gain.T
        out = mean + rng.standard_normal((n, n_ix.size)) @ root.T
        return np.asarray(out.reshape(n, extra, n_k), dtype=np.float64)

    def probability_in_range(self, individual: Individual, record: int, low: float, high: float, *,
                             residual: bool = False, seed: int | None = 0) -> float:
        """Posterior probability that the level at ``record`` (index in ``individual``) lies in [low, high]."""
        c = self.predict(individual, seed=seed, residual=residual)[:, record]
        return float(np.mean((c >= low) & (c <= high)))


def sample_posterior(model: Model, individual: Individual, *, n_draws: int = 2000, method: Method = "auto",
                     seed: int = 0, map_result: MapResult | None = None, min_ess: float = 0.1) -> Posterior:
    """Draw ``n_draws`` samples from the posterior of the random effects of ``individual``.

    Parameters
    ----------
    model, individual
        As for :func:`cnidose.estimation.fit_map`.
    n_draws : int
    method : {"auto", "sir", "mcmc"}
        "auto" runs SIR and switches to MCMC when the effective sample size falls below ``min_ess``
        times the number of proposals.
    seed : int
        Seed of the random generator (results are reproducible).
    map_result : MapResult, optional
        A MAP fit of the same individual, to skip refitting.
    """
    with np.errstate(all="ignore"):
        return _sample(model, individual, n_draws=n_draws, method=method, seed=seed, map_result=map_result,
                       min_ess=min_ess)


def _sample(model: Model, individual: Individual, *, n_draws: int, method: Method, seed: int,
            map_result: MapResult | None, min_ess: float) -> Posterior:
    groups, members = build_groups(model, [individual])
    if members[0].error:
        raise InputError(f"ID {individual.id:g}: {members[0].error}")
    g = groups[0]
    mr = map_result if map_result is not None else fit_map(model, [individual])[0]
    rng = np.random.default_rng(seed)
    n_occ = members[0].n_occasions
    if g.dim == 0 or mr.status == "prior-only":
        draws = rng.multivariate_normal(np.zeros(g.dim), np.linalg.inv(g.precision), size=n_draws) if g.dim \
            else np.zeros((n_draws, 0))
        return Posterior(model, individual, mr, g.expand(draws), "prior", float(n_draws), g.names, n_occ)
    mode = mr_theta(mr, g)
    cov: FloatArray = mr.covariance if mr.covariance is not None else np.asarray(np.linalg.inv(g.precision), np.float64)
    if method in ("auto", "sir"):
        draws, ess, n_prop = _sir(g, mode, cov, n_draws, rng)
        if method == "sir" or ess >= min_ess * n_prop:
            return Posterior(model, individual, mr, g.expand(draws), "sir", ess, g.names, n_occ)
    draws, ess = _mcmc(g, mode, cov, n_draws, rng)
    return Posterior(model, individual, mr, g.expand(draws), "mcmc", ess, g.names, n_occ)


def mr_theta(mr: MapResult, g: Group) -> FloatArray:
    """The MAP estimate as the group's vector of estimated effects."""
    full = np.asarray(mr.eta, dtype=np.float64)
    if mr.kappa is not None:
        full = np.concatenate([full, mr.kappa.ravel()])
    return full[g.estimated]


def _log_target(g: Group, theta: FloatArray) -> FloatArray:
    """-OFV/2 at theta (n, d)."""
    pts = theta[None]
    vals = _ofv(g, np.zeros(1, np.int64), pts, g.predict(pts, np.zeros(1, np.int64)))[0]
    return np.where(np.isfinite(vals), -0.5 * vals, -np.inf)


def _sir(g: Group, mode: FloatArray, cov: FloatArray, n_draws: int, rng: np.random.Generator,
         df: float = 4.0, inflate: float = 1.5, factor: int = 4) -> tuple[FloatArray, float, int]:
    d = mode.size
    n_prop = factor * n_draws
    S = cov * inflate**2
    L = np.linalg.cholesky(S)
    z = rng.standard_normal((n_prop, d))
    w = rng.chisquare(df, size=n_prop) / df
    theta = mode + (z @ L.T) / np.sqrt(w)[:, None]
    # log density of the multivariate t proposal (up to a constant)
    u = np.linalg.solve(L, (theta - mode).T).T
    log_q = -0.5 * (df + d) * np.log1p(np.sum(u * u, axis=1) / df)
    log_p = _log_target(g, theta)
    lw = log_p - log_q
    lw -= np.max(lw[np.isfinite(lw)]) if np.isfinite(lw).any() else 0.0
    wts = np.where(np.isfinite(lw), np.exp(lw), 0.0)
    total = wts.sum()
    if total <= 0:
        return np.repeat(mode[None], n_draws, axis=0), 0.0, n_prop
    wts /= total
    ess = float(1.0 / np.sum(wts * wts))
    # systematic resampling
    positions = (rng.random() + np.arange(n_draws)) / n_draws
    idx = np.searchsorted(np.cumsum(wts), positions)
    idx = np.minimum(idx, n_prop - 1)
    return theta[idx], ess, n_prop


def _mcmc(g: Group, mode: FloatArray, cov: FloatArray, n_draws: int, rng: np.random.Generator,
          chains: int = 16, burn: int = 500, thin: int = 5) -> tuple[FloatArray, float]:
    """Adaptive random-walk Metropolis, ``chains`` chains evaluated together."""
    d = mode.size
    scale = 2.38**2 / d
    prop_cov = cov * scale
    L = np.linalg.cholesky(prop_cov + 1e-12 * np.eye(d))
    x = mode + rng.standard_normal((chains, d)) @ np.linalg.cholesky(cov + 1e-12 * np.eye(d)).T * 0.5
    lp = _log_target(g, x)
    per_chain = int(np.ceil(n_draws / chains))
    kept: list[FloatArray] = []
    history: list[FloatArray] = []
    accepted = 0
    total = burn + per_chain * thin
    for it in range(total):
        prop = x + rng.standard_normal((chains, d)) @ L.T
        lq = _log_target(g, prop)
        accept = np.log(rng.random(chains)) < lq - lp
        x = np.where(accept[:, None], prop, x)
        lp = np.where(accept, lq, lp)
        accepted += int(accept.sum())
        if it < burn:
            history.append(x.copy())
            if it in (100, 250, burn - 1):  # adapt the proposal to the chains' covariance
                h = np.concatenate(history[len(history) // 2:])
                c = np.cov(h.T) if d > 1 else np.atleast_2d(np.var(h))
                L = np.linalg.cholesky(c * scale + 1e-10 * np.eye(d))
        elif (it - burn) % thin == 0:
            kept.append(x.copy())
    draws = np.concatenate(kept)[:n_draws]
    ess = _ess(np.stack(kept, axis=1))
    return draws, ess


def _ess(chains: FloatArray) -> float:
    """Effective sample size of (chains, n, d) draws: the smallest over effects (initial positive sequence)."""
    c, n, d = chains.shape
    out = []
    for k in range(d):
        x = chains[:, :, k] - chains[:, :, k].mean(axis=1, keepdims=True)
        var = np.mean(x * x)
        if var <= 0:
            out.append(float(c * n))
            continue
        rho_sum = 0.0
        for lag in range(1, n):
            rho = float(np.mean(x[:, lag:] * x[:, :-lag]) / var)
            if rho < 0.05:
                break
            rho_sum += rho
        out.append(c * n / (1.0 + 2.0 * rho_sum))
    return float(min(out))


def _as_array(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)
