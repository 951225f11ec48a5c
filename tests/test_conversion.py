"""Virtual conversion trials (cnidose.cohort.conversion): stable patients switched between formulations."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cnidose.cli import app
from cnidose.cohort.conversion import load_conversion, run_conversion
from cnidose.errors import InputError

REPO = Path(__file__).resolve().parents[1]
WOILLARD: dict[str, Any] = {
    "format": 1, "n": 3000, "seed": 5, "link": "same",
    "before": {"model": "woillard2011_tac_prograf_advagraf", "product": "Prograf", "covariates": {"PROGRAF": 1}},
    "after": {"model": "woillard2011_tac_prograf_advagraf", "product": "Advagraf", "covariates": {"PROGRAF": 0}},
    "target": {"low": 5.0, "high": 10.0},
    "covariates": {"HCT": {"normal": [0.38, 0.05], "range": [0.25, 0.5]},
                   "CYP3A5": {"categorical": {"0": 0.8, "1": 0.2}}},
}


def test_the_same_patient_on_the_same_product_is_unchanged() -> None:
    """Identity: one model, the same product and covariates on both sides, factor 1 -- every trough is the same,
    so every stable patient stays in range and the ratio is exactly 1."""
    p = copy.deepcopy(WOILLARD)
    p["after"] = dict(p["before"]) | {"factors": [1.0]}
    r = run_conversion(p)
    a = r.arms[0]
    assert a.in_range == 1.0 and a.below == 0.0 and a.above == 0.0
    assert a.ratio == pytest.approx((1.0, 1.0, 1.0), rel=1e-12)
    assert a.factor_source == "protocol"


def test_prograf_to_advagraf_one_to_one_with_one_model() -> None:
    """Woillard 2011 describes both products: the label's 1:1 (the product data's conversion, with its source),
    every random effect kept. Fractions add up to 1 and each lies in its Wilson interval."""
    r = run_conversion(WOILLARD)
    assert r.stable > 0.9 * r.n
    (a,) = r.arms
    assert a.factor == 1.0 and "Advagraf SmPC" in a.factor_source
    assert a.in_range + a.below + a.above == pytest.approx(1.0)
    for key, frac in (("in", a.in_range), ("below", a.below), ("above", a.above)):
        lo, hi = a.ci[key]
        assert lo <= frac <= hi
    assert a.median_daily_dose == pytest.approx(r.median_daily_dose_before, rel=0.25)


def test_envarsus_both_labels_and_the_clearance_link() -> None:
    """The example: US label 0.8 and EU SmPC 0.7, each with its source; converting at 70 % gives lower troughs
    than at 80 %; tying the two models by the clearance quantile narrows the spread of the trough ratio
    against drawing the new model's effects independently."""
    p = load_conversion(REPO / "examples" / "conversion_prograf_envarsus.toml")
    r = run_conversion(p, n=3000)
    by = {a.factor: a for a in r.arms}
    assert set(by) == {0.8, 0.7}
    assert "US Envarsus XR label" in by[0.8].factor_source and "EU Envarsus SmPC" in by[0.7].factor_source
    assert by[0.7].ratio[1] < by[0.8].ratio[1] and by[0.7].above < by[0.8].above
    ind = run_conversion(p | {"link": "independent"}, n=3000)
    spread = {x.link: x.arms[0].ratio[2] / x.arms[0].ratio[0] for x in (r, ind)}
    assert spread["clearance"] < spread["independent"]
    assert "martial2021_tac_envarsus_liver" in r.table() and "andrews2019_tac_adult_kidney" in r.table()


def test_a_bad_protocol_is_refused_naming_the_key() -> None:
    for change, key in (({"lnk": "same"}, r"\[lnk\]"), ({"link": "twins"}, r"\[link\]"),
                        ({"link": "same", "after": {"model": "andrews2019_tac_adult_kidney", "product": "Prograf"}},
                         r"\[link\]: link = \"same\" needs one model")):
        with pytest.raises(InputError, match=key):
            run_conversion(copy.deepcopy(WOILLARD) | change)
    p = copy.deepcopy(WOILLARD)
    p["after"]["factors"] = [0.0]
    with pytest.raises(InputError, match=r"after.factors"):
        run_conversion(p)
    p = copy.deepcopy(WOILLARD)
    p["before"]["covariates"] = {"PROGRAF": "yes"}
    with pytest.raises(InputError, match=r"\[before.covariates.PROGRAF\]: a number"):
        run_conversion(p)
    p = copy.deepcopy(WOILLARD)
    p["after"]["product"] = "Neoral"
    with pytest.raises(InputError, match="Neoral is cyclosporine"):
        run_conversion(p)


def test_the_command_prints_the_table_and_writes_the_csv(tmp_path: Path) -> None:
    out = tmp_path / "conv.csv"
    r = CliRunner().invoke(app, ["simulate-conversion", str(REPO / "examples" / "conversion_prograf_envarsus.toml"),
                                 "--n", "500", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "converted to Envarsus XR" in r.stdout and "link: clearance" in r.stdout
    rows = out.read_text().splitlines()
    assert rows[0].startswith("FACTOR,IN_RANGE") and len(rows) == 3
