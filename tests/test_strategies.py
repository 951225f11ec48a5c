"""Forecasting strategies of the evaluation (issue 15, items 1 and 3): named specs, flattened priors, the
occasion effect carried forward, strategies side by side on the same forecasts, bootstrap intervals by patient.
The simulated cohorts that show each strategy recovering what it targets are in benchmarks/strategies.py (minutes
of CPU: not a unit test)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from cnidose.dosing.averaging import laplace_criterion
from cnidose.dosing.evaluate import (
    Forecast,
    Strategy,
    _hide_after,
    calibration_of,
    compare,
    evaluate,
    strategy,
    summarise,
)
from cnidose.errors import InputError
from cnidose.estimation import fit_map
from cnidose.estimation.observations import observation_data
from cnidose.models.library import resolve_model
from cnidose.models.model import Fitting
from cnidose.pk.events import Individual, split_individuals
from cnidose.records.nonmem import read_nonmem_csv

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tacrolimus_patients.csv"


def test_strategy_specs() -> None:
    assert strategy("map") == Strategy("map", 1.0, "prior")
    assert strategy("flat:2.5") == Strategy("flat:2.5", 2.5, "prior")
    assert strategy(" occ-last + flat:4 ") == Strategy("flat:4+occ-last", 4.0, "last")
    assert strategy("forget:14+log+map").name == "log+forget:14" and strategy("map+map").name == "map"
    for bad, said in (("flat:1", "1 < L"), ("flat:x", "a number"), ("bayes", "unknown forecasting strategy"),
                      ("", "empty"), ("flat:1000", "1 < L")):
        with pytest.raises(InputError, match=said):
            strategy(bad)


def test_flattened_prior_scales_the_between_subject_covariance_only() -> None:
    m = resolve_model("andrews2019_tac_adult_kidney")
    flat = strategy("flat:3").apply(m)
    assert np.allclose(flat.iiv.omega, 3 * m.iiv.omega) and flat.iiv.names == m.iiv.names
    assert flat.iov is m.iov and np.allclose(m.iiv.omega, resolve_model("andrews2019_tac_adult_kidney").iiv.omega)
    assert strategy("map").apply(m) is m


def _with_occasions(tmp_path: Path) -> Path:
    """The example data with OCC: each trough its own occasion, a dose row in the occasion of the next trough."""
    rows = list(csv.DictReader(EXAMPLE.open()))
    seen: dict[str, int] = {}
    for r in rows:
        n = seen.get(r["ID"], 0)
        if r["EVID"] == "0":
            n += 1
            seen[r["ID"]] = n
            r["OCC"] = str(n)
        else:
            r["OCC"] = str(n + 1)
    out = tmp_path / "occ.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0].keys()])
        w.writeheader()
        w.writerows(rows)
    return out


def test_strategies_side_by_side_on_the_same_forecasts(tmp_path: Path) -> None:
    m = resolve_model("andrews2019_tac_adult_kidney")
    inds = read_nonmem_csv(_with_occasions(tmp_path)).individuals()
    specs = [strategy(s) for s in ("map", "flat:3", "occ-last")]
    fc = evaluate([m], inds, strategies=specs)
    by = {s.name: [f for f in fc if f.strategy == s.name] for s in specs}
    keys = [[(f.id, f.step, f.row) for f in by[s.name]] for s in specs]
    assert keys[0] == keys[1] == keys[2] and keys[0]  # the same forecasts, each strategy
    a_priori = {name: [f.predicted for f in v if f.step == 0] for name, v in by.items()}
    assert a_priori["map"] == a_priori["flat:3"] == a_priori["occ-last"]  # no level seen: the priors' centre
    later = {name: np.array([f.predicted for f in v if f.step > 0]) for name, v in by.items()}
    assert not np.allclose(later["map"], later["flat:3"]) and not np.allclose(later["map"], later["occ-last"])
    # occ-last: the forecast of a new occasion is the fit's prediction with the last seen occasion's effect
    ind = inds[0]
    obs = np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))
    trimmed = _hide_after(ind, 1)
    r = fit_map(m, [trimmed])[0]
    occ = m.prepare(trimmed).occasion
    kappa = np.array(r.kappa)
    zero = m.simulate(trimmed, r.eta[None], kappas=kappa[None]).prediction[0, obs[1]]
    kappa[occ[obs[1]]] = kappa[occ[obs[0]]]
    carried = m.simulate(trimmed, r.eta[None], kappas=kappa[None]).prediction[0, obs[1]]
    got = {f.strategy: f.predicted for f in fc if f.id == ind.id and f.step == 1}
    assert got["map"] == pytest.approx(zero, rel=1e-9) and got["occ-last"] == pytest.approx(carried, rel=1e-9)
    # summaries per strategy with bootstrap intervals by patient, reproducible by seed
    s1 = summarise(fc, by_step=False, bootstrap=300, seed=1)
    assert [s.strategy for s in s1] == ["map", "flat:3", "occ-last"]
    for s in s1:
        assert s.patients == 2 and s.ci is not None and s.within_30 >= s.within_20
        for key, value in (("median_pe", s.median_pe), ("mape", s.mape), ("within_20", s.within_20)):
            lo, hi = s.ci[key]
            assert lo <= hi and (lo <= value <= hi or np.isclose(value, lo) or np.isclose(value, hi))
    assert summarise(fc, by_step=False, bootstrap=300, seed=1) == s1


def test_the_cli_compares_strategies(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from cnidose.cli import app

    data = _with_occasions(tmp_path)
    out = tmp_path / "f.csv"
    r = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-s",
                                 "map,flat:2+occ-last", "--bootstrap", "50", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {x["strategy"] for x in rows} == {"map", "flat:2+occ-last"}
    assert all(x["ci"] for x in rows if x["patients"] > 1) and any(x["ci"] for x in rows)
    assert out.read_text().splitlines()[0] == "MODEL,STRATEGY,ID,STEP,ROW,DAY,DV,PRED,PE,WEIGHTS"
    r = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-s", "flat:0.5"])
    assert r.exit_code != 0 and "1 < L" in r.output
    # each model and strategy's summary over all steps carries its paired change against the reference (map)
    whole = {x["strategy"]: x for x in rows if x["step"] is None}
    assert whole["map"]["paired"] is None
    c = whole["flat:2+occ-last"]["paired"]
    assert c["reference"] == ["andrews2019_tac_adult_kidney", "map"] and c["n"] > 0
    assert c["verdict"] == "too few patients" and c["ci"] is not None
    r = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-s",
                                 "map,flat:2+occ-last", "--no-progress", "--calibration", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "against andrews2019_tac_adult_kidney map" in r.stdout and "verdict" not in r.stdout
    assert "expected ±20 %" in r.stdout and "in 80 % PI" in r.stdout
    # another reference: the named strategy; a reference that is not compared is refused before any work
    r = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-s",
                                 "map,flat:2+occ-last", "--reference-strategy", "occ-last+flat:2", "--json"])
    assert r.exit_code == 0, r.output
    whole = {x["strategy"]: x for x in json.loads(r.stdout) if x["step"] is None}
    assert whole["flat:2+occ-last"]["paired"] is None
    assert whole["map"]["paired"]["reference"] == ["andrews2019_tac_adult_kidney", "flat:2+occ-last"]
    for option, value, said in (("--reference-strategy", "flat:3", "none of the strategies"),
                                ("--reference-strategy", "flat:x", "--reference-strategy: flat:L needs a number"),
                                ("--reference-model", "woillard2011_tac_prograf_advagraf", "none of the models")):
        r = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-s",
                                     "map,flat:2+occ-last", option, value])
        assert r.exit_code == 2 and said in r.output, r.output
    rows = list(csv.DictReader(out.open()))
    assert rows and all(0.0 <= float(x["P_WITHIN_20"]) <= 1.0 and x["IN_PI80"] in ("0.0", "1.0") for x in rows)


def _forecasts(strategy_name: str, errors: dict[tuple[int, int], float]) -> list[Forecast]:
    """Forecasts of model "m" with the given PE per (patient, step): observed 10, predicted 10 (1 + PE)."""
    return [Forecast("m", float(i), k, 0, 10.0, 10.0 * (1.0 + e), strategy_name) for (i, k), e in errors.items()]


def test_paired_comparison_against_the_reference() -> None:
    """compare: the changes over the forecasts both made (the a-priori step and unpaired forecasts left out), the
    intervals by patient, and a verdict only with enough patients."""
    rng = np.random.default_rng(5)
    base = {(i, k): float(rng.normal(0.0, 0.25)) for i in range(30) for k in range(4)}
    half = {key: e / 2 for key, e in base.items() if key[1] > 0}
    del half[(0, 1)]  # a forecast the strategy did not make: not paired
    fc = _forecasts("map", base) + _forecasts("half", half) + _forecasts("same", base)
    fc += _forecasts("worse", {key: e * 2 for key, e in base.items()})
    got = {c.strategy: c for c in compare(fc, bootstrap=400, seed=1)}
    assert set(got) == {"half", "same", "worse"} and got["half"].reference == ("m", "map")
    h = got["half"]
    keys = list(half)
    assert h.n == len(keys) == 30 * 3 - 1 and h.patients == 30
    want = np.mean([abs(half[key]) - abs(base[key]) for key in keys]) * 100
    share = np.mean([(abs(half[key]) <= 0.2) - (abs(base[key]) <= 0.2) for key in keys]) * 100
    logs = np.mean([abs(np.log1p(half[key])) - abs(np.log1p(base[key])) for key in keys]) * 100
    assert h.abs_error == pytest.approx(want) and h.within_20 == pytest.approx(share)
    assert h.abs_log == pytest.approx(logs) and h.abs_log < 0
    assert h.ci is not None and h.ci["abs_error"][0] < h.abs_error < h.ci["abs_error"][1] < 0
    assert h.verdict == "better" and got["worse"].verdict == "worse"
    assert got["same"].abs_error == 0.0 and got["same"].verdict == "no difference shown"
    # fewer patients than a verdict needs; no bootstrap: no intervals and no verdict
    few = [f for f in fc if f.id < 5]
    assert {c.verdict for c in compare(few, bootstrap=200)} == {"too few patients"}
    assert all(c.ci is None and c.verdict == "" for c in compare(fc))
    # mixed: closer on average, but fewer within ±20 % (errors of 0.15 become 0.21, errors of 0.6 become 0.3)
    mixed = {(i, k): (0.15 if k % 2 else 0.6) for i in range(30) for k in range(1, 5)}
    other = {key: (0.21 if e == 0.15 else 0.3) for key, e in mixed.items()}
    (c,) = compare(_forecasts("map", mixed) + _forecasts("x", other), bootstrap=200)
    assert c.abs_error < 0 and c.abs_log < 0 and c.within_20 < 0 and c.verdict == "mixed"
    # |PE| favours forecasts that err low, |ln(pred/obs)| does not: half the level against twice the level
    low = {(i, 1): -0.5 for i in range(12)}
    high = {(i, 1): 1.0 for i in range(12)}
    (c,) = compare(_forecasts("map", high) + _forecasts("low", low), bootstrap=100)
    assert c.abs_error == pytest.approx(-50.0) and c.abs_log == pytest.approx(0.0, abs=1e-9)
    # a forecast of 0 (or 1,000 times too low or high) counts LOG_ERROR_CAP on the log scale: finite means and
    # intervals (one patient's forecast: resamples without that patient show no change)
    zero = {(i, k): (-1.0 if (i, k) == (3, 2) else 0.1) for i in range(12) for k in range(1, 4)}
    fine = dict.fromkeys(zero, 0.1)
    (c,) = compare(_forecasts("map", zero) + _forecasts("fine", fine), bootstrap=200)
    cap = 100 * math.log(1000.0)
    assert c.abs_log == pytest.approx((100 * math.log(1.1) - cap) / len(zero))
    assert c.ci is not None and all(np.isfinite(c.ci[k]).all() for k in c.ci) and c.ci["abs_log"][1] == 0.0
    assert c.verdict == "no difference shown"
    (c,) = compare(_forecasts("map", fine) + _forecasts("far", {**fine, (3, 2): 5000.0}))
    assert c.abs_log == pytest.approx((cap - 100 * math.log(1.1)) / len(zero))
    with pytest.raises(InputError, match="reference"):
        compare(fc, reference=("m", "nothing"))


def test_log_and_forgetting_specs() -> None:
    s = strategy("log+forget:14+flat:2")
    assert (s.log_scale, s.half_life, s.prior_scale, s.occasion) == (True, 336.0, 2.0, "prior")
    assert "log scale" in s.describe() and "14 days" in s.describe()
    for bad, said in (("forget:x", "half-life"), ("forget:0.1", "0.5 <= D"), ("logs", "unknown")):
        with pytest.raises(InputError, match=said):
            strategy(bad)
    m = resolve_model("andrews2019_tac_adult_kidney")
    fitted = s.apply(m)
    assert fitted.fitting == Fitting(True, 336.0) and m.fitting == Fitting()
    assert np.allclose(fitted.iiv.omega, 2 * m.iiv.omega)


def _two_levels(first: float, second: float) -> list[Individual]:
    cols = {"ID": [1] * 3, "TIME": [0.0, 36.0, 36.0 + 24 * 20], "EVID": [1, 0, 0], "AMT": [5.0, 0, 0],
            "II": [12.0, 0, 0], "ADDL": [200, 0, 0], "MDV": [1, 0, 0], "DV": [np.nan, first, second],
            "CYP3A5": [0] * 3, "AGE": [50] * 3, "ALB": [40] * 3, "SCR": [120] * 3, "HCT": [0.35] * 3,
            "WT": [75] * 3, "HT": [175] * 3, "SEX": [1] * 3, "OCC": [1, 1, 2]}
    return split_individuals({k: np.asarray(v, dtype=float) for k, v in cols.items()})


def test_log_scale_fits_the_transformed_levels_with_the_sd_at_the_level() -> None:
    m = resolve_model("woillard2011_tac_prograf_advagraf")  # combined error: proportional and additive
    inds = read_nonmem_csv(EXAMPLE).individuals()
    lm = strategy("log").apply(m)
    prep = lm.prepare(inds[0])
    natural, logged = observation_data(m, m.prepare(inds[0])), observation_data(lm, prep)
    level = np.exp(logged.y)
    dv = inds[0].covariates["DV"][natural.rec]
    assert logged.log.all() and np.allclose(level, dv) and not natural.log.any()
    assert np.allclose(logged.sd_log, np.sqrt(natural.prop**2 + (natural.add / dv) ** 2))
    assert natural.add.max() > 0 and np.ptp(logged.sd_log) > 0  # the additive part makes the SD level-dependent
    # the objective at the estimate, recomputed here on the log scale
    r = fit_map(lm, [inds[0]])[0]
    f = lm.simulate(inds[0], r.eta[None]).prediction[0, natural.rec]
    est = np.flatnonzero(np.diag(m.omega) > 0)
    e = r.eta[est]
    ofv = np.sum((np.log(dv) - np.log(f)) ** 2 / logged.sd_log**2 + np.log(logged.sd_log**2)) + e @ np.linalg.solve(
        m.omega[np.ix_(est, est)], e)
    assert r.ofv == pytest.approx(ofv, rel=1e-9)


def test_log_scale_removes_the_pull_of_the_proportional_variance() -> None:
    """A level equal to the typical prediction: on the log scale the estimate stays at the population (the
    residual and the prior agree); on the natural scale ln V(f) = ln (p f)² rewards a lower prediction."""
    m = resolve_model("andrews2019_tac_adult_kidney")
    ind = _two_levels(1.0, 1.0)[0]
    typical = m.simulate(ind).prediction[0]
    obs = np.flatnonzero(ind.evid == 0)
    ind = _two_levels(*typical[obs])[0]
    nat, log = fit_map(m, [ind])[0], fit_map(strategy("log").apply(m), [ind])[0]
    assert np.allclose(log.ipred, typical[obs], rtol=1e-4)
    assert np.all(nat.ipred < typical[obs] * 0.99)  # about p² = 6 % low for Andrews' proportional SD 0.245


def test_forgetting_weighs_the_newer_level() -> None:
    m = resolve_model("andrews2019_tac_adult_kidney")
    ind = _two_levels(12.0, 4.0)[0]  # 20 days apart: the newer level lower
    fm = strategy("forget:5").apply(m)
    od = observation_data(fm, fm.prepare(ind))
    plain = observation_data(m, m.prepare(ind))
    # age 20 days, half-life 5 days: weights 1/16 and 1, scaled to a mean of 1 (the total weight kept)
    w = np.array([1.0 / 16.0, 1.0]) / np.mean([1.0 / 16.0, 1.0])
    assert od.prop == pytest.approx(plain.prop / np.sqrt(w))
    assert np.sum(plain.prop**2 / od.prop**2) == pytest.approx(2.0)
    last = np.flatnonzero(ind.evid == 0)[-1]
    a, b = fit_map(m, [ind])[0], fit_map(fm, [ind])[0]
    assert abs(b.ipred[-1] - ind.covariates["DV"][last]) < abs(a.ipred[-1] - ind.covariates["DV"][last])


def test_evaluate_with_log_and_forgetting_changes_only_the_bayesian_forecasts() -> None:
    m = resolve_model("andrews2019_tac_adult_kidney")
    inds = read_nonmem_csv(EXAMPLE).individuals()
    fc = evaluate([m], inds, strategies=[strategy(s) for s in ("map", "log", "forget:3")])
    by = {k: [f for f in fc if f.strategy == k] for k in ("map", "log", "forget:3")}
    assert [f.predicted for f in by["map"] if f.step == 0] == [f.predicted for f in by["log"] if f.step == 0]
    for k in ("log", "forget:3"):
        assert not np.allclose([f.predicted for f in by["map"] if f.step > 0],
                               [f.predicted for f in by[k] if f.step > 0])


def test_model_averaging_and_selection_in_the_evaluation() -> None:
    ms = [resolve_model("andrews2019_tac_adult_kidney"), resolve_model("woillard2011_tac_prograf_advagraf")]
    inds = read_nonmem_csv(EXAMPLE).individuals()
    fc = evaluate(ms, inds, strategies=[strategy("map")], combine=("average", "select"))
    single = {(f.model, f.id, f.step): f.predicted for f in fc if f.model in (ms[0].id, ms[1].id)}
    avg = [f for f in fc if f.model == "average"]
    sel = [f for f in fc if f.model == "select"]
    assert avg and len(avg) == len(sel) == len(single) // 2
    for f in avg:
        w = dict(f.weights)
        assert sum(w.values()) == pytest.approx(1.0) and set(w) == {ms[0].id, ms[1].id}
        if f.step == 0:
            assert w[ms[0].id] == pytest.approx(0.5)  # a priori: equal weights
        expect = sum(w[m.id] * single[(m.id, f.id, f.step)] for m in ms)
        assert f.predicted == pytest.approx(expect, rel=1e-12)
    assert any(abs(dict(f.weights)[ms[0].id] - 0.5) > 0.01 for f in avg if f.step > 0)
    for f in sel:
        best = max(f.weights, key=lambda x: x[1])[0]
        assert f.predicted == single[(best, f.id, f.step)]
    # the weight at step k is the Laplace marginal likelihood of levels 1..k
    ind = _hide_after(inds[0], 1)
    crit = [laplace_criterion(m, fit_map(m, [ind])[0]) for m in ms]
    w = np.exp(-0.5 * (np.array(crit) - min(crit)))
    got = next(f for f in avg if f.id == inds[0].id and f.step == 1)
    assert dict(got.weights)[ms[0].id] == pytest.approx(w[0] / w.sum(), rel=1e-9)
    with pytest.raises(InputError, match="two models"):
        evaluate(ms[:1], inds, combine=("average",))
    with pytest.raises(InputError, match="unknown way"):
        evaluate(ms, inds, combine=("vote",))


def test_the_criterion_compares_models_fitted_on_different_scales() -> None:
    """A level fitted on the log scale brings its Jacobian, so log-scale and natural-scale fits of the same levels
    give nearly the same marginal likelihood (a proportional error of SD p: log-normal and normal densities
    differ by O(p²) per level), not values 2 ln y apart."""
    m = resolve_model("woillard2011_tac_prograf_advagraf")
    ind = _hide_after(read_nonmem_csv(EXAMPLE).individuals()[0], 2)
    lm = strategy("log").apply(m)
    nat, log = (laplace_criterion(x, fit_map(x, [ind])[0]) for x in (m, lm))
    dv = ind.covariates["DV"][(ind.evid == 0) & (ind.mdv == 0)]
    assert 2 * np.log(dv).sum() > 8.0 and abs(nat - log) < 1.0


def test_the_cli_averages_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cnidose.cli import app

    out = tmp_path / "f.csv"
    args = ["evaluate", "-m", "andrews2019_tac_adult_kidney,woillard2011_tac_prograf_advagraf", "-d", str(EXAMPLE),
            "--combine", "average,select", "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "model weights" in r.output and "average" in r.stdout and "select" in r.stdout
    rows = list(csv.DictReader(out.open()))
    assert {x["MODEL"] for x in rows} >= {"average", "select"}
    assert all("andrews2019_tac_adult_kidney=" in x["WEIGHTS"] for x in rows if x["MODEL"] == "average")
    r = CliRunner().invoke(app, [*args[:2], "andrews2019_tac_adult_kidney", *args[3:]])
    assert r.exit_code != 0 and "two or more models" in r.output


def test_recommend_with_a_strategy_carries_the_last_occasion_and_says_so(tmp_path: Path) -> None:
    from cnidose.dosing import Target, product, recommend
    from cnidose.estimation.posterior import sample_posterior

    m = resolve_model("andrews2019_tac_adult_kidney")
    data = _with_occasions(tmp_path)
    data.write_text(data.read_text().replace(",8.0,0,", ",16.0,0,"))  # ID 2: the last level doubles
    ind = read_nonmem_csv(data).individuals()[1]
    t = Target("tacrolimus", 4.0, 11.0, source="test")
    prior = recommend(m, ind, t, product("Prograf"), n_draws=400, seed=3)
    last = recommend(m, ind, t, product("Prograf"), n_draws=400, seed=3, occasion="last")
    assert prior.inputs["occasion"] == "prior" and last.inputs["occasion"] == "last"
    post = sample_posterior(m, ind, n_draws=400, seed=3)
    occ = m.prepare(ind).occasion[np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))[-1]]
    kappa_last = post.draws[:, len(m.iiv):].reshape(400, post.n_occasions, 1)[:, occ, 0]
    assert prior.values is not None and last.values is not None
    # KAPPA_CL of the last occasion carried forward: clearance exp(kappa) higher, levels lower (and vice versa)
    shift = np.median(last.values) / np.median(prior.values)
    assert np.median(kappa_last) < -0.05 and np.sign(np.log(shift)) == -np.sign(np.median(kappa_last))
    with pytest.raises(InputError, match="occasion"):
        recommend(m, ind, t, product("Prograf"), n_draws=50, occasion="next")


def test_fit_and_recommend_cli_take_a_strategy(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cnidose.cli import app

    outs = {}
    for spec, backend in (("map", "serial"), ("log+flat:2", "serial"), ("log+flat:2", "processes")):
        out = tmp_path / f"{spec}-{backend}.csv"
        r = CliRunner().invoke(app, ["fit", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE), "-s", spec,
                                     "--backend", backend, "--workers", "2", "--chunk-size", "1", "--out", str(out),
                                     "--no-progress"])
        assert r.exit_code == 0, r.output
        assert f"strategy {strategy(spec).name}" in r.output
        outs[spec, backend] = list(csv.DictReader(out.open()))
    # the strategy reaches the worker processes (the payload carries the fitting options and the widened Omega)
    assert outs["log+flat:2", "serial"] == outs["log+flat:2", "processes"]
    assert outs["map", "serial"][0]["ETA_CL"] != outs["log+flat:2", "serial"][0]["ETA_CL"]
    m = strategy("log+flat:2").apply(resolve_model("andrews2019_tac_adult_kidney"))
    expect = fit_map(m, read_nonmem_csv(EXAMPLE).individuals())
    assert float(outs["log+flat:2", "serial"][0]["ETA_CL"]) == pytest.approx(float(expect[0].eta[0]), rel=1e-9)
    r = CliRunner().invoke(app, ["recommend", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE), "--id", "2",
                                 "--target", "4-11", "-s", "log", "--json"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["inputs"]["strategy"] == "log"
    r = CliRunner().invoke(app, ["fit", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE), "-s", "bayes"])
    assert r.exit_code != 0 and "unknown forecasting strategy" in r.output


def test_post_forecasts_the_posterior_predictive_median(tmp_path: Path) -> None:
    from cnidose.dosing.evaluate import POSTERIOR_DRAWS
    from cnidose.estimation.posterior import sample_posterior

    m = resolve_model("andrews2019_tac_adult_kidney")
    inds = read_nonmem_csv(_with_occasions(tmp_path)).individuals()
    assert strategy("post+log").name == "log+post" and strategy("post").forecast == "posterior"
    fc = evaluate([m], inds, strategies=[strategy("map"), strategy("post")], max_step=1)
    got = {(f.strategy, f.id, f.step): f.predicted for f in fc}
    ind = _hide_after(inds[1], 1)
    r = fit_map(m, [ind])[0]
    target = np.flatnonzero(ind.evid == 0)[1]
    draws = sample_posterior(m, ind, n_draws=POSTERIOR_DRAWS, seed=0, map_result=r).predict(ind, seed=0)[:, target]
    assert got["post", inds[1].id, 1] == pytest.approx(float(np.median(draws)), rel=1e-12)
    assert got["post", inds[1].id, 1] != got["map", inds[1].id, 1]
    assert got["post", inds[1].id, 0] == got["map", inds[1].id, 0]  # a priori: the typical prediction for both


def test_an_occasion_without_a_level_is_predicted_as_a_new_occasion(tmp_path: Path) -> None:
    """Posterior predictions at a record whose occasion has no level: that occasion's effect is drawn from its prior
    (it was not estimated), so the draws spread more there than with the between-patient effects alone."""
    from cnidose.estimation.posterior import sample_posterior

    m = resolve_model("andrews2019_tac_adult_kidney")
    ind = _hide_after(read_nonmem_csv(_with_occasions(tmp_path)).individuals()[1], 1)
    post = sample_posterior(m, ind, n_draws=2000, seed=1)
    target = int(np.flatnonzero(ind.evid == 0)[2])  # occasion 3: no level seen
    occ = m.prepare(ind).occasion
    assert occ[target] not in occ[np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))]
    pred = post.predict(ind, seed=2)[:, target]
    zero = m.simulate(ind, post.eta, kappas=np.zeros((post.eta.shape[0], post.n_occasions, 1))).prediction[:, target]
    extra = np.var(np.log(pred)) - np.var(np.log(zero))
    assert extra == pytest.approx(float(m.iov.omega[0, 0]), rel=0.35)  # the occasion's variance, KAPPA_CL on CL


def test_evaluation_by_time_since_transplant() -> None:
    from cnidose.dosing.evaluate import days_since_transplant

    m = resolve_model("andrews2019_tac_adult_kidney")
    inds = read_nonmem_csv(EXAMPLE).individuals()
    ind = inds[0]  # POD 5 on every record: a baseline value, counted on by TIME
    assert days_since_transplant(ind, 1) == pytest.approx(5 + 59.5 / 24)
    fc = evaluate([m], inds)
    assert {round(f.day, 3) for f in fc if f.id == 1} == {round(5 + 59.5 / 24, 3), round(5 + 107.5 / 24, 3)}
    cols = {k: np.asarray(v, dtype=float) for k, v in {
        "ID": [1, 1, 1], "TIME": [0, 100, 500], "EVID": [1, 0, 0], "AMT": [5, 0, 0], "MDV": [1, 0, 0],
        "POD": [2, 6, 23]}.items()}
    varying = split_individuals(cols)[0]
    assert [days_since_transplant(varying, r) for r in range(3)] == [2, 6, 23]
    s = summarise(fc, by_step=False, by_period=True)
    periods = [(x.period, x.step, x.n) for x in s if x.period is not None]
    assert periods == [("days 7-14", None, 3), ("days 7-14", 0, 2)]  # Bayesian and a priori apart
    assert sum(x.n for x in s if x.period is None) == len(fc)


def test_plot_by_time_since_transplant(tmp_path: Path) -> None:
    """The SVG of bias by period: one polyline per model and strategy across the periods it has, a priori
    forecasts hollow, and it parses as XML."""
    import xml.etree.ElementTree as ET

    from typer.testing import CliRunner

    from cnidose.cli import app
    from cnidose.dosing.evaluate import Forecast, plot_by_time_svg

    fc = [Forecast("m<1>", 1.0, step, 0, 10.0, 10.0 * (1 + pe), "map", (), day)
          for step, pe, day in ((0, 0.3, 3.0), (1, 0.1, 5.0), (2, -0.1, 10.0), (3, 0.05, 20.0))]
    fc += [Forecast("m<1>", 2.0, 1, 0, 10.0, 12.0, "post", (), 10.0), Forecast("m<1>", 2.0, 2, 0, 10.0, 11.0,
                                                                          "post", (), 40.0)]
    svg = plot_by_time_svg(fc)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2  # one line per (model, strategy) with two periods or more
    labels = [t.text for t in root.findall(f"{ns}text")]
    assert {"0-7", "7-14", "14-30", "30-90"} <= set(labels) and "90-365" not in labels
    assert "m&lt;1&gt; (map)" in svg  # names are escaped
    hollow = [c for c in root.findall(f"{ns}circle") if c.get("fill") == "none"]
    assert len(hollow) == 1 and "a priori median PE +30.0 %" in hollow[0].findtext(f"{ns}title", "")
    # through the CLI
    out = tmp_path / "time.svg"
    res = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE),
                                   "--plot-time", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    ET.fromstring(out.read_text())


def test_drift_spec_and_occasion_prior() -> None:
    """drift:W: the occasion prior is the model's occasion-to-occasion covariance plus a Wiener process per effect
    from the first occasion (variance W^2 per week)."""
    from cnidose.estimation.cohort import occasion_prior

    s = strategy("post + drift:0.3")
    assert s.name == "drift:0.3+post" and s.drift == 0.3 and "random walk (SD 0.3 per week)" in s.describe()
    for bad, said in (("drift:0", "0 < W"), ("drift:x", "random-walk SD"), ("drift:3", "0 < W")):
        with pytest.raises(InputError, match=said):
            strategy(bad)
    m = resolve_model("andrews2019_tac_adult_kidney")
    d = s.apply(m)
    assert d.fitting == Fitting(False, None, 0.3) and d.iov is m.iov
    times = np.array([72.0, 96.0, 240.0])
    C = occasion_prior(d, times)
    w = m.iov.omega[0, 0]
    walk = 0.3**2 / 168.0 * np.minimum(times[:, None] - 72.0, times[None, :] - 72.0)
    np.testing.assert_allclose(C, w * np.eye(3) + walk)
    np.testing.assert_allclose(occasion_prior(m, times), w * np.eye(3))  # no drift: independent occasions


def _drift_patient(levels: int) -> Individual:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tdm_cohorts import COHORTS, cohort

    m = resolve_model("andrews2019_tac_adult_kidney")
    return _hide_after(cohort(m, 1, 4, **COHORTS["drift"])[0], levels)


def test_drift_estimates_the_next_occasion_from_the_recent_ones() -> None:
    """With a drifting occasion prior the MAP of an occasion without a level (the next trough's) is the prior's
    conditional mean given the estimated occasions (kriging); with independent occasions it is zero."""
    from cnidose.estimation.cohort import occasion_prior, occasion_times

    m = resolve_model("andrews2019_tac_adult_kidney")
    ind = _drift_patient(5)
    d = strategy("drift:0.3").apply(m)
    r = fit_map(d, [ind])[0]
    plain = fit_map(m, [ind])[0]
    prep = d.prepare(ind)
    seen = np.unique(prep.occasion[(ind.evid == 0) & (ind.mdv == 0)])
    unseen = np.setdiff1d(np.arange(prep.n_occasions), seen)
    assert r.status == "converged" and r.kappa is not None and unseen.size
    C = occasion_prior(d, occasion_times(prep))
    kriged = C[np.ix_(unseen, seen)] @ np.linalg.solve(C[np.ix_(seen, seen)], r.kappa[seen, 0])
    np.testing.assert_allclose(r.kappa[unseen, 0], kriged, atol=1e-6)
    assert np.abs(kriged).max() > 0.01
    assert plain.kappa is not None and np.abs(plain.kappa[unseen, 0]).max() < 1e-6
    # the Laplace criterion takes the drifting prior's determinant
    assert np.isfinite(r.prior_logdet) and r.prior_logdet != pytest.approx(plain.prior_logdet)
    assert np.isfinite(laplace_criterion(d, r))


def test_drift_draws_future_occasions_from_the_conditional_prior() -> None:
    """Posterior predictions at occasions after the fitted records: each draw's effect is drawn from the prior
    conditional on the draw's fitted occasions (mean and variance of the Gaussian conditional)."""
    from cnidose.estimation.cohort import occasion_prior, occasion_times
    from cnidose.estimation.posterior import sample_posterior

    m = strategy("drift:0.3").apply(resolve_model("andrews2019_tac_adult_kidney"))
    full = _drift_patient(8)
    obs = np.flatnonzero(full.evid == 0)
    cut = int(obs[3])  # the records up to the 4th trough are fitted; the 5th trough's occasion comes after them
    fitted = Individual(full.id, full.rows[:cut + 1], full.time[:cut + 1], full.evid[:cut + 1], full.amt[:cut + 1],
                        full.rate[:cut + 1], full.ii[:cut + 1], full.addl[:cut + 1], full.ss[:cut + 1],
                        full.cmt[:cut + 1], full.mdv[:cut + 1], {k: v[:cut + 1] for k, v in full.covariates.items()})
    post = sample_posterior(m, fitted, n_draws=4000, seed=3)
    prep = m.prepare(full)
    extra = prep.n_occasions - post.n_occasions
    assert extra >= 1
    seen = post.draws[:, len(m.iiv):].reshape(post.draws.shape[0], post.n_occasions, 1)
    new = post._drifted(prep, seen, extra, np.random.default_rng(5))
    C = occasion_prior(m, occasion_times(prep))
    s, n = np.arange(post.n_occasions), np.arange(post.n_occasions, post.n_occasions + extra)
    gain = C[np.ix_(n, s)] @ np.linalg.inv(C[np.ix_(s, s)])
    resid = new[:, :, 0] - seen[:, :, 0] @ gain.T
    cond = C[np.ix_(n, n)] - gain @ C[np.ix_(s, n)]
    assert np.abs(resid.mean(axis=0)).max() < 4 * np.sqrt(np.diag(cond).max() / resid.shape[0])
    np.testing.assert_allclose(np.var(resid, axis=0), np.diag(cond), rtol=0.1)


def test_the_benchmark_cohorts_truth_and_residual_errors() -> None:
    """benchmarks/tdm_cohorts.py: asking for the truth changes no level; the levels scatter around the truth as
    each residual setting says (assay: 10 % log-normal; lognormal: 0.245 on the log scale; model: 0.245
    proportional, normal); the occasion-free truth differs from the truth by the occasion effects alone."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tdm_cohorts import cohort

    m = resolve_model("andrews2019_tac_adult_kidney")
    for residual, sd in (("assay", 0.10), ("lognormal", 0.245), ("model", 0.245)):
        truth: list[dict[str, np.ndarray]] = []
        with_truth = cohort(m, 40, 11, residual=residual, truth_out=truth)
        plain = cohort(m, 40, 11, residual=residual)
        dv = np.concatenate([i.covariates["DV"][i.evid == 0] for i in with_truth])
        np.testing.assert_array_equal(dv, np.concatenate([i.covariates["DV"][i.evid == 0] for i in plain]))
        exact = np.concatenate([t["exact"] for t in truth])
        ratio = dv / exact
        if residual == "model":
            assert abs(np.std(ratio) - sd) < 0.04 and abs(np.mean(ratio) - 1.0) < 0.05
        else:
            assert abs(np.std(np.log(ratio)) - sd) < 0.04 and abs(np.median(np.log(ratio))) < 0.05
        no_occ = np.concatenate([t["no_occasion"] for t in truth])
        assert np.all(no_occ > 0) and 0.05 < np.std(np.log(exact / no_occ)) < 0.5
    with pytest.raises(ValueError, match="residual"):
        cohort(m, 1, 1, residual="normal")


def test_calibration_says_how_the_model_saw_each_level() -> None:
    """evaluate(calibration=True): on levels simulated from the model itself (its own residual error) about 80 %
    lie inside their 80 % predictive interval and the share within ±20 % is about what the model expects; on
    levels with a smaller error than the model's (a 10 % assay error) more lie inside and more are within ±20 %
    than it expects (the model's variability overstates these patients')."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tdm_cohorts import cohort

    m = resolve_model("andrews2019_tac_adult_kidney")
    got = {}
    for residual in ("model", "assay"):
        fc = [f for f in evaluate([m], cohort(m, 12, 3, residual=residual), max_step=4, calibration=True)
              if f.step > 0]
        assert fc and all(f.expected_20 is not None and 0.0 <= f.expected_20 <= 1.0 and f.in_pi80 in (0.0, 1.0)
                          for f in fc)
        (whole,) = summarise(fc, by_step=False)
        assert whole.coverage_80 == pytest.approx(100 * np.mean([f.in_pi80 for f in fc]))
        assert whole.expected_20 is not None
        got[residual] = whole
    model, assay = got["model"], got["assay"]
    assert model.coverage_80 is not None and 65.0 <= model.coverage_80 <= 95.0
    assert model.expected_20 is not None and abs(model.within_20 - model.expected_20) < 15.0
    assert assay.coverage_80 is not None and assay.coverage_80 > 90.0
    assert assay.expected_20 is not None and assay.within_20 > assay.expected_20 + 10.0
    # without calibration nothing is computed
    plain = evaluate([m], cohort(m, 2, 3), max_step=1)
    assert all(f.expected_20 is None and f.in_pi80 is None for f in plain)
    assert all(s.expected_20 is None and s.coverage_80 is None for s in summarise(plain))


def test_calibration_of_a_mixture_of_predictive_distributions() -> None:
    """calibration_of: the probability within ±20 % and the probability integral transform of a mixture are the
    weighted sums of its components'; one model's interval is its draws' central 80 %."""
    ten, twenty = np.full(100, 10.0), np.full(100, 20.0)
    # a forecast of 10: every draw of the first model is within ±20 %, none of the second's (10/20 - 1 = -0.5)
    assert calibration_of(10.0, 15.0, [ten, twenty], [0.3, 0.7]) == (pytest.approx(0.3), 1.0)
    # the level 15 lies above every draw of the first model and below every one of the second: PIT = the first's
    # weight, inside the central 80 % only where that weight is within [0.1, 0.9]
    assert calibration_of(10.0, 15.0, [ten, twenty], [0.05, 0.95])[1] == 0.0
    assert calibration_of(10.0, 15.0, [ten, twenty], [0.95, 0.05])[1] == 0.0
    assert calibration_of(10.0, 15.0, [ten, twenty])[0] == pytest.approx(0.5)  # equal weights by default
    draws = np.arange(1.0, 101.0)  # 1..100
    # the forecast within ±20 % of the level (|50 / L - 1| <= 0.2): L = 42..62; the level 5: PIT 0.05
    assert calibration_of(50.0, 5.0, [draws]) == (pytest.approx(0.21), 0.0)
    assert calibration_of(50.0, 50.0, [draws])[1] == 1.0
    assert calibration_of(50.0, 95.0, [draws])[1] == 0.0
    assert calibration_of(50.0, 1.0, [np.array([-1.0, 0.0, 50.0])])[0] == pytest.approx(1 / 3)  # <= 0: never within


def test_combined_forecasts_are_calibrated() -> None:
    """evaluate(calibration=True, combine=...): a selected forecast has exactly its chosen model's calibration;
    every combined forecast has both figures, and so do their summaries (the mixture's arithmetic:
    test_calibration_of_a_mixture_of_predictive_distributions)."""
    ms = [resolve_model("andrews2019_tac_adult_kidney"), resolve_model("woillard2011_tac_prograf_advagraf")]
    inds = read_nonmem_csv(EXAMPLE).individuals()
    fc = evaluate(ms, inds, strategies=[strategy("map")], combine=("average", "select"), max_step=2,
                  calibration=True)
    single = {(f.model, f.id, f.step): f for f in fc if f.model in (ms[0].id, ms[1].id)}
    combined = [f for f in fc if f.model in ("average", "select")]
    assert combined and all(f.expected_20 is not None and 0.0 <= f.expected_20 <= 1.0 and f.in_pi80 in (0.0, 1.0)
                            for f in combined)
    for f in combined:
        w = dict(f.weights)
        if f.model == "select":
            chosen = single[(max(w, key=lambda k: w[k]), f.id, f.step)]
            assert (f.expected_20, f.in_pi80) == (chosen.expected_20, chosen.in_pi80)
        else:
            assert all(single[(m.id, f.id, f.step)].expected_20 is not None for m in ms)
    for s in summarise(combined, by_step=False):
        assert s.expected_20 is not None and s.coverage_80 is not None

