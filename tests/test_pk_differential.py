"""Differential test of every solution method against an independent reference (tests/pk_reference.py).

Random event histories mix every record kind: parameters changing at any record (EVID 2 included) while
infusions run, bolus and zero-order doses (given RATE, modelled rate R, modelled duration D), ADDL, SS 1 and
2 (lagged, infused), the constant steady-state infusion, lags shorter and longer than the gaps between records
(and landing exactly on them), EVID 3/4 resets. Each is simulated by the engine with every method and by the
reference (a matrix exponential written for the test, or a tight LSODA solve), under both dose-value
conventions.

CI runs a fixed set of seeds; ``CNIDOSE_DIFFERENTIAL_CASES=N`` runs N seeds per structure (a long run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pytest

from cnidose.pk import (
    LinearStructure,
    OdeStructure,
    one_compartment,
    simulate,
    split_individuals,
    three_compartment,
    transit_absorption,
    two_compartment,
)
from tests.pk_reference import Reference, expm_taylor


def _mm_rhs(x: np.ndarray, p: Mapping[str, np.ndarray]) -> np.ndarray:
    """Depot -> central with Michaelis-Menten plus linear elimination (batched for the engine)."""
    c = x[:, 1] / p["V"]
    out = np.empty_like(x)
    out[:, 0] = -p["KA"] * x[:, 0]
    out[:, 1] = p["KA"] * x[:, 0] - p["VM"] * c / (p["KM"] + c) - p["CL"] / p["V"] * x[:, 1]
    return out


def _mm_rhs_ref(x: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    c = x[1] / p["V"]
    return np.array([-p["KA"] * x[0], p["KA"] * x[0] - p["VM"] * c / (p["KM"] + c) - p["CL"] / p["V"] * x[1]])


MM = OdeStructure(("DEPOT", "CENTRAL"), 1, 2, rhs=_mm_rhs, parameters=("KA", "V", "VM", "KM", "CL"))
# the same system as scalar equations (x: amounts, p: KA, V, VM, KM, CL): the compiled integrator
# (cnidose.pk.compiled) between records, SciPy where a transit input is live
MM_COMPILED = OdeStructure(("DEPOT", "CENTRAL"), 1, 2, rhs=_mm_rhs, parameters=("KA", "V", "VM", "KM", "CL"),
                           equations=("(-p[0] * x[0])",
                                      "(p[0] * x[0] - p[2] * (x[1] / p[1]) / (p[3] + x[1] / p[1])"
                                      " - p[4] / p[1] * x[1])"))

CASES: dict[str, tuple[LinearStructure | OdeStructure, dict[str, tuple[float, float]], tuple[int, ...]]] = {
    "1cmt-oral": (one_compartment(), {"CL": (1, 20), "V": (5, 100), "KA": (0.2, 5)}, (1, 2)),
    "2cmt-iv": (two_compartment(oral=False), {"CL": (1, 20), "V1": (5, 100), "Q": (1, 30), "V2": (10, 200)},
                (1, 2)),
    "3cmt-oral": (three_compartment(), {"CL": (1, 20), "V1": (5, 100), "Q2": (1, 30), "V2": (10, 200),
                                        "Q3": (1, 10), "V3": (20, 200), "KA": (0.2, 5)}, (1, 2)),
    "transit3": (transit_absorption(3, peripherals=0), {"KTR": (0.5, 8), "KA": (0.2, 5), "CL": (1, 20),
                                                        "V1": (5, 100)}, (1, 5)),
    "mm-ode": (MM, {"KA": (0.2, 5), "V": (10, 100), "VM": (5, 50), "KM": (0.5, 10), "CL": (1, 10)}, (1, 2)),
    "mm-compiled": (MM_COMPILED, {"KA": (0.2, 5), "V": (10, 100), "VM": (5, 50), "KM": (0.5, 10), "CL": (1, 10)},
                    (1, 2)),
}
METHODS = {"1cmt-oral": ("auto", "expm", "ode"), "2cmt-iv": ("auto", "expm", "ode"),
           "3cmt-oral": ("auto", "expm", "ode"), "transit3": ("auto", "ode"), "mm-ode": ("auto",),
           "mm-compiled": ("auto",)}
N_SEEDS = int(os.environ.get("CNIDOSE_DIFFERENTIAL_CASES", "0")) or None
CI_SEEDS = {"1cmt-oral": 10, "2cmt-iv": 8, "3cmt-oral": 8, "transit3": 8, "mm-ode": 3, "mm-compiled": 3}
# each structure's random stream; the compiled system shares the SciPy one's, so both solve the same histories
# (the reference's steady state by SciPy is what limits the nonlinear cases' count, not the engine)
STREAM = {"1cmt-oral": 0, "2cmt-iv": 1, "3cmt-oral": 2, "mm-ode": 3, "transit3": 4, "mm-compiled": 3}


def _slowest_rate(structure: LinearStructure, p: Mapping[str, float]) -> float:
    K = structure.rate_matrix({k: np.array([v]) for k, v in p.items()})[0]
    return float(np.min(np.abs(np.linalg.eigvals(K).real)))


def random_history(rng: np.random.Generator, name: str, *, tdm: bool = False
                   ) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Records and per-record parameters (R,) for one random individual. ``tdm``: only the record kinds of the
    engine's fast path (bolus doses with ADDL and lags, observations, EVID 2; cnidose.pk.eigenpath)."""
    structure, ranges, dose_cmts = CASES[name]
    linear = isinstance(structure, LinearStructure)
    n_rec = int(rng.integers(5, 13))
    gaps = rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 17.5], size=n_rec)
    gaps[0] = 0.0
    times = np.cumsum(gaps)
    cols: dict[str, list[float]] = {c: [] for c in ("ID", "TIME", "EVID", "AMT", "RATE", "II", "ADDL", "SS",
                                                    "CMT")}
    for t in times:
        u = rng.random()
        evid, amt, rate, ii, addl, ss, cmt = 0, 0.0, 0.0, 0.0, 0, 0, int(rng.integers(1, structure.n + 1))
        if u < 0.45 or (u < 0.5 and not linear):
            evid = 1 if tdm else int(rng.choice([1, 1, 1, 1, 4]))
            cmt = int(rng.choice(dose_cmts))
            amt = float(rng.uniform(1, 500))
            rate = 0.0 if tdm else float(rng.choice([0.0, 0.0, amt / rng.uniform(0.5, 20), -1.0, -2.0]))
            ii = float(rng.choice([6.0, 8.0, 12.0, 24.0]))
            ss = 0 if tdm else int(rng.choice([0, 0, 0, 1, 2]))
            addl = int(rng.choice([0, 0, 1, 2, 4]))
            if ss == 0 and addl == 0:
                ii = 0.0
        elif tdm:
            evid = 2 if u < 0.6 else 0
        elif u < 0.5:  # the constant steady-state infusion (linear systems only: a formula in the reference)
            evid, amt, rate, ss, cmt = 1, 0.0, float(rng.uniform(1, 50)), 1, int(rng.choice(dose_cmts))
        elif u < 0.62:
            evid = 2
        elif u < 0.67:
            evid, cmt = 3, 0
        for c, v in zip(cols, (1, t, evid, amt, rate, ii, addl, ss, cmt), strict=True):
            cols[c].append(float(v))
    # parameters: drawn at the first record, redrawn at later records with some probability (time-varying)
    params: dict[str, np.ndarray] = {}
    while True:
        for k, (lo, hi) in ranges.items():
            v = np.empty(n_rec)
            for r in range(n_rec):
                v[r] = rng.uniform(lo, hi) if r == 0 or rng.random() < 0.3 else v[r - 1]
            params[k] = v
        if not linear or all(_slowest_rate(structure, {k: float(params[k][r]) for k in ranges}) > 0.01
                             for r in range(n_rec)):
            break
    lags = [0.0, 0.0, 0.5, 1.0, 2.0, 6.5, 13.0]
    for c in dose_cmts:
        for prefix, draw in (("F", lambda: rng.uniform(0.2, 1.0)),
                             ("ALAG", lambda: float(rng.choice(lags)) if rng.random() < 0.6 else rng.uniform(0, 15)),
                             ("D", lambda: rng.uniform(0.5, 20)), ("R", lambda: rng.uniform(5, 200))):
            v = np.empty(n_rec)
            for r in range(n_rec):
                v[r] = draw() if r == 0 or rng.random() < 0.4 else v[r - 1]
            params[f"{prefix}{c}"] = v
    return cols, params


