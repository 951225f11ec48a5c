"""Observations of many individuals at once, by superposition of dose responses.

For a linear structure whose parameters are constant within each individual,
an observation is a sum over the doses that precede it of closed-form
responses ``sum_k w_k e^(lambda_k dt)`` (bolus), their integrals (zero-order
inputs), their convolutions with a gamma density (the Savic transit input:
Kummer's function, :func:`cnidose.pk.solvers.gamma_response`) and geometric
series (steady state). This module compiles the
dose/observation pairs of a whole cohort once (:func:`compile_design`) and then
evaluates them for any batch of parameter sets per individual with array
operations only (:func:`predict_design`): no Python loop over individuals,
records or doses. It is the fast path of estimation; the event engine
(:func:`cnidose.pk.simulate`) remains the reference and handles everything
else (time-varying parameters, nonlinear systems, repeated eigenvalues).

Record semantics are the engine's (NONMEM's): a dose contributes to an
observation record that comes after it in the data, from the time it enters
(after its lag), and until a reset (EVID 3/4, or a dose with SS=1) that comes
after it and before the observation. SS=1/SS=2 doses bring the sum of the
regimen's infinitely many earlier doses; ``AMT=0, RATE>0, SS=1, II=0`` is a
constant infusion at steady state that stops at its record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cnidose.pk.eigen import eigen_blocks as _eigen_blocks
from cnidose.pk.eigen import flow_blocks as _blocks
from cnidose.pk.events import Individual
from cnidose.pk.solvers import gamma_response, gamma_so_far, gamma_support
from cnidose.pk.structure import GammaInput, LinearStructure

__all__ = ["Design", "compile_design", "design_supports", "predict_design"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_BOLUS, _RATE, _MODEL_RATE, _MODEL_DUR, _CONST_INF, _GAMMA = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class Design:
    """Dose/observation pairs of a cohort, independent of parameter values.

    Attributes
    ----------
    n_individuals : int
    obs_ind, obs_cmt, obs_rec : ndarray of int, shape (O,)
        Individual index, 0-based compartment and record index of every observation record.
    obs_start : ndarray of int, shape (N + 1,)
        Observations of individual i are ``obs_start[i]:obs_start[i + 1]`` (in record order).
    pair_* : ndarrays of shape (P,)
        One entry per (dose term, later observation) pair, sorted by observation.
    """

    n_individuals: int
    n_cmt: int
    obs_ind: IntArray
    obs_cmt: IntArray
    obs_rec: IntArray
    obs_time: FloatArray
    obs_start: IntArray
    pair_obs: IntArray
    pair_ind: IntArray
    pair_cmt: IntArray  # dose compartment, 0-based
    pair_tobs: FloatArray  # observation time
    pair_tdose: FloatArray  # nominal dose time (before lag)
    pair_kind: IntArray
    pair_amt: FloatArray
    pair_rate: FloatArray  # given RATE (kind _RATE, _CONST_INF)
    pair_ss: IntArray  # 1: the term is the series of earlier doses of a steady-state regimen
    pair_ii: FloatArray
    pair_addl: IntArray  # bolus doses: number of additional doses the term stands for (a finite series)
    dose_cmts: tuple[int, ...]  # compartments (0-based) that receive doses


def design_supports(structure: object, individual: Individual) -> bool:
    """Whether :func:`compile_design` can represent this individual's records.

    With a gamma (transit) input, the doses into its compartment must be boluses: the engine refuses zero-order
    inputs there, naming the record, and is left to say so."""
    if not isinstance(structure, LinearStructure):
        return False
    n = structure.n
    cmt = np.where(individual.cmt > 0, individual.cmt, 0)
    if not np.all(cmt <= n):
        return False
    if structure.gamma is not None:
        dose = (individual.evid == 1) | (individual.evid == 4)
        into = np.where(individual.cmt > 0, individual.cmt, structure.default_dose) == structure.gamma.cmt
        if np.any(dose & into & (individual.rate != 0)):
            return False
    return True


def compile_design(structure: LinearStructure, individuals: Sequence[Individual],
                   observe: Sequence[NDArray[np.bool_]] | None = None) -> Design:
    """Compile the dose/observation pairs of ``individuals``.

    ``observe[i]`` selects the records of individual i to predict (default:
    EVID 0 records).
    """
    obs_ind: list[int] = []
    obs_cmt: list[int] = []
    obs_rec: list[int] = []
    obs_time: list[float] = []
    obs_start = [0]
    pairs: dict[str, list[float]] = {k: [] for k in ("obs", "ind", "cmt", "tobs", "tdose", "kind", "amt", "rate",
                                                     "ss", "ii", "addl")}
    dose_cmts: set[int] = set()
    n_obs_total = 0
    gamma_c = structure.gamma.cmt - 1 if structure.gamma is not None else -1
    for i, ind in enumerate(individuals):
        R = len(ind)
        sel = (ind.evid == 0) if observe is None else np.asarray(observe[i], dtype=bool)
        # next reset strictly after each record (EVID 3/4, or a dose with SS=1)
        is_reset = (ind.evid == 3) | (ind.evid == 4) | (((ind.evid == 1) | (ind.evid == 4)) & (ind.ss == 1))
        next_reset = np.full(R, R, dtype=np.int64)
        nxt = R
        for r in range(R - 1, -1, -1):
            next_reset[r] = nxt
            if is_reset[r]:
                nxt = r
        obs_idx = np.flatnonzero(sel)
        obs_global = {int(r): n_obs_total + k for k, r in enumerate(obs_idx)}
        for r in obs_idx.tolist():
            obs_ind.append(i)
            c = int(ind.cmt[r]) if ind.evid[r] == 0 and ind.cmt[r] > 0 else structure.default_obs
            obs_cmt.append(c - 1)
            obs_rec.append(int(r))
            obs_time.append(float(ind.time[r]))
        # rec, time, cmt, kind, amt, rate, ss, ii, addl
        terms: list[tuple[int, float, int, int, float, float, int, float, int]] = []
        for r in np.flatnonzero((ind.evid == 1) | (ind.evid == 4)).tolist():
            c = (int(ind.cmt[r]) or structure.default_dose) - 1
            dose_cmts.add(c)
            amt, rate, ii, ss = float(ind.amt[r]), float(ind.rate[r]), float(ind.ii[r]), int(ind.ss[r])
            t = float(ind.time[r])
            if ss == 1 and amt == 0 and rate > 0 and ii == 0:
                terms.append((int(r), t, c, _CONST_INF, 0.0, rate, 0, 0.0, 0))
                continue
            kind = _BOLUS if rate == 0 else _RATE if rate > 0 else _MODEL_RATE if rate == -1 else _MODEL_DUR
            if kind == _BOLUS and c == gamma_c:  # a gamma-density input (design_supports: boluses only)
                kind = _GAMMA
            if kind == _BOLUS:  # the dose and its ADDL doses: one finite geometric series
                terms.append((int(r), t, c, kind, amt, rate, 0, ii, int(ind.addl[r])))
            else:
                for k in range(int(ind.addl[r]) + 1):
                    terms.append((int(r), t + k * ii, c, kind, amt, rate, 0, ii, 0))
            if ss in (1, 2):
                terms.append((int(r), t, c, kind, amt, rate, 1, ii, 0))
        for rec, t, c, kind, amt, rate, ss, ii, addl in terms:
            for o in obs_idx.tolist():
                if not (rec < o < next_reset[rec]):
                    continue
                if ss == 0 and kind != _CONST_INF and float(ind.time[o]) < t:
                    continue
                pairs["obs"].append(obs_global[int(o)])
                pairs["ind"].append(i)
                pairs["cmt"].append(c)
                pairs["tobs"].append(float(ind.time[o]))
                pairs["tdose"].append(t)
                pairs["kind"].append(kind)
                pairs["amt"].append(amt)
                pairs["rate"].append(rate)
                pairs["ss"].append(ss)
                pairs["ii"].append(ii)
                pairs["addl"].append(addl)
        n_obs_total += len(obs_idx)
        obs_start.append(n_obs_total)
    order = np.argsort(np.asarray(pairs["obs"], dtype=np.int64), kind="stable")

    def arr(key: str, dtype: type) -> NDArray:  # type: ignore[type-arg]
        return np.asarray(pairs[key], dtype=dtype)[order]

    return Design(
        n_individuals=len(individuals), n_cmt=structure.n,
        obs_ind=np.asarray(obs_ind, dtype=np.int64), obs_cmt=np.asarray(obs_cmt, dtype=np.int64),
        obs_rec=np.asarray(obs_rec, dtype=np.int64), obs_time=np.asarray(obs_time),
        obs_start=np.asarray(obs_start, dtype=np.int64),
        pair_obs=arr("obs", np.int64), pair_ind=arr("ind", np.int64), pair_cmt=arr("cmt", np.int64),
        pair_tobs=arr("tobs", np.float64), pair_tdose=arr("tdose", np.float64), pair_kind=arr("kind", np.int64),
        pair_amt=arr("amt", np.float64),
        pair_rate=arr("rate", np.float64), pair_ss=arr("ss", np.int64), pair_ii=arr("ii", np.float64),
        pair_addl=arr("addl", np.int64),
        dose_cmts=tuple(sorted(dose_cmts)),
    )


def _eigen(K: FloatArray, blocks: Sequence[Sequence[int]] | None = None
           ) -> tuple[FloatArray, FloatArray, FloatArray, NDArray[np.bool_]]:
    """Batched real eigen-decomposition; ``bad`` marks members to leave to the engine.

    With ``blocks`` (strongly connected components in topological order, all of size 1 or 2) the
    decomposition is computed in closed form; otherwise by LAPACK. A member is bad when an eigenvalue is
    complex or two eigenvalues nearly coincide (relative gap below 1e-6): the eigenvector matrix is then
    close to singular and the closed form loses digits.
    """
    n = K.shape[-1]
    if blocks is not None and all(len(b) <= 2 for b in blocks):
        lam, V, imag = _eigen_blocks(K, blocks)
    else:
        lam_c, V_c = np.linalg.eig(K)
        scale = 1.0 + np.max(np.abs(lam_c.real), axis=-1)
        imag = np.max(np.abs(lam_c.imag), axis=-1) > 1e-10 * scale
        lam, V = lam_c.real, V_c.real
    gap = np.where(np.eye(n, dtype=bool), np.inf, np.abs(lam[..., :, None] - lam[..., None, :]))
    rel = gap / np.maximum(np.maximum(np.abs(lam[..., :, None]), np.abs(lam[..., None, :])), 1e-300)
    bad = imag | (np.min(rel, axis=(-1, -2)) < 1e-6) | ~np.isfinite(V).all(axis=(-1, -2))
    V_safe = np.where(bad[..., None, None], np.eye(n), V)
    Vinv = np.linalg.inv(V_safe)
    bad |= ~np.isfinite(Vinv).all(axis=(-1, -2))
    return lam, V_safe, Vinv, bad


def _expm1_over(lam: FloatArray, m: FloatArray) -> FloatArray:
    """(exp(lam m) - 1) / lam, with its limit m at lam = 0."""
    small = np.abs(lam * m) < 1e-8
    safe = np.where(small, 1.0, lam)
    return np.where(small, m * (1.0 + 0.5 * lam * m), np.expm1(lam * m) / safe)


def predict_design(design: Design, structure: LinearStructure, params: Mapping[str, FloatArray],
                   ) -> tuple[FloatArray, NDArray[np.bool_]]:
    """Predict every observation of the design for B parameter sets per individual.

    Parameters
    ----------
    design : Design
    structure : LinearStructure
    params : mapping of str to ndarray, shape (N, B)
        The structure's rate parameters and, where used, ``F<n>``, ``ALAG<n>``,
        ``R<n>``, ``D<n>`` (dose compartments) and ``S<n>`` (observed compartments).

    Returns
    -------
    prediction : ndarray, shape (O, B)
        Amount / S at each observation record.
    bad : ndarray of bool, shape (N, B)
        Members whose eigen-decomposition is ill-conditioned (or complex, or whose steady state does not
        exist); their predictions are not to be used (simulate them with the engine). Members whose
        parameters are not finite or not valid (negative rate constants, F or lag) get NaN predictions.
    """
    N = design.n_individuals
    first = next(iter(params.values()))
    B = first.shape[1]
    n = structure.n
    K = np.zeros((N, B, n, n))
    invalid_params = np.zeros((N, B), dtype=bool)
    for f in structure.flows:
        k = params[f.rate] / params[f.per] if f.per is not None else params[f.rate]
        invalid_params |= ~(np.isfinite(k) & (k >= 0))
        K[:, :, f.source - 1, f.source - 1] -= k
        if f.target is not None:
            K[:, :, f.target - 1, f.source - 1] += k
    if invalid_params.any():
        K = np.where(invalid_params[..., None, None], -np.eye(n), K)
    lam, V, Vinv, bad = _eigen(K, _blocks(structure))
    ones = np.ones((N, B))
    zeros = np.zeros((N, B))

    def per_cmt(prefix: str, default: FloatArray) -> FloatArray:
        keys = [f"{prefix}{c + 1}" for c in range(n)]
        if not any(k in params for k in keys):
            return np.broadcast_to(default[..., None], (N, B, n))
        return np.stack([params.get(k, default) for k in keys], axis=-1)  # (N, B, n)

    Fc, Lc, Rc, Dc, Sc = (per_cmt("F", ones), per_cmt("ALAG", zeros), per_cmt("R", zeros),
                          per_cmt("D", zeros), per_cmt("S", ones))
    pi, pc, po = design.pair_ind, design.pair_cmt, design.obs_cmt[design.pair_obs]
    P = pi.size
    n_obs = design.obs_ind.size
    pred = np.zeros((n_obs, B))
    if P == 0:
        return pred, bad
    w = V[pi, :, po, :] * Vinv[pi, :, :, pc]  # (P, B, n): V[o, k] Vinv[k, c]
    kind_all = design.pair_kind
    ss_all = design.pair_ss == 1
    contrib = np.zeros((P, B, n))
    ii_all = np.where(design.pair_ii > 0, design.pair_ii, 1.0)

    def sub(mask: NDArray[np.bool_]) -> IntArray:
        return np.flatnonzero(mask)

    def common(q: IntArray) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
        qi, qc = pi[q], pc[q]
        lag = Lc[qi, :, qc]
        dt = design.pair_tobs[q, None] - (design.pair_tdose[q, None] + lag)  # as the engine computes entry times
        amount = Fc[qi, :, qc] * design.pair_amt[q, None]
        return lag, dt, amount, qi

    # -- bolus doses with their ADDL doses (finite series), not steady state
    q = sub((kind_all == _BOLUS) & ~ss_all)
    if q.size:
        lag, dt, amount, qi = common(q)
        L3 = lam[qi]
        ii = ii_all[q, None]
        addl = design.pair_addl[q, None]
        entered = dt >= 0
        if not np.any(addl > 0):  # one dose per record (a chart's administrations): the same sums, no series
            contrib[q] = np.where(entered[..., None], amount[..., None] * np.exp(L3 * np.where(entered, dt, 0.0)[
                ..., None]), 0.0)
        else:
            # index of the last dose that has entered: K = min(ADDL, floor(dt / ii)), checked like the engine
            K = np.where(addl > 0, np.minimum(addl, np.floor(np.maximum(dt, 0.0) / ii)), 0.0)
            t0 = design.pair_tdose[q, None]
            tobs = design.pair_tobs[q, None]
            over = (K > 0) & ((t0 + K * ii) + lag > tobs)
            K = np.where(over, K - 1, K)
            under = (addl > K) & ((t0 + (K + 1) * ii) + lag <= tobs)
            K = np.where(under, K + 1, K)
            dK = np.where(entered, tobs - ((t0 + K * ii) + lag), 0.0)[..., None]
            series = np.where(np.abs(L3 * ii[..., None]) < 1e-12, (K + 1)[..., None],
                              np.expm1(L3 * ii[..., None] * (K + 1)[..., None])
                              / np.where(np.abs(L3 * ii[..., None]) < 1e-12, 1.0, np.expm1(L3 * ii[..., None])))
            series = np.where((addl > 0)[..., None], series, 1.0)
            contrib[q] = np.where(entered[..., None], amount[..., None] * np.exp(L3 * dK) * series, 0.0)
    zero_order = (kind_all == _RATE) | (kind_all == _MODEL_RATE) | (kind_all == _MODEL_DUR)
    if zero_order.any():
        zq = np.flatnonzero(zero_order)
        invalid = (((kind_all[zq] == _MODEL_DUR)[:, None] & ~(Dc[pi[zq], :, pc[zq]] > 0))
                   | ((kind_all[zq] == _MODEL_RATE)[:, None] & ~(Rc[pi[zq], :, pc[zq]] > 0)))
        bad = bad | _scatter_any(invalid, pi[zq], N, B)
    # -- zero-order inputs (expanded ADDL), not steady state
    q = sub(((kind_all == _RATE) | (kind_all == _MODEL_RATE) | (kind_all == _MODEL_DUR)) & ~ss_all)
    if q.size:
        lag, dt, amount, qi = common(q)
        rho, dur = _rate_duration(kind_all[q], design.pair_rate[q], amount, Rc[qi, :, pc[q]], Dc[qi, :, pc[q]])
        L3 = lam[qi]
        m = dt >= 0
        d_ = np.where(m, dt, 0.0)[..., None]
        mp = np.minimum(d_, np.where(m, dur, 0.0)[..., None])
        contrib[q] = np.where(m[..., None], rho[..., None] * np.exp(L3 * (d_ - mp)) * _expm1_over(L3, mp), 0.0)
    # -- constant infusion at steady state, stopped at its record
    q = sub(kind_all == _CONST_INF)
    if q.size:
        qi = pi[q]
        L3 = lam[qi]
        dt = np.broadcast_to((design.pair_tobs[q] - design.pair_tdose[q])[:, None], (q.size, B))
        m = dt >= 0
        safe = np.where(L3 < 0, L3, -1.0)
        decay = np.exp(L3 * np.where(m, dt, 0.0)[..., None])
        contrib[q] = np.where(m[..., None], design.pair_rate[q, None, None] * decay / -safe, 0.0)
        bad |= _scatter_any(((L3 >= 0) & (np.abs(w[q]) > 1e-12)).any(-1) & m, qi, N, B)
    # -- gamma-density (transit) inputs, not steady state: each dose's input so far, decayed since it ended
    gamma_q = kind_all == _GAMMA
    if gamma_q.any():
        assert structure.gamma is not None
        ga, gb, gend, g_invalid = _gamma_parameters(params, structure.gamma, (N, B))
        invalid_params |= g_invalid
        gfull = gamma_response(lam, gend, ga, gb)  # (N, B, n): a whole dose's input, at its end
        q = sub(gamma_q & ~ss_all)
        if q.size:
            lag, dt, amount, qi = common(q)
            contrib[q] = amount[..., None] * gamma_so_far(lam[qi], dt, ga[qi], gb[qi], gend[qi], gfull[qi])
        # at steady state, the earlier doses j = 1, 2, ... (entered dt + j ii ago): those whose input is still
        # running one by one, then those whose input is over as a geometric series (the engine's k0 doses and tail)
        q = sub(gamma_q & ss_all)
        if q.size:
            lag, dt, amount, qi = common(q)
            L3, a3, b3, end3, full3 = lam[qi], ga[qi], gb[qi], gend[qi], gfull[qi]
            iiv = ii_all[q, None]
            first_over = np.maximum(1.0, np.ceil((end3 - dt) / iiv))  # first j with dt + j ii >= end
            geo_ok = L3 < 0
            denom = np.where(geo_ok, -np.expm1(L3 * iiv[..., None]), 1.0)
            tail = np.exp(L3 * (dt + first_over * iiv - end3)[..., None]) * full3 / denom
            total = tail
            for n_back in range(1, _loop_count(first_over)):
                running = n_back < first_over
                if running.any():
                    x = np.where(running, dt + n_back * iiv, 0.0)
                    total = total + np.where(running[..., None], gamma_so_far(L3, x, a3, b3, end3, full3), 0.0)
            contrib[q] = amount[..., None] * total
            bad |= _scatter_any(np.asarray((~geo_ok & (np.abs(w[q]) > 1e-12)).any(-1)), qi, N, B)
    # -- steady-state series of the earlier doses: entries at dt + j*ii, j >= 1
    q = sub(ss_all & ~gamma_q)
    if q.size:
        lag, dt, amount, qi = common(q)
        L3 = lam[qi]
        iiv = ii_all[q, None]
        geo_ok = L3 < 0
        denom = np.where(geo_ok, -np.expm1(L3 * iiv[..., None]), 1.0)  # 1 - e^(lam ii)
        j0 = np.maximum(1.0, np.ceil(-dt / iiv))  # first earlier dose that has entered
        is_bolus = (kind_all[q] == _BOLUS)[:, None]
        d0 = (dt + j0 * iiv)[..., None]
        part_bolus = amount[..., None] * np.exp(L3 * d0) / denom
        rho, dur = _rate_duration(kind_all[q], design.pair_rate[q], amount, Rc[qi, :, pc[q]], Dc[qi, :, pc[q]])
        j1 = np.maximum(j0, np.ceil((dur - dt) / iiv))  # first earlier infusion already complete
        d1 = (dt + j1 * iiv - dur)[..., None]
        part_inf = rho[..., None] * np.exp(L3 * d1) * _expm1_over(L3, dur[..., None]) / denom
        n_partial = _loop_count(np.where(~is_bolus, j1 - j0, 0.0))
        for step in range(n_partial):
            j = j0 + step
            mk = ~is_bolus & (j < j1)
            dq = np.where(mk, dt + j * iiv, 0.0)[..., None]
            part_inf = part_inf + np.where(mk[..., None], rho[..., None] * _expm1_over(L3, dq), 0.0)
        contrib[q] = np.where(is_bolus[..., None], part_bolus, part_inf)
        no_ss: NDArray[np.bool_] = np.asarray((~geo_ok & (np.abs(w[q]) > 1e-12)).any(-1))
        bad |= _scatter_any(no_ss, qi, N, B)
    vals = np.einsum("pbk,pbk->pb", w, contrib)
    np.add.at(pred, design.pair_obs, vals)
    scale = Sc[design.obs_ind, :, design.obs_cmt]
    out = pred / scale
    # parameters that are not finite or not valid rates give NaN (an impossible parameter set, not a failure)
    dose_ok = np.all(np.isfinite(Fc) & (Fc >= 0) & np.isfinite(Lc) & (Lc >= 0), axis=-1)
    invalid_params |= ~dose_ok
    if invalid_params.any():
        out = np.where(invalid_params[design.obs_ind], np.nan, out)
        bad &= ~invalid_params
    return out, bad


def _loop_count(x: FloatArray) -> int:
    """The largest finite entry of ``x`` as a loop count (0 where none): a member whose lag, duration or input is
    not finite gets NaN predictions (``invalid_params``), not an exception from its NaN or infinite count."""
    finite = x[np.isfinite(x)]
    return int(finite.max()) if finite.size else 0


def _gamma_parameters(params: Mapping[str, FloatArray], gamma: GammaInput, shape: tuple[int, int]
                      ) -> tuple[FloatArray, FloatArray, FloatArray, NDArray[np.bool_]]:
    """Shape n + 1, rate (n + 1) / mtt and support (:func:`cnidose.pk.solvers.gamma_support`) of the gamma input,
    (N, B) each, and where n or mtt is not valid (not finite, n < 0, mtt <= 0: an impossible parameter set, NaN
    predictions; the engine refuses such a record with the parameter's name)."""
    n = np.broadcast_to(np.asarray(params[gamma.n], dtype=np.float64), shape)
    mtt = np.broadcast_to(np.asarray(params[gamma.mtt], dtype=np.float64), shape)
    invalid = ~(np.isfinite(n) & (n >= 0) & np.isfinite(mtt) & (mtt > 0))
    a = np.where(invalid, 1.0, n + 1.0)
    b = a / np.where(invalid, 1.0, mtt)
    return a, b, gamma_support(a, b), invalid


def _rate_duration(kind: IntArray, rate: FloatArray, amount: FloatArray, R: FloatArray, D: FloatArray
                   ) -> tuple[FloatArray, FloatArray]:
    """Input rate and duration of zero-order doses (P', B): given RATE, modelled rate R or modelled duration D."""
    k = kind[:, None]
    given = np.broadcast_to(rate[:, None], amount.shape)
    rho = np.where(k == _RATE, given, np.where(k == _MODEL_RATE, R, amount / np.where(D > 0, D, 1.0)))
    dur = np.where(k == _MODEL_DUR, D, amount / np.where(rho > 0, rho, 1.0))
    return rho, dur


def _scatter_any(mask: NDArray[np.bool_], ind: IntArray, N: int, B: int) -> NDArray[np.bool_]:
    out = np.zeros((N, B), dtype=bool)
    if mask.any():
        rows, cols = np.nonzero(mask)
        out[ind[rows], cols] = True
    return out
