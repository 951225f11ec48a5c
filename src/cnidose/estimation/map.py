"""Maximum a posteriori (MAP) Bayesian estimation of individual random effects.

The objective is NONMEM's (see :mod:`cnidose.estimation.observations`). The optimiser works on a whole
group of individuals at once: each iteration predicts every active individual at its estimate and at
central finite-difference perturbations in one vectorised call, forms the gradient and the expected
(Fisher) information, takes a Newton step with a backtracking line search on the exact objective, and
drops the individuals that have converged. Individuals whose optimum is doubtful (not converged,
information not positive definite, an observation far outside its error model, or an observation the
model predicts as exactly zero) are restarted from the best of a fixed set of prior draws, and keep
whichever optimum is lower. Every individual gets a status; one individual's bad data never stops the
batch.

Where some random effect has a wide prior (SD above 0.6) a distant basin can have the lower objective (the
flip-flop of absorption and elimination): rays from the estimate and a quasi-random cloud over the wide
between-subject effects are screened, and the best points are optimised when they may lead out of the
estimate's basin (a hill on the segment to the estimate, or a first step that does not head for it). On the
unimodal objectives of real patients that leaves no start to optimise, and the search costs a few batched
predictions; on the reference suite's wide-prior models it finds every lower basin NONMEM found.

Uncertainty at the optimum: ``covariance="expected"`` (default) is NONMEM's conditional covariance, the
inverse of the expected Fisher information ``[Σ Jᵀ (1/V + ½ (∂V/∂f / V)²) J + Ω⁻¹]⁻¹``;
``covariance="exact"`` inverts half the finite-difference Hessian of the objective. The result says which.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from cnidose.estimation.cohort import Group, Member, ObsSlice, build_groups, effect_layout
from cnidose.estimation.observations import scaled_prediction_and_variance, terms
from cnidose.models.kernel import effect_dependencies
from cnidose.models.model import Model, Notice
from cnidose.pk.events import Individual


def _inv(a: NDArray[np.floating]) -> NDArray[np.float64]:  # type: ignore[type-arg]
    return np.asarray(np.linalg.inv(a), dtype=np.float64)


__all__ = ["MapResult", "fit_map", "objective"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Status = Literal["converged", "prior-only", "not-converged", "error"]
CovMethod = Literal["expected", "exact"]
Derivatives = Literal["exact", "differences"]

_H = 1e-4  # central-difference step on the random effects
# Distant optima (flip-flop of absorption and elimination, ridges) are searched for when some random effect
# has a prior SD above this: only then can a basin far from the prior mode compete. With narrower priors
# the prior penalty of a distant basin (> (1.5/0.6)^2 = 6 for a flip-flop of ~1.5 log units) outweighs
# any equal-fit alternative.
_WIDE_PRIOR_SD = 0.6
# A start of the wide search is probed only when it may lead out of the estimate's basin (_leaves_the_basin):
# points tested on the segment between them, how much higher than both ends one must be, and the cosine between
# the first step from the start and the way to the estimate above which that step heads home
_HILL_POINTS = 7
_HILL_TOL = 1e-6
_TOWARDS = 0.5


@dataclass(frozen=True, slots=True)
class MapResult:
    """The MAP estimate of one individual."""

    id: float
    status: Status
    message: str
    eta: FloatArray  # the model's random effects (IIV), in declared order; zeros where not estimated
    kappa: FloatArray | None  # between-occasion effects, (n_occasions, n_kappa), or None
    ofv: float  # objective at the estimate
    covariance: FloatArray | None  # over the estimated effects, see names
    covariance_method: CovMethod
    names: tuple[str, ...]  # estimated effects, in the covariance's order
    iterations: int
    ipred: FloatArray  # predictions at the observation records (estimate)
    pred: FloatArray  # predictions at the observation records (typical individual)
    obs_records: IntArray  # record indices of those observations
    notices: tuple[Notice, ...] = ()
    n_observations: int = 0
    n_blq: int = 0
    starts: int = 1
    model: str = ""
    #: Σ ln(level) over the levels fitted on the log scale (BLQ excluded): the Jacobian 2·log_levels turns the
    #: objective into -2 ln of the levels' density on their natural scale, comparable between models
    log_levels: float = 0.0
    #: ln det of the prior covariance of the estimated effects (the Laplace criterion's; a drifting occasion prior
    #: makes it depend on the occasions' times)
    prior_logdet: float = float("nan")
    #: how the predictions' derivatives by the random effects were had: "exact" (forward sensitivities of the
    #: compiled model kernel, :mod:`cnidose.models.kernel`) or "differences" (central, step 1e-4)
    derivatives: str = "differences"


@dataclass(slots=True)
class _State:
    theta: FloatArray  # (G, d)
    ofv: FloatArray  # (G,)
    iters: IntArray
    done: NDArray[np.bool_]
    converged: NDArray[np.bool_]
    info: FloatArray = field(default_factory=lambda: np.zeros((0, 0, 0)))  # (G, d, d) expected information / 2
    floor: FloatArray | None = None  # (G,) a lower bound of each member's data term (_data_floor), when needed


_ZERO = np.zeros(1, dtype=np.intp)


def _segment_sum(values: FloatArray, starts: IntArray, G: int) -> FloatArray:
    """Sum rows of ``values`` (O, ...) over each member's observation segment -> (G, ...)."""
    if G == 1 and values.shape[0]:  # one member (a clinician's single patient): its rows are all the rows; the same
        return np.add.reduceat(values, _ZERO, axis=0)  # sums as below (a fit gives the same bits alone or with others)
    out = np.zeros((G, *values.shape[1:]))
    full = np.diff(starts) > 0
    if values.shape[0] and full.any():  # reduceat sums each run of rows up to the next index given
        out[full] = np.add.reduceat(values, starts[:-1][full], axis=0)
    return out


def _quadratic(x: FloatArray, A: FloatArray) -> FloatArray:
    """x' A x over the last axis of ``x`` (..., d) -> (...) (a matrix product: einsum's overhead is larger on the
    few points of one patient)."""
    return np.asarray(((x @ A) * x).sum(axis=-1), dtype=np.float64)


def _information(w: FloatArray, J: FloatArray, starts: IntArray, G: int) -> FloatArray:
    """Half the expected information of the data, each member's sum of ``w`` J_i J_j / 2 over its rows -> (G, d, d)."""
    return _segment_sum(0.5 * w[:, None, None] * J[:, :, None] * J[:, None, :], starts, G)


