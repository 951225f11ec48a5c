"""Which record's F, D and R a dose takes (issue 19): hand-computed expectations for each reading.

NONMEM (PREDPP, the default): F is "the value of the bioavailability parameter in effect at the time the dose
is actually introduced" (NONMEM help, "DOSE EVENT RECORD"); with PK called at event records only (CALLFL=-1,
the default) the value in effect inside (t[i-1], t[i]] is record i's. D is "computed by PK at the dose event
time (or lagged time, if the dose is lagged)" and fixed for the infusion; R "in effect for the later time"
applies to each advance and "may change during the course of the infusion". ALAG is the dose record's for the
dose and its additional doses. mrgsolve's reading ("dose-record") takes F, D, R from the dose's own record.

All cases use a one-compartment intravenous model (no absorption) so amounts are sums of F * AMT e^{-k dt}.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from cnidose.errors import DataError
from cnidose.models.fileformat import parse_model
from cnidose.pk import one_compartment, simulate, split_individuals

CL, V = 2.0, 20.0
K = CL / V
IV = one_compartment(oral=False)


def _amounts(recs: dict[str, list[float]], extra: dict[str, list[float]], dose_values: str = "nonmem") -> np.ndarray:
    ind, = split_individuals({"ID": [1] * len(recs["TIME"]), **recs})
    sim = simulate(IV, ind, {"CL": CL, "V": V, **{k: np.asarray(v, float) for k, v in extra.items()}},
                   return_amounts=True, dose_values=dose_values)  # type: ignore[arg-type]
    assert sim.amounts is not None
    return sim.amounts[0, :, 0]


def test_lag_longer_than_the_gap_to_the_next_record() -> None:
    """Dose at 0 (F 0.5), records at 1 (F 0.8) and 3 (F 0.3), lag 2: it enters at 2, inside (1, 3] -> F 0.3;
    neither the dose record's 0.5 nor the next record's 0.8."""
    recs = {"TIME": [0, 1, 3], "EVID": [1, 2, 0], "AMT": [100, 0, 0]}
    extra = {"F1": [0.5, 0.8, 0.3], "ALAG1": [2, 2, 2]}
    assert _amounts(recs, extra)[2] == pytest.approx(100 * 0.3 * math.exp(-K * 1), rel=1e-13)
    assert _amounts(recs, extra, "dose-record")[2] == pytest.approx(100 * 0.5 * math.exp(-K * 1), rel=1e-13)


def test_two_records_inside_the_lag() -> None:
    recs = {"TIME": [0, 1, 2, 6], "EVID": [1, 2, 2, 0], "AMT": [100, 0, 0, 0]}
    extra = {"F1": [0.9, 0.8, 0.6, 0.3], "ALAG1": [5, 0, 0, 0]}  # a later ALAG never moves the dose
    a = _amounts(recs, extra)
    assert a[1] == a[2] == 0.0
    assert a[3] == pytest.approx(100 * 0.3 * math.exp(-K * 1), rel=1e-13)


def test_a_lagged_dose_landing_on_a_record_takes_that_records_values() -> None:
    """The interval that ends at a record includes its time: entry at 2 == TIME of the record at 2."""
    recs = {"TIME": [0, 2, 4], "EVID": [1, 0, 0], "AMT": [100, 0, 0]}
    a = _amounts(recs, {"F1": [1.0, 0.7, 0.2], "ALAG1": [2, 2, 2]})
    assert a[1] == pytest.approx(70.0, rel=1e-14)  # reported after the dose entered
    assert a[2] == pytest.approx(70 * math.exp(-2 * K), rel=1e-13)


def test_additional_doses_take_the_record_ending_their_interval_and_keep_the_dose_records_lag() -> None:
    recs = {"TIME": [0, 10, 20, 30], "EVID": [1, 2, 2, 0], "AMT": [100, 0, 0, 0], "II": [12, 0, 0, 0],
            "ADDL": [2, 0, 0, 0]}
    extra = {"F1": [1.0, 0.5, 0.4, 0.9], "ALAG1": [1, 7, 7, 7]}  # entries at 1, 13, 25 (lag 1, not 7)
    expected = 100 * (0.5 * math.exp(-29 * K) + 0.4 * math.exp(-17 * K) + 0.9 * math.exp(-5 * K))
    assert _amounts(recs, extra)[3] == pytest.approx(expected, rel=1e-13)
    record = 100 * (math.exp(-29 * K) + math.exp(-17 * K) + math.exp(-5 * K))
    assert _amounts(recs, extra, "dose-record")[3] == pytest.approx(record, rel=1e-13)
    # unlagged additional doses follow the same rule: entries at 0 (F 1), 12 (F 0.4), 24 (F 0.9)
    extra0 = {**extra, "ALAG1": [0, 0, 0, 0]}
    expected0 = 100 * (1.0 * math.exp(-30 * K) + 0.4 * math.exp(-18 * K) + 0.9 * math.exp(-6 * K))
    assert _amounts(recs, extra0)[3] == pytest.approx(expected0, rel=1e-13)


def test_a_lagged_steady_state_dose() -> None:
    """SS=1 at 100 h, every 12 h, lag 1: the implied doses take the SS record's F (0.5; NONMEM help,
    "BIOAVAILABILITY FRACTION PARAMETER": F applies to all implied doses leading to the steady state); the
    record's own dose enters at 101, inside (100, 105], and takes 0.8."""
    recs = {"TIME": [100, 105], "EVID": [1, 0], "AMT": [100, 0], "II": [12, 0], "SS": [1, 0]}
    extra = {"F1": [0.5, 0.8], "ALAG1": [1, 1]}
    r = math.exp(-12 * K)
    implied = 50 * math.exp(-4 * K) * r / (1 - r)  # doses k >= 1 entered at 101 - 12k
    assert _amounts(recs, extra)[1] == pytest.approx(implied + 80 * math.exp(-4 * K), rel=1e-12)
    assert _amounts(recs, extra, "dose-record")[1] == pytest.approx(implied + 50 * math.exp(-4 * K), rel=1e-12)


