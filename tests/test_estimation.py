"""MAP estimation, BLQ, statuses on bad input, the posterior, and the fit command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

from cnidose.cli import app
from cnidose.estimation import fit_map, objective
from cnidose.estimation.cohort import build_groups
from cnidose.estimation.map import _ofv
from cnidose.estimation.posterior import sample_posterior
from cnidose.models import load_model, resolve_model
from cnidose.pk.events import Individual, split_individuals

from .conftest import REPO

M001 = REPO / "validation" / "map-nonmem" / "model001.toml"


Doses = tuple[tuple[float, float], ...] | list[tuple[float, float]]


def _ind(obs: list[tuple[float, float]], *, idn: int = 1, extra: dict[str, list[float]] | None = None,
         doses: Doses = ((0.0, 10000.0),), blq: list[int] | None = None, lloq: float | None = None) -> Individual:
    rows: list[dict[str, float]] = [{"TIME": t, "EVID": 1, "AMT": a, "CMT": 1, "DV": np.nan, "MDV": 1}
                                    for t, a in doses]
    rows += [{"TIME": t, "EVID": 0, "AMT": 0, "CMT": 2, "DV": dv, "MDV": 0} for t, dv in obs]
    rows.sort(key=lambda r: r["TIME"])
    cols: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    cols["ID"] = [idn] * len(rows)
    if blq is not None:
        flags = iter(blq)
        cols["BLQ"] = [next(flags) if r["EVID"] == 0 else 0 for r in rows]
        if lloq is not None:
            cols["LLOQ"] = [lloq] * len(rows)
    for k, v in (extra or {}).items():
        cols[k] = v
    return split_individuals(cols)[0]


def test_objective_is_nonmem_definition() -> None:
    """OFV = sum (y-f)^2/V + ln V + eta' Omega^-1 eta with V = 0.05 f^2, checked by hand."""
    m = load_model(M001)
    ind = _ind([(1.5, 91.2904), (4.4, 110.826), (7.1, 79.384), (24.6, 20.6671)])
    eta = np.array([0.3, -0.1, 0.2])
    sim = m.simulate(ind, eta[None])
    f = sim.prediction[0, 1:]
    y = np.array([91.2904, 110.826, 79.384, 20.6671])
    V = 0.05 * f**2
    expected = float(np.sum((y - f) ** 2 / V + np.log(V)) + eta @ np.linalg.inv(m.omega) @ eta)
    assert objective(m, ind, eta) == pytest.approx(expected, rel=1e-12)


def test_blq_m3_term() -> None:
    m = load_model(M001)
    ind = _ind([(1.5, 91.2904), (48.0, 5.0)], blq=[0, 1])
    eta = np.array([0.1, 0.0, -0.2])
    f = m.simulate(ind, eta[None]).prediction[0, 1:]
    sd = np.sqrt(0.05) * f
    expected = ((91.2904 - f[0]) ** 2 / sd[0] ** 2 + np.log(sd[0] ** 2) - 2 * norm.logcdf((5.0 - f[1]) / sd[1])
                + eta @ np.linalg.inv(m.omega) @ eta)
    assert objective(m, ind, eta) == pytest.approx(float(expected), rel=1e-10)
    # the same with the limit in an LLOQ column (DV on the BLQ record ignored)
    ind2 = _ind([(1.5, 91.2904), (48.0, 0.0)], blq=[0, 1], lloq=5.0)
    assert objective(m, ind2, eta) == pytest.approx(float(expected), rel=1e-10)


def test_blq_pulls_the_estimate() -> None:
    """A late level below 1 mg/L says elimination is faster than a late level of 20 mg/L would."""
    m = load_model(M001)
    early = [(1.5, 91.0), (4.4, 110.0)]
    low = fit_map(m, [_ind([*early, (72.0, 1.0)], blq=[0, 0, 1])])[0]
    high = fit_map(m, [_ind([*early, (72.0, 20.0)], blq=[0, 0, 0])])[0]
    assert low.status == high.status == "converged" and low.n_blq == 1
    assert low.eta[0] > high.eta[0]  # higher clearance


