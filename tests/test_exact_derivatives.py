"""Exact derivatives (issue 14): the expression language's symbolic derivatives, the compiled model kernel's
predictions and forward sensitivities (cnidose.models.kernel, cnidose.pk.tangent), and MAP estimation with them.

The kernel is checked against the event engine (its predictions, to rounding) and against Richardson-extrapolated
central differences of the engine (its derivatives, to ~1e-9 of the largest prediction) on random TDM-shaped
histories: bolus doses with ADDL and lags shorter and longer than the gaps, parameters, F and lags changing at
records (EVID 2 included), under both dose-value conventions, for a diagonalisable structure (eigen-coordinates)
and a chain of equal transit rates (matrix exponentials); and on the library's clinical models with their
time-varying covariates, occasion effects and observation transforms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cnidose.estimation import fit_map
from cnidose.estimation.cohort import build_groups
from cnidose.models import parse_model
from cnidose.models.expr import compile_expression, derivative
from cnidose.models.kernel import Stack, model_kernel
from cnidose.models.library import resolve_model
from cnidose.pk import LinearStructure, split_individuals
from tests.test_pk_differential import CASES, random_history

# -- the expression language -------------------------------------------------------------------------------------

EXPRESSIONS = [
    "A * B + 3 * A ** 2 - B / A",
    "exp(-A * B) * sqrt(A + 4) / log(B + 2)",
    "log10(A * A + 1) + abs(A - B) + min(A, B) * max(A, 2 * B)",
    "(A if B > 0.3 else B * B) * (A + 1) ** B",
    "A ** 0.75 * (B / 2) ** -1.5 + 2 ** A",
    "-(A - B) / (1 + exp(-(A + B)))",
    "(1 - 0.67 * A / (35 + A)) * (2.68 * exp(B) if A >= 1 and A < 2 else 1)",
]


@pytest.mark.parametrize("src", EXPRESSIONS)
def test_symbolic_derivatives_match_differences(src: str) -> None:
    e = compile_expression(src)
    rng = np.random.default_rng(3)
    A = rng.uniform(0.2, 3.0, 200)
    B = rng.uniform(0.2, 3.0, 200)
    for name in ("A", "B"):
        d = derivative(e, name)
        h = 1e-6
        up = {"A": A, "B": B}
        dn = {"A": A, "B": B}
        up[name] = up[name] + h
        dn[name] = dn[name] - h
        fd = (np.asarray(e(up)) - np.asarray(e(dn))) / (2 * h)
        got = np.broadcast_to(np.asarray(d({"A": A, "B": B}) if d is not None else 0.0, dtype=float), fd.shape)
        # away from the kinks of abs/min/max/if (differences straddling one are not derivatives)
        kink = (np.abs(A - B) < 1e-4) | (np.abs(A - 2 * B) < 1e-4) | (np.abs(B - 0.3) < 1e-4) | \
            (np.abs(A - 1) < 1e-4) | (np.abs(A - 2) < 1e-4)
        np.testing.assert_allclose(got[~kink], fd[~kink], rtol=1e-6, atol=1e-7, err_msg=f"d({src})/d{name}")


def test_derivative_is_none_where_the_name_does_not_move_the_value() -> None:
    assert derivative(compile_expression("A * 2"), "B") is None
    assert derivative(compile_expression("3 if A > 1 else 4"), "A") is None
    assert derivative(compile_expression("A * 2"), "A").source == "2"  # type: ignore[union-attr]


# -- the kernel on random histories --------------------------------------------------------------------------------

def _test_model(name: str, f_effect: bool = True, timing: bool = False, duration: bool = False) -> str:
    """A model file whose rate parameters, F and lags are data columns (the history's time-varying values) times
    a random effect (on F unless ``f_effect`` is False; on the lag and a modelled duration D with ``timing``; with
    ``duration``, a modelled duration D from its data column, without a random effect)."""
    structure, _, dose_cmts = CASES[name]
    assert isinstance(structure, LinearStructure)
    comps = structure.compartments
    unit = {"CL": "L/h", "Q": "L/h", "Q2": "L/h", "Q3": "L/h", "V": "L", "V1": "L", "V2": "L", "V3": "L",
            "KA": "1/h", "KTR": "1/h"}
    flows = []
    for f in structure.flows:
        parts = [f'from = "{comps[f.source - 1]}"', f'rate = "{f.rate}"']
        if f.target is not None:
            parts.insert(1, f'to = "{comps[f.target - 1]}"')
        if f.per is not None:
            parts.append(f'per = "{f.per}"')
        flows.append("{ " + ", ".join(parts) + " }")
    rate = list(structure.rate_parameters)
    effects = [f"ETA_{k}" for k in rate] + ([f"ETA_F{c}" for c in dose_cmts] if f_effect else [])
    effects += [f"ETA_{p}{c}" for c in dose_cmts for p in ("ALAG", "D")] if timing else []
    covs = [f'C_{k} = {{ unit = "{unit[k]}" }}' for k in rate]
    covs += [f'C_F{c} = {{ unit = "1" }}' for c in dose_cmts] + [f'C_ALAG{c} = {{ unit = "h" }}' for c in dose_cmts]
    pk = [f'{k} = {{ expr = "C_{k} * exp(ETA_{k})", unit = "{unit[k]}" }}' for k in rate]
    pk += [f'F{c} = {{ expr = "C_F{c}{f" * exp(ETA_F{c})" if f_effect else ""}", unit = "1" }}' for c in dose_cmts]
    if timing:
        covs += [f'C_D{c} = {{ unit = "h" }}' for c in dose_cmts]
        pk += [f'ALAG{c} = {{ expr = "C_ALAG{c} * exp(ETA_ALAG{c})", unit = "h" }}' for c in dose_cmts]
        pk += [f'D{c} = {{ expr = "C_D{c} * exp(ETA_D{c})", unit = "h" }}' for c in dose_cmts]
    else:
        pk += [f'ALAG{c} = {{ expr = "C_ALAG{c}", unit = "h" }}' for c in dose_cmts]
        if duration:
            covs += [f'C_D{c} = {{ unit = "h" }}' for c in dose_cmts]
            pk += [f'D{c} = {{ expr = "C_D{c}", unit = "h" }}' for c in dose_cmts]
    obs = comps[structure.default_obs - 1]
    volume = "V" if "V" in rate else "V1"
    return f"""
format = 1
id = "kernel-test-{name}"
version = "1"
title = "kernel test"
[units]
dose = "mg"
time = "h"
concentration = "mg/L"
[structure]
compartments = {list(comps)!r}
default_dose = "{comps[structure.default_dose - 1]}"
default_obs = "{obs}"
flows = [{", ".join(flows)}]
[parameters]
UNUSED = {{ value = 1.0, unit = "1" }}
[random_effects]
names = {effects!r}
variance = {[0.1] * len(effects)!r}
[covariates]
{chr(10).join(covs)}
[pk]
{chr(10).join(pk)}
[observations.CP]
compartment = "{obs}"
scale = "{volume}"
scale_unit = "L"
unit = "mg/L"
error = {{ model = "proportional", proportional = 0.1 }}
""".replace("'", '"')


def _engine_predictions(model, prep, etas: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([model.simulate(prep, e[None], method="expm").prediction[0] for e in etas])


def _richardson(predict: Callable[[np.ndarray], np.ndarray], theta: np.ndarray) -> np.ndarray:
    """Richardson-extrapolated central differences (steps 1e-3 and 5e-4, error O(h^4)) of ``predict`` (effects
    (G, d) -> predictions (O,)) by each effect: (O, d)."""
    def central(h: float) -> np.ndarray:
        cols = []
        for j in range(theta.shape[1]):
            step = np.zeros(theta.shape[1])
            step[j] = h
            cols.append((predict(theta + step) - predict(theta - step)) / (2 * h))
        return np.stack(cols, axis=1)

    return (4 * central(5e-4) - central(1e-3)) / 3


def _differences(model, prep, etas: np.ndarray, h: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Central differences of the engine's predictions (records, points, effects)."""
    cols = []
    for j in range(etas.shape[1]):
        step = np.zeros(etas.shape[1])
        step[j] = h
        cols.append((_engine_predictions(model, prep, etas + step) - _engine_predictions(model, prep, etas - step)).T
                    / (2 * h))
    return np.stack(cols, axis=-1)


def _with_inputs_and_resets(rng: np.random.Generator, cols: dict[str, list[float]]) -> dict[str, list[float]]:
    """A TDM history with some doses given as zero-order inputs at a given RATE (shorter and longer than the gaps),
    some as bolus regimens at steady state (SS 1 and 2, lags shorter and longer than II) and some records turned
    into EVID 3 (reset) or EVID 4 (reset and dose)."""
    out = {k: list(v) for k, v in cols.items()}
    for r in range(len(out["TIME"])):
        u = rng.random()
        if out["EVID"][r] == 1 and u < 0.35:
            out["RATE"][r] = out["AMT"][r] / float(rng.choice([0.5, 2.0, 6.0, 30.0]))
        elif out["EVID"][r] == 1 and u < 0.6:  # a bolus regimen at steady state (SS 1 resets, SS 2 adds)
            out["SS"][r] = float(rng.choice([1, 2]))
            out["II"][r] = float(rng.choice([6.0, 8.0, 12.0, 24.0]))
        elif out["EVID"][r] == 1 and u < 0.7 and r > 0:
            out["EVID"][r] = 4.0
        elif out["EVID"][r] == 2 and u < 0.2:
            out["EVID"][r] = 3.0
    return out


@pytest.mark.parametrize(("name", "seed", "inputs"), [(n, k, i) for n in ("1cmt-oral", "2cmt-iv", "transit3",
                                                                 "3cmt-oral") for k in range(5) for i in (False, True)])
def test_the_kernel_matches_the_engine_and_its_derivatives_are_exact(name: str, seed: int, inputs: bool) -> None:
    """Bolus doses (``inputs`` False: the eigen-coordinate path, or matrix exponentials for the transit chain and
    the three-compartment model, whose central and peripheral compartments make one block of three), and
    with zero-order inputs, steady states and resets (``inputs`` True: natural coordinates, the input in the
    exponential, the steady state's geometric series by a linear solve)."""
    rng = np.random.default_rng([seed, 23])
    cols, params = random_history(rng, name, tdm=True)
    if inputs:
        cols = _with_inputs_and_resets(rng, cols)
    natural = name == "3cmt-oral" or (inputs and bool(np.any(np.asarray(cols["RATE"]) > 0)
                                                     or np.any(np.asarray(cols["SS"]) > 0)))
    _check_against_the_engine(rng, name, seed, cols, params, _test_model(name, f_effect=not inputs),
                              lambda plan: plan.natural == natural)


def _with_steady_infusions(rng: np.random.Generator, cols: dict[str, list[float]]) -> dict[str, list[float]]:
    """A TDM history whose doses are infusion regimens at steady state (SS 1 and 2, durations shorter and longer
    than II, so that several of the implied inputs overlap, with the history's lags, some shorter and some longer
    than II), constant infusions at steady state (SS 1, AMT 0, II 0), plain infusions and bolus doses."""
    out = {k: list(v) for k, v in cols.items()}
    for r in range(len(out["TIME"])):
        if out["EVID"][r] != 1:
            continue
        u = rng.random()
        amt = out["AMT"][r]
        if u < 0.5:
            out["SS"][r] = float(rng.choice([1, 2]))
            out["II"][r] = float(rng.choice([6.0, 8.0, 12.0, 24.0]))
            out["RATE"][r] = amt / float(rng.choice([0.5, 2.0, 5.0, 7.5, 13.0, 30.0]))
            if rng.random() < 0.3:  # over the model's duration D instead (0.5-20 h, the record's)
                out["RATE"][r] = -2.0
        elif u < 0.65:
            out["SS"][r], out["AMT"][r], out["II"][r], out["ADDL"][r] = 1.0, 0.0, 0.0, 0.0
            out["RATE"][r] = float(rng.uniform(1, 50))
        elif u < 0.8:
            out["RATE"][r] = amt / float(rng.choice([1.0, 4.0, 20.0]))
    return out


@pytest.mark.parametrize(("name", "seed"), [(n, k) for n in ("1cmt-oral", "2cmt-iv", "transit3", "3cmt-oral")
                                            for k in range(4)])
def test_the_kernel_holds_infusion_regimens_at_steady_state(name: str, seed: int) -> None:
    """Infusion regimens and constant infusions at steady state in the kernel (natural coordinates: one interval of
    the periodic input replayed, its periodic state by a linear solve; a constant infusion's by -K^-1 RATE): the
    engine's predictions to rounding and exact derivatives, rate parameters changing at records."""
    rng = np.random.default_rng([seed, 41])
    cols, params = random_history(rng, name, tdm=True)
    cols = _with_steady_infusions(rng, cols)
    _check_against_the_engine(rng, name, seed, cols, params, _test_model(name, f_effect=False, duration=True),
                              lambda plan: plan.natural)


def test_steady_infusion_histories_reach_the_cases_they_are_for() -> None:
    """The random histories of the test above hold infusion regimens at steady state whose inputs overlap (duration
    longer than II), whose lag is longer than II, over a modelled duration, and constant infusions, on SS 1 and
    2."""
    seen = set()
    for name in ("1cmt-oral", "2cmt-iv", "transit3", "3cmt-oral"):
        for seed in range(4):
            rng = np.random.default_rng([seed, 41])
            cols, params = random_history(rng, name, tdm=True)
            cols = _with_steady_infusions(rng, cols)
            for r in range(len(cols["TIME"])):
                ss, rate, amt, ii = cols["SS"][r], cols["RATE"][r], cols["AMT"][r], cols["II"][r]
                if ss and rate == -2:
                    seen.add("modelled duration")
                if ss and rate > 0 and ii > 0:
                    seen.add(f"ss{int(ss)}")
                    c = int(cols["CMT"][r])
                    if amt / rate > ii:
                        seen.add("overlap")
                    if params[f"ALAG{c}"][r] > ii:
                        seen.add("lag > II")
                elif ss == 1 and amt == 0 and rate > 0:
                    seen.add("constant")
    assert seen == {"ss1", "ss2", "overlap", "lag > II", "constant", "modelled duration"}, seen


def _check_against_the_engine(rng: np.random.Generator, name: str, seed: int, cols: dict[str, list[float]],
                              params: dict[str, np.ndarray], model_text: str, plan_ok: Callable[[Any], bool],
                              lags: list[float] | None = None, atol: float = 1e-9) -> None:
    """The history's values as the test model's data columns; under both dose conventions the kernel's predictions
    (three random points) against the engine's and its derivatives against Richardson's differences."""
    structure, _, dose_cmts = CASES[name]
    for k in structure.rate_parameters:
        cols[f"C_{k}"] = list(params[k])
    for c in dose_cmts:
        cols[f"C_F{c}"] = list(params[f"F{c}"])
        cols[f"C_ALAG{c}"] = list(params[f"ALAG{c}"]) if lags is None else lags
        cols[f"C_D{c}"] = list(params[f"D{c}"])
    base = parse_model(model_text.encode())
    ind, = split_individuals(cols)
    n_eta = len(base.iiv)
    etas = rng.normal(0.0, 0.3, (3, n_eta))
    for dose_values in ("nonmem", "dose-record"):
        model = dataclasses.replace(base, dose_values=dose_values)
        kernel = model_kernel(model)
        assert kernel is not None
        prep = model.prepare(ind)
        plan = kernel.plan(model, prep, np.arange(len(ind)))
        assert plan is not None and plan_ok(plan)
        out, jac, held = kernel.run(model, Stack.of([plan]), np.zeros(1, np.int64), etas[None], np.arange(n_eta),
                                    n_eta)
        assert held.all()
        ref = _engine_predictions(model, prep, etas).T  # (R, B)
        top = np.max(np.abs(ref)) + 1e-300
        np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-11 * top, err_msg=f"{name} {seed} {dose_values}")
        richardson = (4 * _differences(model, prep, etas, 5e-4) - _differences(model, prep, etas, 1e-3)) / 3
        np.testing.assert_allclose(jac, richardson, rtol=1e-6, atol=atol * top, err_msg=f"{name} {seed} {dose_values}")


