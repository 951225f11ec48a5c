"""The cohort superposition path equals the event engine on random regimens.

Random designs mix single and repeated doses (ADDL), bolus and zero-order inputs (given RATE, modelled
duration), SS=1/SS=2 bolus and infusion regimens, constant infusions, resets (EVID 3) and observations
at dose times; parameters (including lag, F, duration) differ per individual and per draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cnidose.pk.engine import simulate
from cnidose.pk.events import Individual, split_individuals
from cnidose.pk.structure import LinearStructure, one_compartment, three_compartment, two_compartment
from cnidose.pk.superposition import compile_design, predict_design


def _random_individual(rng: np.random.Generator, idn: int, oral: bool) -> Individual:
    rows: list[dict[str, float]] = []
    t = 0.0
    for _ in range(int(rng.integers(1, 5))):
        t += float(rng.choice([0.0, 1.5, 7.0, 12.0, 24.0]))
        kind = int(rng.integers(0, 7))
        cmt = 1 if (oral and rng.random() < 0.7) else 2 if oral else 1
        rate, ss, ii, addl, amt = 0.0, 0, 0.0, 0, float(rng.uniform(10, 100))
        if kind == 1:
            rate = float(rng.uniform(5, 50))
        elif kind == 2:
            rate = -2.0
        elif kind == 3:
            ss, ii = int(rng.choice([1, 2])), float(rng.choice([8.0, 12.0, 24.0]))
        elif kind == 4:
            addl, ii = int(rng.integers(1, 4)), float(rng.choice([6.0, 12.0]))
        elif kind == 5:
            ss, ii, rate = 1, 12.0, float(rng.uniform(5, 50))
        elif kind == 6:
            ss, ii, rate, amt = 1, 0.0, float(rng.uniform(1, 5)), 0.0  # constant infusion
        rows.append({"TIME": t, "EVID": 1, "AMT": amt, "CMT": cmt, "RATE": rate, "SS": ss, "II": ii, "ADDL": addl})
        for _ in range(int(rng.integers(1, 4))):
            dt = float(rng.choice([0.0, 0.3, 1.0, 2.0, 3.3, 6.0, 12.0, 24.0]))
            rows.append({"TIME": t + dt, "EVID": 0, "AMT": 0, "CMT": 2 if oral else 1, "RATE": 0, "SS": 0, "II": 0,
                         "ADDL": 0})
        if rng.random() < 0.1:
            rows.append({"TIME": t + 1, "EVID": 3, "AMT": 0, "CMT": 0, "RATE": 0, "SS": 0, "II": 0, "ADDL": 0})
    rows.sort(key=lambda r: r["TIME"])
    cols: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    cols["ID"] = [idn] * len(rows)
    return split_individuals(cols)[0]


@pytest.mark.parametrize(("structure", "oral"), [
    (one_compartment(oral=True), True), (two_compartment(oral=True), True),
    (three_compartment(oral=True), True), (one_compartment(oral=False), False),
    (two_compartment(oral=False), False),
])
@pytest.mark.parametrize("seed", [1, 2])
def test_superposition_equals_engine(structure: LinearStructure, oral: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    N, B = 120, 3
    inds = [_random_individual(rng, i, oral) for i in range(N)]
    params: dict[str, Any] = {p: rng.uniform(0.3, 5.0, size=(N, B)) for p in structure.rate_parameters}
    params["ALAG1"] = rng.choice([0.0, 0.3, 2.0], size=(N, B))
    params["F1"] = rng.uniform(0.3, 1.0, size=(N, B))
    params["D1"] = rng.uniform(0.5, 3.0, size=(N, B))
    obs = 2 if oral else 1
    if oral:
        params["D2"] = rng.uniform(0.5, 3.0, size=(N, B))
    params[f"S{obs}"] = rng.uniform(5.0, 20.0, size=(N, B))
    design = compile_design(structure, inds)
    pred, bad = predict_design(design, structure, params)
    assert not bad.any()
    for i, ind in enumerate(inds):
        sim = simulate(structure, ind, {k: v[i][:, None] for k, v in params.items()})
        lo, hi = design.obs_start[i], design.obs_start[i + 1]
        expected = sim.prediction[:, design.obs_rec[lo:hi]].T
        np.testing.assert_allclose(pred[lo:hi], expected, rtol=1e-9, atol=1e-12 * max(1.0, np.abs(expected).max()))


def test_ill_conditioned_members_are_flagged() -> None:
    st = one_compartment(oral=True)
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 2], "AMT": [100, 0], "CMT": [1, 2]})
    design = compile_design(st, [ind])
    # KA equal to CL/V: repeated eigenvalue, the eigenvectors are degenerate
    params = {"KA": np.array([[0.5, 1.0]]), "CL": np.array([[10.0, 10.0]]), "V": np.array([[20.0, 20.0]])}
    _, bad = predict_design(design, st, params)
    assert bad.tolist() == [[True, False]]


def test_a_duration_that_is_not_finite_gives_nan_not_an_exception() -> None:
    """An input at steady state over a modelled duration (RATE = -2) that a trial point makes NaN or infinite: the
    count of its earlier infusions still running is not a number, and the prediction is NaN (or left to the
    engine), never an exception that stops a fit."""
    s = one_compartment()
    ind = split_individuals({"ID": np.ones(3), "TIME": np.array([0.0, 4.0, 30.0]), "EVID": np.array([1.0, 0, 0]),
                             "AMT": np.array([100.0, 0, 0]), "RATE": np.array([-2.0, 0, 0]),
                             "SS": np.array([1.0, 0, 0]), "II": np.array([12.0, 0, 0]),
                             "CMT": np.array([1.0, 1, 1])})[0]
    p = {"CL": np.full((1, 3), 5.0), "V": np.full((1, 3), 50.0), "KA": np.ones((1, 3)),
         "D1": np.array([[2.0, np.nan, np.inf]]), "S1": np.full((1, 3), 50.0)}
    with np.errstate(invalid="ignore"):  # the impossible members' arithmetic (as inside a fit)
        got, bad = predict_design(compile_design(s, [ind]), s, p)
    ref = simulate(s, ind, {k: v[0, 0] for k, v in p.items()}).prediction[0][ind.evid == 0]
    np.testing.assert_allclose(got[:, 0], ref, rtol=1e-10)
    assert np.all(np.isnan(got[:, 1:]) | bad[0, 1:])
