"""Compiled kernels of the linear (closed-form) path, in one Numba module cached on disk
(:func:`cnidose.pk.compiled.load`; ``CNIDOSE_COMPILED=0`` switches them off and NumPy does the same work).

``decompose``
    The closed-form eigen-decomposition of :func:`cnidose.pk.eigen.eigen_blocks` (block lower-triangular rate
    matrices with 1x1 and 2x2 blocks), one matrix at a time, with the inverse of the eigenvector matrix
    (Gaussian elimination with partial pivoting) and the usability test of
    :class:`cnidose.pk.solvers.EigenSolver` (real, finite, infinity-norm condition number below 1e6). NumPy
    spends most of its time on call overhead for these 3x3 and 4x4 matrices.
``run``
    The fast path's schedule (:mod:`cnidose.pk.eigenpath`), each batch member on its own.
"""

from __future__ import annotations

from typing import Any

from cnidose.pk.compiled import load

__all__ = ["linear_kernels"]


def linear_kernels() -> Any:
    """The compiled module (``decompose``, ``run``), or None where compiled code is off or unavailable."""
    return load("cnidose_linear_", LINEAR)


#: the closed-form decomposition of one rate matrix, and the linear solve it inverts V with (Numba source; the
#: linear kernels and the model kernels of :mod:`cnidose.pk.tangent` include it)
DECOMPOSE_ONE = '''\
@njit(cache=True, error_model="numpy")
def _solve(Q, X):
    # X <- Q^-1 X by Gaussian elimination with partial pivoting (Q is overwritten); False where Q is singular
    m = Q.shape[0]
    p = X.shape[1]
    for k in range(m):
        piv = k
        big = abs(Q[k, k])
        for r in range(k + 1, m):
            if abs(Q[r, k]) > big:
                big = abs(Q[r, k])
                piv = r
        if not big > 0.0:
            return False
        if piv != k:
            for c in range(m):
                t = Q[k, c]
                Q[k, c] = Q[piv, c]
                Q[piv, c] = t
            for c in range(p):
                t = X[k, c]
                X[k, c] = X[piv, c]
                X[piv, c] = t
        for r in range(k + 1, m):
            f = Q[r, k] / Q[k, k]
            if f != 0.0:
                for c in range(k, m):
                    Q[r, c] -= f * Q[k, c]
                for c in range(p):
                    X[r, c] -= f * X[k, c]
    for k in range(m - 1, -1, -1):
        for c in range(p):
            acc = X[k, c]
            for j in range(k + 1, m):
                acc -= Q[k, j] * X[j, c]
            X[k, c] = acc / Q[k, k]
    return True


@njit(cache=True, error_model="numpy")
def decompose_one(K, blk, lam, V, W, v, A, Inv, cond_max):
    # one rate matrix K (n, n): its eigenvalues lam (n,), eigenvectors V and their inverse W (n, n), with
    # scratch v (n,), A and Inv (n, n); True where the decomposition is usable
    n = K.shape[0]
    nbk = blk.shape[0]
    imag = False
    col = 0
    for bi in range(nbk):
        i = blk[bi, 0]
        j = blk[bi, 1]
        a = K[i, i]
        bb = 0.0
        c = 0.0
        d = 0.0
        l1 = a
        l2 = a
        npair = 1
        if j >= 0:
            bb = K[i, j]
            c = K[j, i]
            d = K[j, j]
            tr = a + d
            det = a * d - bb * c
            disc = tr * tr / 4.0 - det
            if disc < 0.0:
                imag = True
            sq = math.sqrt(max(disc, 0.0))
            l1 = tr / 2.0 + (sq if tr >= 0.0 else -sq)
            l2 = det / l1 if l1 != 0.0 else tr / 2.0
            npair = 2
        for p in range(npair):
            lv = l1 if p == 0 else l2
            for r in range(n):
                v[r] = 0.0
            if j < 0:
                v[i] = 1.0
            else:
                n1 = math.hypot(bb, lv - a)
                n2 = math.hypot(lv - d, c)
                use1 = n1 >= n2
                nrm = n1 if use1 else n2
                if not nrm > 0.0:
                    nrm = 1.0
                v[i] = (bb if use1 else lv - d) / nrm
                v[j] = (lv - a if use1 else c) / nrm
            for ci in range(bi + 1, nbk):
                r = blk[ci, 0]
                s2 = blk[ci, 1]
                rhs0 = 0.0
                for k in range(n):
                    rhs0 += K[r, k] * v[k]
                if s2 < 0:
                    v[r] = rhs0 / (lv - K[r, r])
                    continue
                rhs1 = 0.0
                for k in range(n):
                    rhs1 += K[s2, k] * v[k]
                m11 = lv - K[r, r]
                m12 = -K[r, s2]
                m21 = -K[s2, r]
                m22 = lv - K[s2, s2]
                det2 = m11 * m22 - m12 * m21
                v[r] = (m22 * rhs0 - m12 * rhs1) / det2
                v[s2] = (-m21 * rhs0 + m11 * rhs1) / det2
            lam[col] = lv
            for r in range(n):
                V[r, col] = v[r]
            col += 1
    ok = not imag
    finite = True
    for r in range(n):
        if not math.isfinite(lam[r]):
            ok = False
        for k in range(n):
            if not math.isfinite(V[r, k]):
                finite = False
    # W = V^-1 by Gaussian elimination with partial pivoting (the identity where V is not finite)
    for r in range(n):
        for k in range(n):
            A[r, k] = V[r, k] if finite else (1.0 if r == k else 0.0)
            Inv[r, k] = 1.0 if r == k else 0.0
    singular = not _solve(A, Inv)
    nv = 0.0
    nw = 0.0
    for r in range(n):
        sv = 0.0
        sw = 0.0
        for k in range(n):
            W[r, k] = math.nan if singular else Inv[r, k]
            sv += abs(V[r, k])
            sw += abs(W[r, k])
        nv = max(nv, sv)
        nw = max(nw, sw)
    cond = nv * nw
    return ok and finite and not singular and math.isfinite(cond) and cond < cond_max
'''