# -- the clinical models -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_id", ["storset2014_tac_adult_kidney", "andrews2019_tac_adult_kidney",
                                      "woillard2011_tac_prograf_advagraf"])
def test_library_models_exact_derivatives(model_id: str) -> None:
    """Time-varying covariates (Størset: post-operative day, prednisolone, haematocrit), occasion effects, the
    red-cell binding transform, a transit chain (Woillard): the kernel's predictions equal the engine's and its
    derivatives Richardson's differences of them."""
    from benchmarks.bench_forecast import storset_cohort

    model = resolve_model(model_id)
    ind = storset_cohort(resolve_model("storset2014_tac_adult_kidney"), 1, 5)[0]
    if model_id != "storset2014_tac_adult_kidney":  # the same records with the covariates these models read
        extra = {"AGE": 50.0, "HT": 175.0, "WT": 75.0, "SEX": 0.0, "PROGRAF": 1.0, "HCT": 0.35, "ALB": 40.0,
                 "SCR": 110.0}
        covs = dict(ind.covariates)
        for k, v in extra.items():
            covs.setdefault(k, np.full(len(ind), v))
        ind = dataclasses.replace(ind, covariates=covs)
    groups, members = build_groups(model, [ind])
    assert not members[0].error, members[0].error
    g = groups[0]
    assert g.exact, "the kernel holds this patient"
    rng = np.random.default_rng(1)
    theta = rng.normal(0.0, 0.25, (2, g.dim))
    which = np.zeros(2, np.int64)
    f, J, held = g.jacobian(theta, which)  # type: ignore[misc]
    assert held.all()
    plain, _ = build_groups(model, [ind], compiled=False)
    ref = plain[0].predict(theta[:, None, :], which)[:, 0]
    np.testing.assert_allclose(f, ref, rtol=1e-10)

    richardson = _richardson(lambda t: plain[0].predict(t[:, None, :], which)[:, 0], theta)
    np.testing.assert_allclose(J, richardson, rtol=1e-6, atol=1e-9 * np.max(np.abs(f)))