def _ofv(g: Group, which: IntArray, theta: FloatArray, f: FloatArray) -> FloatArray:
    """Objective of members ``which`` at ``theta`` (G', B, d) with predictions ``f`` (O', B) -> (G', B)."""
    o = g.observations(which)
    t, _, _, _ = terms(f, *o.terms_args, derivatives=False)
    data = _segment_sum(t, o.starts, which.size)
    prior = _quadratic(theta, g.precision)
    return data + prior


def objective(model: Model, individual: Individual, eta: Any, kappa: Any = None) -> float:
    """The MAP objective of one individual at given random effects (e.g. NONMEM's, to compare)."""
    groups, members = build_groups(model, [individual], fast=False)
    if members[0].error:
        raise ValueError(members[0].error)
    g = groups[0]
    full = np.asarray(eta, dtype=np.float64).ravel()
    if kappa is not None:
        full = np.concatenate([full, np.asarray(kappa, dtype=np.float64).ravel()])
    theta = full[g.estimated][None, None, :]
    f = g.predict(theta)
    return float(_ofv(g, np.arange(1), theta, f)[0, 0])


def _derivatives(g: Group, which: IntArray, theta: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray,
                                                                       FloatArray, FloatArray]:
    """f, J, ofv, gradient and half the expected information for members ``which`` at ``theta`` (G', d).

    J is exact where the group has the compiled kernel (:meth:`Group.jacobian`: forward sensitivities), by central
    differences elsewhere and for the members the kernel leaves to the engine."""
    f, J = _prediction_and_jacobian(g, which, theta)
    return _derivatives_of(g, which, theta, f, J)


def _prediction_and_jacobian(g: Group, which: IntArray, theta: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Predictions (O',) and their derivatives (O', d) at ``theta`` (G', d): exact, or central differences."""
    exact = g.jacobian(theta, which) if g.exact else None
    if exact is None:
        return _from_differences(theta, g.predict(_difference_points(theta), which))
    f, J, held = exact
    if not held.all():
        miss = np.flatnonzero(~held)
        # the rows of which[miss] among those of which (each member's observations, in order)
        starts = np.concatenate([[0], np.cumsum(np.diff(g.obs_start)[which])])
        rows = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in miss])
        f[rows], J[rows] = _from_differences(theta[miss], g.predict(_difference_points(theta[miss]), which[miss]))
    return f, J