def _reference(name: str, cols: Mapping[str, list[float]], params: Mapping[str, np.ndarray],
               dose_values: str) -> np.ndarray:
    structure, _, _ = CASES[name]
    if isinstance(structure, LinearStructure):
        flows = [(f.source, f.target, f.rate, f.per) for f in structure.flows]
        ref = Reference(structure.n, params, default_dose=structure.default_dose, default_obs=structure.default_obs,
                        flows=flows, dose_values=dose_values)
    else:
        ref = Reference(structure.n, params, default_dose=structure.default_dose, default_obs=structure.default_obs,
                        rhs=_mm_rhs_ref, dose_values=dose_values)
    return ref.run(cols)


def _cases() -> list[tuple[str, int]]:
    return [(name, seed) for name in CASES for seed in range(N_SEEDS or CI_SEEDS[name])]


@pytest.mark.parametrize(("name", "seed"), _cases())
def test_every_method_matches_the_reference(name: str, seed: int) -> None:
    rng = np.random.default_rng([seed, STREAM[name]])
    cols, params = random_history(rng, name)
    structure = CASES[name][0]
    ind, = split_individuals(cols)
    for dose_values in ("nonmem", "dose-record"):
        ref = _reference(name, cols, params, dose_values)
        scale = np.max(np.abs(ref)) + 1e-12
        for method in METHODS[name]:
            sim = simulate(structure, ind, params, method=method, return_amounts=True,  # type: ignore[arg-type]
                           dose_values=dose_values)  # type: ignore[arg-type]
            assert sim.amounts is not None
            got = sim.amounts[0]
            tol = 1e-8 if sim.method in ("eigen", "expm") else 1e-6
            err = np.abs(got - ref) / (tol * np.abs(ref) + 0.1 * tol * scale)  # relative, with a floor
            assert np.all(err <= 1.0), (
                f"{name} seed {seed} {method}/{sim.method} {dose_values}: worst record "
                f"{int(np.unravel_index(np.argmax(err), err.shape)[0])}, engine {got.ravel()[np.argmax(err)]!r} "
                f"reference {ref.ravel()[np.argmax(err)]!r}")


