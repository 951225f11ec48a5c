"""The Savic transit input (doses arriving at a gamma-density rate, any real number of transit compartments):
closed form, matrix-exponential and ODE paths against adaptive quadrature of the convolution, steady state against
a long history, a whole n against the explicit Erlang chain, and the records it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.integrate import quad, quad_vec
from scipy.linalg import expm
from scipy.special import gammaincc, hyp1f1
from scipy.stats import gamma as gamma_dist

from cnidose.errors import DataError
from cnidose.models.library import resolve_model
from cnidose.pk.engine import simulate
from cnidose.pk.events import split_individuals
from cnidose.pk.structure import Flow, GammaInput, LinearStructure, one_compartment, two_compartment

METHODS = ("closed", "expm", "ode")
TWO = dataclasses.replace(two_compartment(), gamma=GammaInput(1, "NTR", "MTT"))
MARTIAL = {"CL": 3.27, "V1": 94.9, "Q": 9.62, "V2": 500.0, "KA": 2.97, "NTR": 1.58, "MTT": 3.39, "S2": 94.9,
           "F1": 0.23}


def individual(doses: list[tuple[float, float]], obs: list[float], **cols: list[float]):
    t = [d[0] for d in doses] + list(obs)
    data = {"ID": np.ones(len(t)), "TIME": np.array(t), "AMT": np.array([d[1] for d in doses] + [0.0] * len(obs)),
            "EVID": np.array([1.0] * len(doses) + [0.0] * len(obs)),
            "CMT": np.array([1.0] * len(doses) + [2.0] * len(obs))}
    data |= {k: np.asarray(v, float) for k, v in cols.items()}
    order = np.argsort(data["TIME"], kind="stable")
    return split_individuals({k: v[order] for k, v in data.items()})[0]


def reference(structure: LinearStructure, p: dict[str, float], ind, lag: float = 0.0) -> np.ndarray:
    """Observations by quadrature: sum over doses of int_0^s expm(K (s - u)) e F AMT g(u) du."""
    K = structure.rate_matrix({k: np.asarray([v]) for k, v in p.items()})[0]
    a = p["NTR"] + 1
    g = gamma_dist(a, scale=p["MTT"] / a).pdf
    e = np.zeros(structure.n)
    e[0] = p["F1"]
    obs_c = structure.default_obs - 1
    out = []
    for t in ind.time[ind.evid == 0]:
        x = np.zeros(structure.n)
        for td, amt in zip(ind.time[ind.evid == 1], ind.amt[ind.evid == 1], strict=True):
            s = t - td - lag
            if s > 0:
                x += amt * quad_vec(lambda u, s=s: expm(K * (s - u)) @ e * g(u), 0.0, s, epsabs=0,
                                    epsrel=1e-13)[0]
        out.append(x[obs_c] / p[f"S{obs_c + 1}"])
    return np.array(out)


def test_kummer_function_is_accurate_where_the_closed_form_uses_it() -> None:
    """M(1, a + 1, -z) = a int_0^1 (1 - t)^(a - 1) e^(-z t) dt, by QUADPACK's algebraic-weight rule."""
    for a in (1.0, 1.58, 2.58, 4.0, 7.3):
        for z in (1e-6, 0.1, 1.0, 10.0, 100.0, 3000.0, -1.0, -30.0):
            ref = a * quad(lambda t, z=z: np.exp(-z * t), 0, 1, weight="alg", wvar=(0, a - 1), epsabs=0,
                           epsrel=1e-13, limit=500)[0]
            assert hyp1f1(1.0, a + 1, -z) == pytest.approx(ref, rel=1e-12), (a, z)


@pytest.mark.parametrize("method", METHODS)
def test_every_path_matches_quadrature_of_the_convolution(method: str) -> None:
    """Martial 2021's typical values, three doses 24 h apart and a dose 8 h later (overlapping inputs), levels
    during and after absorption."""
    ind = individual([(0.0, 2.0), (24.0, 2.0), (48.0, 2.0), (56.0, 3.0)], [0.5, 2, 5, 24, 30, 49, 57, 60, 72, 200])
    got = simulate(TWO, ind, MARTIAL, method=method).prediction[0][ind.evid == 0]
    assert got == pytest.approx(reference(TWO, MARTIAL, ind), rel=1e-9, abs=1e-15)