def _from_differences(theta: FloatArray, F: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Predictions and central-difference derivatives from the predictions ``F`` (O', 1 + 2d) at
    :func:`_difference_points`."""
    d = theta.shape[1]
    return F[:, 0], (F[:, 1:1 + d] - F[:, 1 + d:]) / (2 * _H)


def _difference_points(theta: FloatArray) -> FloatArray:
    """The estimate and its central-difference neighbours: (G', d) -> (G', 1 + 2d, d)."""
    d = theta.shape[1]
    offs = np.zeros((1 + 2 * d, d))
    offs[1:1 + d] = np.eye(d) * _H
    offs[1 + d:] = -np.eye(d) * _H
    return theta[:, None, :] + offs[None]


def _derivatives_of(g: Group, which: IntArray, theta: FloatArray, f: FloatArray, J: FloatArray
                    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """:func:`_derivatives` from the predictions ``f`` (O',) and their derivatives ``J`` (O', d)."""
    G = theta.shape[0]
    o = g.observations(which)
    t, dt, w, _ = terms(f[:, None], *o.terms_args)
    assert dt is not None and w is not None
    t, dt, w = t[:, 0], dt[:, 0], w[:, 0]
    dt = np.where(np.isfinite(dt), dt, 0.0)
    w = np.where(np.isfinite(w), w, 0.0)
    Pt = theta @ g.precision
    ofv = _segment_sum(t, o.starts, G) + (Pt * theta).sum(axis=-1)
    grad = _segment_sum(dt[:, None] * J, o.starts, G) + 2.0 * Pt
    info_half = _information(w, J, o.starts, G) + g.precision
    return f, J, ofv, grad, info_half


def _final(g: Group, theta: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Predictions at the estimate and for the typical individual, and half the expected information,
    from one vectorised prediction."""
    G, d = theta.shape
    which = np.arange(G)
    if d == 0:
        F = g.predict(np.zeros((G, 2, 0)), which)
        return F[:, 0], F[:, 1], np.zeros((G, 0, 0))
    if g.exact:
        f_typ = g.predict(np.zeros((G, 1, d)), which)[:, 0]
        f, J = _prediction_and_jacobian(g, which, theta)
    else:
        offs = np.zeros((2 + 2 * d, d))
        offs[2:2 + d] = np.eye(d) * _H
        offs[2 + d:] = -np.eye(d) * _H
        pts = theta[:, None, :] + offs[None]
        pts[:, 1, :] = 0.0
        F = g.predict(pts, which)
        f_typ = F[:, 1]
        f, J = _from_differences(theta, np.concatenate([F[:, :1], F[:, 2:]], axis=1))
    o = g.observations(which)
    _, _, w, _ = terms(f[:, None], *o.terms_args)
    assert w is not None
    w1 = np.where(np.isfinite(w[:, 0]), w[:, 0], 0.0)
    info = _information(w1, J, o.starts, G) + g.precision
    return f, f_typ, info


def _optimise(g: Group, theta0: FloatArray, which: IntArray, *, max_iter: int = 100, tol: float = 1e-10,
              newton_after: int = 4) -> _State:
    """Newton-type minimisation of every member's objective at once.

    Each iteration evaluates the full step together with the finite-difference points around it (one
    vectorised prediction); where the step decreases the objective enough, those derivatives serve the
    next iteration. Elsewhere the step is halved until it does (one cheap prediction per halving).
    """
    G, d = theta0.shape
    theta = theta0.copy()
    if d == 0:
        ofv = _ofv(g, which, theta[:, None, :], g.predict(theta[:, None, :], which))[:, 0]
        st = _State(theta, ofv, np.zeros(G, np.int64), np.ones(G, bool), np.isfinite(ofv))
        return st
    _, _, ofv, grad, info = _derivatives(g, which, theta)
    st = _State(theta, ofv, np.zeros(G, np.int64), ~np.isfinite(ofv), np.zeros(G, bool))
    grad_all, info_all = grad, info
    # quasi-Newton memory for the late phase: BFGS updates of the Hessian from gradient differences,
    # started from the expected information (twice it: the scoring Hessian, free at this point; an exact
    # finite-difference Hessian costs 2d² + 1 predictions and changed no estimate of the reference suite)
    Hq = np.zeros((G, d, d))
    have_q = np.zeros(G, bool)
    prev_theta = theta.copy()
    prev_grad = grad.copy()
    for _ in range(max_iter):
        act = np.flatnonzero(~st.done)
        if act.size == 0:
            break
        st.iters[act] += 1
        grad = grad_all[act]
        H = 2.0 * info_all[act]
        late = np.flatnonzero(st.iters[act] > newton_after)
        if late.size:  # slow linear convergence of scoring: quasi-Newton from the exact Hessian
            members = act[late]
            new_q = members[~have_q[members]]
            if new_q.size:
                He = 2.0 * info_all[new_q]
                pd = np.all(np.isfinite(He), axis=(1, 2))
                pd[pd] = np.all(np.linalg.eigvalsh(He[pd]) > 0, axis=1)
                Hq[new_q[pd]] = He[pd]
                have_q[new_q[pd]] = True
            upd = members[have_q[members] & (st.iters[members] > newton_after + 1)]
            if upd.size:
                sv = st.theta[upd] - prev_theta[upd]
                yv = grad_all[upd] - prev_grad[upd]
                sy = (sv * yv).sum(axis=1)
                Hs = (Hq[upd] @ sv[:, :, None])[:, :, 0]
                sHs = (sv * Hs).sum(axis=1)
                good = (sy > 1e-12) & (sHs > 1e-12)
                u = upd[good]
                yg, hg = yv[good], Hs[good]
                Hq[u] += (yg[:, :, None] * yg[:, None, :] / sy[good][:, None, None]
                          - hg[:, :, None] * hg[:, None, :] / sHs[good][:, None, None])
            use = have_q[members]
            H[late[use]] = Hq[members[use]]
        prev_theta[act] = st.theta[act]
        prev_grad[act] = grad_all[act]
        try:
            step = -np.linalg.solve(H, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = -grad * 0.1
        decrement = -(grad * step).sum(axis=1)
        small = (decrement < tol) | (np.max(np.abs(step), axis=1) < 1e-9)
        st.done[act[small]] = True
        st.converged[act[small]] = True
        todo = act[~small]
        if todo.size == 0:
            continue
        stp = step[~small]
        dec = decrement[~small]
        # the full step, with its derivatives
        cand = st.theta[todo] + stp
        _, _, new, g_new, i_new = _derivatives(g, which[todo], cand)
        ok = np.isfinite(new) & (new <= st.ofv[todo] - 1e-4 * dec)
        acc = todo[ok]
        st.theta[acc], st.ofv[acc] = cand[ok], new[ok]
        grad_all[acc], info_all[acc] = g_new[ok], i_new[ok]
        # backtracking for the others
        pending = np.flatnonzero(~ok)
        alpha = np.full(todo.size, 0.5)
        moved = np.zeros(todo.size, bool)
        for _ls in range(40):
            if pending.size == 0:
                break
            cand = st.theta[todo[pending]] + alpha[pending, None] * stp[pending]
            f = g.predict(cand[:, None, :], which[todo[pending]])
            val = _ofv(g, which[todo[pending]], cand[:, None, :], f)[:, 0]
            good = np.isfinite(val) & (val <= st.ofv[todo[pending]] - 1e-4 * alpha[pending] * dec[pending])
            hit = pending[good]
            st.theta[todo[hit]] = cand[good]
            st.ofv[todo[hit]] = val[good]
            moved[hit] = True
            pending = pending[~good]
            alpha[pending] *= 0.5
        if pending.size:  # no decrease along the Newton direction: stationary to working precision
            st.done[todo[pending]] = True
            st.converged[todo[pending]] = np.abs(dec[pending]) < 1e-6
        mv = todo[np.flatnonzero(moved)]
        if mv.size:
            _, _, o2, g2, i2 = _derivatives(g, which[mv], st.theta[mv])
            st.ofv[mv], grad_all[mv], info_all[mv] = o2, g2, i2
    return st


def _doubtful(g: Group, which: IntArray, st: _State) -> NDArray[np.bool_]:
    """Members whose optimum deserves restarts."""
    out = ~st.converged | ~np.isfinite(st.ofv)
    ok = np.flatnonzero(~out)
    if ok.size:
        f = g.predict(st.theta[ok][:, None, :], which[ok])[:, 0]
        o = g.observations(which[ok])
        fp, V = scaled_prediction_and_variance(f, o.log, o.prop, o.add, o.sd_log, o.if_zero)
        z = np.abs(np.where(o.blq, 0.0, o.y - fp)) / np.sqrt(V)
        flag = (z > 5.0) | ((f == 0) & ~o.blq)
        out[ok] |= _segment_sum(flag.astype(float), o.starts, ok.size) > 0
        # information not positive definite, or an estimate far in the prior's tail
        far = _quadratic(st.theta[ok], g.precision) > 25.0
        out[ok] |= far
        # an objective well above what the levels could give: OFV less each level's term at a prediction equal to
        # it (a BLQ level's 0; about each level's own least term, _data_floor) is, at the optimum, about a
        # chi-square with (levels + effects) degrees of freedom; above its 95th percentile the descent may have
        # stopped in a worse basin than another (shared model 301, individual 2689: 29.94 where NONMEM found
        # 21.35 nearer the prior mode; restarts find it)
        t = terms(np.where(o.blq, 1.0, _levels(o))[:, None], *o.terms_args, derivatives=False)[0][:, 0]
        t = np.where(o.blq | ~np.isfinite(t), 0.0, t)
        surplus = st.ofv[ok] - _segment_sum(t, o.starts, ok.size)
        dof = np.diff(o.starts) + g.dim
        out[ok] |= surplus > _chi2_95(dof)
    return out


def _levels(o: ObsSlice) -> FloatArray:
    """The measured levels of observations ``o`` on their natural scale (``o.y`` holds the log of those fitted on the
    log scale)."""
    return np.where(o.log, np.exp(np.where(o.log, o.y, 0.0)), o.y)


def _chi2_95(k: NDArray[np.int64]) -> FloatArray:
    """The 95th percentile of chi-square with ``k`` degrees of freedom (Wilson and Hilferty 1931: 2.5 % low for
    k = 1, within 1 % from k = 2)."""
    k = np.maximum(k, 1).astype(float)
    a = 2.0 / (9.0 * k)
    return np.asarray(k * (1.0 - a + 1.6448536269514722 * np.sqrt(a)) ** 3, dtype=np.float64)


def _restarts(g: Group, which: IntArray, st: _State, n_draws: int = 40, n_best: int = 3, seed: int = 20211,
              everyone: bool = False) -> int:
    """Restart doubtful members (or everyone) from the best prior draws; keep the lower optimum."""
    doubt = np.arange(which.size) if everyone else np.flatnonzero(_doubtful(g, which, st))
    if doubt.size == 0 or g.dim == 0:
        return 0
    rng = np.random.default_rng(seed)
    cov = np.linalg.inv(g.precision)
    draws = rng.multivariate_normal(np.zeros(g.dim), cov, size=n_draws)
    draws = np.concatenate([draws, 2.0 * draws[: n_draws // 2], -2.0 * draws[: n_draws // 2]])
    D = draws.shape[0]
    pts = np.broadcast_to(draws[None], (doubt.size, D, g.dim)).copy()
    f = g.predict(pts, which[doubt])
    vals = _ofv(g, which[doubt], pts, f)  # (G', D)
    vals = np.where(np.isfinite(vals), vals, np.inf)
    best = np.argsort(vals, axis=1)[:, :n_best]
    starts = pts[np.arange(doubt.size)[:, None], best].reshape(-1, g.dim)
    rep = np.repeat(doubt, n_best)
    sub = _optimise(g, starts, which[rep])
    for k, member in enumerate(rep):
        better = np.isfinite(sub.ofv[k]) and (not np.isfinite(st.ofv[member]) or sub.ofv[k] < st.ofv[member] - 1e-9
                                              or (not st.converged[member] and sub.converged[k]
                                                  and sub.ofv[k] <= st.ofv[member] + 1e-9))
        if better:
            st.theta[member] = sub.theta[k]
            st.ofv[member] = sub.ofv[k]
            st.converged[member] = sub.converged[k]
            st.iters[member] += sub.iters[k]
    return int(doubt.size)


def _polish(g: Group, which: IntArray, st: _State, members: IntArray, *, start_step: float = 0.02,
            min_step: float = 1e-7, max_iter: int = 400) -> None:
    """Derivative-free compass search from the current estimates of ``members`` (for non-smooth optima).

    Directions: the coordinate axes and the eigenvectors of the information matrix. Each iteration
    evaluates every direction both ways for every member at once; a member moves to its best
    improvement or halves its step. Marks members converged when the step falls below ``min_step``.
    """
    if members.size == 0 or g.dim == 0:
        return
    d = g.dim
    theta = st.theta[members].copy()
    ofv = st.ofv[members].copy()
    _, _, _, _, info = _derivatives(g, which[members], theta)
    dirs = np.empty((members.size, 4 * d, d))
    for k in range(members.size):
        try:
            _, vec = np.linalg.eigh(info[k])
            vec = vec / np.sqrt(np.maximum(np.linalg.eigvalsh(info[k]), 1e-12))[None, :]
            vec = vec / np.max(np.abs(vec), axis=0, keepdims=True)
        except np.linalg.LinAlgError:
            vec = np.eye(d)
        base = np.concatenate([np.eye(d), vec.T])
        dirs[k] = np.concatenate([base, -base])
    step = np.full(members.size, start_step)
    active = np.arange(members.size)
    for _ in range(max_iter):
        if active.size == 0:
            break
        pts = theta[active, None, :] + step[active, None, None] * dirs[active]
        f = g.predict(pts, which[members[active]])
        vals = _ofv(g, which[members[active]], pts, f)
        vals = np.where(np.isfinite(vals), vals, np.inf)
        best = np.argmin(vals, axis=1)
        bv = vals[np.arange(active.size), best]
        improve = bv < ofv[active] - 1e-12
        mv = active[improve]
        theta[mv] = pts[np.flatnonzero(improve), best[improve]]
        ofv[mv] = bv[improve]
        step[active[~improve]] *= 0.5
        active = active[step[active] >= min_step]
    better = ofv <= st.ofv[members]
    st.theta[members[better]] = theta[better]
    st.ofv[members[better]] = ofv[better]
    st.converged[members] = True


def _timing_effects(g: Group) -> IntArray:
    """Estimated effects that move dose timing (lag, modelled duration or rate): the objective has kinks.

    Found statically, from which random effects the ``ALAG<n>``, ``D<n>`` and ``R<n>`` assignments of
    ``[pk]`` depend on (through earlier assignments).
    """
    timing: set[str] = set()
    for name, d in effect_dependencies(g.model).items():
        if re.fullmatch(r"(ALAG|D|R)\d+", name):
            timing |= d
    return np.asarray([j for j, base in enumerate(g.bases) if base in timing],
                      dtype=np.int64)


def _timing_scan(g: Group, which: IntArray, st: _State, effects: IntArray, n_grid: int = 25,
                 n_starts: int = 2) -> None:
    """For each effect that moves dose timing, scan it over its prior range (others at the estimate), restart
    from the best grid points that are not the current basin, keep the lower optimum."""
    if effects.size == 0 or which.size == 0:
        return
    sd = np.sqrt(np.diag(np.linalg.inv(g.precision)))
    for j in effects.tolist():
        grid = np.linspace(-3.0, 3.0, n_grid) * sd[j]
        pts = np.repeat(st.theta[:, None, :], n_grid, axis=1)
        pts[:, :, j] = grid[None, :]
        vals = _ofv(g, which, pts, g.predict(pts, which))
        vals = np.where(np.isfinite(vals), vals, np.inf)
        far = np.abs(grid[None, :] - st.theta[:, j:j + 1]) > 0.25 * sd[j]
        vals = np.where(far, vals, np.inf)
        best = np.argsort(vals, axis=1)[:, :n_starts]
        starts = pts[np.arange(which.size)[:, None], best].reshape(-1, g.dim)
        rep = np.repeat(np.arange(which.size), n_starts)
        okv = np.isfinite(vals[np.arange(which.size)[:, None], best].ravel())
        rep, starts = rep[okv], starts[okv]
        if rep.size == 0:
            continue
        _keep_lower(st, rep, _optimise(g, starts, which[rep]))


def _wide(g: Group) -> IntArray:
    """Estimated effects whose prior SD exceeds ``_WIDE_PRIOR_SD``: the only ones along which a distant basin
    can compete with the prior mode's (see the constant)."""
    if g.dim == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.sqrt(np.diag(_inv(g.precision))) > _WIDE_PRIOR_SD).astype(np.int64)


def _data_floor(g: Group, which: IntArray) -> FloatArray:
    """A lower bound of each member's data term (the objective less the prior), over all predictions: the sum over
    its levels of each level's own minimum over the prediction (a level's term alone, at the best prediction for
    it), a BLQ level's 0 (-2 ln Phi >= 0). Each minimum: the terms on a grid of predictions (the level times
    e^-8 .. e^8, steps of 0.2 in the log, and 0), then on finer grids around the best point; less a margin for what
    the grids may miss. Then OFV(theta) >= floor + theta' Omega^-1 theta for every theta (up to that margin). A
    level whose least term lies at the grid's edge or is nowhere finite has no bound: the member's floor is -inf
    (nothing is pruned)."""
    o = g.observations(which)
    if o.idx.size == 0:
        return np.zeros(which.size)
    level = _levels(o)
    level = np.where(np.isfinite(level) & (level > 0), level, 1.0)
    args = o.terms_args
    n_obs = o.idx.size

    def at(s: FloatArray) -> FloatArray:  # the terms at predictions level * e^s, (O, S)
        t = terms(level[:, None] * np.exp(s), *args, derivatives=False)[0]
        return np.where(np.isfinite(t), t, np.inf)

    rows = np.arange(n_obs)
    centre = np.zeros(n_obs)
    best = at(np.full((n_obs, 1), -np.inf))[:, 0]  # a prediction of exactly 0 (a model's value there, if any)
    unbounded = np.zeros(n_obs, bool)
    for stage, (half, n) in enumerate(((8.0, 81), (0.2, 81), (0.005, 41))):  # ever finer grids around the best
        s = centre[:, None] + np.linspace(-half, half, n)[None, :]
        t = at(s)
        k = np.argmin(t, axis=1)
        if stage == 0:  # the least at the coarse grid's edge, or nowhere finite: no bound found (a level of 0 with a
            unbounded = (k == 0) | (k == n - 1) | ~np.isfinite(t[rows, k])  # proportional error: -inf)
        best = np.minimum(best, t[rows, k])
        centre = s[rows, k]
    best = np.where(unbounded, -np.inf, best)
    best = np.where(o.blq, 0.0, best)
    # the last grid's step is 2.5e-4 in the log: a term with a residual SD of 0.01 is then within 2e-4 of its
    # minimum
    return _segment_sum(best - 1e-3 - 1e-6 * np.abs(best), o.starts, which.size) - 1e-3


# Points of the wide-prior search (rays, cloud) are screened only where they might compete: prior penalty below the
# estimate's objective less the data floor (no point beyond can have a lower objective, _data_floor), plus this
# slack -- a point a little beyond may still lie in a lower basin's pull
_SCREEN_SLACK = 4.0


def _screen_values(g: Group, which: IntArray, st: _State, members: IntArray, pts: FloatArray) -> FloatArray:
    """The objective at points ``pts`` (G', P, d) of ``members``, inf where a point cannot compete (its prior
    penalty alone exceeds what any point could have and still beat the estimate, by more than the slack), which
    are not predicted."""
    pen = _quadratic(pts, g.precision)
    if st.floor is None:
        st.floor = _data_floor(g, which)
    room = st.ofv[members] - st.floor[members] + _SCREEN_SLACK
    keep = pen < np.where(np.isfinite(room), room, np.inf)[:, None]
    vals = np.full(pts.shape[:2], np.inf)
    n_keep = keep.sum(axis=1)
    B = int(n_keep.max()) if n_keep.size else 0
    if B == 0:
        return vals
    order = np.argsort(~keep, axis=1, kind="stable")[:, :B]  # each member's kept points first
    rows = np.arange(members.size)[:, None]
    sub = pts[rows, order]  # (G', B, d); past a member's kept points: repeats of other points, not used
    sub_vals = _ofv(g, which[members], sub, g.predict(sub, which[members]))
    used = np.arange(B)[None, :] < n_keep[:, None]
    vals[rows, order] = np.where(used & np.isfinite(sub_vals), sub_vals, np.inf)
    return vals


def _ray_directions(g: Group) -> FloatArray:
    """The rays of the wide-prior search from an estimate, in raw effect units (:func:`_wide_search`): (R, d), or
    (0, d) where no effect is wide. Made once per layout (every fit of a patient makes its own group)."""
    return _make_rays(g.dim, tuple(_wide(g).tolist()), tuple(g.occasions))


@lru_cache(maxsize=64)
def _make_rays(d: int, wide_effects: tuple[int, ...], occasions: tuple[int, ...]) -> FloatArray:
    wide = np.zeros(d, bool)
    wide[list(wide_effects)] = True
    if not wide.any():
        return np.zeros((0, d))
    occ = np.asarray(occasions, dtype=np.int64)
    i, j = np.triu_indices(d, k=1)
    # pairs with a wide effect; effects of two different occasions act at different times: no ridge between them
    keep = (wide[i] | wide[j]) & ~((occ[i] > 0) & (occ[j] > 0) & (occ[i] != occ[j]))
    i, j = i[keep], j[keep]
    pairs = np.zeros((2 * i.size, d))
    rows = np.arange(i.size)
    pairs[2 * rows, i], pairs[2 * rows, j] = 1.0, 1.0  # e_i + e_j, then e_i - e_j
    pairs[2 * rows + 1, i], pairs[2 * rows + 1, j] = 1.0, -1.0
    D = np.concatenate([np.eye(d)[wide], pairs])  # raw effect units: a flip-flop moves two log-parameters alike
    steps = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    out = np.concatenate([np.concatenate([a * D for a in steps]), np.concatenate([-a * D for a in steps])])
    out.setflags(write=False)
    return out


def _wide_search(g: Group, which: IntArray, st: _State, members: IntArray, *, rays: bool = True,
                 n_ray_best: int = 3, n_cloud_best: int = 5, chunk: int = 64) -> None:
    """Look for other basins where a prior is wide, in one screen of two sets of points per member; restart from
    the best of each set; keep the lower optimum.

    Rays from the estimate: the axis of every wide effect and every diagonal pair of axes with at least one wide
    effect and not of two different occasions (e_i, e_i + e_j, e_i - e_j), both ways, 0.5-4 units of the effects.
    The flip-flop of absorption and elimination, for one, moves the log volume and the log absorption rate by the
    same amount (an e_i + e_j ray). Directions between narrow effects only are not searched: a basin along them
    pays more prior penalty than it can gain (``_WIDE_PRIOR_SD``). The ``n_ray_best`` lowest ray points start
    probes.

    A cloud over the prior of the wide between-subject effects (:func:`_cloud`), the others once at the estimate
    and once at zero: the ``n_cloud_best`` lowest points far from the estimate and distinct from each other start
    probes.

    The points are predicted together (one call per chunk of members), and the starts of both probed together
    (:func:`_probe_and_keep`). A member whose optimum moved is screened by the cloud again around its new
    estimate.
    """
    if members.size == 0 or g.dim == 0:
        return
    d = g.dim
    ray = _ray_directions(g) if rays else np.zeros((0, d))
    cloud, wide = _cloud(g)
    n_ray = ray.shape[0]
    if n_ray == 0 and cloud.shape[0] == 0:
        return
    root = np.linalg.cholesky(g.precision)  # (p - c)' P (p - c) = |L'(p - c)|^2
    starts: list[FloatArray] = []
    owners: list[IntArray] = []
    for lo in range(0, members.size, chunk):
        part = members[lo:lo + chunk]
        est = st.theta[part]
        parts = [est[:, None, :] + ray[None]]
        if cloud.shape[0]:
            # the other effects at the estimate, and at their prior mode (a flip-flop's other basin has the narrow
            # effect near its prior mode when the first basin pushed it far out)
            n = cloud.shape[0]
            pts = np.repeat(est[:, None, :], n, axis=1)
            if wide.size < d:
                pts = np.concatenate([pts, np.zeros((part.size, n, d))], axis=1)
            pts[:, :, wide] = np.tile(cloud, (pts.shape[1] // n, 1))[None]
            parts.append(pts)
        allpts = np.concatenate(parts, axis=1)
        vals = _screen_values(g, which, st, part, allpts)
        rows = np.arange(part.size)[:, None]
        if n_ray:
            best = np.argsort(vals[:, :n_ray], axis=1)[:, :n_ray_best]
            okv = np.isfinite(vals[rows, best]).ravel()
            starts.append(allpts[rows, best].reshape(-1, d)[okv])
            owners.append(np.repeat(part, best.shape[1])[okv])
        if allpts.shape[1] > n_ray:
            cpts, cvals = allpts[:, n_ray:], vals[:, n_ray:]
            diff = cpts - est[:, None, :]
            cvals = np.where(np.isfinite(cvals) & (_quadratic(diff, g.precision) > 1.0), cvals, np.inf)
            order = np.argsort(cvals, axis=1)
            for r, member in enumerate(part.tolist()):
                ranked = order[r][np.isfinite(cvals[r, order[r]])]
                chosen = _distinct(cpts[r, ranked] @ root, n_cloud_best)
                if chosen:
                    starts.append(cpts[r, ranked[chosen]])
                    owners.append(np.full(len(chosen), member, dtype=np.int64))
    if not starts:
        return
    before = st.ofv.copy()
    _probe_and_keep(g, which, st, np.concatenate(starts), np.concatenate(owners))
    moved = members[st.ofv[members] < before[members] - 1e-9]
    if rays and moved.size and cloud.shape[0]:
        _wide_search(g, which, st, moved, rays=False, n_cloud_best=n_cloud_best, chunk=chunk)


def _cloud(g: Group, inflate: float = 1.5) -> tuple[FloatArray, IntArray]:
    """The cloud of the wide-prior search (:func:`_wide_search`) and the wide between-subject effects it covers:
    Halton points mapped to normal quantiles over those effects' prior (SDs inflated by ``inflate``), (n, k) and
    (k,); (0, 0) where none is wide. The cloud has 64, 512 or 1,024 points for one, two or more wide effects: along
    one wide effect 64 quantiles reach 3.6 prior SDs out (inflated), 0.06 SD apart near the mode and at most 0.44 SD
    apart in the tails, where a point's prior penalty alone is 10-13 (256 reached 4.3 SDs).
    Between-occasion effects are left to the rays: each acts on its own occasion's levels, and a cloud over the
    product of many occasions' effects would cover none of them well."""
    occ = g.occasions
    wide = tuple(w for w in _wide(g).tolist() if occ[w] == 0)
    if not wide:
        return np.zeros((0, 0)), np.zeros(0, np.int64)
    marginal = _inv(g.precision)[np.ix_(wide, wide)]  # the wide effects' prior marginal
    return _make_cloud(marginal.tobytes(), len(wide), inflate), np.asarray(wide, dtype=np.int64)


@lru_cache(maxsize=64)
def _make_cloud(marginal: bytes, k: int, inflate: float) -> FloatArray:
    """The cloud for wide effects of prior covariance ``marginal`` (k x k, its bytes): made once per prior."""
    z = _normal_cloud(64 if k == 1 else 128 * 2 ** min(k, 3), k)
    chol = np.linalg.cholesky(np.frombuffer(marginal, dtype=np.float64).reshape(k, k))
    out = np.asarray(inflate * z @ chol.T, dtype=np.float64)
    out.setflags(write=False)
    return out


def _probe_and_keep(g: Group, which: IntArray, st: _State, starts: FloatArray, owners: IntArray) -> None:
    """Optimise from each start that may lead out of its member's basin; a member keeps the lower optimum.

    Starts that seem to lie in the estimate's own basin (:func:`_leaves_the_basin`) are left out at first: on
    unimodal objectives (most real patients) that removes nearly every start. A member for which a start then
    finds a lower optimum has shown that its objective has several basins, and every start it had is tried
    after all. A start that is tried is optimised to convergence: a descent into a distant basin may climb out
    of a ridge slowly (on the reference suite one needed 15 iterations to come within 3 of the estimate's
    objective), so a short probe with a margin would drop it.
    """
    if owners.size == 0:
        return
    leaves = _leaves_the_basin(g, which, st, starts, owners)
    before = st.ofv.copy()
    if leaves.any():
        _keep_lower(st, owners[leaves], _optimise(g, starts[leaves], which[owners[leaves]]))
    moved = np.flatnonzero(st.ofv < before - 1e-9)
    rest = ~leaves & np.isin(owners, moved)
    if rest.any():
        _keep_lower(st, owners[rest], _optimise(g, starts[rest], which[owners[rest]]))


def _leaves_the_basin(g: Group, which: IntArray, st: _State, starts: FloatArray, owners: IntArray,
                      n_interior: int = _HILL_POINTS) -> NDArray[np.bool_]:
    """Which starts may lead out of their member's current basin, and so deserve a probe.

    A start is left out when both say it lies in the estimate's basin: the hill-valley test (Ursem 1999: no
    point of the straight segment from the start to the estimate is higher than both ends) and the first
    step the optimiser would take from it (a scoring step) pointing towards the estimate (cosine at least
    ``_TOWARDS``). The segment alone is not enough: descent paths curve, and on the reference suite a start
    with a hill-free segment led into a lower basin when its first step pointed elsewhere. One batched
    prediction for every start.
    """
    if owners.size == 0:
        return np.zeros(0, bool)
    s = np.arange(1, n_interior + 1) / (n_interior + 1)
    est = st.theta[owners]
    pts = est[:, None, :] + s[None, :, None] * (starts - est)[:, None, :]  # (S, n_interior, d)
    if g.exact:
        F = g.predict(pts, which[owners])
        f0, J0 = _prediction_and_jacobian(g, which[owners], starts)
    else:  # one prediction for both tests
        around = _difference_points(starts)  # (S, 1 + 2d, d): the start first
        F = g.predict(np.concatenate([around, pts], axis=1), which[owners])
        n_around = around.shape[1]
        f0, J0 = _from_differences(starts, F[:, :n_around])
        F = F[:, n_around:]
    full = np.concatenate([starts[:, None, :], pts], axis=1)
    vals = _ofv(g, which[owners], full, np.concatenate([f0[:, None], F], axis=1))
    vals = np.where(np.isfinite(vals), vals, np.inf)
    ends = np.maximum(vals[:, 0], st.ofv[owners])
    hill = np.any(vals[:, 1:] > ends[:, None] + _HILL_TOL, axis=1)
    _, _, _, grad, info = _derivatives_of(g, which[owners], starts, f0, J0)
    try:
        step = -np.linalg.solve(2.0 * info, grad[..., None])[..., 0]
    except np.linalg.LinAlgError:
        step = -grad
    home = est - starts
    with np.errstate(all="ignore"):
        cos = (step * home).sum(axis=1) / (np.linalg.norm(step, axis=1) * np.linalg.norm(home, axis=1))
    away = ~(np.isfinite(cos) & (cos >= _TOWARDS))
    # an impossible start cannot be probed
    keep: NDArray[np.bool_] = np.isfinite(vals[:, 0]) & (hill | away)
    return keep


def _keep_lower(st: _State, members: IntArray, sub: _State) -> None:
    """Where ``sub`` (one row per entry of ``members``) found a lower objective, take it."""
    for k, member in enumerate(members):
        if np.isfinite(sub.ofv[k]) and sub.ofv[k] < st.ofv[member] - 1e-9:
            st.theta[member] = sub.theta[k]
            st.ofv[member] = sub.ofv[k]
            st.converged[member] = sub.converged[k]
            st.iters[member] += sub.iters[k]


def _halton(n: int, d: int) -> FloatArray:
    """The first ``n`` points (skipping 0) of the d-dimensional Halton sequence: an even, deterministic cover."""
    primes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71]
    while len(primes) < d:  # more dimensions than listed: next primes
        c = primes[-1] + 2
        while any(c % p == 0 for p in primes):
            c += 2
        primes.append(c)
    out = np.zeros((n, d))
    idx = np.arange(1, n + 1)
    for k in range(d):
        b = primes[k]
        f, i, r = 1.0, idx.copy(), np.zeros(n)
        while np.any(i > 0):
            f /= b
            r += f * (i % b)
            i //= b
        out[:, k] = r
    return out


def _distinct(u: FloatArray, n_best: int, block: int = 64) -> list[int]:
    """Greedily, in order, the first ``n_best`` of the points ``u`` (rows; whitened: the prior's Mahalanobis
    distance is their Euclidean one) each more than 1 from every one taken before it; their row numbers. The
    distances of a block of candidates are formed at once."""
    chosen: list[int] = []
    for lo in range(0, u.shape[0], block):
        if len(chosen) == n_best:
            break
        cand = u[lo:lo + block]
        taken = u[chosen] if chosen else np.zeros((0, u.shape[1]))
        # as Python booleans: the greedy pass below reads them one at a time
        clear = np.all(((cand[:, None, :] - taken[None, :, :]) ** 2).sum(axis=2) > 1.0, axis=1).tolist()
        apart = (((cand[:, None, :] - cand[None, :, :]) ** 2).sum(axis=2) > 1.0).tolist()  # (block, block)
        mine: list[int] = []
        for i in range(cand.shape[0]):
            if len(chosen) + len(mine) == n_best:
                break
            if clear[i] and all(apart[i][j] for j in mine):
                mine.append(i)
        chosen += [lo + i for i in mine]
    return chosen


@lru_cache(maxsize=16)
def _normal_cloud(n: int, k: int) -> FloatArray:
    """The Halton points (:func:`_halton`) mapped to standard normal quantiles (each coordinate clipped to
    1e-6..1-1e-6): the same for every fit, so made once (the standard library's inverse normal, Wichura's AS241,
    spares the fit SciPy's special functions, a quarter second to import)."""
    inv = NormalDist().inv_cdf
    u = np.clip(_halton(n, k), 1e-6, 1 - 1e-6)
    z = np.array([inv(float(x)) for x in u.ravel()]).reshape(n, k)
    z.setflags(write=False)
    return z


def _exact_covariance(g: Group, which: int, theta: FloatArray) -> FloatArray | None:
    """(½ ∇² OFV)⁻¹: the Hessian by central differences of the exact gradient where the group has the compiled
    kernel (step 1e-5: error ~1e-10), by central second differences of the objective otherwise."""
    d = theta.size
    if g.exact:
        h = 1e-5
        around = np.concatenate([theta + h * np.eye(d), theta - h * np.eye(d)])
        _, _, _, grad, _ = _derivatives(g, np.full(2 * d, which), around)
        Hg = (grad[:d] - grad[d:]).T / (2 * h)  # column i: the gradient's change along effect i
        try:
            return _inv(0.25 * (Hg + Hg.T))
        except np.linalg.LinAlgError:
            return None
    h = 1e-3
    pts: list[FloatArray] = [theta]
    for i in range(d):
        for j in range(d):
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                p = theta.copy()
                p[i] += si * h
                p[j] += sj * h
                pts.append(p)
    P = np.asarray(pts)[None]
    w = np.array([which])
    vals = _ofv(g, w, P, g.predict(P, w))[0]
    H = np.zeros((d, d))
    k = 1
    for i in range(d):
        for j in range(d):
            pp, pm, mp, mm = vals[k:k + 4]
            H[i, j] = (pp - pm - mp + mm) / (4 * h * h)
            k += 4
    H = 0.5 * (H + H.T)
    try:
        out: FloatArray = _inv(0.5 * H)
        return out
    except np.linalg.LinAlgError:
        return None


def fit_map(model: Model, individuals: Sequence[Individual], *, covariance: CovMethod = "expected",
            fast: bool = True, restarts: bool = True,
            progress: Callable[[int, int], None] | None = None,
            start: Sequence[MapResult | None] | None = None,
            derivatives: Derivatives = "exact") -> list[MapResult]:
    """MAP estimates for every individual (in input order), each with a status.

    Parameters
    ----------
    model : Model
    individuals : sequence of Individual
        Records with a ``DV`` column (and optionally ``BLQ``, ``LLOQ``, the IOV occasion column).
    covariance : {"expected", "exact"}
        NONMEM's expected-information conditional covariance, or the inverse of half the exact Hessian.
    fast : bool
        Use the vectorised superposition path where it applies (the engine otherwise).
    restarts : bool
        Restart doubtful individuals from prior draws.
    progress : callable(done, total), optional
    start : sequence of MapResult or None, optional
        Where to start each individual's optimisation (one entry per individual, None: at the prior mode): an
        earlier estimate of the same individual, e.g. on fewer levels. Effects are matched by name (an
        occasion the earlier fit did not have starts at zero). Restarts and the wide-prior search are as
        without it; only the first descent is shorter.
    derivatives : {"exact", "differences"}
        "exact": the predictions' derivatives by forward sensitivities where the model's compiled kernel holds
        the individual (:mod:`cnidose.models.kernel`), central differences elsewhere; "differences": central
        differences throughout. Each result says which it had.
    """
    if derivatives not in ("exact", "differences"):
        raise ValueError(f"derivatives must be 'exact' or 'differences', not {derivatives!r}")
    if start is not None and len(start) != len(individuals):
        raise ValueError(f"start has {len(start)} entries for {len(individuals)} individuals")
    with np.errstate(all="ignore"):  # trial points may overflow; such points are rejected, not reported
        return _fit_map(model, individuals, covariance=covariance, fast=fast, restarts=restarts,
                        progress=progress, start=start, compiled=derivatives == "exact")


def _start_values(model: Model, r: MapResult) -> dict[str, float]:
    """An estimate's effects by name (:func:`cnidose.estimation.cohort.effect_layout`)."""
    full = np.concatenate([r.eta, r.kappa.ravel()]) if r.kappa is not None else r.eta
    layout = effect_layout(model, r.kappa.shape[0] if r.kappa is not None else 0)
    return {name: float(v) for (name, _, _), v in zip(layout, full, strict=True) if np.isfinite(v)}


def _fit_map(model: Model, individuals: Sequence[Individual], *, covariance: CovMethod, fast: bool,
             restarts: bool, progress: Callable[[int, int], None] | None,
             start: Sequence[MapResult | None] | None = None, compiled: bool = True) -> list[MapResult]:
    groups, members = build_groups(model, individuals, fast=fast, compiled=compiled)
    results: dict[int, MapResult] = {}
    total = len(members)
    done = 0
    for m in members:
        if m.error:
            results[m.index] = _failed(model, m)
            done += 1
    for g in groups:
        which = np.arange(g.size)
        has_obs = np.diff(g.obs_start) > 0
        theta0 = np.zeros((g.size, g.dim))
        if start is not None:
            for k, m in enumerate(g.members):
                prev = start[m.index]
                if prev is not None and prev.status in ("converged", "not-converged"):
                    values = _start_values(model, prev)
                    theta0[k] = [values.get(n, 0.0) for n in g.names]
        fit_idx = which[has_obs]
        st = _optimise(g, theta0[fit_idx], fit_idx)
        timing = _timing_effects(g)
        n_restart = _restarts(g, fit_idx, st, everyone=timing.size > 0) if restarts else 0
        if restarts:
            _timing_scan(g, fit_idx, st, timing)
            if _wide(g).size:
                _wide_search(g, fit_idx, st, np.arange(fit_idx.size))
        _polish(g, fit_idx, st, np.flatnonzero(~st.converged & np.isfinite(st.ofv)))
        theta = np.zeros((g.size, g.dim))
        theta[fit_idx] = st.theta
        f_est, f_typ, info = _final(g, theta)
        cov_all: list[FloatArray | None] = [None] * g.size
        if g.dim:
            if covariance == "expected":
                ok_info = np.all(np.isfinite(info), axis=(1, 2))
                ok_info[ok_info] = np.linalg.det(info[ok_info]) > 0
                inv_all = np.full_like(info, np.nan)
                if ok_info.any():
                    inv_all[ok_info] = np.linalg.inv(info[ok_info])
                for k in range(g.size):
                    cov_all[k] = inv_all[k] if ok_info[k] else None
            else:
                for k in range(g.size):
                    cov_all[k] = _exact_covariance(g, k, theta[k])
        prior_logdet = -float(np.linalg.slogdet(g.precision)[1]) if g.dim else 0.0
        pos = {int(k): j for j, k in enumerate(fit_idx)}
        full_all = g.expand(theta)
        n_eta = len(model.iiv)
        # per member, from the group's concatenated levels: the sum of the log levels (the log-scale fit's Jacobian
        # term) and the number of BLQ levels
        log_levels = _segment_sum(np.where(g.log & ~g.blq, g.y, 0.0), g.obs_start, g.size)
        n_blq = _segment_sum(g.blq.astype(float), g.obs_start, g.size)
        for k, m in enumerate(g.members):
            lo, hi = g.obs_start[k], g.obs_start[k + 1]
            full = full_all[k]
            kappa = full[n_eta:].reshape(m.n_occasions, len(model.iov)) if model.iov is not None and \
                full.size > n_eta else None
            assert m.obs is not None
            if k in pos:
                j = pos[k]
                ok = bool(st.converged[j]) and np.isfinite(st.ofv[j])
                status: Status = "converged" if ok else "not-converged"
                msg = "" if ok else _remedy(float(st.ofv[j]))
                ofv, iters = float(st.ofv[j]), int(st.iters[j])
                if cov_all[k] is None and g.dim:
                    status, msg = "not-converged", ("the information matrix at the estimate is singular; "
                                                    "the data do not identify every random effect")
            else:
                status, msg, ofv, iters = "prior-only", "no observations: the estimate is the prior (typical " \
                    "individual) and the covariance is Omega", 0.0, 0
                prior_cov: FloatArray = _inv(g.precision) if g.dim else np.zeros((0, 0))
                cov_all[k] = prior_cov
            results[m.index] = MapResult(
                id=float(m.individual.id), status=status, message=msg, eta=full[:n_eta], kappa=kappa, ofv=ofv,
                covariance=cov_all[k], covariance_method=covariance, names=g.names, iterations=iters,
                ipred=f_est[lo:hi], pred=f_typ[lo:hi], obs_records=m.obs.rec, notices=m.notices,
                n_observations=int(hi - lo), n_blq=int(n_blq[k]), starts=1 + (n_restart > 0),
                model=model.ref, log_levels=float(log_levels[k]),
                derivatives="exact" if g.exact else "differences", prior_logdet=prior_logdet)
            done += 1
            if progress is not None:
                progress(done, total)
    return [results[k] for k in range(len(members))]


def _remedy(ofv: float) -> str:
    if not np.isfinite(ofv):
        return ("an observation is impossible under the model (predicted exactly 0 with a proportional-only "
                "error, or a non-positive prediction on the log scale): check dose and sampling times, or mark "
                "the level BLQ")
    return ("the optimiser did not reach a stationary point; the estimate is the best found — check the data "
            "for outliers, or compare with covariance='exact'")


def _failed(model: Model, m: Member) -> MapResult:
    n_eta = len(model.iiv)
    empty = np.zeros(0)
    return MapResult(id=float(m.individual.id), status="error", message=m.error, eta=np.full(n_eta, np.nan),
                     kappa=None, ofv=float("nan"), covariance=None, covariance_method="expected", names=(),
                     iterations=0, ipred=empty, pred=empty, obs_records=np.zeros(0, np.int64), notices=m.notices,
                     model=model.ref)
