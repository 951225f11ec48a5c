"""Forecasting strategies of the evaluation (issue 15, items 1 and 3): named specs, flattened priors, the
occasion effect carried forward, strategies side by side on the same forecasts, bootstrap intervals by patient.
The simulated cohorts that show each strategy recovering what it targets are in benchmarks/strategies.py (minutes
of CPU: not a unit test)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cnidose.dosing.evaluate import Strategy, _hide_after, evaluate, strategy, summarise
from cnidose.errors import InputError
from cnidose.estimation import fit_map
from cnidose.models.library import resolve_model
from cnidose.records.nonmem import read_nonmem_csv

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tacrolimus_patients.csv"


def test_strategy_specs() -> None:
    assert strategy("map") == Strategy("map", 1.0, "prior")
    assert strategy("flat:2.5") == Strategy("flat:2.5", 2.5, "prior")
    assert strategy(" occ-last + flat:4 ") == Strategy("occ-last + flat:4", 4.0, "last")
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
    assert out.read_text().splitlines()[0] == "MODEL,STRATEGY,ID,STEP,ROW,DV,PRED,PE"
    r = CliRunner().invoke(app, ["evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-s", "flat:0.5"])
    assert r.exit_code != 0 and "1 < L" in r.output