def test_a_lag_and_a_repeated_eigenvalue() -> None:
    """ka equal to the elimination rate constant: the decomposition fails, the matrix-exponential path integrates
    the gamma input numerically; a lag delays the input."""
    s = dataclasses.replace(one_compartment(), gamma=GammaInput(1, "NTR", "MTT"))
    p = {"CL": 5.0, "V": 50.0, "KA": 0.1, "NTR": 0.7, "MTT": 2.0, "S2": 50.0, "F1": 0.8, "ALAG1": 0.75}
    ind = individual([(0.0, 10.0), (12.0, 10.0)], [0.5, 1.0, 3.0, 12.5, 20.0])
    ref = reference(s, p, ind, lag=0.75)
    for method in ("closed", "ode"):
        sim = simulate(s, ind, p, method=method)
        assert sim.prediction[0][ind.evid == 0] == pytest.approx(ref, rel=1e-8, abs=1e-14)
    assert simulate(s, ind, p).method == "expm"


@pytest.mark.parametrize("tau", [24.0, 12.0])
def test_steady_state_is_the_limit_of_a_long_history(tau: float) -> None:
    obs = [0.0, 1.0, 3.0, 6.0, tau - 0.01]
    p = MARTIAL | {"V2": 100.0}  # 3,000 h of history reach the steady state to 1e-15
    n = int(3000 / tau)
    ss = individual([(0.0, 2.0)], obs, SS=[1.0] + [0.0] * len(obs), II=[tau] + [0.0] * len(obs))
    hist = individual([(tau * (k - n), 2.0) for k in range(n + 1)], obs)
    b = simulate(TWO, hist, p, method="closed").prediction[0][hist.evid == 0]
    for method in METHODS:
        a = simulate(TWO, ss, p, method=method).prediction[0][ss.evid == 0]
        assert a == pytest.approx(b, rel=1e-8 if method == "ode" else 1e-12), method


def test_a_whole_number_of_transit_compartments_is_the_erlang_chain() -> None:
    """n = 2: the gamma input (shape 3, rate 3/MTT) into the absorption compartment is the explicit chain of a
    dose compartment and 2 transit compartments, 3 transfers at ktr = 3/MTT, a different solution path."""
    ktr = 3 / 2.5
    s = dataclasses.replace(one_compartment(), gamma=GammaInput(1, "NTR", "MTT"))
    p = {"CL": 4.0, "V": 80.0, "KA": 1.3, "NTR": 2.0, "MTT": 2.5, "S2": 80.0, "F1": 1.0}
    ind = individual([(0.0, 5.0), (12.0, 5.0)], [1.0, 4.0, 12.0, 13.0, 30.0])
    got = simulate(s, ind, p).prediction[0][ind.evid == 0]
    # the explicit chain: DOSE -> T1 -> T2 -> DEPOT -> CENTRAL
    explicit = LinearStructure(("DOSE", "T1", "T2", "DEPOT", "CENTRAL"), 1, 5,
                               (Flow(1, 2, "KTR"), Flow(2, 3, "KTR"), Flow(3, 4, "KTR"), Flow(4, 5, "KA"),
                                Flow(5, None, "CL", "V")))
    ind5 = dataclasses.replace(ind, cmt=np.where(ind.evid == 1, 1, 5))
    want = simulate(explicit, ind5, {"KTR": ktr, "KA": 1.3, "CL": 4.0, "V": 80.0, "S5": 80.0},
                    method="expm").prediction[0][ind.evid == 0]
    assert got == pytest.approx(want, rel=1e-10)