def _assert_same_optima(model, inds, covariance: Callable[[int, Any], bool] = lambda k, fit: True) -> list:  # type: ignore[no-untyped-def, type-arg]
    """Fit ``inds`` with exact derivatives and with central differences: the same statuses and optima (to the
    optimiser's tolerance), and the same covariance where ``covariance(k, exact fit k)``; returns the exact fits."""
    exact = fit_map(model, inds)
    plain = fit_map(model, inds, derivatives="differences")
    for k, (a, b) in enumerate(zip(exact, plain, strict=True)):
        assert a.derivatives == "exact" and b.derivatives == "differences"
        assert a.status == b.status
        assert abs(a.ofv - b.ofv) < 1e-6
        np.testing.assert_allclose(a.eta, b.eta, atol=1e-4)
        if covariance(k, a) and (a.covariance is not None or b.covariance is not None):
            assert a.covariance is not None and b.covariance is not None
            np.testing.assert_allclose(a.covariance, b.covariance, rtol=1e-4, atol=1e-8)
    return exact


def test_map_with_exact_derivatives_equals_map_with_differences() -> None:
    """The same optima (to the optimiser's tolerance) and covariance, whichever derivatives the fit takes."""
    from benchmarks.bench_forecast import storset_cohort

    model = resolve_model("storset2014_tac_adult_kidney")
    exact = _assert_same_optima(model, storset_cohort(model, 3, 2))
    assert all(a.status == "converged" and a.covariance is not None for a in exact)