def _infusion(a0: float, rate: float, dt: float) -> float:
    return a0 * math.exp(-K * dt) + rate / K * (1 - math.exp(-K * dt))


def test_a_lagged_infusion_takes_its_modelled_duration_when_it_starts() -> None:
    """RATE=-2, lag 1: D at the record ending (0, 3] is 4 h (not the dose record's 2 h): 25 mg/h from 1 to 5 h,
    fixed although D changes again at 4 h."""
    recs = {"TIME": [0, 3, 4, 8], "EVID": [1, 2, 0, 0], "AMT": [100, 0, 0, 0], "RATE": [-2, 0, 0, 0]}
    extra = {"D1": [2, 4, 1, 1], "ALAG1": [1, 1, 1, 1]}
    a = _amounts(recs, extra)
    a3 = _infusion(0, 25, 2)
    a5 = _infusion(a3, 25, 2)
    assert a[1] == pytest.approx(a3, rel=1e-13)
    assert a[3] == pytest.approx(a5 * math.exp(-3 * K), rel=1e-13)
    b = _amounts(recs, extra, "dose-record")  # 50 mg/h from 1 to 3 h
    assert b[3] == pytest.approx(_infusion(0, 50, 2) * math.exp(-5 * K), rel=1e-13)


def test_a_modelled_rate_follows_the_records_until_the_amount_is_in() -> None:
    """RATE=-1, 100 mg: R 10 over (0, 2], 20 over (2, 4], 5 over (4, 10], 40 after -> 20 + 40 + 30 mg by 10 h,
    the last 10 mg in 0.25 h; with the dose record's R (10) it is a 10-h infusion."""
    recs = {"TIME": [0, 2, 4, 10, 20], "EVID": [1, 2, 2, 0, 0], "AMT": [100, 0, 0, 0, 0],
            "RATE": [-1, 0, 0, 0, 0]}
    extra = {"R1": [10, 10, 20, 5, 40]}
    a = _amounts(recs, extra)
    a2 = _infusion(0, 10, 2)
    a4 = _infusion(a2, 20, 2)
    a10 = _infusion(a4, 5, 6)
    a1025 = _infusion(a10, 40, 0.25)
    np.testing.assert_allclose(a, [0, a2, a4, a10, a1025 * math.exp(-9.75 * K)], rtol=1e-12)
    b = _amounts(recs, extra, "dose-record")
    assert b[4] == pytest.approx(_infusion(0, 10, 10) * math.exp(-10 * K), rel=1e-12)


