"""NONMEM record semantics the reference suite does not exercise."""

from __future__ import annotations

import numpy as np
import pytest

from cnidose.errors import DataError
from cnidose.pk import one_compartment, simulate, simulate_many, split_individuals, two_compartment

P2 = {"CL": 3.0, "V1": 25.0, "Q": 4.0, "V2": 60.0, "KA": 0.9, "S2": 25.0}


def test_modelled_rate_equals_explicit_rate() -> None:
    obs = [0.5, 2, 5, 9, 30]
    base = {"ID": [1] * 6, "TIME": [0, *obs], "AMT": [100, 0, 0, 0, 0, 0], "CMT": [2] * 6}
    explicit, = split_individuals({**base, "RATE": [12.5, 0, 0, 0, 0, 0]})
    modelled, = split_individuals({**base, "RATE": [-1, 0, 0, 0, 0, 0]})
    duration, = split_individuals({**base, "RATE": [-2, 0, 0, 0, 0, 0]})
    a = simulate(two_compartment(), explicit, P2).prediction
    b = simulate(two_compartment(), modelled, {**P2, "R2": 12.5}).prediction
    c = simulate(two_compartment(), duration, {**P2, "D2": 8.0}).prediction
    np.testing.assert_allclose(b, a, rtol=1e-13)
    np.testing.assert_allclose(c, a, rtol=1e-13)


def test_evid2_predicts_without_dosing_and_carries_covariate_change() -> None:
    recs = {"ID": [1] * 4, "TIME": [0, 6, 6, 12], "EVID": [1, 2, 0, 0], "AMT": [100, 0, 0, 0],
            "CMT": [1, 2, 2, 2]}
    ind, = split_individuals(recs)
    cl = np.array([3.0, 3.0, 3.0, 6.0])  # CL doubles in (6, 12], announced on the record at 12
    sim = simulate(two_compartment(), ind, {**P2, "CL": cl})
    assert sim.prediction[0, 1] == sim.prediction[0, 2]
    ref = simulate(two_compartment(), ind, P2).prediction
    assert sim.prediction[0, 2] == ref[0, 2]
    assert sim.prediction[0, 3] < ref[0, 3]


def test_ss_bolus_with_lag_longer_than_interval() -> None:
    """Lag 30 h > II 12 h: doses given before the SS record still arrive after it."""
    s = two_compartment()
    p = {**P2, "ALAG1": 30.0}
    obs_t = [1200 + x for x in (0.0, 5, 13, 19, 31, 45)]
    explicit, = split_individuals({"ID": [1] * 7, "TIME": [0, *obs_t], "AMT": [10] + [0] * 6,
                                   "II": [12] + [0] * 6, "ADDL": [100] + [0] * 6, "CMT": [1] + [2] * 6})
    ss, = split_individuals({"ID": [1] * 7, "TIME": [1200, *obs_t], "AMT": [10] + [0] * 6,
                             "II": [12] + [0] * 6, "SS": [1] + [0] * 6, "CMT": [1] + [2] * 6})
    np.testing.assert_allclose(simulate(s, ss, p).prediction[0, 1:], simulate(s, explicit, p).prediction[0, 1:],
                               rtol=1e-9)


def test_ss2_adds_to_current_state() -> None:
    s = one_compartment()
    p = {"CL": 2.0, "V": 10.0, "KA": 1.0, "S2": 10.0}
    only_ss, = split_individuals({"ID": [1, 1], "TIME": [5, 5], "AMT": [50, 0], "II": [24, 0], "SS": [1, 0],
                                  "CMT": [1, 2]})
    first, = split_individuals({"ID": [1, 1, 1], "TIME": [0, 5, 5], "AMT": [20, 50, 0], "II": [0, 24, 0],
                                "SS": [0, 2, 0], "CMT": [1, 1, 2]})
    bolus, = split_individuals({"ID": [1, 1], "TIME": [0, 5], "AMT": [20, 0], "CMT": [1, 2]})
    a = simulate(s, only_ss, p).prediction[0, 1]
    b = simulate(s, first, p).prediction[0, 2]
    c = simulate(s, bolus, p).prediction[0, 1]
    np.testing.assert_allclose(b, a + c, rtol=1e-12)


def test_reset_cancels_pending_doses() -> None:
    s = one_compartment()
    p = {"CL": 2.0, "V": 10.0, "KA": 1.0}
    ind, = split_individuals({"ID": [1] * 4, "TIME": [0, 30, 31, 60], "EVID": [1, 3, 0, 0],
                              "AMT": [100, 0, 0, 0], "II": [12, 0, 0, 0], "ADDL": [5, 0, 0, 0]})
    sim = simulate(s, ind, p, return_amounts=True)
    assert sim.amounts is not None
    assert np.all(sim.amounts[0, 1:] == 0.0)