def test_map_of_intravenous_steady_states_takes_exact_derivatives() -> None:
    """Antignac 2007 (tacrolimus, intravenous then oral): a continuous infusion at steady state (SS 1, AMT 0, RATE,
    II 0), then a 4-hour infusion every 12 h at steady state (SS 1 and 2), then oral doses; troughs on each. The fit
    takes the kernel's exact derivatives and reaches the optimum the central differences reach."""
    model = resolve_model("antignac2007_tac_kidney_iv_oral")
    rows = [(0.0, 1, 0.0, 0.08, 0.0, 1, 2), (20.0, 0, 0, 0, 0, 0, 2),  # continuous 0.08 mg/h: 1.9 mg a day
            (24.0, 1, 1.0, 0.25, 12.0, 1, 2), (35.5, 0, 0, 0, 0, 0, 2), (36.0, 1, 1.0, 0.25, 12.0, 2, 2),
            (47.5, 0, 0, 0, 0, 0, 2), (48.0, 1, 4.0, 0.0, 12.0, 0, 1), (59.5, 0, 0, 0, 0, 0, 2),
            (60.0, 1, 4.0, 0.0, 12.0, 0, 1), (71.5, 0, 0, 0, 0, 0, 2)]
    cols = {"ID": [1.0] * len(rows), "TIME": [r[0] for r in rows], "EVID": [float(r[1]) for r in rows],
            "AMT": [r[2] for r in rows], "RATE": [r[3] for r in rows], "II": [r[4] for r in rows],
            "SS": [float(r[5]) for r in rows], "CMT": [float(r[6]) for r in rows], "ADDL": [0.0] * len(rows),
            "MDV": [1.0 - float(r[1] == 0) for r in rows], "POD": [1.0 + r[0] // 24 for r in rows],
            "PRED": [20.0] * len(rows)}
    cols["DV"] = [float("nan") if r[1] else v for r, v in zip(rows, [0, 9.1, 0, 7.2, 0, 8.4, 0, 6.3, 0, 7.7],
                                                               strict=True)]
    ind, = split_individuals(cols)
    kernel = model_kernel(model)
    assert kernel is not None
    assert kernel.plan(model, model.prepare(ind), np.flatnonzero(ind.evid == 0)) is not None
    exact, = fit_map(model, [ind])
    plain, = fit_map(model, [ind], derivatives="differences")
    assert exact.derivatives == "exact" and plain.derivatives == "differences"
    assert exact.status == plain.status == "converged"
    assert abs(exact.ofv - plain.ofv) < 1e-6
    np.testing.assert_allclose(exact.eta, plain.eta, atol=1e-4)
    np.testing.assert_allclose(exact.ipred, plain.ipred, rtol=1e-6)


def _suite_model(run: str):  # type: ignore[no-untyped-def]
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "validation" / "map-nonmem"))
    import mapsuite

    return mapsuite, mapsuite.load(run)


def test_ode_kernel_sensitivities(shared: object) -> None:
    """Michaelis-Menten elimination (shared model 201): the ODE kernel's predictions are the engine's compiled
    integration's (same DOP853 steps), and its sensitivities (variational equations) Richardson's differences."""
    mapsuite, model = _suite_model("201")
    inds = mapsuite.individuals("201", 2)
    groups, members = build_groups(model, inds)
    assert all(not m.error for m in members)
    plain, _ = build_groups(model, inds, compiled=False)
    g = groups[0]
    assert g.exact and g.size == len(inds)  # every individual in one group, predicted in one call
    rng = np.random.default_rng(4)
    theta = rng.normal(0.0, 0.3, (g.size, g.dim))
    which = np.arange(g.size)
    f, J, held = g.jacobian(theta, which)  # type: ignore[misc]
    assert held.all()
    ref = np.concatenate([p.predict(theta[k][None, None, :], np.zeros(1, np.int64))[:, 0]
                          for k, p in enumerate(plain)])
    np.testing.assert_allclose(f, ref, rtol=1e-12)

    def each(t: np.ndarray) -> np.ndarray:  # the plain groups hold one individual each
        return np.concatenate([p.predict(t[k][None, None, :], np.zeros(1, np.int64))[:, 0]
                               for k, p in enumerate(plain)])

    np.testing.assert_allclose(J, _richardson(each, theta), rtol=1e-5, atol=1e-8 * np.max(np.abs(f)))


def test_a_stiff_trial_point_is_refused_at_once(shared: object) -> None:
    """An optimiser's trial step can reach a corner where the explicit integrator is limited to tiny steps
    (VMAX 1e7, VC 0.03 L): the kernel gives that point up (NaN) once it cannot finish within its step budget,
    in milliseconds, instead of integrating 100,000 steps."""
    import time

    mapsuite, model = _suite_model("201")
    groups, _ = build_groups(model, mapsuite.individuals("201", 1)[:1])
    g = groups[0]
    g.jacobian(np.zeros((1, g.dim)), np.zeros(1, np.int64))  # compiled before the clock starts
    t0 = time.perf_counter()
    f, _, _ = g.jacobian(np.array([[7.0, -7.6, -3.0, -7.5]]), np.zeros(1, np.int64))  # type: ignore[misc]
    assert time.perf_counter() - t0 < 0.05
    assert np.isnan(f).all()