@pytest.mark.parametrize(("name", "seed"), [(n, k) for n in ("1cmt-oral", "2cmt-iv", "3cmt-oral", "transit3")
                                             for k in range(N_SEEDS or 6)])
def test_the_fast_path_matches_the_reference(name: str, seed: int) -> None:
    """The engine's fast path (predictions only, record by record in eigen-coordinates) on TDM-shaped histories:
    bolus doses with ADDL and lags shorter and longer than the gaps, parameters and F changing at records,
    EVID 2; every record's prediction against the reference, under both dose-value conventions. The transit
    chain's repeated eigenvalue sends it to the general engine, which must give the same."""
    from cnidose.pk.eigenpath import predict_records

    rng = np.random.default_rng([seed, 7, STREAM[name]])
    cols, params = random_history(rng, name, tdm=True)
    structure = CASES[name][0]
    assert isinstance(structure, LinearStructure)
    ind, = split_individuals(cols)
    obs_c = np.where((ind.evid == 0) & (ind.cmt > 0), ind.cmt, structure.default_obs) - 1
    batch = {k: np.asarray(v, float)[None, :] for k, v in params.items()}
    changed = np.zeros(len(ind), bool)
    for k in structure.rate_parameters:
        changed[1:] |= batch[k][0, 1:] != batch[k][0, :-1]
    for dose_values in ("nonmem", "dose-record"):
        ref = _reference(name, cols, params, dose_values)[np.arange(len(ind)), obs_c]
        fast = predict_records(structure, ind, batch, 1, changed, nonmem=dose_values == "nonmem")
        if name != "transit3":
            assert fast is not None and fast[1].all()
        sim = simulate(structure, ind, params, dose_values=dose_values)  # type: ignore[arg-type]
        scale = np.max(np.abs(ref)) + 1e-12
        np.testing.assert_allclose(sim.prediction[0], ref, rtol=1e-8, atol=1e-9 * scale,
                                   err_msg=f"{name} seed {seed} {dose_values} ({sim.method})")


@pytest.mark.parametrize(("name", "seed"), [(n, k) for n in ("1cmt-oral", "2cmt-iv", "3cmt-oral")
                                             for k in range(N_SEEDS or 6)])
