"""Cohort scale: batch fitting and virtual trials, serial vs local processes vs a real Dask cluster."""

from __future__ import annotations

import copy
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnidose.cohort import batch_evaluate, batch_fit
from cnidose.cohort.executor import loopback_cluster
from cnidose.cohort.trial import load_protocol, run_trial, trial_svg
from cnidose.dosing.evaluate import evaluate
from cnidose.errors import InputError
from cnidose.models import load_model
from cnidose.models.library import resolve_model
from cnidose.records.nonmem import read_nonmem_csv

from .conftest import REPO

PROTOCOL = REPO / "examples" / "trial_cpic.toml"


def _same(a: list, b: list) -> bool:  # type: ignore[type-arg]
    return len(a) == len(b) and all(
        np.array_equal(x.eta, y.eta) and x.ofv == y.ofv and x.status == y.status
        and np.array_equal(x.covariance, y.covariance) for x, y in zip(a, b, strict=True))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """A real dask.distributed scheduler and two single-threaded workers, separate processes, on loopback."""
    pytest.importorskip("distributed", reason="install the dask extra: pip install -e '.[dev,dask]'")
    from distributed import Client

    with loopback_cluster(2) as addr:
        with Client(addr, timeout=30) as c:
            assert len(c.scheduler_info()["workers"]) == 2
        yield addr


def test_batch_fit_on_dask_equals_serial(shared: Path, dask_cluster: str) -> None:
    m = load_model(REPO / "validation" / "map-nonmem" / "model001.toml")
    inds = read_nonmem_csv(shared / "validation" / "map-nonmem" / "data" / "data_to_fit001.csv").individuals()[:2000]
    serial = batch_fit(m, inds, chunk_size=250)
    dask = batch_fit(m, inds, backend="dask", scheduler=dask_cluster, chunk_size=250)
    assert _same(serial, dask)
    assert [r.id for r in dask] == [float(i.id) for i in inds]


def test_batch_fit_on_processes_equals_serial(shared: Path) -> None:
    m = load_model(REPO / "validation" / "map-nonmem" / "model101.toml")
    inds = read_nonmem_csv(shared / "validation" / "map-nonmem" / "data" / "data_to_fit101.csv").individuals()[:300]
    assert _same(batch_fit(m, inds, chunk_size=100), batch_fit(m, inds, backend="processes", workers=2,
                                                               chunk_size=100))


def test_trial_same_seed_same_result_on_every_backend(dask_cluster: str) -> None:
    p = load_protocol(PROTOCOL)
    a = run_trial(p, n=3000, chunk_size=1000)
    b = run_trial(p, n=3000, chunk_size=1000, backend="dask", scheduler=dask_cluster)
    np.testing.assert_array_equal(a.attainment, b.attainment)
    np.testing.assert_array_equal(a.percentiles, b.percentiles)
    # weekly adjustment moves patients into range
    assert a.attainment[-1] > a.attainment[0] + 0.2
    assert a.n == 3000 and a.days == 28


def test_trial_bad_input(tmp_path: Path) -> None:
    p = load_protocol(PROTOCOL)
    with pytest.raises(InputError, match="must be a positive whole number, got 0"):
        run_trial(p, n=0)
    bad = copy.deepcopy(p)
    bad["regimen"]["titrate_daily"] = True
    with pytest.raises(InputError, match=r"\[regimen.titrate_daily\]: unknown rule"):
        run_trial(bad)
    other = copy.deepcopy(p)
    other["regimen"]["product"] = "Neoral"
    with pytest.raises(InputError, match="Neoral is cyclosporine"):
        run_trial(other, n=10)
    nomodel = copy.deepcopy(p)
    nomodel["model"] = "voclosporin_model_that_does_not_exist"
    with pytest.raises(InputError, match="not a library id"):
        run_trial(nomodel, n=10)
    for key, value, msg in (("method", "pid", r"\[adjust.method\]: unknown method 'pid'"),
                            ("draws", 500, r"\[adjust.draws\]: applies to method = \"recommender\" only"),
                            ("every_days", 0, r"\[adjust.every_days\]: must be a whole number >= 1")):
        wrong = copy.deepcopy(p)
        wrong["adjust"][key] = value
        with pytest.raises(InputError, match=msg):
            run_trial(wrong, n=10)
    with pytest.raises(InputError, match="positive whole number"):
        run_trial(p, n=-5)
    for section, key, value, msg in (("covariates", "AGE", {"normal": [55.0]}, r"\[covariates.AGE\]: normal"),
                                     ("covariates", "AGE", "old", r"\[covariates.AGE\]: give a number"),
                                     ("covariates", "CYP3A5", {"categorical": {"x": 1.0}},
                                      r"\[covariates.CYP3A5\]: categorical"),
                                     ("regimen", "start_mg_per_kg_day", "a lot",
                                      r"\[regimen.start_mg_per_kg_day\]: must be a positive number")):
        wrong = copy.deepcopy(p)
        wrong[section][key] = value
        with pytest.raises(InputError, match=msg):
            run_trial(wrong, n=10)
    rule = copy.deepcopy(p)
    rule["adjust"] = {"method": "recommender", "every_days": 7, "choice": "median"}
    with pytest.raises(InputError, match=r"\[adjust.choice\]: unknown choice rule 'median'"):
        run_trial(rule, n=10)
    fit_other = copy.deepcopy(p)
    fit_other["adjust"] = {"method": "recommender", "every_days": 7, "model": "press2010_csa_adult_kidney"}
    with pytest.raises(InputError, match=r"\[adjust.model\]: press2010_csa_adult_kidney is a cyclosporine model"):
        run_trial(fit_other, n=10)
    missing = copy.deepcopy(p)
    del missing["covariates"]["SCR"]
    with pytest.raises(InputError, match=r"no values for covariate.*SCR"):
        run_trial(missing, n=10)