def test_one_group_for_many_individuals_equals_one_at_a_time(shared: object) -> None:
    mapsuite, model = _suite_model("301")  # time-varying covariates: the engine path, now the kernel's
    inds = mapsuite.individuals("301", 3)
    together = fit_map(model, inds)
    for ind, r in zip(inds, together, strict=True):
        alone = fit_map(model, [ind])[0]
        assert r.derivatives == "exact"
        np.testing.assert_allclose(r.eta, alone.eta, atol=1e-7)
        assert abs(r.ofv - alone.ofv) < 1e-7


def test_a_warm_up_in_progress_never_makes_a_fit_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cnidose serve`` compiles the library's kernels in the background: a fit that comes meanwhile does not
    wait for the compiler (differences through the engine), and gets the kernel once it is ready."""
    import threading

    from benchmarks.bench_forecast import storset_cohort

    from cnidose.models import kernel as K

    model = resolve_model("storset2014_tac_adult_kidney")
    patient = storset_cohort(model, 1, 3)[0]
    monkeypatch.setattr(K, "_READY", set())
    monkeypatch.setattr(K, "_CACHE", {})
    gate = threading.Event()
    real = K._build

    def slow(key, m):  # type: ignore[no-untyped-def]
        gate.wait(30)
        return real(key, m)

    monkeypatch.setattr(K, "_build", slow)
    thread = K.warm([model])
    try:
        assert K.model_kernel(model) is None
        assert fit_map(model, [patient])[0].derivatives == "differences"
    finally:
        gate.set()
        thread.join(60)
    assert K.model_kernel(model) is not None
    assert fit_map(model, [patient])[0].derivatives == "exact"


def test_the_kernel_reads_the_exposure_multiplier_and_intravenous_doses() -> None:
    """The reserved columns the engine's models read: EXPOSURE (an interaction's multiplier, dividing CL over the
    interval each record covers) and IV (an intravenous dose routed to the model's IV compartment, here infused
    over 4 h): the kernel's predictions equal the engine's and its derivatives Richardson's differences."""
    from cnidose.models.exposure import with_exposure

    andrews = resolve_model("andrews2019_tac_adult_kidney")
    cols: dict[str, list[float]] = {"ID": [1] * 8, "TIME": [0, 12, 24, 36, 47.5, 60, 71.5, 84],
                                    "EVID": [1, 1, 1, 1, 0, 1, 0, 1], "AMT": [5, 5, 5, 5, 0, 5, 0, 5],
                                    "DV": [0, 0, 0, 0, 9.0, 0, 14.0, 0], "MDV": [1, 1, 1, 1, 0, 1, 0, 1]}
    for k, v in {"CYP3A5": 0, "AGE": 50, "ALB": 40, "BSA": 1.9, "SCR": 150, "HCT": 0.32, "LBW": 60, "POD": 5}.items():
        cols[k] = [v] * 8
    ind = with_exposure(split_individuals(cols)[0], [(30.0, None, 2.5)])
    antignac = resolve_model("antignac2007_tac_kidney_iv_oral")
    iv = dict(cols, IV=[1, 1, 0, 0, 0, 0, 0, 0], RATE=[1.25, 1.25, 0, 0, 0, 0, 0, 0], PRED=[30] * 8)
    for model, patient in ((andrews, ind), (antignac, split_individuals(iv)[0])):
        groups, members = build_groups(model, [patient])
        assert not members[0].error, members[0].error
        g = groups[0]
        assert g.exact
        theta = np.random.default_rng(2).normal(0.0, 0.2, (1, g.dim))
        which = np.zeros(1, np.int64)
        f, J, held = g.jacobian(theta, which)  # type: ignore[misc]
        assert held.all()
        plain, _ = build_groups(model, [patient], compiled=False)
        np.testing.assert_allclose(f, plain[0].predict(theta[:, None, :], which)[:, 0], rtol=1e-10)
        richardson = _richardson(lambda t: plain[0].predict(t[:, None, :], which)[:, 0], theta)  # noqa: B023
        np.testing.assert_allclose(J, richardson, rtol=1e-6, atol=1e-9 * np.max(np.abs(f)))


@pytest.mark.parametrize(("name", "seed"), [(n, k) for n in ("1cmt-oral", "2cmt-iv", "transit3") for k in range(6)])
def test_derivatives_of_event_times_that_move_with_the_effects(name: str, seed: int) -> None:
    """Lags and modelled durations with a random effect (and F on inputs at a given RATE, whose duration it sets):
    each point's events in their own order, and the derivatives of the entry times -- a bolus entering dL later
    shifts the state by -dL K (amount e_c), an input's start and end by -dL rho e_c and (dL + dD) rho e_c, and its
    rate rho = F AMT / D moves with F and D -- against the engine and Richardson's differences."""
    rng = np.random.default_rng([seed, 29])
    cols, params = random_history(rng, name, tdm=True)
    for r in range(len(cols["TIME"])):
        u = rng.random()
        if cols["EVID"][r] == 1 and u < 0.3:
            cols["RATE"][r] = -2.0
        elif cols["EVID"][r] == 1 and u < 0.5:
            cols["RATE"][r] = cols["AMT"][r] / float(rng.uniform(0.5, 10.0))
    lags = list(rng.uniform(0.0, 15.0) * np.ones(len(cols["TIME"])))  # continuous: no entry on a record's time
    _check_against_the_engine(rng, name, seed, cols, params, _test_model(name, timing=True),
                              lambda plan: plan.timed, lags, atol=1e-8)