def test_the_compiled_fast_path_equals_its_numpy_twin_and_the_reference(name: str, seed: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's schedule run by the compiled kernel (Numba) and by NumPy (CNIDOSE_COMPILED=0) on a batch
    of three members (parameters scaled per member): the two agree to rounding, and member 0 matches the
    reference, under both dose-value conventions."""
    from cnidose.pk import kernels
    from cnidose.pk.eigenpath import predict_records

    assert kernels.linear_kernels() is not None  # the kernel is there to compare
    rng = np.random.default_rng([seed, 11, STREAM[name]])
    cols, params = random_history(rng, name, tdm=True)
    structure = CASES[name][0]
    assert isinstance(structure, LinearStructure)
    ind, = split_individuals(cols)
    obs_c = np.where((ind.evid == 0) & (ind.cmt > 0), ind.cmt, structure.default_obs) - 1
    scale = np.array([[1.0], [0.7], [1.6]])
    batch = {k: (np.asarray(v, float)[None, :] * (scale if k in structure.rate_parameters else 1.0))
             for k, v in params.items()}
    batch = {k: np.ascontiguousarray(np.broadcast_to(v, (3, len(ind)))) for k, v in batch.items()}
    changed = np.zeros(len(ind), bool)
    for k in structure.rate_parameters:
        changed[1:] |= np.any(batch[k][:, 1:] != batch[k][:, :-1], axis=0)
    for dose_values in ("nonmem", "dose-record"):
        nonmem = dose_values == "nonmem"
        compiled = predict_records(structure, ind, batch, 3, changed, nonmem=nonmem)
        monkeypatch.setenv("CNIDOSE_COMPILED", "0")
        plain = predict_records(structure, ind, batch, 3, changed, nonmem=nonmem)
        monkeypatch.delenv("CNIDOSE_COMPILED")
        assert compiled is not None and plain is not None and compiled[1].all()
        top = np.max(np.abs(plain[0])) + 1e-300
        np.testing.assert_allclose(compiled[0], plain[0], rtol=1e-11, atol=1e-13 * top)
        ref = _reference(name, cols, params, dose_values)[np.arange(len(ind)), obs_c]
        np.testing.assert_allclose(compiled[0][0], ref, rtol=1e-8, atol=1e-9 * (np.max(np.abs(ref)) + 1e-12),
                                   err_msg=f"{name} seed {seed} {dose_values}")


def test_a_batch_with_an_ill_conditioned_member_mixes_the_paths() -> None:
    """One member with KA equal to CL/V (a repeated eigenvalue): that member goes to the matrix exponential,
    the others stay on the fast path, and every member equals its separate run."""
    ind, = split_individuals({"ID": [1] * 5, "TIME": [0, 1, 12, 13, 30], "EVID": [1, 0, 1, 0, 0],
                              "AMT": [100, 0, 100, 0, 0], "ADDL": [0, 0, 1, 0, 0], "II": [0, 0, 12, 0, 0]})
    ka = np.array([[1.0], [0.2], [2.5]])  # member 2: KA = CL / V = 0.2
    p = {"CL": 2.0, "V": 10.0, "KA": ka, "S2": 10.0}
    sim = simulate(one_compartment(), ind, p)
    assert sim.method == "expm"
    for j in range(3):
        one = simulate(one_compartment(), ind, {"CL": 2.0, "V": 10.0, "KA": float(ka[j, 0]), "S2": 10.0},
                       method="expm")
        np.testing.assert_allclose(sim.prediction[j], one.prediction[0], rtol=1e-11)


def test_a_large_batch_with_ill_conditioned_members_splits_and_matches_separate_runs() -> None:
    """A batch of 300 on the general engine (lags differ between members, so not the fast path) with four members
    whose KA equals CL/V (a repeated eigenvalue): those go to the matrix exponential apart from the others, and
    every member's predictions and amounts equal its own run on the matrix exponential."""
    ind, = split_individuals({"ID": [1] * 6, "TIME": [0, 1, 12, 13, 30, 50], "EVID": [1, 0, 1, 0, 0, 0],
                              "AMT": [100, 0, 100, 0, 0, 0], "ADDL": [0, 0, 2, 0, 0, 0], "II": [0, 0, 12, 0, 0, 0]})
    rng = np.random.default_rng(3)
    B = 300
    cl, v = rng.uniform(1, 5, (B, 1)), rng.uniform(10, 50, (B, 1))
    ka = rng.uniform(0.3, 3, (B, 1))
    bad = [0, 17, 150, 299]
    ka[bad] = cl[bad] / v[bad]
    p = {"CL": cl, "V": v, "KA": ka, "ALAG1": rng.uniform(0.1, 1.0, (B, 1)), "S2": v}
    sim = simulate(one_compartment(), ind, p, return_amounts=True)
    assert sim.method == "expm" and sim.amounts is not None
    for j in [*bad, 1, 100, 298]:
        one = simulate(one_compartment(), ind, {k: float(x[j, 0]) for k, x in p.items()}, method="expm",
                       return_amounts=True)
        assert one.amounts is not None
        np.testing.assert_allclose(sim.prediction[j], one.prediction[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sim.amounts[j], one.amounts[0], rtol=1e-9, atol=1e-12)


def test_reference_matrix_exponential_against_a_known_closed_form() -> None:
    """The reference's own exponential: a 2x2 with distinct eigenvalues, and a Jordan block (t e^{-kt})."""
    a, b, t = 0.7, 0.2, 13.0
    E = expm_taylor(np.array([[-a, 0.0], [a, -b]]) * t)
    np.testing.assert_allclose(E[1, 0], a / (a - b) * (np.exp(-b * t) - np.exp(-a * t)), rtol=1e-13)
    J = expm_taylor(np.array([[-a, 0.0], [a, -a]]) * t)
    np.testing.assert_allclose(J[1, 0], a * t * np.exp(-a * t), rtol=1e-13)


@pytest.mark.parametrize("method", ["auto", "expm", "ode"])
def test_clearance_change_during_an_infusion_is_counted_once(method: str) -> None:
    """Regression (issue 14): with a rate parameter changing at a record while an infusion ran, the matrix
    exponential and ODE paths counted every later infusion start or stop twice (their copy of the input rates
    was the record's own array), and levels fell linearly below zero (-5.2 mg/L at 72 h, reference 1.7)."""
    k0, t_end = 20.0, 10.0  # 200 mg over 10 h
    times = [0.0, 4.0, 6.0, 12.0, 24.0, 72.0]
    ind, = split_individuals({"ID": [1] * 6, "TIME": times, "EVID": [1, 2, 2, 0, 0, 0],
                              "AMT": [200, 0, 0, 0, 0, 0], "RATE": [k0, 0, 0, 0, 0, 0]})
    cl = np.array([2.0, 2.0, 6.0, 6.0, 6.0, 6.0])  # CL 6 from the record at 6 h: the interval (4, 6] on
    v = 30.0
    sim = simulate(one_compartment(oral=False), ind, {"CL": cl, "V": v, "S1": v}, method=method)

    # by hand: A(t + dt) = A e^{-k dt} + (rate / k)(1 - e^{-k dt}), piece by piece
    def piece(a: float, rate: float, k: float, dt: float) -> float:
        return a * np.exp(-k * dt) + rate / k * (1 - np.exp(-k * dt))

    k1, k2 = 2.0 / v, 6.0 / v
    a4 = piece(0.0, k0, k1, 4.0)
    a6 = piece(a4, k0, k2, 2.0)
    a10 = piece(a6, k0, k2, 4.0)
    expected = [0.0, a4, a6, piece(a10, 0, k2, 2.0), piece(a10, 0, k2, 14.0), piece(a10, 0, k2, 62.0)]
    assert t_end == 10.0
    np.testing.assert_allclose(sim.prediction[0], np.array(expected) / v, rtol=1e-7 if method == "ode" else 1e-12)
    assert sim.prediction[0, -1] > 0


@pytest.mark.parametrize("name", ["1cmt-oral", "2cmt-iv", "transit3"])  # blocks of 1 and 2 (3cmt: LAPACK)
def test_the_compiled_decomposition_equals_numpys(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eigen-decomposition, inverse and usability test compiled (cnidose.pk.kernels.decompose) against the
    NumPy closed form and LAPACK's inverse (CNIDOSE_COMPILED=0), on random parameters of each structure plus
    members with a repeated eigenvalue (KA = CL/V, or a transit chain: not usable) and a non-finite parameter."""
    from cnidose.pk import kernels
    from cnidose.pk.solvers import EigenSolver

    assert kernels.linear_kernels() is not None
    structure, ranges, _ = CASES[name]
    assert isinstance(structure, LinearStructure)
    rng = np.random.default_rng(STREAM[name])
    B = 200
    params = {k: np.exp(rng.uniform(np.log(lo), np.log(hi), B)) for k, (lo, hi) in ranges.items()}
    if "KA" in params and "V" in params:
        params["KA"][0] = params["CL"][0] / params["V"][0]
    params[next(iter(params))][1] = np.nan
    fast, plain = EigenSolver(structure, B), EigenSolver(structure, B)
    fast.set_params(params)
    monkeypatch.setenv("CNIDOSE_COMPILED", "0")
    plain.set_params(params)
    np.testing.assert_array_equal(fast.good, plain.good)
    assert not fast.good[1] and (name != "1cmt-oral" or not fast.good[0])
    assert fast.good.sum() >= (0 if name == "transit3" else 0.9 * B)
    g = fast.good
    np.testing.assert_allclose(fast.lam[g], plain.lam[g], rtol=1e-13)
    np.testing.assert_allclose(fast.V[g], plain.V[g], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fast.W[g], plain.W[g], rtol=1e-9, atol=1e-12 * np.abs(plain.W[g]).max(initial=1.0))