LINEAR = '''\
# generated by cnidose.pk.kernels; do not edit
import math

import numpy as np
from numba import njit, types

# one signature each, compiled when the module is first loaded (then cached): inputs of any layout, read-only
# or not; outputs writable
def _in(dtype, ndim):
    return types.Array(dtype, ndim, "A", readonly=True)


def _out(dtype, ndim):
    return types.Array(dtype, ndim, "A")


F8, I8, B1 = types.float64, types.int64, types.boolean
DECOMPOSE = types.void(_in(F8, 3), _in(I8, 2), _out(F8, 2), _out(F8, 3), _out(F8, 3), _out(B1, 1), F8)
RUN = types.void(_in(I8, 2), _in(F8, 1), _in(F8, 1), _in(F8, 3), _in(F8, 4), _in(F8, 4), _in(F8, 3), _in(F8, 3),
                 _in(B1, 1), _out(F8, 2))


''' + DECOMPOSE_ONE + '''

@njit(DECOMPOSE, cache=True, error_model="numpy")
def decompose(K, blk, lam, V, W, good, cond_max):
    n = K.shape[1]
    v = np.empty(n)
    A = np.empty((n, n))
    Inv = np.empty((n, n))
    for m in range(K.shape[0]):
        good[m] = decompose_one(K[m], blk, lam[m], V[m], W[m], v, A, Inv, cond_max)


@njit(RUN, cache=True, error_model="numpy")
def run(ops, amts, dts, lam, V, W, Fs, Ss, good, out):
    nb = lam.shape[1]
    n = lam.shape[2]
    nd = dts.shape[0]
    y = np.empty(n)
    x = np.empty(n)
    E = np.empty((max(nd, 1), n))
    have = np.zeros(max(nd, 1), np.bool_)
    for b in range(nb):
        if not good[b]:
            continue
        for i in range(n):
            y[i] = 0.0
        for d in range(nd):
            have[d] = False
        u = 0
        for k in range(ops.shape[0]):
            kind = ops[k, 0]
            if kind == 0:
                d = ops[k, 1]
                if not have[d]:
                    for i in range(n):
                        E[d, i] = math.exp(lam[u, b, i] * dts[d])
                    have[d] = True
                for i in range(n):
                    y[i] *= E[d, i]
            elif kind == 1:
                a = Fs[ops[k, 1], b, ops[k, 2]] * amts[k]
                c = ops[k, 3]
                for i in range(n):
                    y[i] += a * W[u, b, i, c]
            elif kind == 2:
                s = ops[k, 1]
                for i in range(n):
                    acc = 0.0
                    for m in range(n):
                        acc += V[u, b, i, m] * y[m]
                    x[i] = acc
                for i in range(n):
                    acc = 0.0
                    for m in range(n):
                        acc += W[s, b, i, m] * x[m]
                    y[i] = acc
                u = s
                for d in range(nd):
                    have[d] = False
            else:
                j = ops[k, 1]
                oc = ops[k, 2]
                acc = 0.0
                for m in range(n):
                    acc += V[u, b, oc, m] * y[m]
                sc = ops[k, 3]
                out[b, j] = acc / Ss[sc, b, j] if sc >= 0 else acc
'''