def test_unreachable_scheduler_fails_fast() -> None:
    pytest.importorskip("distributed")
    p = load_protocol(PROTOCOL)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="does not answer"):
        run_trial(p, n=100, backend="dask", scheduler=f"tcp://127.0.0.1:{_free_port()}")
    assert time.perf_counter() - t0 < 15.0


def test_trial_with_the_recommender_on_dask_equals_serial(dask_cluster: str) -> None:
    p = load_protocol(PROTOCOL)
    p["adjust"] = {"every_days": 7, "method": "recommender", "draws": 100}
    p["days"] = 15
    a = run_trial(p, n=24, chunk_size=12)
    b = run_trial(p, n=24, chunk_size=12, backend="dask", scheduler=dask_cluster)
    np.testing.assert_array_equal(a.percentiles, b.percentiles)
    np.testing.assert_array_equal(a.mean_daily_dose, b.mean_daily_dose)
    assert a.failures == [] and a.days == 15
    # the recommender changed doses at day 7 and day 14, in strengths of Prograf (0.5 mg steps)
    q = copy.deepcopy(p)
    del q["adjust"]
    fixed = run_trial(q, n=24, chunk_size=12)
    assert not np.array_equal(a.mean_daily_dose[7:], fixed.mean_daily_dose[7:])
    np.testing.assert_array_equal(a.mean_daily_dose[:7], fixed.mean_daily_dose[:7])
    np.testing.assert_array_equal(a.percentiles[:, :7], fixed.percentiles[:, :7])


def test_trial_failing_patients_are_reported_not_fatal() -> None:
    """The recommender fits with a model that needs a covariate the protocol lacks: every patient's
    recommendation fails, each is reported with its day, and the doses are kept."""
    p = load_protocol(PROTOCOL)
    fit_model = next(m for m in ("benkali2010_tac_advagraf", "woillard2011_tac_prograf_advagraf")
                     if any(c not in p["covariates"] and cv.default is None and cv.derive is None and not cv.domain_only
                            for c, cv in resolve_model(m).covariates.items()))
    p["adjust"] = {"every_days": 7, "method": "recommender", "model": fit_model}
    p["days"] = 10
    r = run_trial(p, n=6, chunk_size=3)
    assert [(who, day) for who, day, _ in r.failures] == [(k, 7) for k in range(1, 7)]
    assert all("absent" in msg or "missing" in msg for _, _, msg in r.failures)
    q = copy.deepcopy(p)
    del q["adjust"]
    np.testing.assert_array_equal(r.mean_daily_dose, run_trial(q, n=6, chunk_size=3).mean_daily_dose)


