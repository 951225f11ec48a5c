"""Concentration-effect models of calcineurin inhibition (issue 18, item 2): each reproduces the statements of its
paper quoted in effects.toml, the effect is monotone and bounded, and the patient's analysis reports it from the
fitted and forecast curves."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from cnidose.errors import InputError
from cnidose.models.pd import effect_model, effect_models, effects_for


def test_every_model_reproduces_its_papers_statements() -> None:
    assert {m.drug for m in effect_models()} == {"tacrolimus", "cyclosporine"}
    for m in effect_models():
        assert m.checks, f"{m.id} has no reference check"
        assert m.failed_checks() == []
        assert float(m.fraction(m.ec50)) == pytest.approx(0.5, abs=1e-12)  # half the maximal effect at the EC50


def test_published_numbers() -> None:
    tac, csa = effect_model("fukudo2005_tac_calcineurin"), effect_model("fukudo2005_csa_calcineurin")
    assert (tac.ec50, tac.ec50_ci, csa.ec50, csa.ec50_ci) == (26.4, (15.7, 37.1), 200.0, (127.0, 274.0))
    nfat = effect_model("clinnephrol2017_tac_nfat")
    assert (nfat.ec50, nfat.hill) == (6.7, 1.5)
    # the paper's threshold (0.9 ng/mL) and ceiling (48 ng/mL) are the 5 % and 95 % effect concentrations
    assert nfat.concentration_at(0.05) == pytest.approx(0.9, abs=0.05)
    assert nfat.concentration_at(0.95) == pytest.approx(48.0, abs=0.5)


def test_effect_is_monotone_bounded_and_inverts() -> None:
    c = np.array([-1.0, 0.0, 0.5, 5.0, 50.0, 5000.0])
    for m in effect_models():
        e = m.fraction(c)
        assert e[0] == e[1] == 0.0 and np.all(np.diff(e[1:]) > 0) and np.all(e < 1.0)
        for f in (0.1, 0.5, 0.9):
            assert float(m.fraction(m.concentration_at(f))) == pytest.approx(f, rel=1e-12)
        with pytest.raises(ValueError):
            m.concentration_at(1.0)
    assert [m.id for m in effects_for("tacrolimus")] == ["fukudo2005_tac_calcineurin", "clinnephrol2017_tac_nfat"]
    assert effects_for("voclosporin") == []
    with pytest.raises(InputError, match="no concentration-effect model"):
        effect_model("nope")


def test_the_analysis_reports_the_effect_over_the_fitted_and_forecast_curves() -> None:
    from cnidose.records.db import make_engine, upgrade
    from cnidose.records.demo import seed_demo
    from cnidose.records.store import SYSTEM, Store
    from cnidose.web.services import analyse

    today = dt.date(2026, 11, 25)
    engine = make_engine("sqlite://")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store, today)
    r = analyse(store.chart(SYSTEM, ids["DEMO-TX-1"]), today, n_draws=200, seed=0)
    pd = r["pd"]
    assert "not validated for choosing a dose" in pd["note"]
    for m in pd["models"]:
        model = effect_model(m["id"])
        for part in ("fit", "current", "proposed"):
            s = m[part]
            assert s["trough"] == pytest.approx(float(model.fraction(s["c_trough"])), rel=2e-3)
            assert s["peak"] == pytest.approx(float(model.fraction(s["c_peak"])), rel=2e-3)
            assert s["trough"] <= s["mean"] <= s["peak"]
        # the proposed regimen (a lower dose here) inhibits less than the current one, by the same curve
        assert m["proposed"]["dose"] < m["current"]["dose"] and m["proposed"]["trough"] < m["current"]["trough"]
    series = r["pd_curve"]["series"]
    assert len(series) == len(pd["models"]) and len(series[0]["proposed"]) == len(r["forecast"]["hours"])
    engine.dispose()
