"""Predictions and their exact derivatives with respect to the random effects: the record loops of the compiled
model kernels (:mod:`cnidose.models.kernel` makes the model's side: every parameter at every record and its
derivatives, and the observation transforms).

The linear loop (:func:`tangent_kernel`) is the event engine's fast path (:mod:`cnidose.pk.eigenpath`: bolus doses
with ADDL and lags, observations, parameters that change at records) carried with forward sensitivities. For each
batch member it decomposes each distinct rate matrix K = V diag(lambda) W (W = V^-1; the closed form of
:data:`cnidose.pk.kernels.DECOMPOSE_ONE`) and carries the state y = W x in eigen-coordinates record by record, as
the fast path does. The sensitivities s_j = dx/dtheta_j (theta: the estimated random effects) obey
s_j' = K s_j + K_j x within a segment of constant parameters (K_j: the derivative of K along theta_j); in
eigen-coordinates sigma_j = W s_j that is sigma_j' = Lambda sigma_j + M_j y with M_j = W K_j V, whose solution over
a step of length t is

    sigma_j(t) = e^(Lambda t) sigma_j(0) + (M_j o Phi(t)) y(0),
    Phi_ik(t) = int_0^t e^(lambda_i (t - u)) e^(lambda_k u) du

(the Daleckii-Krein form of the derivative of the matrix exponential), evaluated without cancellation as
e^(max(lambda_i, lambda_k) t) (1 - e^(-|lambda_i - lambda_k| t)) / |lambda_i - lambda_k| (t e^(lambda_i t) on the
diagonal). A bolus adds dF_j AMT W e_cmt to sigma_j; where the parameters change x and s are continuous, so sigma
moves to the new coordinates as y does (W' V); an observation A/S has the derivative (V[cmt] . sigma_j) / S -
(A/S) dS_j / S. A member whose rate matrix has no usable decomposition in some segment (repeated eigenvalues, as a
chain of equal transit rates has, complex ones, or an ill-conditioned V) is carried in natural coordinates with
matrix exponentials instead (Pade approximants with scaling and squaring, Higham 2005): x <- E x and
s_j <- E s_j + L_j x, E = exp(K t) and L_j its derivative along K_j t, the upper-right block of
exp([[K t, K_j t], [0, K t]]) (Van Loan 1978). Nothing is differenced: the derivatives are exact to rounding.

The ODE loop (:func:`ode_loop`) integrates each member with Dormand and Prince's DOP853 (SciPy's coefficients and
step control, as :mod:`cnidose.pk.compiled`) and the variational equations S' = Jx S + Jp dp in the same stages
and steps, so S is the exact derivative of the computed solution.

A segment starts wherever a parameter of the rate matrix (of the equations) or its derivative changes: two
occasions with equal parameters at the start of a fit still have different derivatives. A member whose parameters
the engine would refuse (a negative or non-finite rate parameter, bioavailability or scale) gets NaN, as the
engine's refusal gives there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.pk.compiled import integrator_source, load
from cnidose.pk.eigenpath import _CINF, _DOSE, _OBS, _RATE, _RESET, _SS, _SSB, _SSE, _STEP, _SWITCH, _schedule
from cnidose.pk.events import Individual
from cnidose.pk.kernels import DECOMPOSE_ONE

__all__ = ["schedule", "tangent_kernel"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def schedule(ind: Individual, default_dose: int, default_obs: int, lag_of: dict[int, float],
             f_index: tuple[int, ...], observed: IntArray, *, nonmem: bool, f_of: FloatArray | None = None,
             d_of: FloatArray | None = None) -> tuple[IntArray, FloatArray, FloatArray, FloatArray]:
    """The records of ``ind`` as the kernel's operations (n_ops, 6), the amounts, the step lengths and the
    operations' auxiliary values (:func:`cnidose.pk.eigenpath._schedule`).

    Operations: (STEP, step index, ...); (DOSE, index of the compartment's F in the parameters or -1, the record
    whose F applies, compartment, the dose record); (SWITCH, record) before each record's interval (the kernel
    moves to that record's segment); (OBS, record, compartment, position among ``observed`` or -1); (RATE,
    compartment, the record of its F and D, +1 start or -1 end, the dose record, 0 given RATE or 1 modelled
    duration): the input rate changes by the row's amount, the input's duration in ``aux``; (RESET): EVID 3 or 4;
    (SS, F index, record, index of its II, tau and compartment in the step lengths). ``lag_of`` gives each dose
    record's lag (one value for every batch member); ``f_index`` the F parameter of each compartment; ``f_of`` and
    ``d_of`` (records, compartments) the F and D values that set the inputs' rates and durations.
    """
    R = len(ind)
    ev = ind.evid
    dose = (ev == 1) | (ev == 4)
    dose_c = np.where(ind.cmt > 0, ind.cmt, default_dose) - 1
    obs_c = np.where((ev == 0) & (ind.cmt > 0), ind.cmt, default_obs) - 1
    ops, amts, dts, aux = _schedule(ind, dose, dose_c, obs_c, lag_of, np.arange(R, dtype=np.int64), nonmem=nonmem,
                                    f_of=f_of, d_of=d_of)
    slot = np.full(R, -1, dtype=np.int64)
    slot[observed] = np.arange(observed.size)
    is_dose, is_obs = ops[:, 0] == _DOSE, ops[:, 0] == _OBS
    ops[is_dose, 1] = [f_index[int(c)] for c in ops[is_dose, 3]]
    is_ss = ops[:, 0] == _SS  # (SS, compartment -> its F, record, extras): the compartment is among the extras
    ops[is_ss, 1] = [f_index[int(dts[int(e) + 2])] for e in ops[is_ss, 3]]
    ops[is_obs, 3] = slot[ops[is_obs, 1]]
    return ops, amts, dts, aux


def tangent_kernel() -> Any:
    """The compiled record loop (``run``), or None where compiled code is off or unavailable."""
    return load("cnidose_tangent_", TEMPLATE.format(version=_VERSION, decompose_one=DECOMPOSE_ONE, shared=SHARED,
                                                     **_CODES))


_VERSION = "8"
_CODES = {"STEP": _STEP, "DOSE": _DOSE, "SWITCH": _SWITCH, "OBS": _OBS, "RATE": _RATE, "RESET": _RESET,
          "SS": _SS, "SSB": _SSB, "SSE": _SSE, "CINF": _CINF}

SHARED = '''
@njit(cache=True, error_model="numpy")
def _invalidate(out, jac, lo, hi, b, nd):
    # a member whose parameters the engine would refuse: NaN at its observations
    for row in range(lo, hi):
        out[row, b] = math.nan
        for col in range(nd):
            jac[row, b, col] = math.nan


@njit(cache=True, error_model="numpy")
def _segments(Pg, dPg, R, idx, nd, seg, first):
    # the segments of records where the parameters idx (and their derivatives) are constant: seg[r] is record r's,
    # first[u] the first record of segment u; returns their number
    nseg = 0
    for r in range(R):
        new = r == 0
        if not new:
            for q in idx:
                if Pg[r, q] != Pg[r - 1, q]:
                    new = True
                    break
                for col in range(nd):
                    if dPg[r, q, col] != dPg[r - 1, q, col]:
                        new = True
                        break
                if new:
                    break
        if new:
            first[nseg] = r
            nseg += 1
        seg[r] = nseg - 1
    return nseg


@njit(cache=True, error_model="numpy")
def _give(x, S, Pg, dPg, fi, rb, c, amount, nd):
    # a bolus of amount * F into compartment c in natural coordinates, F (parameter fi, -1: 1) of record rb, and its
    # derivative; False where the engine would refuse F
    fv = 1.0
    if fi >= 0:
        fv = Pg[rb, fi]
        if not (math.isfinite(fv) and fv >= 0.0):
            return False
    x[c] += fv * amount
    if fi >= 0:
        for col in range(nd):
            S[c, col] += dPg[rb, fi, col] * amount
    return True


@njit(cache=True, error_model="numpy")
def _report(x, S, Pg, dPg, r, oc, s_index, nd, out, jac, row, b):
    # A/S of compartment oc at record r (natural coordinates) and its derivative; False where S is refused
    si = s_index[oc]
    sv = 1.0
    if si >= 0:
        sv = Pg[r, si]
        if not (math.isfinite(sv) and sv > 0.0):
            return False
    conc = x[oc] / sv
    out[row, b] = conc
    for col in range(nd):
        acc = S[oc, col] / sv
        if si >= 0:
            acc -= conc * dPg[r, si, col] / sv
        jac[row, b, col] = acc
    return True


@njit(cache=True, error_model="numpy")
def _input_edge(Pg, dPg, op, delta, duration, nd, lag_idx, f_idx, d_idx, r_dot, S):
    # the derivatives at an input's start (op[3] = +1) or end (-1): op = (RATE, compartment, record of F and D, edge,
    # dose record, kind: 0 given RATE, duration F AMT / RATE; 1 modelled duration D, rate F AMT / D). The rate's
    # derivative enters r_dot; the state's jumps by the shifts of the start (-dL rho e_c) and end ((dL + dD) rho
    # e_c): x' changes by +-rho e_c there
    c = op[1]
    rec = op[2]
    sr = op[4]
    rho = delta if op[3] > 0 else -delta
    fi = f_idx[c]
    fv = Pg[rec, fi] if fi >= 0 else 1.0
    for col in range(nd):
        df = dPg[rec, fi, col] if fi >= 0 else 0.0
        if op[5] == 0:
            dd = duration * df / fv
            dr = 0.0
        else:
            dd = dPg[rec, d_idx[c], col] if d_idx[c] >= 0 else 0.0
            dr = rho * (df / fv - dd / duration)
        dl = dPg[sr, lag_idx[c], col] if lag_idx[c] >= 0 and sr >= 0 else 0.0
        if op[3] > 0:
            r_dot[c, col] += dr
            S[c, col] -= dl * rho
        else:
            r_dot[c, col] -= dr
            S[c, col] += (dl + dd) * rho
'''


TEMPLATE = '''\
# generated by cnidose.pk.tangent (version {version}); do not edit
import math

import numpy as np
from numba import njit

{decompose_one}
{shared}

@njit(cache=True, error_model="numpy")
def _rate_matrix(p, src, tgt, rate, per, K):
    n = K.shape[0]
    for a in range(n):
        for c in range(n):
            K[a, c] = 0.0
    for f in range(src.shape[0]):
        k = p[rate[f]]
        if per[f] >= 0:
            k = k / p[per[f]]
        s = src[f]
        K[s, s] -= k
        if tgt[f] >= 0:
            K[tgt[f], s] += k


@njit(cache=True, error_model="numpy")
def _rate_tangent(p, dp, col, src, tgt, rate, per, K):
    # the derivative of K along direction col (dp: (NP, nd) parameter derivatives); False where it is zero
    n = K.shape[0]
    nonzero = False
    for a in range(n):
        for c in range(n):
            K[a, c] = 0.0
    for f in range(src.shape[0]):
        dk = dp[rate[f], col]
        if per[f] >= 0:
            q = p[per[f]]
            dk = dk / q - p[rate[f]] * dp[per[f], col] / (q * q)
        if dk != 0.0:
            nonzero = True
            s = src[f]
            K[s, s] -= dk
            if tgt[f] >= 0:
                K[tgt[f], s] += dk
    return nonzero


@njit(cache=True, error_model="numpy")
def _phi(lam, t, Phi):
    # Phi_ik = int_0^t e^(lam_i (t - u)) e^(lam_k u) du, without cancellation
    n = lam.shape[0]
    for a in range(n):
        for c in range(n):
            hi = max(lam[a], lam[c])
            gap = abs(lam[a] - lam[c])
            z = gap * t
            if z < 1e-6:
                w = t * (1.0 - z / 2.0 + z * z / 6.0)
            else:
                w = -math.expm1(-z) / gap
            Phi[a, c] = math.exp(hi * t) * w


# Pade approximants of exp (Higham 2005, SIAM J Matrix Anal Appl 26:1179, Table 2.3 and eq. 2.3): the degree
# m with theta_m above the 1-norm, else degree 13 after scaling by 2^-s; backward error below unit roundoff
PADE3 = np.array([120.0, 60.0, 12.0, 1.0])
PADE5 = np.array([30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0])
PADE7 = np.array([17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0])
PADE9 = np.array([17643225600.0, 8821612800.0, 2075673600.0, 302702400.0, 30270240.0, 2162160.0, 110880.0,
                  3960.0, 90.0, 1.0])
PADE13 = np.array([64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
                   129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0, 40840800.0,
                   960960.0, 16380.0, 182.0, 1.0])
THETA = np.array([1.495585217958292e-2, 2.539398330063230e-1, 9.504178996162932e-1, 2.097847961257068,
                  5.371920351148152])


@njit(cache=True, error_model="numpy")
def _mm(A, B, out):
    m = A.shape[0]
    for a in range(m):
        for c in range(m):
            acc = 0.0
            for k in range(m):
                acc += A[a, k] * B[k, c]
            out[a, c] = acc


@njit(cache=True, error_model="numpy")
def _block(K, Kd, t, Z, ZE, out):
    # out = the derivative of exp(K t) along Kd t: the upper-right block of exp([[K t, Kd t], [0, K t]])
    n = K.shape[0]
    for a in range(n):
        for c in range(n):
            Z[a, c] = K[a, c] * t
            Z[a, n + c] = Kd[a, c] * t
            Z[n + a, c] = 0.0
            Z[n + a, n + c] = K[a, c] * t
    _expm(Z, ZE)
    for a in range(n):
        for c in range(n):
            out[a, c] = ZE[a, n + c]


@njit(cache=True, error_model="numpy")
def _expm(A, X):
    # X = exp(A) for a small square A (loops: no BLAS call for matrices of a few rows)
    m = A.shape[0]
    nrm = 0.0
    for c in range(m):
        acc = 0.0
        for r in range(m):
            acc += abs(A[r, c])
        nrm = max(nrm, acc)
    if not math.isfinite(nrm):
        for r in range(m):
            for c in range(m):
                X[r, c] = math.nan
        return
    sq = 0
    deg = 13
    for j in range(4):
        if nrm <= THETA[j]:
            deg = 3 + 2 * j
            break
    if deg == 13 and nrm > THETA[4]:
        sq = int(math.ceil(math.log2(nrm / THETA[4])))
    scale = 0.5 ** sq
    As = np.empty((m, m))
    for r in range(m):
        for c in range(m):
            As[r, c] = A[r, c] * scale
    A2 = np.empty((m, m))
    _mm(As, As, A2)
    U = np.zeros((m, m))
    V = np.zeros((m, m))
    T = np.empty((m, m))
    if deg < 13:
        b = PADE3 if deg == 3 else PADE5 if deg == 5 else PADE7 if deg == 7 else PADE9
        Pk = np.eye(m)
        Uo = b[1] * np.eye(m)
        for r in range(m):
            V[r, r] = b[0]
        for j in range(1, (deg - 1) // 2 + 1):
            _mm(Pk, A2, T)
            for r in range(m):
                for c in range(m):
                    Pk[r, c] = T[r, c]
                    Uo[r, c] += b[2 * j + 1] * T[r, c]
                    V[r, c] += b[2 * j] * T[r, c]
        _mm(As, Uo, U)
    else:
        b = PADE13
        A4 = np.empty((m, m))
        A6 = np.empty((m, m))
        _mm(A2, A2, A4)
        _mm(A4, A2, A6)
        W1 = np.empty((m, m))
        W2 = np.empty((m, m))
        for r in range(m):
            for c in range(m):
                W1[r, c] = b[13] * A6[r, c] + b[11] * A4[r, c] + b[9] * A2[r, c]
                W2[r, c] = b[12] * A6[r, c] + b[10] * A4[r, c] + b[8] * A2[r, c]
        _mm(A6, W1, T)
        for r in range(m):
            for c in range(m):
                T[r, c] += b[7] * A6[r, c] + b[5] * A4[r, c] + b[3] * A2[r, c] + (b[1] if r == c else 0.0)
        _mm(As, T, U)
        _mm(A6, W2, V)
        for r in range(m):
            for c in range(m):
                V[r, c] += b[6] * A6[r, c] + b[4] * A4[r, c] + b[2] * A2[r, c] + (b[0] if r == c else 0.0)
    # solve (V - U) X = (V + U)
    Q = np.empty((m, m))
    for r in range(m):
        for c in range(m):
            Q[r, c] = V[r, c] - U[r, c]
            X[r, c] = V[r, c] + U[r, c]
    _solve(Q, X)
    for _ in range(sq):
        _mm(X, X, T)
        for r in range(m):
            for c in range(m):
                X[r, c] = T[r, c]


@njit(cache=True, error_model="numpy")
def _periodic(K, Kd, act, ii, nd, Kt, E, Q1, Q2, y, s, Z, ZE, Ej):
    # the periodic state of a regimen repeated every ii: y (n, 1), what one interval adds at its end, becomes
    # x_ss = E x_ss + y = (I - E)^-1 y, E = exp(K ii); s (n, nd), y's derivatives, becomes x_ss's,
    # (I - E)^-1 (s + E_j x_ss) (E_j: the derivative of E along K_j, _block). In place; False where I - E is singular
    # (a compartment without elimination). Kt, Q1, Q2, Z, ZE, Ej: work arrays
    n = K.shape[0]
    for a in range(n):
        for q in range(n):
            Kt[a, q] = K[a, q] * ii
    _expm(Kt, E)
    for a in range(n):
        for q in range(n):
            Q1[a, q] = (1.0 if a == q else 0.0) - E[a, q]
            Q2[a, q] = Q1[a, q]
    if not _solve(Q1, y):
        return False
    if nd == 0:
        return True
    for col in range(nd):
        if act[col]:
            _block(K, Kd[col], ii, Z, ZE, Ej)
            for a in range(n):
                acc = 0.0
                for q in range(n):
                    acc += Ej[a, q] * y[q, 0]
                s[a, col] += acc
    return _solve(Q2, s)


@njit(cache=True, error_model="numpy")
def _natural(Pg, dPg, nd, nseg, first, seg, ops, k0, k1, amts, aux, dts, t0, nt, lo, hi_out, b, src, tgt, rate,
             per, s_index, lag_idx, f_idx, d_idx, out, jac):
    # one member in natural coordinates with matrix exponentials (any rate matrix: repeated eigenvalues, as in a
    # chain of equal transit rates, or an ill-conditioned decomposition; inputs at given rates): with the input
    # rates r, [x; 1] <- E [x; 1], E = exp([[K t, r t], [0, 0]]), and s_j <- E s_j + L_j [x; 1], L_j the
    # derivative of E along [[K_j t, 0], [0, 0]]: the upper-right block of exp([[A, A_j], [0, A]]) (Van Loan
    # 1978). False where a parameter is refused (the caller gives NaN).
    n = s_index.shape[0]
    m = n + 1
    want = nd > 0
    ndx = max(nd, 1)
    x = np.zeros(n)
    r_in = np.zeros(n)
    r_dot = np.zeros((n, ndx))  # the input rates' derivatives
    sg = np.zeros((n, ndx))
    xn = np.empty(n)
    sn = np.empty((n, ndx))
    K = np.empty((n, n))
    Kd = np.empty((ndx, n, n))
    act = np.zeros(ndx, np.bool_)
    live = np.zeros(ndx, np.bool_)
    E = np.empty((max(nt, 1), m, m))
    L = np.empty((max(nt, 1), ndx, m, m))
    have = np.zeros(max(nt, 1), np.bool_)
    Za = np.zeros((m, m))
    Z = np.zeros((2 * m, 2 * m))
    ZE = np.empty((2 * m, 2 * m))
    Kt = np.empty((n, n))
    E1 = np.empty((n, n))
    G1 = np.empty((n, n))
    Q1 = np.empty((n, n))
    Q2 = np.empty((n, n))
    rhs1 = np.empty((n, 1))
    rhs2 = np.empty((n, ndx))
    Zs = np.empty((2 * n, 2 * n))
    ZEs = np.empty((2 * n, 2 * n))
    LE = np.empty((n, n))
    LG = np.empty((n, n))
    keep_x = np.empty(n)  # the state set aside while an infusion regimen's steady state is made (SSB .. SSE)
    keep_s = np.empty((n, ndx))
    keep_r = np.empty(n)
    keep_rd = np.empty((n, ndx))
    u = -1
    for k in range(k0, k1):
        kind = ops[k, 0]
        if kind == {SWITCH} or u < 0:
            s = seg[ops[k, 1]] if kind == {SWITCH} else 0
            if s != u:
                u = s
                _rate_matrix(Pg[first[u]], src, tgt, rate, per, K)
                if want:
                    for col in range(nd):
                        act[col] = _rate_tangent(Pg[first[u]], dPg[first[u]], col, src, tgt, rate, per, Kd[col])
                for d in range(nt):
                    have[d] = False
            if kind == {SWITCH}:
                continue
        if kind == {STEP}:
            d = ops[k, 1]
            t = dts[t0 + d]
            if not have[d]:
                for a in range(m):
                    for c in range(m):
                        Za[a, c] = 0.0
                for a in range(n):
                    for c in range(n):
                        Za[a, c] = K[a, c] * t
                    Za[a, n] = r_in[a] * t
                _expm(Za, E[d])
                if want:
                    for col in range(nd):
                        moving = act[col]
                        for a in range(n):
                            if r_dot[a, col] != 0.0:
                                moving = True
                        live[col] = moving
                        if moving:
                            for a in range(m):
                                for c in range(m):
                                    Z[a, c] = Za[a, c]
                                    Z[m + a, c] = 0.0
                                    Z[m + a, m + c] = Za[a, c]
                                    if a < n and c < n:
                                        Z[a, m + c] = Kd[col, a, c] * t if act[col] else 0.0
                                    elif a < n:
                                        Z[a, m + c] = r_dot[a, col] * t
                                    else:
                                        Z[a, m + c] = 0.0
                            _expm(Z, ZE)
                            for a in range(m):
                                for c in range(m):
                                    L[d, col, a, c] = ZE[a, m + c]
                have[d] = True
            for a in range(n):
                acc = E[d, a, n]
                for c in range(n):
                    acc += E[d, a, c] * x[c]
                xn[a] = acc
            if want:
                for col in range(nd):
                    for a in range(n):
                        acc = 0.0
                        for c in range(n):
                            acc += E[d, a, c] * sg[c, col]
                        if live[col]:
                            acc += L[d, col, a, n]
                            for c in range(n):
                                acc += L[d, col, a, c] * x[c]
                        sn[a, col] = acc
                for col in range(nd):
                    for a in range(n):
                        sg[a, col] = sn[a, col]
            for a in range(n):
                x[a] = xn[a]
        elif kind == {DOSE}:
            c = ops[k, 3]
            if not _give(x, sg, Pg, dPg, ops[k, 1], ops[k, 2], c, amts[k], nd):
                return False
            li = lag_idx[c]
            sr = ops[k, 4]
            if want and li >= 0 and sr >= 0:  # a later entry: x' jumps by K (amount e_c) later
                fv = Pg[ops[k, 2], ops[k, 1]] if ops[k, 1] >= 0 else 1.0
                for col in range(nd):
                    dl = dPg[sr, li, col]
                    if dl != 0.0:
                        for a in range(n):
                            sg[a, col] -= dl * K[a, c] * fv * amts[k]
        elif kind == {RATE}:
            r_in[ops[k, 1]] += amts[k]
            if want:
                _input_edge(Pg, dPg, ops[k], amts[k], aux[k], nd, lag_idx, f_idx, d_idx, r_dot, sg)
            for d in range(nt):
                have[d] = False
        elif kind == {RESET}:
            for a in range(n):
                x[a] = 0.0
                r_in[a] = 0.0
                for col in range(nd):
                    sg[a, col] = 0.0
                    r_dot[a, col] = 0.0
            for d in range(nt):
                have[d] = False
        elif kind == {SS}:
            # a bolus regimen at steady state (AMT every II, the SS record's F, lag L): the doses given before the
            # record that have entered add sum_k exp(K (k II - L)) a e_c = (I - exp(K II))^-1 exp(K tau) a e_c,
            # tau = the first such dose's age; its derivative (I - E)^-1 (E_j x_ss + G_j a e_c + G da e_c)
            fi = ops[k, 1]
            rb = ops[k, 2]
            di = ops[k, 3]
            ii = dts[t0 + di]
            tau = dts[t0 + di + 1]
            c = int(dts[t0 + di + 2])
            fv = 1.0
            if fi >= 0:
                fv = Pg[rb, fi]
                if not (math.isfinite(fv) and fv >= 0.0):
                    return False
            amount = fv * amts[k]
            for a in range(n):
                for q in range(n):
                    Kt[a, q] = K[a, q] * tau
            _expm(Kt, G1)
            for a in range(n):
                rhs1[a, 0] = G1[a, c] * amount
            if want:
                for col in range(nd):
                    da = dPg[rb, fi, col] * amts[k] if fi >= 0 else 0.0
                    for a in range(n):
                        rhs2[a, col] = G1[a, c] * da
                    if act[col]:
                        _block(K, Kd[col], tau, Zs, ZEs, LG)
                        for a in range(n):
                            rhs2[a, col] += LG[a, c] * amount
            if not _periodic(K, Kd, act, ii, nd, Kt, E1, Q1, Q2, rhs1, rhs2, Zs, ZEs, LE):
                return False  # no steady state: a compartment without elimination
            for a in range(n):
                x[a] += rhs1[a, 0]
                for col in range(nd):
                    sg[a, col] += rhs2[a, col]
        elif kind == {SSB}:
            # an infusion regimen's steady state (cnidose.pk.eigenpath._schedule): the state so far is set aside and
            # one dosing interval of the periodic input is replayed from an empty system (the next operations)
            for a in range(n):
                keep_x[a] = x[a]
                keep_r[a] = r_in[a]
                x[a] = 0.0
                r_in[a] = 0.0
                for col in range(nd):
                    keep_s[a, col] = sg[a, col]
                    keep_rd[a, col] = r_dot[a, col]
                    sg[a, col] = 0.0
                    r_dot[a, col] = 0.0
            for d in range(nt):
                have[d] = False
        elif kind == {SSE}:
            # what one interval of the periodic input left, y (x now), is the periodic state less its decay over
            # the interval: x_ss = E x_ss + y, x_ss = (I - E)^-1 y with E = exp(K II); its derivative
            # (I - E)^-1 (s_y + E_j x_ss). The inputs running at the record's time go on (r_in).
            ii = amts[k]
            for a in range(n):
                rhs1[a, 0] = x[a]
                for col in range(nd):
                    rhs2[a, col] = sg[a, col]
            if not _periodic(K, Kd, act, ii, nd, Kt, E1, Q1, Q2, rhs1, rhs2, Zs, ZEs, LE):
                return False  # no steady state: a compartment without elimination
            for a in range(n):
                x[a] = keep_x[a] + rhs1[a, 0]
                r_in[a] += keep_r[a]
                for col in range(nd):
                    sg[a, col] = keep_s[a, col] + rhs2[a, col]
                    r_dot[a, col] += keep_rd[a, col]
            for d in range(nt):
                have[d] = False
        elif kind == {CINF}:
            # a constant infusion at steady state into compartment c: x_ss = -K^-1 rho e_c; its derivative solves
            # -K s_j = K_j x_ss
            c = ops[k, 1]
            for a in range(n):
                for q in range(n):
                    Q1[a, q] = -K[a, q]
                    Q2[a, q] = -K[a, q]
                rhs1[a, 0] = amts[k] if a == c else 0.0
            if not _solve(Q1, rhs1):
                return False  # no steady state: a compartment without elimination
            if want:
                for col in range(nd):
                    for a in range(n):
                        acc = 0.0
                        if act[col]:
                            for q in range(n):
                                acc += Kd[col, a, q] * rhs1[q, 0]
                        rhs2[a, col] = acc
                if not _solve(Q2, rhs2):
                    return False
            for a in range(n):
                x[a] += rhs1[a, 0]
                for col in range(nd):
                    sg[a, col] += rhs2[a, col]
        elif kind == {OBS}:
            slot = ops[k, 3]
            if slot >= 0 and not _report(x, sg, Pg, dPg, ops[k, 1], ops[k, 2], s_index, nd, out, jac, lo + slot, b):
                return False
    return True


@njit(cache=True, error_model="numpy")
def run(which, P, dP, nd, ops, op_start, amts, aux, dts, dt_start, rec_start, out_start, natural, blk, src, tgt,
        rate, per, rate_idx, s_index, lag_idx, f_idx, d_idx, out, jac, held):
    # P (G, B, R, NP): every record's parameters for row g of which (an individual) and point b; dP (G, B, R, NP,
    # nd): their derivatives by the estimated effects. Per individual i: operations op_start[i]:op_start[i+1],
    # step lengths dt_start[i]:..., records rec_start[i]:...; flows src -> tgt (-1: out) at p[rate] / p[per]
    # (per -1: p[rate]); rate_idx: the rate parameters; s_index: each compartment's scale parameter (-1: none);
    # natural[i]: individual i in natural coordinates (its inputs at given rates need them); lag_idx, f_idx,
    # d_idx: each compartment's ALAG, F and D parameters (-1: none), for the derivatives of entry times and inputs.
    # out (O, B) and jac (O, B, nd): A/S at the observed records, row out_start[g] + slot
    G = which.shape[0]
    B = P.shape[1]
    n = s_index.shape[0]
    want = nd > 0
    ndx = max(nd, 1)
    rmax = max(P.shape[2], 1)
    tmax = 1
    for g in range(G):
        i = which[g]
        tmax = max(tmax, dt_start[i + 1] - dt_start[i])
    seg = np.empty(rmax, np.int64)
    first = np.empty(rmax, np.int64)
    lam = np.empty((rmax, n))
    V = np.empty((rmax, n, n))
    W = np.empty((rmax, n, n))
    M = np.empty((rmax, ndx, n, n))
    act = np.zeros((rmax, ndx), np.bool_)
    K = np.empty((n, n))
    Kd = np.empty((n, n))
    T = np.empty((n, n))
    vs = np.empty(n)
    As = np.empty((n, n))
    Is = np.empty((n, n))
    y = np.empty(n)
    x = np.empty(n)
    sig = np.empty((n, ndx))
    xs = np.empty((n, ndx))
    E = np.empty((tmax, n))
    have = np.zeros(tmax, np.bool_)
    Phi = np.empty((tmax, n, n))
    have_phi = np.zeros(tmax, np.bool_)
    for g in range(G):
        i = which[g]
        R = rec_start[i + 1] - rec_start[i]
        t0 = dt_start[i]
        nt = dt_start[i + 1] - t0
        lo = out_start[g]
        hi_out = out_start[g + 1]
        for b in range(B):
            held[g, b] = True
            Pg = P[g, b]
            dPg = dP[g, b]
            ok = True
            for r in range(R):
                for q in rate_idx:
                    v = Pg[r, q]
                    if not (math.isfinite(v) and v >= 0.0):
                        ok = False
            if not ok:  # the engine refuses such parameters: an impossible point
                _invalidate(out, jac, lo, hi_out, b, nd)
                continue
            # segments of constant rate parameters (and derivatives)
            nseg = _segments(Pg, dPg, R, rate_idx, nd, seg, first)
            good = natural[i] == 0
            for u in range(nseg):
                if not good:
                    break
                _rate_matrix(Pg[first[u]], src, tgt, rate, per, K)
                if not decompose_one(K, blk, lam[u], V[u], W[u], vs, As, Is, 1e6):
                    good = False
            if not good:  # repeated or complex eigenvalues, or an ill-conditioned decomposition: exponentials
                if not _natural(Pg, dPg, nd, nseg, first, seg, ops, op_start[i], op_start[i + 1], amts, aux, dts,
                                t0, nt, lo, hi_out, b, src, tgt, rate, per, s_index, lag_idx, f_idx, d_idx, out, jac):
                    _invalidate(out, jac, lo, hi_out, b, nd)
                continue
            for u in range(nseg):
                if want:
                    for col in range(nd):
                        act[u, col] = _rate_tangent(Pg[first[u]], dPg[first[u]], col, src, tgt, rate, per, Kd)
                        if act[u, col]:  # M = W Kd V
                            for a in range(n):
                                for c in range(n):
                                    acc = 0.0
                                    for m in range(n):
                                        acc += Kd[a, m] * V[u, m, c]
                                    T[a, c] = acc
                            for a in range(n):
                                for c in range(n):
                                    acc = 0.0
                                    for m in range(n):
                                        acc += W[u, a, m] * T[m, c]
                                    M[u, col, a, c] = acc
            for a in range(n):
                y[a] = 0.0
                for col in range(nd):
                    sig[a, col] = 0.0
            for d in range(nt):
                have[d] = False
                have_phi[d] = False
            u = 0
            bad = False
            for k in range(op_start[i], op_start[i + 1]):
                kind = ops[k, 0]
                if kind == {STEP}:
                    d = ops[k, 1]
                    if not have[d]:
                        for a in range(n):
                            E[d, a] = math.exp(lam[u, a] * dts[t0 + d])
                        have[d] = True
                    if want:
                        if not have_phi[d]:
                            _phi(lam[u], dts[t0 + d], Phi[d])
                            have_phi[d] = True
                        for col in range(nd):
                            if act[u, col]:
                                for a in range(n):
                                    acc = 0.0
                                    for c in range(n):
                                        acc += M[u, col, a, c] * Phi[d, a, c] * y[c]
                                    sig[a, col] = E[d, a] * sig[a, col] + acc
                            else:
                                for a in range(n):
                                    sig[a, col] *= E[d, a]
                    for a in range(n):
                        y[a] *= E[d, a]
                elif kind == {DOSE}:
                    fi = ops[k, 1]
                    rb = ops[k, 2]
                    c = ops[k, 3]
                    fv = 1.0
                    if fi >= 0:
                        fv = Pg[rb, fi]
                        if not (math.isfinite(fv) and fv >= 0.0):
                            bad = True
                            break
                    amount = fv * amts[k]
                    for a in range(n):
                        y[a] += amount * W[u, a, c]
                    if want and fi >= 0:
                        for col in range(nd):
                            da = dPg[rb, fi, col] * amts[k]
                            if da != 0.0:
                                for a in range(n):
                                    sig[a, col] += da * W[u, a, c]
                    li = lag_idx[c]
                    sr = ops[k, 4]
                    if want and li >= 0 and sr >= 0:  # a later entry: x' jumps by K (amount e_c) later
                        for col in range(nd):
                            dl = dPg[sr, li, col]
                            if dl != 0.0:
                                for a in range(n):
                                    sig[a, col] -= dl * lam[u, a] * amount * W[u, a, c]
                elif kind == {RESET}:
                    for a in range(n):
                        y[a] = 0.0
                        for col in range(nd):
                            sig[a, col] = 0.0
                elif kind == {SWITCH}:
                    s = seg[ops[k, 1]]
                    if s != u:
                        for a in range(n):
                            acc = 0.0
                            for m in range(n):
                                acc += V[u, a, m] * y[m]
                            x[a] = acc
                        for a in range(n):
                            acc = 0.0
                            for m in range(n):
                                acc += W[s, a, m] * x[m]
                            y[a] = acc
                        if want:
                            for col in range(nd):
                                for a in range(n):
                                    acc = 0.0
                                    for m in range(n):
                                        acc += V[u, a, m] * sig[m, col]
                                    xs[a, col] = acc
                            for col in range(nd):
                                for a in range(n):
                                    acc = 0.0
                                    for m in range(n):
                                        acc += W[s, a, m] * xs[m, col]
                                    sig[a, col] = acc
                        u = s
                        for d in range(nt):
                            have[d] = False
                            have_phi[d] = False
                elif kind == {OBS}:
                    slot = ops[k, 3]
                    if slot < 0:
                        continue
                    r = ops[k, 1]
                    oc = ops[k, 2]
                    amount = 0.0
                    for m in range(n):
                        amount += V[u, oc, m] * y[m]
                    si = s_index[oc]
                    sv = 1.0
                    if si >= 0:
                        sv = Pg[r, si]
                        if not (math.isfinite(sv) and sv > 0.0):
                            bad = True
                            break
                    conc = amount / sv
                    row = lo + slot
                    out[row, b] = conc
                    if want:
                        for col in range(nd):
                            acc = 0.0
                            for m in range(n):
                                acc += V[u, oc, m] * sig[m, col]
                            acc = acc / sv
                            if si >= 0:
                                acc -= conc * dPg[r, si, col] / sv
                            jac[row, b, col] = acc
            if bad:
                _invalidate(out, jac, lo, hi_out, b, nd)
'''


def ode_loop() -> str:
    """The record loop of ODE models with forward sensitivities (Numba source): a model kernel module made of it
    and the model's ``rhs(x, p, d)`` and ``jac(x, p, Jx, Jp)`` (derivatives of the right-hand side by the amounts
    and by the parameters) besides ``params``/``fill``/``transform_all`` (:mod:`cnidose.models.kernel`)."""
    return integrator_source() + SHARED + ODE_LOOP.format(**_CODES)


ODE_LOOP = '''

# the ODE record loop (cnidose.pk.tangent.ode_loop), on the integrator of cnidose.pk.compiled
@njit(cache=True, error_model="numpy")
def run(which, P, dP, nd, ops, op_start, amts, aux, dts, dt_start, rec_start, out_start, natural, s_index,
        param_idx, lag_idx, f_idx, d_idx, rtol, atol, out, jac_out, held):
    # as the linear loop (cnidose.pk.tangent), each member integrated in natural coordinates; param_idx: the
    # parameters the equations read (a segment starts where one of them, or its derivative, changes); a dose
    # entering later by dL shifts the state by -dL (f(x+) - f(x-)), the jump of the derivatives it causes
    G = which.shape[0]
    B = P.shape[1]
    n = s_index.shape[0]
    NPAR = P.shape[3]
    ndx = max(nd, 1)
    rmax = max(P.shape[2], 1)
    seg = np.empty(rmax, np.int64)
    first = np.empty(rmax, np.int64)
    y = np.zeros(n)
    r_in = np.zeros(n)
    r_dot = np.zeros((n, ndx))
    fa = np.empty(n)
    fb = np.empty(n)
    S = np.zeros((n, ndx))
    K = np.empty((13, n))
    KS = np.empty((13, n, ndx))
    ys = np.empty(n)
    Ss = np.empty((n, ndx))
    yn = np.empty(n)
    Sn = np.empty((n, ndx))
    f1 = np.empty(n)
    sc = np.empty(n)
    Jx = np.empty((n, n))
    Jp = np.empty((n, NPAR))
    for g in range(G):
        i = which[g]
        R = rec_start[i + 1] - rec_start[i]
        t0 = dt_start[i]
        lo = out_start[g]
        hi_out = out_start[g + 1]
        for b in range(B):
            held[g, b] = True
            Pg = P[g, b]
            dPg = dP[g, b]
            ok = True
            for r in range(R):
                for q in param_idx:
                    if not math.isfinite(Pg[r, q]):
                        ok = False
            nseg = _segments(Pg, dPg, R, param_idx, nd, seg, first)
            for a in range(n):
                y[a] = 0.0
                r_in[a] = 0.0
                for col in range(ndx):
                    S[a, col] = 0.0
                    r_dot[a, col] = 0.0
            u = 0
            bad = not ok
            for k in range(op_start[i], op_start[i + 1]):
                if bad:
                    break
                kind = ops[k, 0]
                if kind == {SWITCH}:
                    u = seg[ops[k, 1]]
                elif kind == {RATE}:
                    r_in[ops[k, 1]] += amts[k]
                    if nd > 0:
                        _input_edge(Pg, dPg, ops[k], amts[k], aux[k], nd, lag_idx, f_idx, d_idx, r_dot, S)
                elif kind == {RESET}:
                    for a in range(n):
                        y[a] = 0.0
                        r_in[a] = 0.0
                        for col in range(ndx):
                            S[a, col] = 0.0
                            r_dot[a, col] = 0.0
                elif kind == {STEP}:
                    status = _integrate(y, S, Pg[first[u]], dPg[first[u]], nd, r_in, r_dot, dts[t0 + ops[k, 1]],
                                        rtol, atol, K, KS, ys, Ss, yn, Sn, f1, sc, Jx, Jp)
                    if status != 0:
                        bad = True
                elif kind == {DOSE}:
                    c = ops[k, 3]
                    li = lag_idx[c]
                    sr = ops[k, 4]
                    shifted = False
                    if nd > 0 and li >= 0 and sr >= 0:
                        for col in range(nd):
                            if dPg[sr, li, col] != 0.0:
                                shifted = True
                    if shifted:
                        _f(y, Pg[first[u]], r_in, fa)
                    bad = not _give(y, S, Pg, dPg, ops[k, 1], ops[k, 2], c, amts[k], nd)
                    if shifted and not bad:
                        _f(y, Pg[first[u]], r_in, fb)
                        for col in range(nd):
                            dl = dPg[sr, li, col]
                            for a in range(n):
                                S[a, col] -= dl * (fb[a] - fa[a])
                elif kind == {OBS}:
                    slot = ops[k, 3]
                    if slot >= 0:
                        bad = not _report(y, S, Pg, dPg, ops[k, 1], ops[k, 2], s_index, nd, out, jac_out, lo + slot,
                                          b)
            if bad:
                _invalidate(out, jac_out, lo, hi_out, b, nd)
'''
