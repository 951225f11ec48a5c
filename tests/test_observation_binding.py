"""Binding a cohort's observations at once gives what binding each individual alone gives: the same arrays, bit for
bit, and for an individual a check refuses the same error naming its record and field."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cnidose.dosing.strategies import strategy
from cnidose.errors import CnidoseError
from cnidose.estimation.cohort import build_groups
from cnidose.estimation.observations import ObservationData, observation_data, observation_data_many
from cnidose.models import load_model, resolve_model
from cnidose.models.fileformat import parse_model
from cnidose.pk.events import Individual
from cnidose.records.nonmem import read_nonmem_csv

from .conftest import REPO

FIELDS = ("rec", "rows", "y", "blq", "limit", "log", "prop", "add", "sd_log", "if_zero")


def _with(ind: Individual, **columns: np.ndarray) -> Individual:
    return replace(ind, covariates={**ind.covariates, **columns})


def _cohort() -> list[Individual]:
    """The example patients, each with BLQ and LLOQ columns and levels of every kind: ordinary, BLQ (the limit in
    LLOQ), and individuals that checks refuse (a negative level, BLQ 2, a missing level, a BLQ level without a
    limit), or that have no level at all."""
    base = read_nonmem_csv(REPO / "examples" / "tacrolimus_patients.csv").individuals()
    rng = np.random.default_rng(7)
    out: list[Individual] = []
    for k in range(24):
        ind = base[k % len(base)]
        ind = replace(ind, id=float(k + 1))
        n = len(ind)
        obs = np.flatnonzero((ind.evid == 0) & (ind.mdv == 0))
        dv = ind.covariates["DV"].copy()
        dv[obs] = np.round(rng.uniform(2.0, 15.0, obs.size), 1)
        blq, lloq = np.zeros(n), np.full(n, np.nan)
        if k % 4 == 1 and obs.size:  # the first level BLQ, its limit in LLOQ
            blq[obs[0]], lloq[obs[0]] = 1.0, 1.5
        if k % 4 == 2 and obs.size:  # a BLQ level without a DV, its limit in LLOQ
            blq[obs[-1]], dv[obs[-1]], lloq[obs[-1]] = 1.0, np.nan, 0.8
        if k == 4:
            dv[obs[-1]] = -3.0
        if k == 8:
            blq[obs[0]] = 2.0
        if k == 12:
            dv[obs[0]] = np.nan
        if k == 16:
            blq[obs[0]], dv[obs[0]] = 1.0, np.nan  # and no LLOQ
        mdv = ind.mdv.copy()
        if k == 20:
            mdv[obs] = 1  # no level at all
        ind = replace(_with(ind, DV=dv, BLQ=blq, LLOQ=lloq, IMMUNOASSAY=np.full(n, float(k % 2))), mdv=mdv)
        out.append(ind)
    return out


def _same(a: ObservationData | CnidoseError, b: ObservationData | CnidoseError) -> None:
    if isinstance(b, CnidoseError):
        assert isinstance(a, CnidoseError) and str(a) == str(b)
        return
    assert isinstance(a, ObservationData)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f


@pytest.mark.parametrize("model_ref", ["andrews2019_tac_adult_kidney", "storset2014_tac_adult_kidney",
                                       "validation/map-nonmem/model407.toml", "validation/map-nonmem/model001.toml"])
@pytest.mark.parametrize("spec", ["map", "log", "forget:3"])
def test_cohort_binding_is_each_individuals(model_ref: str, spec: str) -> None:
    model = load_model(REPO / model_ref) if model_ref.endswith(".toml") else resolve_model(model_ref)
    model = strategy(spec).apply(model)
    preps = []
    for ind in _cohort():
        try:
            preps.append(model.prepare(ind))
        except CnidoseError:
            continue
    assert len(preps) >= 20
    many = observation_data_many(model, preps)
    alone: list[ObservationData | CnidoseError] = []
    for p in preps:
        try:
            alone.append(observation_data(model, p))
        except CnidoseError as exc:
            alone.append(exc)
    assert len(many) == len(alone)
    for a, b in zip(many, alone, strict=True):
        _same(a, b)
    refused = [str(b) for b in alone if isinstance(b, CnidoseError)]
    assert len(refused) >= 3 and all("row" in r for r in refused), refused  # each names its record


def test_an_individual_with_other_columns_is_bound_alone() -> None:
    model = resolve_model("andrews2019_tac_adult_kidney")
    cohort = _cohort()[:6]
    cohort[2] = replace(cohort[2], covariates={k: v for k, v in cohort[2].covariates.items() if k != "LLOQ"})
    preps = [model.prepare(i) for i in cohort]
    for a, p in zip(observation_data_many(model, preps), preps, strict=True):
        try:
            b: ObservationData | CnidoseError = observation_data(model, p)
        except CnidoseError as exc:
            b = exc
        _same(a, b)


def test_build_groups_records_each_refusal_and_fits_the_rest() -> None:
    model = resolve_model("andrews2019_tac_adult_kidney")
    groups, members = build_groups(model, _cohort(), compiled=False)
    errors = {int(m.individual.id): m.error for m in members if m.error}
    assert set(errors) == {5, 9, 13, 17}, errors
    assert "negative" in errors[5] and "BLQ must be 0 or 1" in errors[9] and "column DV" in errors[13]
    assert "column LLOQ" in errors[17]
    assert sum(g.size for g in groups) == len(members) - len(errors)


def test_an_error_model_reading_pk_values_is_evaluated_per_individual() -> None:
    """An error SD that reads a [pk] value (the typical individual's, at each level): 0.05 x VC / 70 with VC = 70
    is 0.05 at every level, bound at once or alone."""
    text = (REPO / "validation" / "map-nonmem" / "model001.toml").read_text()
    text = text.replace('proportional = "sqrt(0.05)"', 'proportional = "0.05 * VC / 70"')
    model = parse_model(text.encode())
    cohort = read_nonmem_csv(REPO / "examples" / "tacrolimus_patients.csv").individuals()
    preps = [model.prepare(i) for i in cohort]
    many = observation_data_many(model, preps)
    for a, p in zip(many, preps, strict=True):
        _same(a, observation_data(model, p))
        assert isinstance(a, ObservationData) and np.allclose(a.prop, 0.05, rtol=1e-12, atol=0.0)


def test_a_level_of_a_type_without_an_error_model_is_named() -> None:
    text = (REPO / "validation" / "map-nonmem" / "model001.toml").read_text()
    text = text.replace(', error = { model = "proportional", proportional = "sqrt(0.05)", prediction_if_zero = 1.0 }',
                        "").replace('error = { model = "proportional", proportional = "sqrt(0.05)", '
                                    'prediction_if_zero = 1.0 }\n', "")
    model = parse_model(text.encode())
    assert model.observations[0].error is None
    cohort = read_nonmem_csv(REPO / "examples" / "tacrolimus_patients.csv").individuals()
    for res in observation_data_many(model, [model.prepare(i) for i in cohort]):
        assert isinstance(res, CnidoseError)
        assert "has no error model" in str(res) and "column DV" in str(res) and "row" in str(res)
