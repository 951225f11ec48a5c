"""MAP estimates against NONMEM on the 28 models of the mapbayr reference suite (../shared/validation/map-nonmem).

Every individual must agree with NONMEM (every ETA within 0.001) or beat it (cnidose's objective at its
estimate no higher than NONMEM's + 0.001); the objective at NONMEM's ETAs must reproduce NONMEM's to 1e-6
(relative to max(|OFV|, 1)); the expected-information covariance must match NONMEM's ETC within 1 % for at
least 99 % of individuals on models 001, 101, 401 and 405.

CI runs 25 individuals of each of the 4 sampling designs per model (fewer for the engine-path models);
``CNIDOSE_FULL_VALIDATION=1`` runs all 4,000 per model.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "validation" / "map-nonmem"))
import mapsuite

FULL = os.environ.get("CNIDOSE_FULL_VALIDATION") == "1"
pytestmark = pytest.mark.validation


def _per_design(model: str) -> int | None:
    return None if FULL else mapsuite.SLOW.get(model, 25)


@pytest.fixture(scope="module")
def runs(shared: Any) -> dict[str, Any]:
    return {}


def _run(runs: dict[str, Any], model: str) -> Any:
    if model not in runs:
        runs[model] = mapsuite.run(model, _per_design(model))
    return runs[model]


@pytest.mark.parametrize("model", mapsuite.MODELS)
def test_every_individual_agrees_with_or_beats_nonmem(runs: dict[str, Any], model: str) -> None:
    rep, res, _ = _run(runs, model)
    print(f"model {model}: {rep.n} individuals, {rep.agree / rep.n:.2%} agree, {rep.beat} beat NONMEM, "
          f"{len(rep.worse)} worse, {rep.seconds:.2f} s, {rep.statuses}")
    assert not rep.worse, rep.worse[:5]
    assert rep.ofv_repro <= 1e-6
    assert all(r.status in ("converged", "prior-only") for r in res)


@pytest.mark.parametrize("model", ["001", "101", "401", "405"])
def test_covariance_matches_nonmem_etc(runs: dict[str, Any], model: str) -> None:
    _, res, _ = _run(runs, model)
    n_eta = len(res[0].eta)
    ok = 0
    for r in res:
        nm = mapsuite.nonmem_etc(model, int(r.id), n_eta)
        ours = r.covariance
        assert ours is not None and r.covariance_method == "expected"
        scale = np.sqrt(np.outer(np.diag(nm), np.diag(nm)))
        if np.all(np.abs(ours - nm) <= 0.01 * scale):
            ok += 1
    assert ok / len(res) >= 0.99, f"{ok}/{len(res)} within 1 %"


# Individuals of the wide-prior models with a second basin that a narrower search missed while the wide search
# was made cheaper (issue 15: the hill-valley and first-step tests, the search restricted to directions with a
# wide effect, starts optimised to convergence): each was once worse than NONMEM by 0.5-17 objective units.
HARD = [("504", 1185), ("511", 3099), ("512", 605), ("513", 1185), ("513", 3253),
        # narrow priors (SD 0.45), time-varying covariates: the descent from the prior mode stopped in a basin 8.6
        # above NONMEM's (29.94 against 21.35); an objective that high above what the levels allow now calls for
        # restarts (estimation.map._doubtful)
        ("301", 2689)]


@pytest.mark.parametrize(("model", "ident"), HARD)
def test_multimodal_individuals_find_the_lower_basin(shared: Any, model: str, ident: int) -> None:
    from cnidose.estimation import fit_map

    m = mapsuite.load(model)
    ind = [i for i in mapsuite.individuals(model, None) if int(i.id) == ident]
    r = fit_map(m, ind)[0]
    assert r.status == "converged"
    assert r.ofv <= mapsuite.nonmem_ofv(model, ident) + 1e-3, (r.ofv, mapsuite.nonmem_ofv(model, ident), r.eta)