def test_a_clearance_change_during_absorption_and_a_batch_with_different_lags() -> None:
    """A covariate change mid-input (CL per record) on the closed form equals the ODE path; members with different
    lags (the engine's per-member event order) equal their separate runs."""
    ind = individual([(0.0, 2.0), (24.0, 2.0)], [1.0, 2.0, 3.0, 6.0, 26.0, 30.0])
    cl = np.where(ind.time >= 2.0, 5.0, 3.27)  # a record's value applies to the interval ending at it
    p = dict(MARTIAL) | {"CL": cl[None, :]}
    closed = simulate(TWO, ind, p, method="closed").prediction
    ode = simulate(TWO, ind, p, method="ode").prediction
    assert closed == pytest.approx(ode, rel=1e-8)
    lags = np.array([[0.0], [0.4], [1.7]])
    batch = simulate(TWO, ind, dict(MARTIAL) | {"ALAG1": lags}).prediction
    for j, lag in enumerate(lags[:, 0]):
        one = simulate(TWO, ind, dict(MARTIAL) | {"ALAG1": float(lag)}).prediction[0]
        assert batch[j] == pytest.approx(one, rel=1e-12)


def test_records_the_transit_input_cannot_take_are_refused() -> None:
    ind = individual([(0.0, 2.0)], [4.0], RATE=[1.0, 0.0])
    with pytest.raises(DataError, match="zero-order input into a compartment whose doses enter") as e:
        simulate(TWO, ind, MARTIAL)
    assert e.value.column == "RATE"
    bad = individual([(0.0, 2.0)], [4.0])
    with pytest.raises(DataError, match="transit input parameter MTT must be finite and > 0, got -1"):
        simulate(TWO, bad, MARTIAL | {"MTT": -1.0})


def test_martial_model_once_daily_and_the_last_dose_approximation() -> None:
    """Once daily, what is left of a dose's input at the next dose (the part the paper's last-dose NONMEM code
    drops) is below 1e-6 of the dose; a typical patient's steady-state AUC is F x dose / CL (mass balance)."""
    m = resolve_model("martial2021_tac_envarsus_liver")
    a = 1.58 + 1
    assert gammaincc(a, a / 3.39 * 24) < 1e-6
    assert gammaincc(a, a / 3.39 * 12) > 1e-3  # twice daily it would not be negligible
    from cnidose.models.checks import steady_state_metric

    cavg, _ = steady_state_metric(m, {"WT": 70, "DBS": 0}, 2.0, 24.0, "cavg")
    assert cavg == pytest.approx(0.23 * 2.0 / (3.27 * 24) * 1000, rel=1e-9)
    trough, _ = steady_state_metric(m, {"WT": 70, "DBS": 0}, 2.0, 24.0, "trough")
    assert 2.0 < trough < 5.861  # below the average, above nothing: the once-daily profile


def test_a_map_fit_with_the_transit_input_finds_the_patient() -> None:
    """Envarsus once daily for two weeks, a trough and a 24-h profile simulated for a patient who clears 60 %
    faster than typical: the MAP fit (by superposition) moves ETA_CL
    towards the truth and predicts the levels better than the population."""
    from cnidose.estimation import fit_map

    m = resolve_model("martial2021_tac_envarsus_liver")
    doses = [24.0 * k for k in range(14)]
    obs = [24 * 7 - 0.1, 24 * 13 + 1, 24 * 13 + 2, 24 * 13 + 4, 24 * 13 + 8, 24 * 14 - 0.1]
    t = doses + obs
    cols = {"ID": np.ones(len(t)), "TIME": np.array(t), "AMT": np.array([2.0] * 14 + [0.0] * 6),
            "EVID": np.array([1.0] * 14 + [0.0] * 6), "MDV": np.array([1.0] * 14 + [0.0] * 6),
            "DV": np.zeros(len(t)), "WT": np.full(len(t), 80.0)}
    order = np.argsort(cols["TIME"], kind="stable")
    ind = split_individuals({k: v[order] for k, v in cols.items()})[0]
    truth = np.zeros(len(m.eta_names))
    truth[m.eta_names.index("ETA_CL")] = np.log(1.6)
    dv = m.simulate(ind, truth[None, :]).prediction[0]
    data = dataclasses.replace(ind, covariates=dict(ind.covariates) | {"DV": np.where(ind.evid == 0, dv, 0.0)})
    (fit,) = fit_map(m, [data])
    assert 0.2 < fit.eta[m.eta_names.index("ETA_CL")] <= np.log(1.6) + 0.1
    obs_mask = ind.evid == 0
    ipred = m.simulate(data, np.asarray(fit.eta)[None, :]).prediction[0][obs_mask]
    pred = m.simulate(data).prediction[0][obs_mask]
    assert np.abs(np.log(ipred / dv[obs_mask])).max() < 0.5 * np.abs(np.log(pred / dv[obs_mask])).max()