def test_trial_bootstraps_a_covariate_table(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("WT,AGE,CYP3A5,ALB,BSA,SCR,HCT,LBW\n"
                     "60,40,0,40,1.7,100,0.30,48\n"
                     "95,65,1,35,2.1,180,0.36,66\n"
                     "80,55,0,.,.,120,0.33,58\n", encoding="utf-8")  # missing: default (ALB) or derived (BSA)
    doc = PROTOCOL.read_text(encoding="utf-8").split("[covariates]")[0]
    doc = doc.replace("days = 28\n", 'days = 28\ncovariate_table = "cohort.csv"\n')
    (tmp_path / "trial.toml").write_text(doc + "[covariates]\nHT = 175.0\n", encoding="utf-8")
    p = load_protocol(tmp_path / "trial.toml")
    r = run_trial(p, n=300, chunk_size=100)
    assert any("ALB" in m for m in r.notices) and any("BSA derived" in m for m in r.notices)
    # three distinct patients' start doses: 0.1 mg/kg/day (x1.5 for the expresser), in 0.5 mg steps per dose
    assert 0.1 * 60 <= r.mean_daily_dose[0] <= 0.15 * 95 + 1
    # an implausible value (haematocrit in percent) is rejected, naming the covariate
    table.write_text("WT,AGE,CYP3A5,ALB,BSA,SCR,HCT,LBW\n60,40,0,40,1.7,100,33,48\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"virtual patient 1, covariate HCT: .*33"):
        run_trial(p, n=10)
    table.write_text("WT,AGE\n60,forty\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"line 2, column AGE: 'forty' is not a number"):
        run_trial(p, n=10)


def test_trial_plot_is_svg() -> None:
    r = run_trial(load_protocol(PROTOCOL), n=500, chunk_size=500)
    root = ET.fromstring(trial_svg(r))
    assert root.tag.endswith("svg")
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and len(lines[0].get("points", "").split()) == r.days


def test_batch_evaluate_equals_serial_on_every_backend(dask_cluster: str) -> None:
    """Same chunks, same forecasts on every backend, bit for bit; and the same as the unchunked evaluation
    (to rounding: individuals fitted together share vectorised arithmetic)."""
    inds = read_nonmem_csv(REPO / "examples" / "tacrolimus_patients.csv").individuals()
    models = [resolve_model("andrews2019_tac_adult_kidney"), resolve_model("storset2014_tac_adult_kidney")]
    problems: list[str] = []
    whole = evaluate(models, inds, problems=problems)
    runs = []
    for backend, sched in (("serial", None), ("processes", None), ("dask", dask_cluster)):
        got: list[str] = []
        runs.append(batch_evaluate(models, inds, backend=backend, scheduler=sched,  # type: ignore[arg-type]
                                   chunk_size=1, problems=got))
        assert got == problems
    assert runs[0] == runs[1] == runs[2]
    assert [(f.model, f.id, f.step, f.row) for f in runs[0]] == [(f.model, f.id, f.step, f.row) for f in whole]
    np.testing.assert_allclose([f.predicted for f in runs[0]], [f.predicted for f in whole], rtol=1e-9)
    assert whole and {f.model for f in whole} == {m.id for m in models}


def test_cli_simulate_trial_and_evaluate_on_processes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cnidose.cli import app

    out, svg = tmp_path / "trial.csv", tmp_path / "trial.svg"
    r = CliRunner().invoke(app, ["simulate-trial", str(PROTOCOL), "--n", "2000", "--seed", "3", "--chunk-size", "500",
                                 "--out", str(out), "--plot", str(svg)])
    assert r.exit_code == 0, r.output
    rows = out.read_text().splitlines()
    assert rows[0] == "DAY,ATTAINMENT,P05,P50,P95,MEAN_DAILY_DOSE_MG" and len(rows) == 29
    assert "2000 virtual patients" in r.output and "note: CYP3A4_22 not in the data" in r.output
    assert ET.fromstring(svg.read_text()).tag.endswith("svg")
    r2 = CliRunner().invoke(app, ["simulate-trial", str(PROTOCOL), "--n", "2000", "--seed", "3", "--chunk-size",
                                  "500", "--backend", "processes", "--workers", "2"])
    assert r2.exit_code == 0 and r2.stdout.splitlines() == rows
    r = CliRunner().invoke(app, ["simulate-trial", str(PROTOCOL), "--n", "0"])
    assert r.exit_code == 2 and "positive whole number" in r.output
    patients = str(REPO / "examples" / "tacrolimus_patients.csv")
    a = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", patients, "--chunk-size", "1"])
    b = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", patients, "--chunk-size", "1",
                                 "--backend", "processes", "--workers", "2"])
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout and "5 forecasts" in b.output


def test_trial_troughs_are_proportional_to_the_dose_with_a_lagged_model() -> None:
    """Regression: the trial carries each dose's amount in F, and under NONMEM's rule a lagged dose took the F of
    the next record -- for the evening dose of Andrews 2019 (lag 0.38 h) the daily trough record, F = 1, so it
    gave 1 mg whatever the regimen. Same seed, twice the dose: every trough exactly twice (a linear model)."""
    import copy

    from cnidose.cohort.batch import model_payload
    from cnidose.cohort.trial import load_protocol, simulate_troughs
    from cnidose.models.library import resolve_model

    p = copy.deepcopy(load_protocol(REPO / "examples" / "trial_cpic.toml"))
    p.pop("adjust", None)
    m = resolve_model(p["model"])
    out = {}
    for dose in (5.0, 10.0):
        p["regimen"] = {"product": "Prograf", "interval": 12, "dose_mg": dose}
        out[dose], _, _, _ = simulate_troughs(model_payload(m), p, 50, 3)
    np.testing.assert_allclose(out[10.0], 2 * out[5.0], rtol=1e-12)


def test_trial_percentiles_are_numpys() -> None:
    """The trial's percentiles (one partial sort) are np.percentile's numbers, ties and tiny cohorts included."""
    from cnidose.cohort.trial import percentiles

    rng = np.random.default_rng(5)
    for shape in ((3, 1), (2, 2), (4, 7), (28, 1001), (5, 20_000)):
        x = np.round(rng.lognormal(size=shape), 1)  # ties
        np.testing.assert_array_equal(percentiles(x, (5.0, 50.0, 95.0)), np.percentile(x, [5, 50, 95], axis=1))


def test_trial_stretches_of_doses_equal_one_record_per_dose(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial gives each stretch between dose changes as one dose record with additional doses (ADDL), the
    amount in F. Expanded into one record per dose with the amount in AMT and simulated by the matrix
    exponential, every trough is the same: the compaction changes no dose (weekly proportional adjustment,
    so the amounts change at every stretch; Andrews 2019 has a lag)."""
    import cnidose.cohort.trial as trial
    from cnidose.cohort.batch import model_payload
    from cnidose.pk.engine import simulate
    from cnidose.pk.events import split_individuals

    p = copy.deepcopy(load_protocol(REPO / "examples" / "trial_cpic.toml"))
    assert p["adjust"]["method"] == "proportional" and int(p["adjust"]["every_days"]) == 7
    m = resolve_model(p["model"])
    seen: list[tuple[object, dict[str, np.ndarray], np.ndarray]] = []

    def spy(structure, ind, params, **kw):  # type: ignore[no-untyped-def]
        sim = simulate(structure, ind, params, **kw)
        seen.append((ind, dict(params), sim.prediction))
        return sim

    monkeypatch.setattr(trial, "simulate", spy)
    trial.simulate_troughs(model_payload(m), p, 20, 4)
    assert len(seen) == 4  # days 7, 14, 21 and the whole 28 days
    ind, params, pred = seen[-1]
    fkey = f"F{m.structure.default_dose}"
    F = np.broadcast_to(params[fkey], pred.shape)
    rows = {"TIME": [], "EVID": [], "AMT": [], "CMT": []}
    amounts = []
    for j in range(len(ind)):  # type: ignore[arg-type]
        if ind.evid[j] == 1:  # type: ignore[attr-defined]
            for k in range(int(ind.addl[j]) + 1):  # type: ignore[attr-defined]
                rows["TIME"].append(float(ind.time[j] + k * ind.ii[j]))  # type: ignore[attr-defined]
                rows["EVID"].append(1)
                rows["AMT"].append(1.0)
                rows["CMT"].append(m.structure.default_dose)
                amounts.append(F[:, j])
        else:
            rows["TIME"].append(float(ind.time[j]))  # type: ignore[attr-defined]
            rows["EVID"].append(0)
            rows["AMT"].append(0.0)
            rows["CMT"].append(m.structure.default_obs)
            amounts.append(np.ones(F.shape[0]))
    order = np.lexsort((np.array(rows["EVID"]), np.array(rows["TIME"])))
    cols = {k: np.asarray(v, float)[order] for k, v in rows.items()}
    cols["ID"] = np.ones(order.size)
    one, = split_individuals(cols)
    per_dose = {k: v for k, v in params.items() if k != fkey}
    per_dose[fkey] = np.stack(amounts, axis=1)[:, order] * np.broadcast_to(1.0, (F.shape[0], order.size))
    given = per_dose[fkey][:, cols["EVID"] == 1]
    assert max(len(np.unique(row)) for row in given) >= 3  # the amounts change from stretch to stretch
    ref = simulate(m.structure, one, per_dose, method="expm", dose_values="dose-record").prediction
    obs_new = ind.evid == 0  # type: ignore[attr-defined]
    np.testing.assert_allclose(pred[:, obs_new], ref[:, cols["EVID"] == 0], rtol=1e-10)
