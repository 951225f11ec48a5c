"""The event engine's fast path: linear systems whose records hold bolus doses, observations and covariate
changes only -- the shape of therapeutic drug monitoring data (a dose every 12 or 24 h, daily covariates, a
trough now and then).

Every distinct parameter set of the individual's records (one per record where a covariate changes) is
decomposed in one batched call, K = V diag(lambda) V^-1 (:class:`cnidose.pk.solvers.EigenSolver`); the state is
then carried record by record in eigen-coordinates: a step is y * exp(lambda dt), a change of parameters
y -> W' V y, a bolus y += F AMT W e_cmt, a prediction V[cmt] . y / S. The semantics are the engine's (NONMEM's):
an interval takes the parameters of the record that ends it; a lagged dose enters with the F of the record
ending the interval it enters in ("nonmem") or of its own record ("dose-record"); a dose at a record enters
before that record's prediction; additional doses (ADDL) enter every II after it. Anything else -- infusions,
steady state, resets, lags that differ between batch members, a decomposition that is ill-conditioned for some
member, a dose parameter the engine would refuse -- is left to the general engine
(:func:`cnidose.pk.engine.simulate`), with its checks and messages. The tests compare the two paths on every
record kind they share.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from cnidose.pk.events import Individual
from cnidose.pk.solvers import EigenSolver
from cnidose.pk.structure import LinearStructure, OdeStructure

__all__ = ["predict_records"]

FloatArray = NDArray[np.float64]


def predict_records(structure: LinearStructure | OdeStructure, ind: Individual, P: Mapping[str, FloatArray],
                    B: int, changed: NDArray[np.bool_], *, nonmem: bool
                    ) -> tuple[FloatArray, NDArray[np.bool_]] | None:
    """Predictions (B, R) of every record and the batch members they hold (a member whose decomposition is
    ill-conditioned is left to the general engine: NaN, False), or None where the fast path does not apply
    (module docstring)."""
    if not isinstance(structure, LinearStructure) or structure.gamma is not None:
        return None
    ev = ind.evid
    dose = ev == 1
    if np.any((ev != 0) & (ev != 1) & (ev != 2)):
        return None
    if np.any(ind.ss[dose] != 0) or np.any(ind.rate[dose] != 0):
        return None
    R, n = len(ind), structure.n
    dose_c = np.where(ind.cmt > 0, ind.cmt, structure.default_dose) - 1
    obs_c = np.where((ev == 0) & (ind.cmt > 0), ind.cmt, structure.default_obs) - 1
    # dose parameters, checked once: anything the engine would refuse goes to the engine
    F: dict[int, FloatArray] = {}
    lag_of: dict[int, float] = {}  # dose record -> its lag (one for every batch member)
    for c in {int(x) for x in dose_c[dose]}:
        f = P.get(f"F{c + 1}")
        F[c] = np.broadcast_to(1.0, (B, R)) if f is None else f
        if f is not None and not (np.all(np.isfinite(f)) and np.all(f >= 0)):
            return None
        a = P.get(f"ALAG{c + 1}")
        if a is not None:
            rows = np.flatnonzero(dose & (dose_c == c))
            v = a[:, rows]
            if not (np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v == v[:1])):
                return None
            lag_of.update(zip(rows.tolist(), v[0].tolist(), strict=True))
    starts = np.flatnonzero(np.concatenate([[True], changed[1:]]))
    U = starts.size
    segment = np.cumsum(np.isin(np.arange(R), starts)) - 1
    es = EigenSolver(structure, U * B)
    es.set_params({k: np.ascontiguousarray(P[k][:, starts].T).reshape(U * B) for k in structure.rate_parameters})
    good = es.good.reshape(U, B).all(axis=0)
    if not good.any():
        return None
    lam = es.lam.reshape(U, B, n)
    V = np.where(good[None, :, None, None], es.V.reshape(U, B, n, n), 0.0)
    W = np.where(good[None, :, None, None], es.W.reshape(U, B, n, n), 0.0)
    lam = np.where(good[None, :, None], lam, 0.0)
    out = np.empty((B, R))
    y = np.zeros((B, n))
    pending: list[tuple[float, int, int]] = []  # (time it enters, compartment, dose record), in time order
    t_prev = float(ind.time[0])
    u = -1
    # of the segment in force: exp(lambda dt) by dt (doses repeat their intervals), W e_c (a unit dose into c) and
    # V[c] (what c holds), contiguous
    steps: dict[float, FloatArray] = {}
    units: dict[int, FloatArray] = {}
    observed: dict[int, FloatArray] = {}
    for j in range(R):
        s = int(segment[j])
        if s != u:
            if u >= 0:
                y = np.einsum("bij,bj->bi", W[s], np.einsum("bij,bj->bi", V[u], y))
            u = s
            steps, units, observed = {}, {}, {}
        t = float(ind.time[j])
        cur = t_prev
        while pending and pending[0][0] <= t:
            te, c, src = pending.pop(0)
            if te > cur:
                y *= _step(steps, lam[u], te - cur)
                cur = te
            y += (F[c][:, j if nonmem else src] * float(ind.amt[src]))[:, None] * _unit(units, W[u], c)
        if t > cur:
            y *= _step(steps, lam[u], t - cur)
        if dose[j]:  # the dose and its additional doses (ADDL, every II), each after the lag
            c = int(dose_c[j])
            L = lag_of.get(j, 0.0)
            for k in range(int(ind.addl[j]) + 1):
                te = t + k * float(ind.ii[j]) + L
                if te > t:
                    pending.append((te, c, j))
                else:
                    y += (F[c][:, j] * float(ind.amt[j]))[:, None] * _unit(units, W[u], c)
            pending.sort(key=lambda p: p[0])
        oc = int(obs_c[j])
        held_c = observed.get(oc)
        if held_c is None:
            held_c = observed[oc] = np.ascontiguousarray(V[u][:, oc, :])
        key = f"S{oc + 1}"
        pred = np.einsum("bj,bj->b", held_c, y)
        out[:, j] = pred / P[key][:, j] if key in P else pred
        t_prev = t
    out[~good] = np.nan
    return out, good


def _step(cache: dict[float, FloatArray], lam: FloatArray, dt: float) -> FloatArray:
    """exp(lambda dt), once per dt of the segment."""
    e = cache.get(dt)
    if e is None:
        e = cache[dt] = np.exp(lam * dt)
    return e


def _unit(cache: dict[int, FloatArray], W: FloatArray, c: int) -> FloatArray:
    """W e_c (eigen-coordinates of a unit amount in c), contiguous, once per compartment of the segment."""
    w = cache.get(c)
    if w is None:
        w = cache[c] = np.ascontiguousarray(W[:, :, c])
    return w