def _row(time: float, evid: float, amt: float, cmt: float, ss: float = 0.0, ii: float = 0.0, addl: float = 0.0
         ) -> dict[str, float]:
    return {"TIME": time, "EVID": evid, "AMT": amt, "CMT": cmt, "SS": ss, "II": ii, "ADDL": addl}


def _random_history(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Doses into the transit input (with ADDL, at steady state SS 1 or 2, some F-less zero doses), a bolus into
    the central compartment, an EVID 3 or 4 reset, observations also at dose times and during absorption."""
    rows: list[dict[str, float]] = []
    t = 0.0
    tau = float(rng.choice([8.0, 12.0, 24.0]))
    for k in range(int(rng.integers(2, 6))):
        ss = float(rng.choice([0, 0, 1, 2])) if k else float(rng.choice([0, 1]))
        addl = float(rng.integers(0, 4)) if rng.random() < 0.5 else 0.0
        evid = 4.0 if k and rng.random() < 0.15 else 1.0
        rows.append(_row(t, evid, float(rng.uniform(0.5, 5)), 1.0, ss, tau if (ss or addl) else 0.0, addl))
        if rng.random() < 0.3:
            rows.append(_row(t + float(rng.uniform(0, 3)), 1.0, 0.5, 2.0))
        for _ in range(int(rng.integers(1, 5))):
            rows.append(_row(t + float(rng.choice([0.0, rng.uniform(0, 2 * tau)])), 0.0, 0.0, 2.0))
        if rng.random() < 0.1:
            rows.append(_row(t + tau, 3.0, 0.0, 0.0))
        t += float(rng.uniform(0.5, 3)) * tau
    rows.sort(key=lambda r: r["TIME"])  # stable: a dose before an observation at its time, as listed
    cols = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return split_individuals({"ID": np.ones(len(rows)), **cols})[0]


@pytest.mark.parametrize("seed", range(12))
def test_superposition_equals_the_engine(seed: int) -> None:
    """The estimation's fast path (every dose-observation pair in one array expression, Kummer's function only
    for inputs still running) against the event engine, on random histories and four parameter sets at once:
    lags, F, n from 0 to 4, short and long mean transit times (inputs that outlast the interval at steady
    state)."""
    from cnidose.pk.superposition import compile_design, design_supports, predict_design

    rng = np.random.default_rng(seed)
    ind = _random_history(rng)
    assert design_supports(TWO, ind)
    B = 4
    p = {k: np.full(B, v) for k, v in MARTIAL.items()}
    p["NTR"] = np.array([0.0, 1.58, 4.0, rng.uniform(0, 3)])
    p["MTT"] = np.array([3.39, 0.5, 30.0, rng.uniform(1, 10)])
    p["ALAG1"] = np.array([0.0, 0.0, 1.25, rng.uniform(0, 2)])
    p["F1"] = np.array([0.23, 1.0, 0.5, rng.uniform(0.1, 1)])
    p["KA"] = np.array([2.97, 0.4, 1.1, rng.uniform(0.2, 4)])
    want = simulate(TWO, ind, {k: v[:, None] for k, v in p.items()}).prediction[:, ind.evid == 0]
    design = compile_design(TWO, [ind])
    got, bad = predict_design(design, TWO, {k: v[None, :] for k, v in p.items()})
    assert not bad.any()
    np.testing.assert_allclose(got.T, want, rtol=1e-10, atol=1e-14)


def test_superposition_refuses_what_the_engine_refuses() -> None:
    """A zero-order input into the transit compartment is left to the engine (which names the record); an
    impossible n or mean transit time gives NaN, the mark of a point the fit must not take."""
    from cnidose.pk.superposition import compile_design, design_supports, predict_design

    assert not design_supports(TWO, individual([(0.0, 2.0)], [4.0], RATE=[1.0, 0.0]))
    ind = individual([(0.0, 2.0)], [4.0, 8.0])
    p = {k: np.full((1, 3), v) for k, v in MARTIAL.items()}
    p["MTT"] = np.array([[3.39, -1.0, 3.39]])
    p["NTR"] = np.array([[1.58, 1.58, np.nan]])
    got, _ = predict_design(compile_design(TWO, [ind]), TWO, p)
    assert np.isfinite(got[:, 0]).all() and np.isnan(got[:, 1:]).all()
    # at steady state, a lag that is not finite makes the count of running inputs not a number: NaN, no exception
    ss = individual([(0.0, 2.0)], [4.0, 30.0], SS=[1.0, 0.0, 0.0], II=[24.0, 0.0, 0.0])
    p = {k: np.full((1, 3), v) for k, v in MARTIAL.items()}
    p["ALAG1"] = np.array([[0.5, np.nan, np.inf]])
    with np.errstate(invalid="ignore"):  # the impossible members' arithmetic (as inside a fit)
        got, _ = predict_design(compile_design(TWO, [ss]), TWO, p)
    assert np.isfinite(got[:, 0]).all() and np.isnan(got[:, 1:]).all()


def test_martial_fit_on_superposition_equals_the_engine_fit() -> None:
    """Envarsus once daily (Martial 2021), a trough every few days and a dose change: the fit by superposition
    (the default) and the fit through the event engine reach the same estimate and objective."""
    from cnidose.estimation import fit_map

    m = resolve_model("martial2021_tac_envarsus_liver")
    rows = []
    for day in range(14):
        rows.append((24.0 * day, 1.0, 4.0 if day < 7 else 5.0, np.nan))
        if day in (3, 6, 9, 13):
            rows.append((24.0 * day + 23.5, 0.0, 0.0, [6.1, 5.0, 8.2, 7.4][(3, 6, 9, 13).index(day)]))
    cols = {"ID": np.ones(len(rows)), "TIME": np.array([r[0] for r in rows]),
            "EVID": np.array([r[1] for r in rows]), "AMT": np.array([r[2] for r in rows]),
            "DV": np.array([r[3] for r in rows]), "MDV": np.array([r[1] for r in rows]),
            "WT": np.full(len(rows), 75.0), "DBS": np.zeros(len(rows)), "POD": 400.0 + np.array([r[0] for r in rows])
            / 24.0}
    ind = split_individuals(cols)[0]
    (fast,) = fit_map(m, [ind])
    (slow,) = fit_map(m, [ind], fast=False)
    assert fast.status == slow.status == "converged"
    assert fast.ofv == pytest.approx(slow.ofv, abs=1e-7)
    assert np.asarray(fast.eta) == pytest.approx(np.asarray(slow.eta), abs=1e-5)
    assert fast.ipred == pytest.approx(slow.ipred, rel=1e-8)


def test_the_engine_starts_each_step_where_the_last_one_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine reuses a dose's input so far at the end of one step as the start of the next (same rate
    constants): about half the evaluations of Kummer's function, and the same levels as evaluating both ends."""
    from cnidose.pk import solvers

    ind = individual([(24.0 * k, 2.0) for k in range(10)], [24.0 * k + 23.5 for k in range(10)] + [30.0, 31.0])
    p = {k: np.array([[v], [v * 1.1]]) for k, v in MARTIAL.items()}
    calls = [0]
    inner = solvers.gamma_so_far

    def counted(*args: object) -> np.ndarray:
        calls[0] += 1
        return inner(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(solvers, "gamma_so_far", counted)
    reused = simulate(TWO, ind, p, method="closed").prediction
    n_reused, calls[0] = calls[0], 0
    plain_input = solvers.EigenSolver.gamma_input

    def forgetful(self: solvers.EigenSolver, u0: np.ndarray, u1: np.ndarray, g: solvers.GammaDose) -> np.ndarray:
        g.last = None
        return plain_input(self, u0, u1, g)

    monkeypatch.setattr(solvers.EigenSolver, "gamma_input", forgetful)
    fresh = simulate(TWO, ind, p, method="closed").prediction
    np.testing.assert_allclose(reused, fresh, rtol=1e-13, atol=1e-300)
    assert n_reused < 0.65 * calls[0], (n_reused, calls[0])  # 58 against 96 when written