def test_statuses_on_bad_input_and_the_batch_goes_on() -> None:
    m = load_model(M001)
    good = _ind([(1.5, 91.2904), (4.4, 110.826)], idn=1)
    no_obs = _ind([], idn=2)
    all_blq = _ind([(48.0, 2.0), (72.0, 2.0)], idn=3, blq=[1, 1])
    dose_after = _ind([(1.5, 91.2904), (4.4, 110.826)], idn=4, doses=[(0.0, 10000.0), (24.0, 10000.0)])
    nan_level = _ind([(1.5, 91.2904), (4.4, np.nan)], idn=5)
    negative = _ind([(1.5, -3.0)], idn=6)
    res = fit_map(m, [good, no_obs, all_blq, dose_after, nan_level, negative])
    assert [r.status for r in res] == ["converged", "prior-only", "converged", "converged", "error", "error"]
    assert "no observations" in res[1].message and np.allclose(res[1].eta, 0)
    assert np.allclose(res[1].covariance, m.omega)
    assert res[2].n_blq == 2 and res[2].ofv > 0
    assert "row 3, column DV" in res[4].message and "DV is missing" in res[4].message
    assert "impossible level -3" in res[5].message
    assert res[0].model.startswith("mapbayr-001 1.0.0 sha256:")


def test_missing_covariate_on_one_record_names_it() -> None:
    m = load_model(REPO / "validation" / "map-nonmem" / "model301.toml")
    bw = [70.0, 72.0, np.nan]
    ind = _ind([(1.5, 91.0), (4.4, 110.0)], extra={"BW": bw, "SEX": [0.0, 0.0, 0.0]})
    ok = _ind([(1.5, 91.0), (4.4, 110.0)], idn=2, extra={"BW": [70.0, 70.0, 70.0], "SEX": [0.0, 0.0, 0.0]})
    res = fit_map(m, [ind, ok])
    assert res[0].status == "error" and "row 3, column BW" in res[0].message and "BW" in res[0].message
    assert res[1].status == "converged"


def test_fast_and_engine_paths_agree() -> None:
    m = load_model(REPO / "validation" / "map-nonmem" / "model101.toml")
    inds = [_ind([(1.5, 91.0), (4.4, 110.0), (24.0, 30.0)], idn=1),
            _ind([(2.0, 60.0), (30.0, 20.0)], idn=2, doses=[(0.0, 10000.0), (12.0, 5000.0)])]
    a = fit_map(m, inds, fast=True)
    b = fit_map(m, inds, fast=False)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.eta, y.eta, atol=1e-6)
        assert x.ofv == pytest.approx(y.ofv, abs=1e-8)
        np.testing.assert_allclose(x.covariance, y.covariance, rtol=1e-5)


def test_exact_covariance_option() -> None:
    m = load_model(M001)
    ind = _ind([(1.5, 91.2904), (4.4, 110.826), (7.1, 79.384), (24.6, 20.6671)])
    exp_ = fit_map(m, [ind])[0]
    ex = fit_map(m, [ind], covariance="exact")[0]
    assert ex.covariance_method == "exact" and exp_.covariance_method == "expected"
    np.testing.assert_allclose(ex.eta, exp_.eta)
    assert ex.covariance is not None and exp_.covariance is not None
    assert np.all(np.linalg.eigvalsh(ex.covariance) > 0)
    # same order of magnitude, not the same matrix (NONMEM's is the expected one)
    ratio = np.diag(ex.covariance) / np.diag(exp_.covariance)
    assert np.all((ratio > 0.3) & (ratio < 3.0)) and not np.allclose(ratio, 1.0, rtol=1e-3)


def _tacrolimus_patient(future: bool = False) -> Individual:
    rows = [{"TIME": 0.0, "EVID": 1, "AMT": 5.0, "CMT": 1, "II": 12.0, "ADDL": 20, "DV": np.nan, "MDV": 1}]
    rows += [{"TIME": t, "EVID": 0, "AMT": 0.0, "CMT": 2, "II": 0.0, "ADDL": 0, "DV": dv, "MDV": 0}
             for t, dv in ((59.5, 12.0), (107.5, 14.5))]
    if future:
        rows.append({"TIME": 131.5, "EVID": 2, "AMT": 0.0, "CMT": 2, "II": 0.0, "ADDL": 0, "DV": np.nan, "MDV": 1})
    cols: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    cols["ID"] = [1] * len(rows)
    for k, v in {"CYP3A5": 0, "AGE": 50, "ALB": 40, "BSA": 1.9, "SCR": 150, "HCT": 0.32, "LBW": 60}.items():
        cols[k] = [v] * len(rows)
    return split_individuals(cols)[0]