def test_an_invalid_value_is_named_at_the_record_that_supplies_it() -> None:
    recs = {"TIME": [0, 1, 3], "EVID": [1, 2, 0], "AMT": [100, 0, 0]}
    ind, = split_individuals({"ID": [1] * 3, **recs}, rows=[4, 5, 6])
    with pytest.raises(DataError, match=r"row 6, column F1: .*got -0.1 .*dose of row 4 enters"):
        simulate(IV, ind, {"CL": CL, "V": V, "F1": np.array([0.5, 0.8, -0.1]), "ALAG1": 2.0})
    # the dose-record reading never looks at row 6
    simulate(IV, ind, {"CL": CL, "V": V, "F1": np.array([0.5, 0.8, -0.1]), "ALAG1": 2.0}, dose_values="dose-record")


MODEL = """
format = 1
id = "test_lagged_f"
version = "1.0.0"
title = "Bioavailability on a time-varying covariate, with a lag (test model)"
drug = "tacrolimus"
confirmed = false

[units]
dose = "mg"
time = "h"
concentration = "mg/L"

[structure]
compartments = ["DEPOT", "CENTRAL"]
default_dose = "DEPOT"
default_obs = "CENTRAL"
flows = [
  { from = "DEPOT", to = "CENTRAL", rate = "KA" },
  { from = "CENTRAL", rate = "CL", per = "V" },
]

[parameters]
TVCL = { value = 3.0, unit = "L/h" }
TVV = { value = 40.0, unit = "L" }
TVKA = { value = 1.2, unit = "1/h" }
TLAG = { value = 0.98, unit = "h" }
PROP = { value = 0.1, unit = "1" }

[random_effects]
names = ["ETA_CL"]
cv_percent = [30.0]
cv_conversion = "sqrt"

[covariates.DOSEN]
unit = "1"
description = "number of doses given so far"

[pk]
CL = { expr = "TVCL * exp(ETA_CL)", unit = "L/h" }
V = { expr = "TVV", unit = "L" }
KA = { expr = "TVKA", unit = "1/h" }
ALAG1 = { expr = "TLAG", unit = "h" }
F1 = { expr = "0.4 + 0.1 * DOSEN", unit = "1" }

[observations.CP]
compartment = "CENTRAL"
scale = "V"
scale_unit = "L"
unit = "mg/L"
error = { model = "proportional", proportional = "PROP" }
"""


def test_nonmem_reading_equals_the_dose_record_reading_with_covariates_shifted_to_the_entry_record() -> None:
    """The issue's NONMEM-shaped case: F depends on a time-varying covariate, doses are lagged (0.98 h) and the
    covariate changes at a record inside the lag. NONMEM's answer is what the dose-record reading gives once
    each dose record carries the covariate of the record that ends its entry interval (how the issue's
    author reproduced NONMEM 7.4.4 on 1,000 individuals, to 6e-9 in the objective)."""
    model = parse_model(MODEL.encode())
    times = [0.0, 0.5, 4.0, 12.0, 12.5, 13.0, 20.0]
    evid = [1, 2, 0, 1, 2, 0, 0]
    dosen = [0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # the count rises on the record after each dose
    base = {"ID": [1] * 7, "TIME": times, "EVID": evid, "AMT": [5, 0, 0, 5, 0, 0, 0], "CMT": [1, 2, 2, 1, 2, 2, 2]}
    ind, = split_individuals({**base, "DOSEN": dosen})
    # the doses enter at 0.98 h, inside (0.5, 4] (the record at 4 h: DOSEN 1), and at 12.98 h, inside
    # (12.5, 13] (the record at 13 h: DOSEN 2)
    shifted = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    ind_shift, = split_individuals({**base, "DOSEN": shifted})
    etas = np.array([[0.2]])
    nm = model.simulate(ind, etas).prediction
    rec = replace(model, dose_values="dose-record").simulate(ind_shift, etas).prediction
    np.testing.assert_allclose(nm, rec, rtol=1e-13)
    plain = replace(model, dose_values="dose-record").simulate(ind, etas).prediction
    assert not np.allclose(nm[0, 2:], plain[0, 2:], rtol=1e-3)  # the two readings differ on this data
