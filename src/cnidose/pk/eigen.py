"""Eigen-decomposition of rate matrices in closed form, from the structure of the flows.

A linear structure's compartments fall into strongly connected components of its flow graph; ordered
topologically, the rate matrix is block lower-triangular, and with blocks of one or two compartments (every
model of the library: depot chains, central and peripheral pairs) its eigenvalues and eigenvectors follow in
closed form, batched over any leading axes. LAPACK's general ``eig`` on many small matrices costs far more.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from cnidose.pk.structure import LinearStructure

__all__ = ["eigen_blocks", "flow_blocks"]

FloatArray = NDArray[np.float64]


@lru_cache(maxsize=64)
def flow_blocks(structure: LinearStructure) -> tuple[tuple[int, ...], ...]:
    """Strongly connected components of the flow graph, in topological order (0-based compartments).

    Ordered this way the rate matrix is block lower-triangular, so its eigen-decomposition reduces to
    that of the (small) diagonal blocks.
    """
    n = structure.n
    adj = [[False] * n for _ in range(n)]
    for f in structure.flows:
        if f.target is not None:
            adj[f.source - 1][f.target - 1] = True
    reach = [row[:] for row in adj]
    for k in range(n):
        for i in range(n):
            if reach[i][k]:
                for j in range(n):
                    if reach[k][j]:
                        reach[i][j] = True
    comps: list[list[int]] = []
    seen: set[int] = set()
    for i in range(n):
        if i in seen:
            continue
        comp = [i] + [j for j in range(n) if j != i and reach[i][j] and reach[j][i]]
        seen.update(comp)
        comps.append(sorted(comp))
    # topological order: a component goes after every component that reaches it
    order: list[list[int]] = []
    remaining = comps[:]
    while remaining:
        for c in remaining:
            if not any(reach[j][c[0]] and j not in c for other in remaining if other is not c for j in other):
                order.append(c)
                remaining.remove(c)
                break
    return tuple(tuple(c) for c in order)


def eigen_blocks(K: FloatArray, blocks: Sequence[Sequence[int]]
                 ) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
    """Closed-form eigen-decomposition of a block lower-triangular matrix with 1x1 and 2x2 blocks."""
    shape = K.shape[:-2]
    n = K.shape[-1]
    lam = np.zeros((*shape, n))
    V = np.zeros((*shape, n, n))
    imag = np.zeros(shape, dtype=bool)
    col = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for bi, b in enumerate(blocks):
            if len(b) == 1:
                pairs = [(K[..., b[0], b[0]], {b[0]: np.ones(shape)})]
            else:
                i, j = b
                a, bb, c, d = K[..., i, i], K[..., i, j], K[..., j, i], K[..., j, j]
                tr, det = a + d, a * d - bb * c
                disc = tr * tr / 4.0 - det
                imag |= disc < 0
                sq = np.sqrt(np.maximum(disc, 0.0))
                l1 = tr / 2.0 + np.where(tr >= 0, sq, -sq)  # larger magnitude root, then the stable one
                l2 = np.where(l1 != 0, det / np.where(l1 != 0, l1, 1.0), tr / 2.0)
                pairs = []
                for lv in (l1, l2):
                    # (K_b - lam I) u = 0: u = (bb, lam - a) or (lam - d, c), whichever is larger
                    n1 = np.hypot(bb, lv - a)
                    n2 = np.hypot(lv - d, c)
                    use1 = n1 >= n2
                    nrm = np.where(use1, n1, n2)
                    nrm = np.where(nrm > 0, nrm, 1.0)
                    u0 = np.where(use1, bb, lv - d) / nrm
                    u1 = np.where(use1, lv - a, c) / nrm
                    pairs.append((lv, {i: u0, j: u1}))
            for lv, comp in pairs:
                v = np.zeros((*shape, n))
                for idx, val in comp.items():
                    v[..., idx] = val
                # later blocks: v_c = (lam I - K_cc)^-1 sum_{a before c} K_ca v_a
                for c_blk in blocks[bi + 1:]:
                    rhs = np.stack([np.einsum("...k,...k->...", K[..., r, :], v) for r in c_blk], axis=-1)
                    if len(c_blk) == 1:
                        r = c_blk[0]
                        v[..., r] = rhs[..., 0] / (lv - K[..., r, r])
                        continue
                    r, s2 = c_blk
                    m11, m12 = lv - K[..., r, r], -K[..., r, s2]
                    m21, m22 = -K[..., s2, r], lv - K[..., s2, s2]
                    det2 = m11 * m22 - m12 * m21
                    v[..., r] = (m22 * rhs[..., 0] - m12 * rhs[..., 1]) / det2
                    v[..., s2] = (-m21 * rhs[..., 0] + m11 * rhs[..., 1]) / det2
                lam[..., col] = lv
                V[..., :, col] = v
                col += 1
    return lam, V, imag
