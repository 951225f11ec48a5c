"""Observations of many individuals at once, by superposition of dose responses.

For a linear structure whose parameters are constant within each individual,
an observation is a sum over the doses that precede it of closed-form
responses ``sum_k w_k e^(lambda_k dt)`` (bolus), their integrals (zero-order
inputs) and geometric series (steady state). This module compiles the
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

from cnidose.pk.events import Individual
from cnidose.pk.structure import LinearStructure

__all__ = ["Design", "compile_design", "design_supports", "predict_design"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_BOLUS, _RATE, _MODEL_RATE, _MODEL_DUR, _CONST_INF = 0, 1, 2, 3, 4


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
    dose_cmts: tuple[int, ...]  # compartments (0-based) that receive doses


def design_supports(structure: object, individual: Individual) -> bool:
    """Whether :func:`compile_design` can represent this individual's records."""
    if not isinstance(structure, LinearStructure):
        return False
    n = structure.n
    cmt = np.where(individual.cmt > 0, individual.cmt, 0)
    return bool(np.all(cmt <= n))


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
                                                     "ss", "ii")}
    dose_cmts: set[int] = set()
    n_obs_total = 0
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
        # rec, time, cmt, kind, amt, rate, ss, ii
        terms: list[tuple[int, float, int, int, float, float, int, float]] = []
        for r in np.flatnonzero((ind.evid == 1) | (ind.evid == 4)).tolist():
            c = (int(ind.cmt[r]) or structure.default_dose) - 1
            dose_cmts.add(c)
            amt, rate, ii, ss = float(ind.amt[r]), float(ind.rate[r]), float(ind.ii[r]), int(ind.ss[r])
            t = float(ind.time[r])
            if ss == 1 and amt == 0 and rate > 0 and ii == 0:
                terms.append((int(r), t, c, _CONST_INF, 0.0, rate, 0, 0.0))
                continue
            kind = _BOLUS if rate == 0 else _RATE if rate > 0 else _MODEL_RATE if rate == -1 else _MODEL_DUR
            for k in range(int(ind.addl[r]) + 1):
                terms.append((int(r), t + k * ii, c, kind, amt, rate, 0, ii))
            if ss in (1, 2):
                terms.append((int(r), t, c, kind, amt, rate, 1, ii))
        for rec, t, c, kind, amt, rate, ss, ii in terms:
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
        dose_cmts=tuple(sorted(dose_cmts)),
    )


