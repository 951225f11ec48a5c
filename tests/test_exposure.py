"""Interactions in the PK model: the EXPOSURE column divides CL over the interval it covers (issue 6)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from cnidose.dosing import find_target, product, recommend
from cnidose.dosing.regimen import steady_state_metric_draws
from cnidose.errors import DataError, InputError
from cnidose.estimation import fit_map
from cnidose.models import resolve_model
from cnidose.models.exposure import with_exposure
from cnidose.models.model import EXPOSURE
from cnidose.pk.events import Individual, split_individuals

from .conftest import REPO

COVS = {"CYP3A5": 0, "AGE": 50, "ALB": 40, "BSA": 1.9, "SCR": 150, "HCT": 0.32, "LBW": 60, "WT": 78}
VORI = 3.0  # voriconazole: tacrolimus exposure x3 (the interaction data's factor, US Prograf label)


def _course(days: int = 20, dose: float = 4.0, levels: dict[float, float] | None = None) -> Individual:
    """BID doses for ``days`` days and a trough before every morning dose from day 2 (DV: ``levels`` or 0)."""
    rows = [(12.0 * k, 1, dose, 1, 0) for k in range(2 * days)]
    rows += [(24.0 * d - 0.01, 0, 0.0, 2, 1) for d in range(2, days + 1)]
    rows.sort()
    cols: dict[str, Any] = {"ID": [1] * len(rows), "TIME": [r[0] for r in rows], "EVID": [r[1] for r in rows],
                            "AMT": [r[2] for r in rows], "CMT": [r[3] for r in rows],
                            "DV": [(levels or {}).get(r[0], 0.0) if r[4] else np.nan for r in rows],
                            "MDV": [1 - r[4] for r in rows]}
    for k, v in COVS.items():
        cols[k] = [v] * len(rows)
    return split_individuals(cols)[0]


def _troughs(ind: Individual, pred: np.ndarray) -> dict[float, float]:  # type: ignore[type-arg]
    obs = (ind.evid == 0) & (ind.mdv == 0)
    return dict(zip(ind.time[obs].tolist(), pred[obs].tolist(), strict=True))


@pytest.fixture(scope="module")
def model() -> Any:
    return resolve_model("andrews2019_tac_adult_kidney")


def test_the_multiplier_divides_clearance_from_its_start_and_not_before(model: Any) -> None:
    base = _course()
    vori = with_exposure(base, [(250.0, None, VORI)])  # from day 10, 10:00 on (between two doses)
    assert 250.0 in vori.time and len(vori) == len(base) + 1  # a record of its own where it starts
    assert with_exposure(base, [(240.0, None, VORI)]).time.size == len(base)  # a dose is there already
    p0 = model.individual_parameters(base)["CL"][0]
    p1 = model.individual_parameters(vori)["CL"][0]
    t = vori.time
    assert np.allclose(p1[t <= 250.0], p0[0]) and np.allclose(p1[t > 250.0], p0[0] / VORI, rtol=1e-12)
    a = _troughs(base, model.simulate(base).prediction[0])
    b = _troughs(vori, model.simulate(vori).prediction[0])
    assert all(b[k] == a[k] for k in a if k < 250.0)  # nothing changes before the interaction starts
    assert all(b[k] > a[k] for k in a if k > 250.0)
    # at steady state the exposure (average level, AUC / tau) is three times higher: linear model, CL / 3
    eta = np.zeros((1, len(model.eta_names)))
    avg = [steady_state_metric_draws(model, {**COVS, **extra}, np.array([4.0]), 12.0, "average", eta)[0, 0]
           for extra in ({}, {EXPOSURE: VORI})]
    assert avg[1] / avg[0] == pytest.approx(VORI, rel=1e-3)  # 97-point Simpson rule on either curve


def test_a_stop_with_its_offset_ends_the_adjustment(model: Any) -> None:
    ind = with_exposure(_course(days=40), [(240.0, 480.0 + 72.0, VORI)])  # stopped day 20, offset 3 days
    cl = model.individual_parameters(ind)["CL"][0]
    t = ind.time
    assert np.allclose(cl[(t > 240.0) & (t <= 552.0)], cl[0] / VORI) and np.allclose(cl[t > 552.0], cl[0])
    pred = _troughs(ind, model.simulate(ind).prediction[0])
    base = _troughs(_course(days=40), model.simulate(_course(days=40)).prediction[0])
    ratio = [pred[k] / base[k] for k in sorted(base) if k > 552.0 + 24.0]
    assert all(a > b for a, b in itertools.pairwise(ratio))  # washing out...
    assert ratio[0] < 1.3 and 1.0 < ratio[-1] < 1.1  # ...fast at first, then slowly (the peripheral compartment)


def test_the_fit_sees_the_interaction_instead_of_bending_the_patient(model: Any) -> None:
    """Levels made by the typical patient with voriconazole from day 10: with the adjustment the MAP estimate
    stays near the typical patient; without it, the fit must invent a low clearance."""
    truth = with_exposure(_course(), [(240.0, None, VORI)])
    levels = _troughs(truth, model.simulate(truth).prediction[0])
    observed = _course(levels=levels)
    with_adj = fit_map(model, [with_exposure(observed, [(240.0, None, VORI)])])[0]
    without = fit_map(model, [observed])[0]
    names = list(model.eta_names)
    # (not exactly 0: with a proportional error the likelihood also weighs log f)
    assert with_adj.status == "converged" and np.max(np.abs(with_adj.eta)) < 0.1
    assert without.eta[names.index("ETA_CL")] < -0.3
    assert with_adj.ofv < without.ofv


def test_the_recommendation_assumes_the_interaction_goes_on_and_says_so(model: Any) -> None:
    truth = with_exposure(_course(), [(240.0, None, VORI)])
    levels = _troughs(truth, model.simulate(truth).prediction[0])
    t = find_target("tacrolimus", "kidney", "adult", 1.0, concomitant="mmf")
    plain = recommend(model, _course(levels=levels), t, product("Prograf"), interval=12.0, n_draws=300, seed=1)
    adj = recommend(model, with_exposure(_course(levels=levels), [(240.0, None, VORI)]), t, product("Prograf"),
                    interval=12.0, n_draws=300, seed=1)
    stopped = recommend(model, with_exposure(_course(levels=levels), [(240.0, 470.0, VORI)]), t,
                        product("Prograf"), interval=12.0, n_draws=300, seed=1)
    assert adj.chosen is not None and plain.chosen is not None and stopped.chosen is not None
    assert any("multiplies exposure by 3" in w for w in adj.warnings)
    assert not any("multiplies exposure" in w for w in stopped.warnings + plain.warnings)
    # once voriconazole is over, the patient's own (typical) clearance needs about three times the dose
    assert stopped.chosen.dose == pytest.approx(VORI * adj.chosen.dose, rel=0.35)


def test_bad_multipliers_and_intervals_are_refused(model: Any) -> None:
    ind = with_exposure(_course(), [(240.0, None, VORI)])
    cols: dict[str, Any] = {"ID": [1, 1], "TIME": [0.0, 12.0], "EVID": [1, 0], "AMT": [4.0, 0.0], "CMT": [1, 2],
                            "DV": [np.nan, 5.0], EXPOSURE: [1.0, 0.0], **{k: [v, v] for k, v in COVS.items()}}
    with pytest.raises(DataError, match=r"positive number.*") as e:
        model.simulate(split_individuals(cols)[0])
    assert e.value.row == 2 and e.value.column == EXPOSURE
    mm = resolve_model(str(REPO / "validation" / "map-nonmem" / "model201.toml"))  # Michaelis-Menten: no CL
    with pytest.raises(DataError, match="no clearance parameter CL"):
        mm.prepare(split_individuals({**cols, EXPOSURE: [1.0, 2.0]})[0])
    with pytest.raises(InputError, match="ends"):
        with_exposure(_course(), [(240.0, 100.0, VORI)])
    with pytest.raises(InputError, match="positive"):
        with_exposure(_course(), [(240.0, None, -1.0)])
    with pytest.raises(InputError, match="already has"):
        with_exposure(ind, [(10.0, None, 2.0)])