def test_invalid_dose_parameters_name_record_and_parameter() -> None:
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 1], "AMT": [100, 0]}, rows=[7, 8])
    with pytest.raises(DataError, match=r"row 7, column F1"):
        simulate(one_compartment(), ind, {"CL": 1.0, "V": 10.0, "KA": 1.0, "F1": -0.5})
    with pytest.raises(DataError, match=r"row 7, column ALAG1"):
        simulate(one_compartment(), ind, {"CL": 1.0, "V": 10.0, "KA": 1.0, "ALAG1": np.nan})
    with pytest.raises(DataError, match=r"column KA"):
        simulate(one_compartment(), ind, {"CL": 1.0, "V": 10.0})


def test_simulate_many_batches_shared_schedules() -> None:
    rec = {"ID": [1] * 4, "TIME": [0, 2, 12, 24], "AMT": [5, 0, 0, 0], "II": [12, 0, 0, 0],
           "ADDL": [1, 0, 0, 0], "CMT": [1, 2, 2, 2]}
    a, = split_individuals(rec)
    b, = split_individuals({**rec, "ID": [2] * 4})
    c, = split_individuals({**rec, "ID": [3] * 4, "AMT": [7, 0, 0, 0]})
    params = [{**P2, "CL": 2.0}, {**P2, "CL": 4.0}, {**P2, "CL": 3.0}]
    many = simulate_many(two_compartment(), [a, b, c], params)
    for ind, p, sim in zip([a, b, c], params, many, strict=True):
        np.testing.assert_allclose(sim.prediction, simulate(two_compartment(), ind, p).prediction, rtol=1e-13)


def test_unusable_parameters_name_record_and_parameter() -> None:
    ind, = split_individuals({"ID": [1, 1, 1], "TIME": [0, 1, 2], "AMT": [100, 0, 0]}, rows=[2, 3, 4])
    base = {"CL": 1.0, "V": 10.0, "KA": 1.0, "S2": 10.0}
    with pytest.raises(DataError, match=r"row 4, column CL: .*>= 0, got -1"):
        simulate(one_compartment(), ind, {**base, "CL": [1.0, 1.0, -1.0]})
    with pytest.raises(DataError, match=r"row 3, column KA: .*finite"):
        simulate(one_compartment(), ind, {**base, "KA": [1.0, np.nan, 1.0]})
    with pytest.raises(DataError, match=r"row 2, column S2: .*> 0.*batch member 2"):
        simulate(one_compartment(), ind, {**base, "S2": np.array([[10.0], [0.0]])})


def test_simulate_many_error_names_the_individual_at_fault() -> None:
    rec = {"ID": [1, 1], "TIME": [0, 1], "AMT": [5, 0]}
    a, = split_individuals(rec, rows=[2, 3])
    b, = split_individuals({**rec, "ID": [2, 2]}, rows=[4, 5])
    good = {"CL": 1.0, "V": 10.0, "KA": 1.0}
    with pytest.raises(DataError, match=r"row 4, column F1"):
        simulate_many(one_compartment(), [a, b], [good, {**good, "F1": -1.0}])


def test_split_individuals_owns_its_arrays_and_names_the_first_record_out_of_order() -> None:
    """The individuals' arrays are views of the split's own copies: changing the caller's columns afterwards, or one
    individual's arrays, changes no other individual. A record earlier than the one before it within its individual
    is refused, naming it; a new ID may start at an earlier time."""
    time = np.array([0.0, 1.0, 2.0, 0.0, 5.0])
    amt = np.array([10.0, 0.0, 0.0, 20.0, 0.0])
    a, b = split_individuals({"ID": [1, 1, 1, 2, 2], "TIME": time, "AMT": amt, "WT": np.full(5, 70.0)})
    time[:] = 99.0
    amt[:] = 0.0
    assert a.time.tolist() == [0.0, 1.0, 2.0] and b.time.tolist() == [0.0, 5.0] and b.amt[0] == 20.0
    a.covariates["WT"][:] = 1.0
    a.time[:] = -1.0
    assert b.covariates["WT"].tolist() == [70.0, 70.0] and b.time.tolist() == [0.0, 5.0]
    with pytest.raises(DataError) as err:
        split_individuals({"ID": [1, 1, 2, 2, 2], "TIME": [0.0, 1.0, 0.0, 3.0, 2.5]}, rows=[2, 3, 4, 5, 6])
    assert err.value.row == 6 and err.value.column == "TIME" and "for ID 2" in str(err.value)
