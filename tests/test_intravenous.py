"""Intravenous tacrolimus: doses that enter the blood directly, a model that describes them (Antignac 2007), and
models that do not refuse them instead of absorbing them with oral bioavailability."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnidose.clinical import parse_record
from cnidose.errors import DataError, ModelFileError
from cnidose.models.fileformat import parse_model
from cnidose.models.library import choose_model, resolve_model
from cnidose.pk.events import split_individuals
from cnidose.records.analysis import analyse
from cnidose.records.exchange import record_to_nonmem

REPO = Path(__file__).resolve().parents[1]
ANTIGNAC = "antignac2007_tac_kidney_iv_oral"


def individual(doses: list[tuple[float, float, float, int]], obs: list[float], **covs: float):
    """(time, amt, rate, iv) doses and observation times, with constant covariates."""
    rows = [(t, 1, a, r, iv) for t, a, r, iv in doses] + [(t, 0, 0.0, 0.0, 0) for t in obs]
    rows.sort(key=lambda x: (x[0], x[1] == 1))
    n = len(rows)
    cols = {"ID": np.ones(n), "TIME": np.array([r[0] for r in rows]), "EVID": np.array([r[1] for r in rows], float),
            "AMT": np.array([r[2] for r in rows]), "RATE": np.array([r[3] for r in rows]),
            "IV": np.array([r[4] for r in rows], float), "MDV": np.array([r[1] for r in rows], float)}
    cols |= {k: np.full(n, v) for k, v in covs.items()}
    return split_individuals(cols)[0]


def typical(model, ind) -> np.ndarray:
    return model.simulate(ind).prediction[0][ind.evid == 0]


def test_an_intravenous_dose_enters_the_blood_and_an_oral_one_is_absorbed_with_f() -> None:
    """Closed forms of the one-compartment model: IV bolus D/V e^-kt; oral F D ka/(V (ka-k)) (e^-kt - e^-ka t);
    a 24-h infusion (R/CL)(1 - e^-kt); the model's values at POD 30, prednisone 20 mg/day."""
    m = resolve_model(ANTIGNAC)
    day = 31.0
    cl = 1.81 * (1 + day**2.54 / (day**2.54 + 3.81**2.54))
    v, ka, f = 98.4, 4.5, 0.137
    k = cl / v
    times = [1.0, 6.0, 12.0]
    iv = typical(m, individual([(0.0, 2.0, 0.0, 1)], times, POD=30, PRED=20))
    oral = typical(m, individual([(0.0, 2.0, 0.0, 0)], times, POD=30, PRED=20))
    inf = typical(m, individual([(0.0, 2.0, 2.0 / 24, 1)], times, POD=30, PRED=20))
    for j, t in enumerate(times):
        assert iv[j] == pytest.approx(2.0 / v * math.exp(-k * t) * 1000, rel=1e-9)
        assert oral[j] == pytest.approx(f * 2.0 * ka / (v * (ka - k)) * (math.exp(-k * t) - math.exp(-ka * t)) * 1000,
                                        rel=1e-9)
        assert inf[j] == pytest.approx(2.0 / 24 / cl * (1 - math.exp(-k * t)) * 1000, rel=1e-9)
    # the same dose orally gives F times the exposure: compare late, when absorption is over
    late = [200.0]
    r = (typical(m, individual([(0.0, 2.0, 0.0, 0)], late, POD=30, PRED=20))
         / typical(m, individual([(0.0, 2.0, 0.0, 1)], late, POD=30, PRED=20)))
    assert r[0] == pytest.approx(f * ka / (ka - k), rel=1e-9)


def test_an_oral_model_refuses_an_intravenous_dose_naming_the_row() -> None:
    """Andrews 2019 describes oral Prograf: an intravenous dose read as oral would be absorbed with its apparent
    clearance -- a wrong concentration, not a warning. So it is refused, naming the record and the column."""
    m = resolve_model("andrews2019_tac_adult_kidney")
    covs = {"WT": 70, "HT": 175, "AGE": 50, "SEX": 0, "CYP3A5": 0, "CYP3A4_22": 0, "HCT": 0.35, "POD": 5, "SCR": 100,
            "ALB": 40, "IMMUNOASSAY": 0}
    ind = individual([(0.0, 1.0, 1.0 / 24, 1), (24.0, 3.0, 0.0, 0)], [36.0], **covs)
    with pytest.raises(DataError, match=r"intravenous dose.*describes oral doses only") as e:
        m.simulate(ind)
    assert e.value.row == int(ind.rows[0]) and e.value.column == "IV"
    # IV = 0 everywhere is an ordinary oral course
    oral = individual([(24.0, 3.0, 0.0, 0)], [36.0], **covs)
    assert np.isfinite(m.simulate(oral).prediction).all()
    with pytest.raises(DataError, match=r"IV is 1 .* or 0, got 2"):
        resolve_model(ANTIGNAC).simulate(individual([(0.0, 1.0, 0.0, 2)], [6.0], POD=3, PRED=20))