_ODE_TIMED = """
format = 1
id = "kernel-test-ode-timed"
version = "1"
title = "ODE kernel with lags and inputs that move with the effects"
[units]
dose = "mg"
time = "h"
concentration = "mg/L"
[structure]
kind = "ode"
compartments = ["DEPOT", "CENTRAL"]
default_dose = "DEPOT"
default_obs = "CENTRAL"
[structure.ode]
dDEPOT = "-KA * DEPOT"
dCENTRAL = "KA * DEPOT - VM * CENTRAL / (KM * V + CENTRAL)"
[parameters]
TVKA = { value = 1.2, unit = "1/h" }
TVV = { value = 30.0, unit = "L" }
TVVM = { value = 40.0, unit = "mg/h" }
TVKM = { value = 2.0, unit = "mg/L" }
TLAG = { value = 0.8, unit = "h" }
TF = { value = 0.7, unit = "1" }
TD = { value = 3.0, unit = "h" }
[random_effects]
names = ["ETA_KA", "ETA_V", "ETA_VM", "ETA_LAG", "ETA_F", "ETA_D"]
variance = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
[pk]
KA = { expr = "TVKA * exp(ETA_KA)", unit = "1/h" }
V = { expr = "TVV * exp(ETA_V)", unit = "L" }
VM = { expr = "TVVM * exp(ETA_VM)", unit = "mg/h" }
KM = { expr = "TVKM", unit = "mg/L" }
ALAG1 = { expr = "TLAG * exp(ETA_LAG)", unit = "h" }
F1 = { expr = "TF * exp(ETA_F)", unit = "1" }
D2 = { expr = "TD * exp(ETA_D)", unit = "h" }
[observations.CP]
compartment = "CENTRAL"
scale = "V"
scale_unit = "L"
unit = "mg/L"
error = { model = "proportional", proportional = 0.1 }
"""


def test_ode_kernel_derivatives_of_event_times() -> None:
    """The ODE loop's timed events: a lagged bolus (its entry's derivative -dL (f(x+) - f(x-))), a modelled
    duration into the central compartment and an input at a given RATE into the depot whose duration F sets:
    predictions equal the engine's compiled integration and the derivatives Richardson's differences."""
    model = parse_model(_ODE_TIMED.encode())
    ind, = split_individuals({"ID": [1] * 9, "TIME": [0, 2, 6, 12, 13, 18, 24, 30, 40],
                              "EVID": [1, 0, 0, 1, 0, 0, 1, 0, 0], "AMT": [100, 0, 0, 80, 0, 0, 60, 0, 0],
                              "CMT": [1, 2, 2, 2, 2, 2, 1, 2, 2], "RATE": [0, 0, 0, -2, 0, 0, 20, 0, 0]})
    kernel = model_kernel(model)
    assert kernel is not None
    prep = model.prepare(ind)
    plan = kernel.plan(model, prep, np.arange(len(ind)))
    assert plan is not None and plan.timed
    n_eta = len(model.iiv)
    etas = np.random.default_rng(6).normal(0.0, 0.25, (3, n_eta))
    out, jac, held = kernel.run(model, Stack.of([plan]), np.zeros(1, np.int64), etas[None], np.arange(n_eta), n_eta)
    assert held.all()
    ref = np.stack([model.simulate(prep, e[None]).prediction[0] for e in etas]).T
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)

    def predict(t: np.ndarray) -> np.ndarray:
        return np.stack([model.simulate(prep, e[None]).prediction[0] for e in t]).T.ravel()

    richardson = _richardson(predict, etas).reshape(len(ind), 3, n_eta)
    assert np.abs(jac[..., 3]).max() > 1e-3 and np.abs(jac[..., 5]).max() > 1e-3  # the lag and D move the levels
    np.testing.assert_allclose(jac, richardson, rtol=1e-5, atol=1e-7 * np.max(np.abs(out)))


