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

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cnidose.pk.eigen import eigen_blocks as _eigen_blocks
from cnidose.pk.eigen import flow_blocks as _blocks
from cnidose.pk.events import Individual
from cnidose.pk.solvers import gamma_response, gamma_so_far, gamma_so_far_slopes, gamma_support
from cnidose.pk.structure import GammaInput, LinearStructure

__all__ = ["Design", "compile_design", "design_differentiable", "design_supports", "predict_design",
           "predict_design_jacobian"]

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
    if individual.cmt.size and int(individual.cmt.max()) > structure.n:  # CMT >= 0 (split_individuals)
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
    EVID 0 records). The records of all individuals are laid end to end and
    paired with array operations (no Python loop over records).
    """
    N = len(individuals)
    sizes = np.fromiter((len(ind) for ind in individuals), dtype=np.int64, count=N)
    first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # each individual's first global record
    R = int(first[-1])

    def cat(name: str, dtype: type) -> NDArray:  # type: ignore[type-arg]
        if N == 0:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([getattr(ind, name) for ind in individuals]).astype(dtype, copy=False)

    time, evid, cmt, amt, rate = cat("time", np.float64), cat("evid", np.int64), cat("cmt", np.int64), \
        cat("amt", np.float64), cat("rate", np.float64)
    ii, ss, addl = cat("ii", np.float64), cat("ss", np.int64), cat("addl", np.int64)
    ind_of = np.repeat(np.arange(N, dtype=np.int64), sizes)
    local = np.arange(R, dtype=np.int64) - first[ind_of]
    if observe is None:
        sel = evid == 0
    else:
        sel = np.concatenate([np.asarray(o, dtype=bool) for o in observe]) if N else np.zeros(0, bool)
    # observations, in record order
    obs_pos = np.flatnonzero(sel)
    obs_ind = ind_of[obs_pos]
    obs_cmt = np.where((evid[obs_pos] == 0) & (cmt[obs_pos] > 0), cmt[obs_pos], structure.default_obs) - 1
    obs_start = np.concatenate([[0], np.cumsum(np.bincount(obs_ind, minlength=N))]).astype(np.int64)
    # the next reset strictly after each record (EVID 3/4, or a dose with SS=1), else the end of its individual
    dose = (evid == 1) | (evid == 4)
    resets = np.flatnonzero((evid == 3) | (evid == 4) | (dose & (ss == 1)))
    after = np.append(resets, R)[np.searchsorted(resets, np.arange(R), side="right")]  # R: none left
    next_reset = np.minimum(after, first[ind_of + 1])
    # terms, in the order of their dose records: a constant steady-state infusion is one term; a bolus dose with
    # its ADDL doses one finite series (other inputs, a gamma input included: one term per dose); then, at SS 1/2,
    # the series of the regimen's earlier doses
    gamma_c = structure.gamma.cmt - 1 if structure.gamma is not None else -1
    d = np.flatnonzero(dose)
    dc = np.where(cmt[d] > 0, cmt[d], structure.default_dose) - 1
    const_inf = (ss[d] == 1) & (amt[d] == 0) & (rate[d] > 0) & (ii[d] == 0)
    kind_d = np.where(rate[d] == 0, _BOLUS, np.where(rate[d] > 0, _RATE, np.where(rate[d] == -1, _MODEL_RATE,
                                                                                   _MODEL_DUR)))
    kind_d = np.where((kind_d == _BOLUS) & (dc == gamma_c), _GAMMA, kind_d)
    kind_d = np.where(const_inf, _CONST_INF, kind_d)
    n_exp = np.where(const_inf, 1, np.where(kind_d == _BOLUS, 1, addl[d] + 1))
    n_ss = np.where(~const_inf & ((ss[d] == 1) | (ss[d] == 2)), 1, 0)
    per = n_exp + n_ss
    t_of = np.repeat(np.arange(d.size, dtype=np.int64), per)  # the dose of each term
    j = np.arange(t_of.size, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)  # position within its dose
    is_ss = j >= n_exp[t_of]
    rec = d[t_of]
    kind = kind_d[t_of]
    expanded = (kind != _BOLUS) & (kind != _CONST_INF) & ~is_ss
    t_term = np.where(expanded, time[rec] + j * ii[rec], time[rec])
    term_ss = is_ss.astype(np.int64)
    term_addl = np.where((kind == _BOLUS) & ~is_ss, addl[rec], 0)
    term_amt = np.where(kind == _CONST_INF, 0.0, amt[rec])
    term_ii = np.where(kind == _CONST_INF, 0.0, ii[rec])
    # each term's candidate observations: those after its record and before the next reset (a contiguous run of
    # obs_pos), then, for an input that is not a steady state, those at or after its time
    lo = np.searchsorted(obs_pos, rec, side="right")
    hi = np.searchsorted(obs_pos, next_reset[rec], side="left")
    count = np.maximum(hi - lo, 0)
    pair_term = np.repeat(np.arange(rec.size, dtype=np.int64), count)
    pair_o = np.repeat(lo, count) + np.arange(pair_term.size, dtype=np.int64) \
        - np.repeat(np.cumsum(count) - count, count)
    keep = (term_ss[pair_term] == 1) | (kind[pair_term] == _CONST_INF) | (time[obs_pos[pair_o]] >= t_term[pair_term])
    pair_term, pair_o = pair_term[keep], pair_o[keep]
    order = np.argsort(pair_o, kind="stable")
    pair_term, pair_o = pair_term[order], pair_o[order]
    prec = rec[pair_term]
    return Design(
        n_individuals=N, n_cmt=structure.n,
        obs_ind=obs_ind.astype(np.int64), obs_cmt=obs_cmt.astype(np.int64), obs_rec=local[obs_pos],
        obs_time=time[obs_pos], obs_start=obs_start,
        pair_obs=pair_o.astype(np.int64), pair_ind=ind_of[prec], pair_cmt=dc[t_of[pair_term]].astype(np.int64),
        pair_tobs=time[obs_pos[pair_o]], pair_tdose=t_term[pair_term], pair_kind=kind[pair_term].astype(np.int64),
        pair_amt=term_amt[pair_term], pair_rate=rate[prec], pair_ss=term_ss[pair_term], pair_ii=term_ii[pair_term],
        pair_addl=term_addl[pair_term].astype(np.int64),
        dose_cmts=tuple(sorted({int(c) for c in np.unique(dc)})),
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
    bad = imag | ~np.isfinite(V).all(axis=(-1, -2))
    mag = np.abs(lam)
    for i in range(n):  # each pair of eigenvalues once (the structures have 2-4 compartments)
        for j in range(i + 1, n):
            bad |= np.abs(lam[..., i] - lam[..., j]) < 1e-6 * np.maximum(np.maximum(mag[..., i], mag[..., j]), 1e-300)
    V_safe = np.where(bad[..., None, None], np.eye(n), V)
    Vinv = _inverse(V_safe)
    singular: NDArray[np.bool_] = np.asarray(~np.isfinite(Vinv).all(axis=(-1, -2)))
    if singular.any():
        bad |= singular
        Vinv = np.where(singular[..., None, None], np.eye(n), Vinv)
        V_safe = np.where(singular[..., None, None], np.eye(n), V_safe)
    return lam, V_safe, Vinv, bad


def _inverse(A: FloatArray) -> FloatArray:
    """Batched inverse of small matrices (..., n, n): by cofactors for n <= 2 (LAPACK's batched call costs more
    than the arithmetic on a cohort's 2 x 2 blocks), by LAPACK above. A singular matrix gives non-finite entries
    (the caller marks the member), not an exception."""
    n = A.shape[-1]
    if n == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / A
    if n == 2:
        a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
        out = np.empty_like(A)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = 1.0 / (a * d - b * c)
            out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1] = d * r, -b * r, -c * r, a * r
        return out
    try:
        return np.asarray(np.linalg.inv(A), dtype=np.float64)
    except np.linalg.LinAlgError:  # some member singular: each alone, NaN for those
        flat = A.reshape(-1, n, n)
        out = np.full_like(flat, np.nan)
        for k in range(flat.shape[0]):
            with contextlib.suppress(np.linalg.LinAlgError):
                out[k] = np.linalg.inv(flat[k])
        return out.reshape(A.shape)


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
        parameters are not finite or not valid (negative rate constants, F or lag; a modelled rate or duration
        that is not positive) get NaN predictions.
    """
    N = design.n_individuals
    first = next(iter(params.values()))
    B = first.shape[1]
    n = structure.n
    K, invalid_params = _rate_matrix(structure, params, (N, B))
    lam, V, Vinv, bad = _eigen(K, _blocks(structure))
    ones = np.ones((N, B))
    zeros = np.zeros((N, B))

    def given(prefix: str) -> bool:
        return any(f"{prefix}{c + 1}" in params for c in range(n))

    def per_cmt(prefix: str, default: FloatArray) -> FloatArray:
        if not given(prefix):
            return np.broadcast_to(default[..., None], (N, B, n))
        return np.stack([params.get(f"{prefix}{c + 1}", default) for c in range(n)], axis=-1)  # (N, B, n)

    # without bioavailability or lag parameters (F 1, lag 0) the per-pair gathers below are skipped: the same numbers
    has_f, has_lag = given("F"), given("ALAG")

    Fc, Lc, Sc = per_cmt("F", ones), per_cmt("ALAG", zeros), per_cmt("S", ones)
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
        if has_lag:
            lag = Lc[qi, :, qc]
            dt = design.pair_tobs[q, None] - (design.pair_tdose[q, None] + lag)  # as the engine computes entry times
        else:
            lag = np.zeros((q.size, B))
            dt = np.broadcast_to((design.pair_tobs[q] - design.pair_tdose[q])[:, None], (q.size, B))
        if has_f:
            amount = Fc[qi, :, qc] * design.pair_amt[q, None]
        else:
            amount = np.broadcast_to(design.pair_amt[q, None], (q.size, B))
        return lag, dt, amount, qi

    # -- bolus doses with their ADDL doses (finite series), not steady state
    bolus = (kind_all == _BOLUS) & ~ss_all
    for q in (sub(bolus & (design.pair_addl == 0)), sub(bolus & (design.pair_addl > 0))):
        if q.size:
            lag, dt, amount, qi = common(q)
            contrib[q] = amount[..., None] * _bolus_response(design, q, lam[qi], lag, dt)[0]
    # -- zero-order inputs (expanded ADDL), not steady state; then the steady states that are not gamma inputs (the
    # series of a regimen's earlier doses, constant infusions): the responses predict_design_jacobian differentiates,
    # here without directions (a modelled rate or duration that is not positive: NaN, an impossible parameter set)
    no_dirs: dict[str, FloatArray] = {}
    steady = (ss_all & (kind_all != _GAMMA)) | (kind_all == _CONST_INF)
    zero_order = ((kind_all == _RATE) | (kind_all == _MODEL_RATE) | (kind_all == _MODEL_DUR)) & ~ss_all
    for q, fn in ((sub(zero_order), _zero_order_tangents), (sub(steady), _steady_tangents)):
        if q.size:
            lag, dt, amount, qi = common(q)
            contrib[q] = fn(design, structure, params, no_dirs, q, lam[qi], lag, dt, amount, None, None,
                            np.zeros((q.size, B, 0, n)), (N, B), invalid_params)[0]
    if steady.any():
        q = sub(steady)
        bad |= _no_steady_state(design, q, lam[pi[q]], w[q], (N, B))
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
    vals = np.einsum("pbk,pbk->pb", w, contrib)
    # the pairs are sorted by observation (compile_design, _subset): each observation's sum over its run of pairs
    po_all = design.pair_obs
    first_pair = np.flatnonzero(np.concatenate([[True], po_all[1:] != po_all[:-1]]))
    pred[po_all[first_pair]] = np.add.reduceat(vals, first_pair, axis=0)
    scale = Sc[design.obs_ind, :, design.obs_cmt]
    out = pred / scale
    # parameters that are not finite or not valid rates give NaN (an impossible parameter set, not a failure)
    if has_f or has_lag:
        dose_ok = np.all(np.isfinite(Fc) & (Fc >= 0) & np.isfinite(Lc) & (Lc >= 0), axis=-1)
        invalid_params |= ~dose_ok
    if invalid_params.any():
        out = np.where(invalid_params[design.obs_ind], np.nan, out)
        bad &= ~invalid_params
    return out, bad


def design_differentiable(design: Design) -> bool:
    """Whether :func:`predict_design_jacobian` takes this design: every kind of input (bolus doses with ADDL,
    zero-order inputs at a given RATE or of a modelled rate or duration, steady states of either, constant infusions,
    gamma-density inputs) but a gamma-density input at steady state."""
    return not bool(np.any((design.pair_kind == _GAMMA) & (design.pair_ss == 1)))


def predict_design_jacobian(design: Design, structure: LinearStructure, params: Mapping[str, FloatArray],
                            tangents: Mapping[str, FloatArray]) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
    """:func:`predict_design` with the predictions' exact derivatives by d directions (the random effects).

    ``tangents[name]`` (N, B, d) is the derivative of parameter ``name`` along each direction (absent: zero). The
    design must be :func:`design_differentiable`. The derivatives go through the eigen-decomposition: with
    M = V⁻¹ dK V, dλ_k = M_kk and dV = V C, C_kl = M_kl / (λ_l − λ_k) (k ≠ l), dV⁻¹ = −C V⁻¹; a mode's weight
    w_k = V_ok V⁻¹_kc is the same for any scaling of V's columns, so C_kk = 0 serves. Each pair's response is
    closed-form in λ, the time since the dose entered, F·AMT and a modelled rate or duration, and so are its
    derivatives: a bolus F·AMT·e^{λ(t − t_d − lag)} (times its ADDL series, :func:`_unit_tangents`); F·AMT times the
    gamma input's convolution (:func:`cnidose.pk.solvers.gamma_so_far_slopes`; its n and mtt must not depend on the
    directions); a zero-order input (:func:`_zero_order_tangents`); the steady-state series of a regimen's earlier
    doses and a constant infusion (:func:`_steady_tangents`). Exact up to the kinks where an event crosses an
    observation time (a lagged dose entering, an infusion ending): there the one-sided derivative of the side the
    parameters are on.

    Returns (O, B) predictions, (O, B, d) derivatives and ``bad`` (N, B) as :func:`predict_design`.
    """
    N = design.n_individuals
    first = next(iter(params.values()))
    B = first.shape[1]
    d = next(iter(tangents.values())).shape[-1] if tangents else 0
    n = structure.n
    zero_t = np.zeros((N, B, d))

    def tan(name: str | None) -> FloatArray:
        return tangents.get(name, zero_t) if name is not None else zero_t

    K, invalid_params = _rate_matrix(structure, params, (N, B))
    dK = np.zeros((N, B, d, n, n))
    for f in structure.flows:
        if f.per is not None:
            k = params[f.rate] / params[f.per]
            dk = (tan(f.rate) - k[..., None] * tan(f.per)) / params[f.per][..., None]
        else:
            dk = tan(f.rate)
        dK[..., f.source - 1, f.source - 1] -= dk
        if f.target is not None:
            dK[..., f.target - 1, f.source - 1] += dk
    lam, V, Vinv, bad = _eigen(K, _blocks(structure))
    M = Vinv[:, :, None] @ dK @ V[:, :, None]  # (N, B, d, n, n)
    dlam = np.diagonal(M, axis1=-2, axis2=-1)  # (N, B, d, n)
    gap = lam[..., None, :] - lam[..., :, None]  # [k, l]: lambda_l - lambda_k
    off = ~np.eye(n, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        C = np.where(off, M / np.where(off, gap, 1.0)[:, :, None], 0.0)
    VC = V[:, :, None] @ C
    CVi = C @ Vinv[:, :, None]

    Fc, Lc, Sc = (_per_cmt_tangents(params, tangents, prefix, n, (N, B), d, default)
                  for prefix, default in (("F", 1.0), ("ALAG", 0.0), ("S", 1.0)))
    pi, pc, po = design.pair_ind, design.pair_cmt, design.obs_cmt[design.pair_obs]
    n_obs = design.obs_ind.size
    pred = np.zeros((n_obs, B))
    dpred = np.zeros((n_obs, B, d))
    P = pi.size
    if P:
        w = V[pi, :, po, :] * Vinv[pi, :, :, pc]  # (P, B, n)
        dw = VC[pi, :, :, po, :] * Vinv[pi, :, None, :, pc] - V[pi, :, None, po, :] * CVi[pi, :, :, :, pc]
        lag = Lc[0][pi, :, pc] if Lc is not None else np.zeros((P, B))
        dt = design.pair_tobs[:, None] - (design.pair_tdose[:, None] + lag)
        L3 = lam[pi]
        amt = design.pair_amt[:, None]
        amount = Fc[0][pi, :, pc] * amt if Fc is not None else np.broadcast_to(amt, (P, B))
        d_amount = Fc[1][pi, :, :, pc] * amt[..., None] if Fc is not None else None  # (P, B, d)
        d_lag = Lc[1][pi, :, :, pc] if Lc is not None else None  # (P, B, d)
        kinds = design.pair_kind
        steady = (design.pair_ss == 1) | (kinds == _CONST_INF)
        unit = ((kinds == _BOLUS) | (kinds == _GAMMA)) & ~steady  # a response proportional to the amount
        if unit.all():
            contrib, dcontrib = _unit_tangents(design, structure, params, tangents, np.arange(P), L3, lag, dt, amount,
                                               d_amount, d_lag, dlam[pi], (N, B), invalid_params)
        else:
            contrib, dcontrib = np.zeros((P, B, n)), np.zeros((P, B, d, n))
            for q, fn in ((np.flatnonzero(unit), _unit_tangents),
                          (np.flatnonzero(~unit & ~steady), _zero_order_tangents),
                          (np.flatnonzero(steady), _steady_tangents)):
                if q.size:
                    contrib[q], dcontrib[q] = fn(design, structure, params, tangents, q, L3[q], lag[q], dt[q],
                                                 amount[q], None if d_amount is None else d_amount[q],
                                                 None if d_lag is None else d_lag[q], dlam[pi[q]], (N, B),
                                                 invalid_params)
        if steady.any():
            sq = np.flatnonzero(steady)
            bad = bad | _no_steady_state(design, sq, L3[sq], w[sq], (N, B))
        vals = np.einsum("pbk,pbk->pb", w, contrib)
        dvals = np.einsum("pbjk,pbk->pbj", dw, contrib) + np.einsum("pbk,pbjk->pbj", w, dcontrib)
        first_pair = np.flatnonzero(np.concatenate([[True], design.pair_obs[1:] != design.pair_obs[:-1]]))
        pred[design.pair_obs[first_pair]] = np.add.reduceat(vals, first_pair, axis=0)
        dpred[design.pair_obs[first_pair]] = np.add.reduceat(dvals, first_pair, axis=0)
    if Sc is not None:
        scale = Sc[0][design.obs_ind, :, design.obs_cmt]
        dscale = Sc[1][design.obs_ind, :, :, design.obs_cmt]
    else:
        scale, dscale = np.ones((n_obs, B)), np.zeros((n_obs, B, d))
    out = pred / scale
    jac = (dpred - out[..., None] * dscale) / scale[..., None]
    for dose_params in (Fc, Lc):
        if dose_params is not None:
            invalid_params |= ~np.all(np.isfinite(dose_params[0]) & (dose_params[0] >= 0), axis=-1)
    if invalid_params.any():
        out = np.where(invalid_params[design.obs_ind], np.nan, out)
        jac = np.where(invalid_params[design.obs_ind][..., None], np.nan, jac)
        bad &= ~invalid_params
    return out, jac, bad


def _unit_tangents(design: Design, structure: LinearStructure, params: Mapping[str, FloatArray],
                   tangents: Mapping[str, FloatArray], q: IntArray, L3: FloatArray, lag: FloatArray, dt: FloatArray,
                   amount: FloatArray, d_amount: FloatArray | None, d_lag: FloatArray | None, d_lam: FloatArray,
                   shape: tuple[int, int], invalid: NDArray[np.bool_]) -> tuple[FloatArray, FloatArray]:
    """Bolus and gamma-input pairs ``q`` of :func:`predict_design_jacobian`: each mode's contribution A R (P', B, n)
    and its derivatives (P', B, d, n), A (dR/dlambda dlambda - dR/dx dlag) + dA R. R is the mode's response to a unit
    dose, x the time since the dose entered (a lag moves it back). ``invalid`` (N, B) is updated in place."""
    kinds = design.pair_kind[q]
    gq = np.flatnonzero(kinds == _GAMMA)
    if gq.size == 0:
        response, slope = _bolus_response(design, q, L3, lag, dt)
        r_lam, r_x = response * slope, L3 * response
    else:
        gamma = structure.gamma
        if gamma is None or gamma.n in tangents or gamma.mtt in tangents:
            raise ValueError("predict_design_jacobian: the gamma input's n and mtt cannot depend on the directions "
                             "(the closed form has no derivative of Kummer's function by them)")
        P, B, n = L3.shape
        response, r_lam, r_x = np.zeros((P, B, n)), np.zeros((P, B, n)), np.zeros((P, B, n))
        bq = np.flatnonzero(kinds == _BOLUS)
        if bq.size:
            resp, slope = _bolus_response(design, q[bq], L3[bq], lag[bq], dt[bq])
            response[bq], r_lam[bq], r_x[bq] = resp, resp * slope, L3[bq] * resp
        ga, gb, gend, g_invalid = _gamma_parameters(params, gamma, shape)
        invalid |= g_invalid
        gi = design.pair_ind[q[gq]]
        response[gq], r_lam[gq], r_x[gq] = gamma_so_far_slopes(L3[gq], dt[gq], ga[gi], gb[gi], gend[gi])
    dresp = d_lam * r_lam[:, :, None, :]  # (P', B, d, n)
    if d_lag is not None:
        dresp = dresp - d_lag[..., None] * r_x[:, :, None, :]
    dcontrib = amount[..., None, None] * dresp
    if d_amount is not None:
        dcontrib = dcontrib + d_amount[..., None] * response[:, :, None, :]
    return amount[..., None] * response, dcontrib


def _rate_duration_tangents(design: Design, structure: LinearStructure, params: Mapping[str, FloatArray],
                            tangents: Mapping[str, FloatArray], q: IntArray, amount: FloatArray,
                            d_amount: FloatArray | None, shape: tuple[int, int], invalid: NDArray[np.bool_]
                            ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Rate and duration (P', B) of zero-order pairs ``q``, and their derivatives (P', B, d): a given RATE (T = A /
    RATE), a modelled rate R (T = A / R) or duration D (rho = A / D), A = F AMT. A modelled R or D that is not
    positive marks the member ``invalid`` (in place)."""
    P, B = amount.shape
    d = next(iter(tangents.values())).shape[-1] if tangents else 0
    kinds = design.pair_kind[q][:, None]
    pi, pc = design.pair_ind[q], design.pair_cmt[q]

    def modelled(prefix: str) -> tuple[FloatArray, FloatArray]:
        got = _per_cmt_tangents(params, tangents, prefix, structure.n, shape, d, 0.0)
        if got is None:
            return np.zeros((P, B)), np.zeros((P, B, d))
        return got[0][pi, :, pc], got[1][pi, :, :, pc]

    dA = d_amount if d_amount is not None else np.zeros((P, B, d))
    R, dR = modelled("R")
    D, dD = modelled("D")
    bad_input = ((kinds == _MODEL_DUR) & ~(D > 0)) | ((kinds == _MODEL_RATE) & ~(R > 0))
    if bad_input.any():
        rows, cols = np.nonzero(bad_input)
        invalid[pi[rows], cols] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        rho, dur = _rate_duration(design.pair_kind[q], design.pair_rate[q], amount, R, D)
        k3 = kinds[..., None]
        d_rho = np.where(k3 == _RATE, 0.0, np.where(k3 == _MODEL_RATE, dR, (dA - rho[..., None] * dD)
                                                     / np.where(D > 0, D, 1.0)[..., None]))
        d_dur = np.where(k3 == _MODEL_DUR, dD, (dA - dur[..., None] * d_rho) / rho[..., None])
    return rho, dur, d_rho, d_dur


def _per_cmt_tangents(params: Mapping[str, FloatArray], tangents: Mapping[str, FloatArray], prefix: str, n: int,
                      shape: tuple[int, int], d: int, default: float) -> tuple[FloatArray, FloatArray] | None:
    """The per-compartment parameters ``<prefix>1`` .. ``<prefix>n`` (N, B, n), ``default`` where a compartment has
    none, and their derivatives (N, B, d, n); None where the model has none of them."""
    keys = [f"{prefix}{c + 1}" for c in range(n)]
    if not any(k in params for k in keys):
        return None
    value = np.stack([np.broadcast_to(params[k], shape) if k in params else np.full(shape, default) for k in keys],
                     axis=-1)
    return value, np.stack([np.broadcast_to(tangents[k], (*shape, d)) if k in tangents else np.zeros((*shape, d))
                            for k in keys], axis=-1)


def _no_steady_state(design: Design, q: IntArray, L3: FloatArray, w: FloatArray, shape: tuple[int, int]
                     ) -> NDArray[np.bool_]:
    """Members (N, B) with a steady-state pair among ``q`` (SS series or constant infusion; a constant infusion once
    it has started) whose eigen-modes include one that does not decay and weighs in: it has no steady state."""
    no_ss = ((L3 >= 0) & (np.abs(w) > 1e-12)).any(axis=-1)
    const = design.pair_kind[q] == _CONST_INF
    no_ss &= ~const[:, None] | (design.pair_tobs[q] >= design.pair_tdose[q])[:, None]
    return _scatter_any(no_ss, design.pair_ind[q], *shape)


def _E_and_slope(L3: FloatArray, m: FloatArray) -> tuple[FloatArray, FloatArray]:
    """E(lambda, m) = (e^(lambda m) - 1) / lambda and dE/dlambda = (m e^(lambda m) - E) / lambda (m^2/2 + lambda
    m^3/6 near lambda m = 0), for ``m`` broadcasting against ``L3``."""
    E = _expm1_over(L3, m)
    small = np.abs(L3 * m) < 1e-6
    lam_safe = np.where(small, 1.0, L3)
    return E, np.where(small, m * m / 2 + L3 * m ** 3 / 6, (m * np.exp(L3 * m) - E) / lam_safe)


def _steady_tangents(design: Design, structure: LinearStructure, params: Mapping[str, FloatArray],
                     tangents: Mapping[str, FloatArray], q: IntArray, L3: FloatArray, lag: FloatArray, dt: FloatArray,
                     amount: FloatArray, d_amount: FloatArray | None, d_lag: FloatArray | None, d_lam: FloatArray,
                     shape: tuple[int, int], invalid: NDArray[np.bool_]) -> tuple[FloatArray, FloatArray]:
    """Steady-state pairs ``q`` (the series of a regimen's earlier doses, SS 1/2; bolus or zero-order, not a gamma
    input) and constant infusions at steady state, of :func:`predict_design_jacobian`: contributions (P', B, n) and
    their derivatives (P', B, d, n), the same sums as :func:`predict_design`.

    With den = 1 - e^(lambda ii) and the first earlier dose that has entered j0 (and, for an input, j1 the first
    already complete; both piecewise constant): a bolus A e^(lambda d0) / den, d0 = x + j0 ii; an input rho
    e^(lambda d1) E(lambda, T) / den, d1 = x + j1 ii - T, plus rho E(lambda, x + j ii) for the inputs j0 <= j < j1
    still running; a constant infusion RATE e^(lambda x) / -lambda. d den / d lambda = -ii e^(lambda ii). A mode that
    does not decay (lambda >= 0) and weighs in gives no steady state: :func:`predict_design_jacobian` marks the
    member bad, as :func:`predict_design` does."""
    P, B, n = L3.shape
    d = d_lam.shape[2]
    kinds = design.pair_kind[q]
    contrib = np.zeros((P, B, n))
    dcontrib = np.zeros((P, B, d, n))
    dx = -d_lag if d_lag is not None else np.zeros((P, B, d))  # the time since entry moves against the lag
    dA = d_amount if d_amount is not None else np.zeros((P, B, d))
    geo_ok = L3 < 0
    # constant infusions: c = RATE e^(lambda x) / -lambda (x from its record: no lag, no F)
    cq = np.flatnonzero(kinds == _CONST_INF)
    if cq.size:
        x = np.broadcast_to((design.pair_tobs[q[cq]] - design.pair_tdose[q[cq]])[:, None], (cq.size, B))
        Lc3 = L3[cq]
        safe = np.where(Lc3 < 0, Lc3, -1.0)
        c = np.where((x >= 0)[..., None], design.pair_rate[q[cq], None, None] * np.exp(Lc3 * x[..., None]) / -safe,
                     0.0)
        contrib[cq] = c
        dcontrib[cq] = d_lam[cq] * (c * (x[..., None] - 1.0 / safe))[:, :, None, :]
    sq = np.flatnonzero(kinds != _CONST_INF)
    if sq.size == 0:
        return contrib, dcontrib
    L = L3[sq]
    dl = d_lam[sq]
    x = dt[sq]
    ii = np.where(design.pair_ii[q[sq]] > 0, design.pair_ii[q[sq]], 1.0)[:, None]
    ok = geo_ok[sq]
    e_ii = np.exp(L * ii[..., None])
    den = np.where(ok, -np.expm1(L * ii[..., None]), 1.0)
    den_slope = np.where(ok, ii[..., None] * e_ii / den, 0.0)  # -d log(den) / d lambda
    j0 = np.maximum(1.0, np.ceil(-x / ii))
    is_bolus = kinds[sq] == _BOLUS
    out = np.zeros((sq.size, B, n))
    dout = np.zeros((sq.size, B, d, n))
    bq = np.flatnonzero(is_bolus)
    if bq.size:
        d0 = (x[bq] + j0[bq] * ii[bq])[..., None]
        A = amount[sq][bq]
        c = A[..., None] * np.exp(L[bq] * d0) / den[bq]
        out[bq] = c
        dout[bq] = (c[:, :, None, :] * (dl[bq] * (d0 + den_slope[bq])[:, :, None, :]
                                         + L[bq][:, :, None, :] * dx[sq][bq][..., None])
                    + dA[sq][bq][..., None] * (c / A[..., None])[:, :, None, :])
    iq = np.flatnonzero(~is_bolus)
    if iq.size:
        qq = q[sq[iq]]
        rho, T, d_rho, d_T = _rate_duration_tangents(design, structure, params, tangents, qq, amount[sq][iq],
                                                     None if d_amount is None else d_amount[sq][iq], shape, invalid)
        Li, dli, xi, iii = L[iq], dl[iq], x[iq], ii[iq]
        dxi = dx[sq][iq][..., None]  # (P'', B, d, 1)
        j1 = np.maximum(j0[iq], np.ceil((T - xi) / iii))
        d1 = (xi + j1 * iii - T)[..., None]
        E_T, E_T_lam = _E_and_slope(Li, T[..., None])
        r = rho[..., None]
        decay = np.exp(Li * d1)
        tail = r * decay * E_T / den[iq]
        # d tail = tail (d1 + den_slope) dlambda + tail lambda (dx - dT) + r decay (E_lam dlambda + e^(lambda T) dT)
        #          / den + tail drho / rho
        dT4 = d_T[..., None]
        dtail = (tail[:, :, None, :] * ((d1 + den_slope[iq])[:, :, None, :] * dli + Li[:, :, None, :] * (dxi - dT4))
                 + ((r * decay / den[iq])[:, :, None, :]
                    * (E_T_lam[:, :, None, :] * dli + np.exp(Li * T[..., None])[:, :, None, :] * dT4))
                 + d_rho[..., None] * (decay * E_T / den[iq])[:, :, None, :])
        n_partial = _loop_count(j1 - j0[iq])
        for step in range(n_partial):
            j = j0[iq] + step
            mk = j < j1
            m = np.where(mk, xi + j * iii, 0.0)[..., None]
            E_m, E_m_lam = _E_and_slope(Li, m)
            mk3 = mk[..., None]
            tail = tail + np.where(mk3, r * E_m, 0.0)
            dtail = dtail + np.where(mk3[..., None], d_rho[..., None] * E_m[:, :, None, :]
                                     + r[..., None] * (E_m_lam[:, :, None, :] * dli
                                                       + np.exp(Li * m)[:, :, None, :] * dxi), 0.0)
        out[iq] = tail
        dout[iq] = dtail
    contrib[sq] = out
    dcontrib[sq] = dout
    return contrib, dcontrib


def _zero_order_tangents(design: Design, structure: LinearStructure, params: Mapping[str, FloatArray],
                         tangents: Mapping[str, FloatArray], q: IntArray, L3: FloatArray, lag: FloatArray,
                         dt: FloatArray, amount: FloatArray, d_amount: FloatArray | None, d_lag: FloatArray | None,
                         d_lam: FloatArray, shape: tuple[int, int], invalid: NDArray[np.bool_]
                         ) -> tuple[FloatArray, FloatArray]:
    """Zero-order inputs ``q`` (given RATE, modelled rate R or duration D; not at steady state) of
    :func:`predict_design_jacobian`: each mode's contribution (P', B, n) and its derivatives (P', B, d, n).

    An input at rate rho for a duration T, x after it started: rho E(lambda, x) while it runs (E(lambda, m) =
    (e^(lambda m) - 1) / lambda), rho e^(lambda (x - T)) E(lambda, T) after. dE/dlambda = (m e^(lambda m) - E) /
    lambda (m^2/2 + lambda m^3/6 near lambda m = 0) and dE/dm = e^(lambda m); x moves with -dlag; rho and T with the
    amount A = F AMT and the modelled R or D (given RATE: T = A / RATE; R: T = A / R; D: rho = A / D)."""
    P, B = L3.shape[:2]
    d = d_lam.shape[2]
    rho, dur, d_rho, d_dur = _rate_duration_tangents(design, structure, params, tangents, q, amount, d_amount, shape,
                                                     invalid)
    entered = dt >= 0
    x = np.where(entered, dt, 0.0)
    running = x < dur
    m = np.where(running, x, dur)[..., None]  # (P', B, 1)
    E, E_lam = _E_and_slope(L3, m)
    e_m = np.exp(L3 * m)
    decay = np.exp(L3 * np.where(running, 0.0, x - dur)[..., None])  # 1 while it runs
    since = np.where(running, 0.0, x - dur)[..., None, None]  # (P', B, 1, 1)
    r = rho[..., None, None]
    dx = -d_lag[..., None] if d_lag is not None else np.zeros((P, B, d, 1))
    run4 = running[..., None, None]
    # running: d(rho E(x)) = drho E + rho (E_lam dlam + e^(lam x) dx); after: rho e^(lam (x - T)) E(T) moves with rho,
    # lambda (through the decay and E), x and T
    d_m = np.where(run4, dx, d_dur[..., None])
    d_since = np.where(run4, 0.0, dx - d_dur[..., None])
    dc = (d_rho[..., None] * (decay * E)[:, :, None, :]
          + r * decay[:, :, None, :] * (E_lam[:, :, None, :] * d_lam + e_m[:, :, None, :] * d_m
                                        + E[:, :, None, :] * (since * d_lam + L3[:, :, None, :] * d_since)))
    ent3 = entered[..., None]
    contrib = np.where(ent3, rho[..., None] * decay * E, 0.0)
    return contrib, np.where(ent3[..., None], dc, 0.0)


def _rate_matrix(structure: LinearStructure, params: Mapping[str, FloatArray], shape: tuple[int, int]
                 ) -> tuple[FloatArray, NDArray[np.bool_]]:
    """The rate matrix (N, B, n, n), and the members whose rate constants are not finite or negative (their matrix is
    -I, and they get NaN predictions)."""
    n = structure.n
    K = np.zeros((*shape, n, n))
    invalid = np.zeros(shape, dtype=bool)
    for f in structure.flows:
        k = params[f.rate] / params[f.per] if f.per is not None else params[f.rate]
        invalid |= ~(np.isfinite(k) & (k >= 0))
        K[:, :, f.source - 1, f.source - 1] -= k
        if f.target is not None:
            K[:, :, f.target - 1, f.source - 1] += k
    if invalid.any():
        K = np.where(invalid[..., None, None], -np.eye(n), K)
    return K, invalid


def _bolus_response(design: Design, q: IntArray, L3: FloatArray, lag: FloatArray, dt: FloatArray
                    ) -> tuple[FloatArray, FloatArray]:
    """Bolus pairs ``q`` (not at steady state): each eigen-mode's response to a unit dose, with its ADDL doses where
    it has them (a finite geometric series), (P', B, n); and the response's logarithmic derivative by the mode's
    eigenvalue, (P', B, n) (its derivative by the lag is -lambda times it; :func:`predict_design_jacobian`).

    ``L3`` (P', B, n): the eigenvalues of each pair's individual; ``lag``, ``dt`` (P', B): the lag and the time from
    the dose's entry (after its lag) to the observation."""
    entered = dt >= 0
    addl = design.pair_addl[q, None]
    if not np.any(addl > 0):  # one dose per record (a chart's administrations): no series
        d_ = np.where(entered, dt, 0.0)[..., None]
        return np.where(entered[..., None], np.exp(L3 * d_), 0.0), np.broadcast_to(d_, L3.shape)
    ii = np.where(design.pair_ii[q] > 0, design.pair_ii[q], 1.0)[:, None]
    # index of the last dose that has entered: K = min(ADDL, floor(dt / ii)), checked like the engine
    K = np.where(addl > 0, np.minimum(addl, np.floor(np.maximum(dt, 0.0) / ii)), 0.0)
    t0 = design.pair_tdose[q, None]
    tobs = design.pair_tobs[q, None]
    over = (K > 0) & ((t0 + K * ii) + lag > tobs)
    K = np.where(over, K - 1, K)
    under = (addl > K) & ((t0 + (K + 1) * ii) + lag <= tobs)
    K = np.where(under, K + 1, K)
    dK = np.where(entered, tobs - ((t0 + K * ii) + lag), 0.0)[..., None]
    x = L3 * ii[..., None]  # the geometric series of the K + 1 doses that have entered
    K1 = (K + 1)[..., None]
    tiny = np.abs(x) < 1e-12
    series = np.where(tiny, K1, np.expm1(x * K1) / np.where(tiny, 1.0, np.expm1(x)))
    # d log(series) / dx = (K+1) e^{x(K+1)} / expm1(x(K+1)) - e^x / expm1(x); near x = 0 (where both terms are about
    # 1/x) its series K/2 + x K (K+2) / 12
    near = np.abs(x) < 1e-4
    xs = np.where(near, 1.0, x)
    dlog = np.where(near, 0.5 * (K1 - 1) + x * (K1 - 1) * (K1 + 1) / 12.0,
                    K1 * np.exp(xs * K1) / np.expm1(xs * K1) - np.exp(xs) / np.expm1(xs))
    return (np.where(entered[..., None], np.exp(L3 * dK) * series, 0.0),
            dK + ii[..., None] * dlog)


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