def test_a_model_file_names_its_intravenous_compartment_with_its_route() -> None:
    text = (REPO / "src/cnidose/models/library" / f"{ANTIGNAC}.toml").read_text()
    with pytest.raises(ModelFileError, match=r"structure.iv_dose.*'BLOOD' is not one of DEPOT, CENTRAL"):
        parse_model(text.replace('iv_dose = "CENTRAL"', 'iv_dose = "BLOOD"').encode())
    with pytest.raises(ModelFileError, match="lists \"intravenous\" in route"):
        parse_model(text.replace('route = ["oral", "intravenous"]', 'route = ["oral"]').encode())


def test_intravenous_doses_choose_a_model_that_describes_them() -> None:
    prefer = {("tacrolimus", "kidney", "adult"): "andrews2019_tac_adult_kidney"}
    c = choose_model("tacrolimus", "kidney", "adult", "Prograf", intravenous=True, prefer=prefer)
    assert c.id == ANTIGNAC
    assert "intravenous doses" in c.explanation() and "andrews2019_tac_adult_kidney" in c.explanation()
    assert choose_model("tacrolimus", "kidney", "adult", "Prograf", prefer=prefer).id == "andrews2019_tac_adult_kidney"
    lung = choose_model("tacrolimus", "lung", "adult", "Prograf", intravenous=True)
    assert lung.id is None and "monchaud2012_tac_lung describe oral doses only" in lung.explanation()


def test_a_record_with_intravenous_doses_is_fitted_with_the_intravenous_model() -> None:
    """The demo kidney patient, given 1 mg/day as 24-h infusions on the first two days before oral Prograf: the
    export marks the infusions IV = 1, the analysis chooses Antignac 2007 and says why, and the fit runs."""
    doc = json.loads((REPO / "examples" / "kidney_transplant_patient.json").read_text())
    tx = dt.date.fromisoformat(doc["transplant"]["date"])
    doc["regimens"][0]["start"] = f"{tx + dt.timedelta(days=2)}T08:00:00Z"
    doc["administrations"] = [{"time": f"{tx + dt.timedelta(days=d)}T08:00:00Z", "dose": 1.0, "unit": "mg",
                               "product": "Prograf", "route": "intravenous", "infusion_h": 24.0} for d in (0, 1)]
    as_of = dt.date(2026, 11, 30)
    rec = parse_record(doc, as_of=as_of)
    export = record_to_nonmem(rec)
    iv = export.header.index("IV")
    marks = [(r[export.header.index("EVID")], r[iv]) for r in export.rows]
    assert marks[:2] == [(1, 1), (1, 1)] and all(v == 0 for e, v in marks[2:] if e == 1)
    out = analyse(rec, as_of, n_draws=200)
    assert out["model_choice"]["id"] == ANTIGNAC, out["model_choice"]
    assert out["model"].startswith(ANTIGNAC)
    assert "intravenous doses" in out["model_inputs"]["model"]["why"]
    assert "recommendation" in out, out["warnings"]


def test_the_cohort_fast_path_routes_intravenous_doses() -> None:
    """Regression (found 2026-12-07): a patient whose covariates are constant is fitted through superposition,
    which compiled the raw records, where an intravenous dose (IV = 1, no CMT) still went to the oral depot and
    was absorbed with oral F -- the MAP fit of a child on IV ciclosporin or an adult on IV tacrolimus with constant
    covariates was wrong. Both paths now read the prepared (routed) records: the same estimates as the engine."""
    from cnidose.estimation import fit_map

    m = resolve_model("antignac2007_tac_kidney_iv_oral")
    n = 6
    ind, = split_individuals({"ID": [1] * n, "TIME": [0, 12, 24, 36, 47.5, 71.5], "EVID": [1, 1, 1, 1, 0, 0],
                              "AMT": [5, 5, 5, 5, 0, 0], "IV": [1, 1, 0, 0, 0, 0], "RATE": [1.25, 1.25, 0, 0, 0, 0],
                              "DV": [0, 0, 0, 0, 16.0, 8.0], "MDV": [1, 1, 1, 1, 0, 0], "POD": [5] * n,
                              "PRED": [30] * n})
    fast = fit_map(m, [ind])[0]
    engine = fit_map(m, [ind], fast=False, derivatives="differences")[0]
    np.testing.assert_allclose(fast.ipred, engine.ipred, rtol=1e-6)
    np.testing.assert_allclose(fast.eta, engine.eta, atol=1e-4)
    typical = m.simulate(ind).prediction[0, [4, 5]]
    np.testing.assert_allclose(fast.pred, typical, rtol=1e-9)  # the typical prediction, IV doses infused into CENTRAL
