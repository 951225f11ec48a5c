"""The wide-prior search's pruning (issue 14, speed): a point is screened only where it might compete, judged by a
lower bound of the objective, OFV(theta) >= data floor + theta' Omega^-1 theta (cnidose.estimation.map._data_floor);
and its choice of distinct starts. The search's results are held by the MAP suite (tests/test_validation_map_nonmem.py:
every individual agrees with NONMEM or beats it, the multimodal ones included)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import pytest

from cnidose.estimation.cohort import build_groups
from cnidose.estimation.map import _data_floor, _distinct, _ofv
from cnidose.estimation.observations import terms

from .conftest import REPO

sys.path.insert(0, str(REPO / "validation" / "map-nonmem"))
import mapsuite


@pytest.mark.parametrize(("model", "blq"), [("001", False), ("403", False), ("405", False), ("407", False),
                                           ("001", True), ("405", True)])
def test_the_data_floor_is_below_the_data_term_everywhere(shared: Any, model: str, blq: bool) -> None:
    """Proportional, additive, combined and exponential (log-scale) errors, and BLQ levels (M3): at prior draws
    (Omega x 4) the objective less the prior penalty never falls below the floor, and the floor is not far below
    the best of them (it bounds, and is close enough to prune)."""
    m = mapsuite.load(model)
    rng = np.random.default_rng(int(model))
    for ind in mapsuite.individuals(model, 2)[:6]:
        if blq:  # the first level below a limit at its own value
            obs = np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))
            flag = np.zeros(len(ind))
            flag[obs[0]] = 1.0
            ind = dataclasses.replace(ind, covariates={**ind.covariates, "BLQ": flag})
        g = build_groups(m, [ind], fast=False)[0][0]
        w = np.arange(1)
        floor = float(_data_floor(g, w)[0])
        assert np.isfinite(floor)
        cov = np.linalg.inv(g.precision) * 4.0
        theta = rng.multivariate_normal(np.zeros(g.dim), cov, size=400)[None]
        data = (_ofv(g, w, theta, g.predict(theta, w)) - np.einsum("gbi,ij,gbj->gb", theta, g.precision, theta))[0]
        data = data[np.isfinite(data)]
        assert data.size > 300
        assert np.all(data >= floor), (model, float(data.min()), floor)
        # and close to the levels' own minima over the prediction, found here by brute force (a dense grid)
        level = np.where(g.log, np.exp(np.where(g.log, g.y, 0.0)), g.y)
        f = level[:, None] * np.exp(np.linspace(-9.0, 9.0, 200_001))[None, :]
        t = terms(f, g.y, g.blq, g.limit, g.log, g.prop, g.add, g.sd_log, g.if_zero, derivatives=False)[0]
        own = np.where(g.blq, 0.0, np.nanmin(np.where(np.isfinite(t), t, np.nan), axis=1))
        assert own.sum() - 0.01 * len(g.y) - 0.01 < floor <= own.sum()


def test_no_floor_where_the_data_term_has_none(shared: Any) -> None:
    """A level of exactly 0 under a proportional-only error: its term falls without bound as the prediction goes to
    0 (1/p^2 + ln(p^2 f^2)), so there is no floor and nothing may be pruned."""
    m = mapsuite.load("001")
    assert m.observations[0].error.additive is None and m.observations[0].error.proportional is not None
    ind = mapsuite.individuals("001", 1)[0]
    obs = np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))
    dv = ind.covariates["DV"].copy()
    dv[obs[0]] = 0.0
    zero = dataclasses.replace(ind, covariates={**ind.covariates, "DV": dv})
    g = build_groups(m, [zero], fast=False)[0][0]
    assert _data_floor(g, np.arange(1))[0] == -np.inf
    g = build_groups(m, [ind], fast=False)[0][0]
    assert np.isfinite(_data_floor(g, np.arange(1))[0])


def test_distinct_starts_are_the_greedy_choice() -> None:
    """Blocks of candidates at once, the same choice as one at a time: in order, each more than 1 (Mahalanobis)
    from every one taken."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n, d, n_best = int(rng.integers(0, 200)), int(rng.integers(1, 5)), int(rng.integers(1, 7))
        a = rng.normal(size=(d, d))
        precision = a @ a.T + 0.1 * np.eye(d)
        pts = rng.normal(size=(n, d)) * rng.uniform(0.3, 3.0)
        want: list[int] = []
        for k in range(n):
            if len(want) == n_best:
                break
            if all(float((pts[k] - pts[j]) @ precision @ (pts[k] - pts[j])) > 1.0 for j in want):
                want.append(k)
        got = _distinct(pts @ np.linalg.cholesky(precision), n_best, block=int(rng.integers(1, 70)))
        assert got == want