def test_posterior_sir_matches_a_long_mcmc_run() -> None:
    """SIR (2,000 draws) against an independent long random-walk Metropolis run on the same objective."""
    m = resolve_model("andrews2019_tac_adult_kidney")
    patient = _tacrolimus_patient()
    post = sample_posterior(m, patient, n_draws=2000, seed=1)
    assert post.method == "sir" and post.ess > 500
    # independent Metropolis: 64 chains x 4,000 steps after 1,000 burn-in
    g = build_groups(m, [patient])[0][0]
    w = np.zeros(1, np.int64)

    def logp(th: np.ndarray) -> np.ndarray:
        pts = th[None]
        return -0.5 * _ofv(g, w, pts, g.predict(pts, w))[0]

    rng = np.random.default_rng(5)
    cov = post.map.covariance
    assert cov is not None
    L = np.linalg.cholesky(cov * 2.38**2 / cov.shape[0])
    x = np.tile(post.draws[:64, g.estimated], (1, 1))
    lp = logp(x)
    kept = []
    for it in range(5000):
        prop = x + rng.standard_normal(x.shape) @ L.T
        lq = logp(prop)
        acc = np.log(rng.random(x.shape[0])) < lq - lp
        x[acc], lp[acc] = prop[acc], lq[acc]
        if it >= 1000 and it % 4 == 0:
            kept.append(x.copy())
    chain = np.concatenate(kept)
    sir = post.draws[:, g.estimated]
    se = chain.std(axis=0) / np.sqrt(2000 / 3) + chain.std(axis=0) / np.sqrt(chain.shape[0] / 10)
    assert np.all(np.abs(sir.mean(axis=0) - chain.mean(axis=0)) < 4 * se)
    np.testing.assert_allclose(sir.std(axis=0), chain.std(axis=0), rtol=0.12)
    # probability that the true trough 24 h after the last level lies in 10-15 ng/mL
    fut = _tacrolimus_patient(future=True)
    p_sir = post.probability_in_range(fut, 3, 10.0, 15.0)
    full = np.zeros((chain.shape[0], g.full_dim))
    full[:, g.estimated] = chain
    sub = full[:: max(1, chain.shape[0] // 4000)]
    pred = m.simulate(fut, sub[:, : len(m.eta_names)], kappas=sub[:, len(m.eta_names):][:, None, :]).prediction
    p_mcmc = float(np.mean((pred[:, 3] >= 10) & (pred[:, 3] <= 15)))
    assert abs(p_sir - p_mcmc) < 0.04


def test_posterior_falls_back_to_mcmc_and_says_so() -> None:
    m = load_model(M001)
    ind = _ind([(1.5, 91.2904), (4.4, 110.826)])
    post = sample_posterior(m, ind, n_draws=800, method="mcmc", seed=3)
    assert post.method == "mcmc" and post.ess > 50 and post.draws.shape == (800, 3)
    sir = sample_posterior(m, ind, n_draws=2000, seed=3)
    np.testing.assert_allclose(post.eta.mean(axis=0), sir.eta.mean(axis=0), atol=0.08)


def test_cli_fit(tmp_path: Path, shared: Path) -> None:
    src = shared / "validation" / "map-nonmem" / "data" / "data_to_fit001.csv"
    lines = src.read_text().splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= 30]
    keep.append("31,0,1,10000,1,0,0,1,.,1")
    keep.append("31,1.5,0,0,2,0,0,0,.,1")  # a NaN level
    data = tmp_path / "d.csv"
    data.write_text("\n".join(keep) + "\n")
    out, preds = tmp_path / "etas.csv", tmp_path / "pred.csv"
    r = CliRunner().invoke(app, ["fit", "-m", str(M001), "-d", str(data), "-o", str(out), "-p", str(preds)])
    assert r.exit_code == 0, r.output
    assert "31 individuals: 30 converged, 1 error" in r.output and "error: ID 31: row" in r.output
    rows = [ln.split(",") for ln in out.read_text().splitlines()]
    assert rows[0][:4] == ["ID", "ETA_CL", "ETA_VC", "ETA_KA"] and rows[0][-3:] == ["OFV", "STATUS", "MESSAGE"]
    assert rows[1][0] == "1" and rows[1][-2] == "converged"
    assert abs(float(rows[1][1]) - 0.405058386) < 1e-3  # NONMEM's ETA1 of ID 1
    p = [ln.split(",") for ln in preds.read_text().splitlines()]
    assert p[0][-2:] == ["IPRED", "PRED"] and len(p) == len(keep)
    r = CliRunner().invoke(app, ["fit", "-m", str(M001), "-d", str(data), "--eta-names", "positional"])
    assert r.stdout.splitlines()[0].startswith("ID,ETA1,ETA2,ETA3,SD_ETA1")


def _two_occasion_columns() -> dict[str, Any]:
    """The tacrolimus patient's records with its two troughs on two occasions (OCC 1, 1, 2)."""
    base = _tacrolimus_patient()
    cols: dict[str, Any] = {"ID": [1, 1, 1], "TIME": base.time, "EVID": base.evid, "AMT": base.amt, "CMT": base.cmt,
                            "II": base.ii, "ADDL": base.addl, "MDV": base.mdv, "OCC": [1, 1, 2]}
    cols.update(base.covariates)
    return cols


def test_iov_by_occasion() -> None:
    """Two troughs on two occasions: one between-occasion effect per occasion, estimated with the IIV."""
    m = resolve_model("andrews2019_tac_adult_kidney")
    cols = _two_occasion_columns()
    two_occ = split_individuals(cols)[0]
    r = fit_map(m, [two_occ])[0]
    assert r.status == "converged" and r.kappa is not None and r.kappa.shape == (2, 1)
    assert r.names[-2:] == ("KAPPA_CL_OCC1", "KAPPA_CL_OCC2")
    # the trough of occasion 2 is higher (14.5 vs 12 ng/mL): its clearance effect is lower
    assert r.kappa[1, 0] < r.kappa[0, 0]
    # objective at the estimate, recomputed by the public function
    assert objective(m, two_occ, r.eta, r.kappa) == pytest.approx(r.ofv, rel=1e-9)
    # posterior predictions on a new occasion draw its effect from the prior
    post = sample_posterior(m, two_occ, n_draws=500, seed=2, map_result=r)
    assert post.draws.shape == (500, 4 + 2)


def test_warm_start_reaches_the_same_optimum_in_fewer_iterations() -> None:
    """Starting at the estimate on the first trough (one occasion) the fit on both troughs (two occasions:
    the new occasion's effect starts at zero) finds the cold start's optimum; a start at the optimum itself
    needs no descent; a start of the wrong length is refused."""
    m = resolve_model("andrews2019_tac_adult_kidney")
    cols = _two_occasion_columns()
    two = split_individuals(cols)[0]
    one_cols = {**cols, "MDV": [1, 0, 1], "EVID": [1, 0, 2]}
    one = split_individuals(one_cols)[0]
    first = fit_map(m, [one])[0]
    assert first.status == "converged"
    cold = fit_map(m, [two])[0]
    warm = fit_map(m, [two], start=[first])[0]
    assert warm.status == "converged"
    np.testing.assert_allclose(warm.eta, cold.eta, atol=1e-4)
    np.testing.assert_allclose(warm.kappa, cold.kappa, atol=1e-4)
    assert warm.ofv == pytest.approx(cold.ofv, abs=1e-8)
    again = fit_map(m, [two], start=[cold], restarts=False)[0]
    assert again.iterations <= 2 < cold.iterations
    with pytest.raises(ValueError, match="start has 2 entries"):
        fit_map(m, [two], start=[cold, cold])