def test_superposition_leaves_an_equal_rate_chain_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Monchaud 2012 (lung): a dose compartment and four transit compartments at one rate, so superposition's
    eigen-decomposition fails at every point. Those points are predicted by the compiled kernel (matrix
    exponentials), not the engine (a SciPy matrix exponential per step, ~100x slower), and equal the engine's."""
    from cnidose.estimation.cohort import Group

    model = resolve_model("monchaud2012_tac_lung")
    rows = [(24.0 * d + h, 1.0, 3.0, np.nan) for d in range(10) for h in (0.0, 12.0)]
    rows += [(24.0 * d + 23.5, 0.0, 0.0, 8.0) for d in (3, 6, 9)]
    rows.sort(key=lambda r: (r[0], -r[1]))
    cols = {"ID": np.ones(len(rows)), "TIME": np.array([r[0] for r in rows]), "EVID": np.array([r[1] for r in rows]),
            "AMT": np.array([r[2] for r in rows]), "DV": np.array([r[3] for r in rows]),
            "MDV": np.array([r[1] for r in rows])}
    covs = {name: np.full(len(rows), float(c.domain[0] + c.domain[1]) / 2 if c.domain else 0.0)
            for name, c in model.covariates.items()}
    if "HCT" in covs:
        covs["HCT"] = np.full(len(rows), 0.33)
    ind = split_individuals(cols | covs)[0]
    groups, members = build_groups(model, [ind])
    assert not members[0].error, members[0].error
    g = groups[0]
    assert g.fast and g.kernel is not None, "superposition with the kernel for its derivatives"
    theta = np.random.default_rng(3).normal(0.0, 0.3, (1, 5, g.dim))
    which = np.zeros(1, np.int64)
    plain, _ = build_groups(model, [ind], compiled=False)
    ref = plain[0].predict(theta, which)  # superposition, the failing points by the engine

    def no_engine(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the engine was used")

    monkeypatch.setattr(Group, "_run_engine", no_engine)
    monkeypatch.setattr(type(model), "simulate", no_engine)
    got = g.predict(theta, which)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


# -- exact derivatives through the closed form (superposition, no compiled code) -----------------------------------

@pytest.mark.parametrize(("n_cmt", "seed", "inputs"), [(1, 1, "bolus"), (2, 2, "bolus"), (3, 3, "bolus"),
                                                       (2, 4, "bolus"), (2, 5, "gamma"), (2, 6, "gamma"),
                                                       (1, 7, "zero-order"), (2, 8, "zero-order"),
                                                       (3, 9, "zero-order"), (1, 10, "steady"), (2, 11, "steady"),
                                                       (3, 12, "steady")])
def test_closed_form_derivatives_of_bolus_designs_are_exact(n_cmt: int, seed: int, inputs: str) -> None:
    """:func:`predict_design_jacobian` on random histories (single doses and ADDL series, lags shorter and longer than
    the gaps, observations at dose times) of bolus doses absorbed first-order, or through a gamma-density (transit)
    input with fixed n and mtt (Martial 2021's), or mixed with zero-order inputs (a given RATE, a modelled rate R or
    duration D, observed while they run and after), or with steady states (SS 1 and 2 of boluses and of inputs at a
    given RATE or of a modelled duration, some longer than the interval, and constant infusions): its predictions are
    :func:`predict_design`'s, and its derivatives along random directions of every parameter (rate constants,
    volumes, F, lag, R, D, observation scale) are Richardson's differences of :func:`predict_design`."""
    gamma, steady = inputs == "gamma", inputs == "steady"
    zero_order = inputs == "zero-order" or steady
    import dataclasses as dc

    from cnidose.pk.structure import GammaInput, one_compartment, three_compartment, two_compartment
    from cnidose.pk.superposition import (
        compile_design,
        design_differentiable,
        predict_design,
        predict_design_jacobian,
    )

    structure = {1: one_compartment, 2: two_compartment, 3: three_compartment}[n_cmt](oral=True)
    if gamma:
        structure = dc.replace(structure, gamma=GammaInput(cmt=1, n="NTR", mtt="MTT"))
    rng = np.random.default_rng(seed)
    inds = []
    for i in range(40):
        rows: list[tuple[float, int, float, float, int, float, int]] = []  # time, evid, amt, ii, addl, rate, ss
        t = 0.0
        for _ in range(int(rng.integers(1, 4))):
            t += float(rng.choice([0.0, 2.0, 12.0, 24.0]))
            addl = int(rng.choice([0, 0, 2, 5]))
            rate = float(rng.choice([0.0, 4.0, -1.0, -2.0])) if zero_order else 0.0
            ss = int(rng.choice([0, 1, 2])) if steady else 0
            amt = float(rng.uniform(1, 10))
            if steady and rng.random() < 0.15:  # a constant infusion at steady state
                rate, ss, amt, addl = float(rng.uniform(0.2, 2.0)), 1, 0.0, 0
            rows.append((t, 1, amt, 12.0 if (addl or ss) and amt > 0 else 0.0, addl, rate, ss))
            for dt in rng.choice([0.0, 0.5, 1.7, 6.0, 11.9, 30.0], size=int(rng.integers(1, 4))):
                rows.append((t + float(dt), 0, 0.0, 0.0, 0, 0.0, 0))
        rows.sort(key=lambda r: (r[0], -r[1]))
        cols = {"ID": [float(i)] * len(rows), "TIME": [r[0] for r in rows], "EVID": [float(r[1]) for r in rows],
                "AMT": [r[2] for r in rows], "II": [r[3] for r in rows], "ADDL": [float(r[4]) for r in rows],
                "RATE": [r[5] for r in rows], "SS": [float(r[6]) for r in rows],
                # with a gamma input some levels are of its compartment, where the input itself arrives (the
                # density's own term in the derivative by the lag cancels in every other compartment)
                "CMT": [1.0 if r[1] or (gamma and k % 3 == 0) else 2.0 for k, r in enumerate(rows)]}
        inds.append(split_individuals(cols)[0])
    design = compile_design(structure, inds)
    assert design_differentiable(design) and (gamma or np.any(design.pair_addl > 0))
    if zero_order:
        assert {0, 1, 2, 3} <= set(np.unique(design.pair_kind).tolist())  # bolus, RATE, R, D
    if steady:
        assert np.any(design.pair_ss == 1) and np.any(design.pair_kind == 4)  # and constant infusions
    N, d = len(inds), 3
    names = [*structure.rate_parameters, "F1", "ALAG1", "S2", *(("R1", "D1") if zero_order else ())]
    base = {p: rng.uniform(0.3, 3.0, size=(N, 1)) for p in structure.rate_parameters}
    base |= {"F1": rng.uniform(0.3, 1.0, (N, 1)), "ALAG1": rng.choice([0.0, 0.4, 13.0], size=(N, 1)),
             "S2": rng.uniform(5.0, 20.0, (N, 1))}
    if zero_order:  # inputs shorter and longer than the sampling gaps
        base |= {"R1": rng.uniform(0.5, 5.0, (N, 1)), "D1": rng.uniform(0.5, 8.0, (N, 1))}
    if gamma:  # n from 0 to 4 (a real number), inputs shorter and longer than the sampling gaps
        base |= {"NTR": rng.choice([0.0, 1.58, 4.0], size=(N, 1)), "MTT": rng.choice([0.5, 3.39, 20.0], size=(N, 1))}
    tangents = {p: rng.normal(size=(N, 1, d)) * base[p][..., None] * 0.3 for p in names}
    f, J, bad = predict_design_jacobian(design, structure, base, tangents)
    assert not bad.any()
    ref, _ = predict_design(design, structure, base)
    np.testing.assert_allclose(f, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())

    def moved(theta: np.ndarray) -> np.ndarray:  # (N, d) -> (O,): the parameters moved along the tangents
        params = base | {p: base[p] + np.einsum("nbj,nj->nb", tangents[p], theta) for p in names}
        return predict_design(design, structure, params)[0][:, 0]

    obs_of = design.obs_ind
    for j in range(d):
        e = np.zeros((N, d))
        e[:, j] = 1.0
        h = 1e-4
        d1 = (moved(h * e) - moved(-h * e)) / (2 * h)
        d2 = (moved(2 * h * e) - moved(-2 * h * e)) / (4 * h)
        rich = (4 * d1 - d2) / 3
        # away from the kinks where a lagged dose enters at an observation time (differences straddle them)
        lag = base["ALAG1"][:, 0][obs_of]
        clean = np.ones(obs_of.size, bool)
        for q in range(design.pair_obs.size):
            x = design.pair_tobs[q] - design.pair_tdose[q] - lag[design.pair_obs[q]]
            if abs(x) < 1e-2 or (design.pair_addl[q] and abs((x + 1e-12) % 12.0) < 1e-2):
                clean[design.pair_obs[q]] = False
        if gamma:  # nor at an input's end (the support, where the tail is cut)
            from cnidose.pk.solvers import gamma_support

            a = base["NTR"][:, 0] + 1
            end = gamma_support(a, a / base["MTT"][:, 0])[obs_of]
            for q in range(design.pair_obs.size):
                o = design.pair_obs[q]
                x = design.pair_tobs[q] - design.pair_tdose[q] - lag[o]
                if abs(x - end[o]) < 1e-2:
                    clean[o] = False
        if zero_order:  # nor at a zero-order input's end
            for q in range(design.pair_obs.size):
                o = design.pair_obs[q]
                i = design.pair_ind[q]
                amount = base["F1"][i, 0] * design.pair_amt[q]
                rate = design.pair_rate[q]
                dur = amount / rate if rate > 0 else amount / base["R1"][i, 0] if rate == -1 else base["D1"][i, 0]
                x = design.pair_tobs[q] - design.pair_tdose[q] - lag[o]
                if rate != 0 and abs(x - dur) < 1e-2:
                    clean[o] = False
        np.testing.assert_allclose(J[clean, 0, j], rich[clean], rtol=1e-7, atol=1e-9 * np.abs(ref).max())


def test_map_by_superposition_takes_exact_derivatives_and_reaches_the_same_optima(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without compiled code (as the command line runs a cohort of constant-parameter individuals), a group predicted
    by superposition takes the closed form's exact derivatives; its optima and covariances are those of central
    differences: shared models 001 and 008 (lag and bioavailability), 002 and 004 (infusions at a given rate, of a
    modelled duration), and Martial 2021 (a gamma-density input whose n and mtt have no random effect)."""
    import sys

    from tests.conftest import REPO

    monkeypatch.setenv("CNIDOSE_COMPILED", "0")
    sys.path.insert(0, str(REPO / "validation" / "map-nonmem"))
    import mapsuite

    shared = REPO.parent / "shared" / "validation" / "map-nonmem" / "data"
    from cnidose.records.nonmem import read_nonmem_csv

    # 008: lag and bioavailability on the depot; 002: infusions at a given rate; 004: of a modelled duration
    for run in ("001", "008", "002", "004"):
        model = mapsuite.load(run)
        inds = read_nonmem_csv(shared / f"data_to_fit{run}.csv").individuals()[:40]
        groups, _ = build_groups(model, inds)
        assert groups[0].fast and groups[0].exact
        def smooth(k: int, fit: Any, run: str = run, inds: list = inds) -> bool:  # type: ignore[type-arg]
            # an optimum may sit where the infusion ends at a sampling time (004, individual 1: D2 = 4 e^0.0953 =
            # 4.4 h, a level at 4.4 h): there the one-sided derivative and the differences' average of both sides
            # give different information matrices, and neither is the other's error
            if run != "004":
                return True
            ends = inds[k].time[inds[k].evid == 1][:, None] + 4.0 * np.exp(fit.eta[2])
            return not np.any(np.abs(inds[k].time[inds[k].evid == 0][None, :] - ends) < 1e-3)

        _assert_same_optima(model, inds, smooth)
    martial = resolve_model("martial2021_tac_envarsus_liver")
    inds = []
    for i, (dose, levels) in enumerate([(5.0, (6.0, 7.5, 8.1)), (3.0, (4.2, 3.9, 5.0)), (8.0, (14.0, 9.5, 11.0))]):
        times = [0.0, 2.0, 23.5, 24.0, 27.0, 47.5]
        evid = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        dv = [float("nan"), levels[0], levels[1], float("nan"), levels[2], 7.0]
        inds.append(split_individuals({
            "ID": [float(i)] * 6, "TIME": times, "EVID": evid, "AMT": [dose if e else 0.0 for e in evid],
            "CMT": [1.0 if e else 2.0 for e in evid], "DV": dv, "WT": [70.0] * 6, "POD": [400.0] * 6})[0])
    groups, members = build_groups(martial, inds)
    assert not any(m.error for m in members), [m.error for m in members]
    assert groups[0].fast and groups[0].exact
    assert all(a.status == "converged" for a in _assert_same_optima(martial, inds))


def test_closed_form_derivatives_carry_an_observation_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    """A level transformed from the model's concentration (Størset 2014's whole blood from plasma, C (1 + BMAX HCT /
    (C + KD))) is differentiated through the transform: by C, and by the parameters it reads that move with the
    effects (here a transform that reads CL, which Størset's does not). Exact against Richardson differences; a
    Størset patient with constant covariates fits by superposition with exact derivatives to the optimum the
    differences reach."""
    from tests.conftest import REPO

    monkeypatch.setenv("CNIDOSE_COMPILED", "0")
    text = (REPO / "validation" / "map-nonmem" / "model001.toml").read_text()
    text = text.replace('[observations.CP]\n', '[observations.CP]\ntransform = "C * (1 + 0.2 * CL / (C + 0.05))"\n')
    model = parse_model(text.encode())
    rng = np.random.default_rng(4)
    inds = [split_individuals({"ID": [float(i)] * 4, "TIME": [0.0, 1.0, 6.0, 24.0], "EVID": [1.0, 0.0, 0.0, 0.0],
                               "AMT": [float(rng.uniform(5, 50)), 0, 0, 0], "CMT": [1.0, 2.0, 2.0, 2.0],
                               "DV": [float("nan"), 0.3, 0.5, 0.2]})[0] for i in range(10)]
    g = build_groups(model, inds)[0][0]
    assert g.fast and g.exact
    theta = rng.normal(0, 0.4, (g.size, g.dim))
    f, J, held = g.jacobian(theta)
    assert held.all()
    np.testing.assert_allclose(f, g.predict(theta[:, None, :])[:, 0], rtol=1e-13)
    richardson = _richardson(lambda t: g.predict(t[:, None, :])[:, 0], theta)
    np.testing.assert_allclose(J, richardson, rtol=1e-7, atol=1e-10 * np.abs(f).max())

    storset = resolve_model("storset2014_tac_adult_kidney")
    inds = []
    for i, (dose, lv) in enumerate([(5.0, (12.0, 10.5, 11.0)), (3.0, (6.0, 7.1, 6.4)), (8.0, (20.0, 17.0, 15.0))]):
        t, ev = [0.0, 11.5, 12.0, 23.5, 24.0, 35.5], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
        inds.append(split_individuals({
            "ID": [float(i)] * 6, "TIME": t, "EVID": ev, "AMT": [dose if e else 0.0 for e in ev],
            "CMT": [1.0 if e else 2.0 for e in ev], "DV": [float("nan"), lv[0], float("nan"), lv[1], float("nan"),
                                                            lv[2]],
            "FFM": [60.0] * 6, "CYP3A5": [0.0] * 6, "PRED": [10.0] * 6, "POD": [30.0] * 6, "HCT": [0.33] * 6})[0])
    g = build_groups(storset, inds)[0][0]
    assert g.fast and g.exact
    assert all(a.status == "converged" for a in _assert_same_optima(storset, inds))