def _eigen(K: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, NDArray[np.bool_]]:
    """Batched real eigen-decomposition; ``bad`` marks members to leave to the engine."""
    lam_c, V_c = np.linalg.eig(K)
    imag = np.max(np.abs(lam_c.imag), axis=-1) > 1e-10 * (1.0 + np.max(np.abs(lam_c.real), axis=-1))
    lam, V = lam_c.real, V_c.real
    cond = np.linalg.cond(V)
    bad = imag | ~np.isfinite(cond) | (cond > 1e6)
    V_safe = np.where(bad[..., None, None], np.eye(K.shape[-1]), V)
    Vinv = np.linalg.inv(V_safe)
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
        exist); their predictions are not to be used (simulate them with the engine).
    """
    N = design.n_individuals
    first = next(iter(params.values()))
    B = first.shape[1]
    n = structure.n
    K = np.zeros((N, B, n, n))
    for f in structure.flows:
        k = params[f.rate] / params[f.per] if f.per is not None else params[f.rate]
        K[:, :, f.source - 1, f.source - 1] -= k
        if f.target is not None:
            K[:, :, f.target - 1, f.source - 1] += k
    lam, V, Vinv, bad = _eigen(K)
    ones = np.ones((N, B))
    zeros = np.zeros((N, B))

    def per_cmt(prefix: str, default: FloatArray) -> FloatArray:
        return np.stack([params.get(f"{prefix}{c + 1}", default) for c in range(n)], axis=-1)  # (N, B, n)

    Fc, Lc, Rc, Dc, Sc = (per_cmt("F", ones), per_cmt("ALAG", zeros), per_cmt("R", zeros),
                          per_cmt("D", zeros), per_cmt("S", ones))
    pi, pc, po = design.pair_ind, design.pair_cmt, design.obs_cmt[design.pair_obs]
    P = pi.size
    n_obs = design.obs_ind.size
    pred = np.zeros((n_obs, B))
    if P == 0:
        return pred, bad
    w = V[pi, :, po, :] * Vinv[pi, :, :, pc]  # (P, B, n): V[o, k] Vinv[k, c]
    lam_p = lam[pi]  # (P, B, n)
    lag = np.where(design.pair_kind[:, None] == _CONST_INF, 0.0, Lc[pi, :, pc])  # (P, B)
    dt = design.pair_tobs[:, None] - (design.pair_tdose[:, None] + lag)  # time since the dose entered (as the engine)
    amount = Fc[pi, :, pc] * design.pair_amt[:, None]
    kind = design.pair_kind[:, None]
    rate_given = np.broadcast_to(design.pair_rate[:, None], dt.shape)
    rho = np.where(kind == _RATE, rate_given,
                   np.where(kind == _MODEL_RATE, Rc[pi, :, pc],
                            np.where(kind == _MODEL_DUR, amount / np.where(Dc[pi, :, pc] > 0, Dc[pi, :, pc], 1.0),
                                     rate_given)))
    dur = np.where(kind == _MODEL_DUR, Dc[pi, :, pc], amount / np.where(rho > 0, rho, 1.0))
    is_inf = (kind == _RATE) | (kind == _MODEL_RATE) | (kind == _MODEL_DUR)
    invalid = ((kind == _MODEL_DUR) & ~(Dc[pi, :, pc] > 0)) | ((kind == _MODEL_RATE) & ~(Rc[pi, :, pc] > 0))
    bad = bad | _scatter_any(invalid, pi, N, B)
    ss = design.pair_ss[:, None] == 1
    ii_safe = np.where(design.pair_ii > 0, design.pair_ii, 1.0)
    ii = ii_safe[:, None, None]
    L3 = lam_p
    contrib = np.zeros((P, B, n))
    # -- bolus, single dose
    m = (kind == _BOLUS) & ~ss & (dt >= 0)
    contrib += np.where(m[..., None], amount[..., None] * np.exp(L3 * np.where(m, dt, 0.0)[..., None]), 0.0)
    # -- zero-order input, single dose
    m = is_inf & ~ss & (dt >= 0)
    mp = np.minimum(np.where(m, dt, 0.0), np.where(m, dur, 0.0))[..., None]
    contrib += np.where(m[..., None], rho[..., None] * np.exp(L3 * (np.where(m, dt, 0.0)[..., None] - mp))
                        * _expm1_over(L3, mp), 0.0)
    # -- constant infusion at steady state, stopped at its record
    m = (kind == _CONST_INF) & (dt >= 0)
    if m.any():
        safe = np.where(L3 < 0, L3, -1.0)
        contrib += np.where(m[..., None], rate_given[..., None] * np.exp(L3 * np.where(m, dt, 0.0)[..., None])
                            / -safe, 0.0)
        bad |= _scatter_any(((L3 >= 0) & (np.abs(w) > 1e-12)).any(-1) & m, pi, N, B)
    # -- steady-state series of the earlier doses: entries at dt + j*ii, j >= 1
    if ss.any():
        geo_ok = L3 < 0
        denom = np.where(geo_ok, -np.expm1(L3 * ii), 1.0)  # 1 - e^(lam ii)
        j0 = np.maximum(1.0, np.ceil(-dt / ii_safe[:, None]))  # first dose that has entered
        m = (kind == _BOLUS) & ss
        if m.any():
            d0 = (dt + j0 * ii_safe[:, None])[..., None]
            term = amount[..., None] * np.exp(L3 * np.where(m[..., None], d0, 0.0)) / denom
            contrib += np.where(m[..., None], term, 0.0)
        m = is_inf & ss
        if m.any():
            iiv = ii_safe[:, None]
            j1 = np.maximum(j0, np.ceil((dur - dt) / iiv))  # first earlier infusion already complete
            d1 = np.where(m, dt + j1 * iiv - dur, 0.0)[..., None]
            full = rho[..., None] * np.exp(L3 * d1) * _expm1_over(L3, np.where(m, dur, 0.0)[..., None]) / denom
            contrib += np.where(m[..., None], full, 0.0)
            n_partial = int(np.max(np.where(m, j1 - j0, 0)))
            for q in range(n_partial):
                j = j0 + q
                mq = m & (j < j1)
                dq = np.where(mq, dt + j * iiv, 0.0)[..., None]
                part = rho[..., None] * _expm1_over(L3, dq)
                # partial infusion still running: integral over [0, dq] of e^(lam (dq - s)) ds
                contrib += np.where(mq[..., None], part, 0.0)
        bad |= _scatter_any((~geo_ok & (np.abs(w) > 1e-12)).any(-1) & ss, pi, N, B)
    vals = np.einsum("pbk,pbk->pb", w, contrib)
    np.add.at(pred, design.pair_obs, vals)
    scale = Sc[design.obs_ind, :, design.obs_cmt]
    return pred / scale, bad


def _scatter_any(mask: NDArray[np.bool_], ind: IntArray, N: int, B: int) -> NDArray[np.bool_]:
    out = np.zeros((N, B), dtype=bool)
    if mask.any():
        rows, cols = np.nonzero(mask)
        out[ind[rows], cols] = True
    return out
