"""Conformance of every library model file, and the acceptance statements of the library issue.

Each library file must load, carry its citation and population, use consistent units, give
positive finite clearances, volumes and rate constants across its stated domain (typical and
+-2 SD random effects), give a finite typical profile, pass its own reference checks, and its
typical steady-state trough from the engine must equal an independent matrix-exponential
calculation (written here from the flows, without the engine's solvers) to 1e-6.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from scipy.linalg import expm

from cnidose.models import Model, library_ids, resolve_model
from cnidose.models.checks import run_checks
from cnidose.models.covariates import STANDARD_COVARIATES
from cnidose.pk.events import split_individuals
from cnidose.pk.structure import LinearStructure

IDS = library_ids()
REQUIRED_MODELS = {
    "andrews2019_tac_adult_kidney", "storset2014_tac_adult_kidney", "andrews2017_tac_paed_kidney",
    "woillard2011_tac_prograf_advagraf", "benkali2010_tac_advagraf", "monchaud2012_tac_lung",
    "press2010_csa_adult_kidney", "fanta2007_csa_paed", "woillard2014_csa_hsct",
}


def test_library_has_the_models_the_issue_names() -> None:
    assert set(IDS) >= REQUIRED_MODELS


def _reference_covariates(model: Model) -> dict[str, float]:
    """Mid-domain values (data units) for every covariate the model's equations use."""
    out: dict[str, float] = {}
    for name, c in model.covariates.items():
        if c.domain_only:
            continue
        if c.levels:
            out[name] = float(min(c.levels))
        elif c.domain is not None:
            out[name] = 0.5 * (c.domain[0] + c.domain[1]) / c.factor
        elif c.default is not None:
            out[name] = c.default / c.factor
        else:
            lo, hi = STANDARD_COVARIATES[name].plausible
            out[name] = 0.5 * (lo + hi)
    return out


def _corners(model: Model) -> list[dict[str, float]]:
    """Every combination of domain ends and levels (at most a few hundred)."""
    axes: list[list[tuple[str, float]]] = []
    for name, c in model.covariates.items():
        if c.domain_only:
            continue
        if c.levels:
            axes.append([(name, float(k)) for k in c.levels])
        elif c.domain is not None:
            axes.append([(name, c.domain[0] / c.factor), (name, c.domain[1] / c.factor)])
    ref = _reference_covariates(model)
    out = []
    for combo in itertools.product(*axes) if axes else [()]:
        d = dict(ref)
        d.update(dict(combo))
        out.append(d)
    return out


@pytest.fixture(params=IDS)
def model(request: pytest.FixtureRequest) -> Model:
    return resolve_model(request.param)


def test_metadata_and_citation(model: Model) -> None:
    m, c = model.meta, model.citation
    assert m["drug"] in ("tacrolimus", "cyclosporine")
    assert m["formulations"] and m["route"] and m["population"] and m["organ"] and m["age_group"]
    assert m["matrix"] in ("whole blood", "plasma") and m["assay"]
    assert isinstance(m["confirmed"], bool) and m["confirmation"]
    assert c["authors"] and c["title"] and c["journal"] and c["year"] and c["doi"].startswith("10.")
    assert model.checks, "every library model carries reference checks"
    assert len(model.content_hash) == 64 and model.version


def test_units_are_consistent(model: Model) -> None:
    # the parser refuses inconsistent units; here: the conventions of the whole library
    assert dict(model.units) == {"dose": "mg", "time": "h", "concentration": "ng/mL"}
    for ob in model.observations:
        assert ob.unit == "ng/mL" and ob.scale_unit == "L" and ob.factor == pytest.approx(1000.0)
        assert ob.error is not None
    for p in model.parameters.values():
        assert p.unit and p.source


def test_positive_parameters_across_the_domain(model: Model) -> None:
    assert isinstance(model.structure, LinearStructure)
    rates = set(model.structure.rate_parameters)
    n_eta = len(model.iiv)
    sd = np.sqrt(np.diag(model.omega))
    etas = np.vstack([np.zeros(n_eta), 2 * sd, -2 * sd])
    for covs in _corners(model):
        ind = model.individual_from_covariates(covs, [1.0])
        params = model.individual_parameters(ind, etas)
        for name, v in params.items():
            assert np.all(np.isfinite(v)), (name, covs)
            if name in rates or name.startswith(("S", "F", "ALAG")):
                assert np.all(v > 0) if not name.startswith("ALAG") else np.all(v >= 0), (name, covs)


def test_typical_profile_is_finite(model: Model) -> None:
    """Five days of twice-daily doses (daily for once-daily formulations), typical individual."""
    covs = _reference_covariates(model)
    tau = 24.0 if model.meta.get("release") == "extended" and "PROGRAF" not in covs else 12.0
    dose = 5.0 if model.meta["drug"] == "tacrolimus" else 150.0
    times = np.linspace(0.25, 120.0, 480)
    n = 1 + len(times)
    cols: dict[str, Any] = {"ID": np.ones(n), "TIME": np.concatenate([[0.0], times]),
                            "AMT": np.r_[dose, np.zeros(len(times))], "II": np.r_[tau, np.zeros(len(times))],
                            "ADDL": np.r_[int(120 // tau) - 1, np.zeros(len(times))],
                            "CMT": np.r_[model.structure.default_dose,
                                         np.full(len(times), model.structure.default_obs)]}
    cols.update({k: np.full(n, v) for k, v in covs.items()})
    ind, = split_individuals(cols)
    pred = model.simulate(ind).prediction[0, 1:]
    assert np.all(np.isfinite(pred)) and np.all(pred >= 0) and pred.max() > 0


def test_reference_checks_pass(model: Model) -> None:
    results = run_checks(model)
    failed = [(r.name, r.expected, r.actual, r.error) for r in results if not r.passed]
    assert not failed


def _independent_trough(model: Model, covs: dict[str, float], dose: float, tau: float) -> float:
    """Steady-state trough from the flows by scipy's expm: x_pre = (I - E(tau))^-1 E(tau) F D e_dose."""
    ind = model.individual_from_covariates(covs, [tau])
    p = {k: float(v[0, 0]) for k, v in model.individual_parameters(ind).items()}
    s = model.structure
    assert isinstance(s, LinearStructure)
    n = len(s.compartments)
    K = np.zeros((n, n))
    for f in s.flows:
        k = p[f.rate] / (p[f.per] if f.per else 1.0)
        K[f.source - 1, f.source - 1] -= k
        if f.target is not None:
            K[f.target - 1, f.source - 1] += k
    d = s.default_dose
    lag = p.get(f"ALAG{d}", 0.0)
    bio = p.get(f"F{d}", 1.0)
    e = np.zeros(n)
    e[d - 1] = bio * dose
    E = expm(K * tau)
    if s.gamma is not None:  # doses arrive at a gamma-density rate: adaptive quadrature of the convolution
        x_tau = _gamma_steady_state(K, e, p[s.gamma.n] + 1, (p[s.gamma.n] + 1) / p[s.gamma.mtt], tau, lag)
    else:
        x_pre = np.linalg.solve(np.eye(n) - E, E @ e)  # state just before a (lagged) dose enters
        x_tau = expm(K * (tau - lag)) @ (x_pre + e)
    ob = model.observations[0]
    c = x_tau[ob.compartment - 1] / p[f"S{ob.compartment}"]
    if ob.transform is not None:
        env: dict[str, Any] = {n: q.value for n, q in model.parameters.items()}
        prep = model.prepare(ind)
        env.update({k: float(v[0]) for k, v in prep.covariates.items()})
        env.update(p)
        env["C"] = c
        c = float(ob.transform(env))
    return float(c)


def _gamma_steady_state(K: np.ndarray, e: np.ndarray, a: float, b: float, tau: float, lag: float) -> np.ndarray:
    """State just before a dose at steady state when each dose e enters at the gamma density g (shape a, rate b):
    sum over earlier doses of r(s) = int_0^s expm(K (s - u)) e g(u) du (scipy quad_vec), the doses whose input
    is over (after 200 h) summed as a geometric series."""
    from scipy.integrate import quad_vec
    from scipy.stats import gamma as gamma_dist

    end = 200.0
    g = gamma_dist(a, scale=1 / b).pdf

    def r(s: float) -> np.ndarray:
        v = quad_vec(lambda u: expm(K * (min(s, end) - u)) @ e * g(u), 0.0, min(s, end), epsabs=0, epsrel=1e-12)[0]
        return np.asarray(expm(K * max(s - end, 0.0)) @ v)

    k0 = int(np.ceil((end + lag) / tau)) + 1
    x = sum((r(k * tau - lag) for k in range(1, k0)), np.zeros(len(e)))
    return np.asarray(x + np.linalg.solve(np.eye(len(e)) - expm(K * tau), r(k0 * tau - lag)))


def test_steady_state_trough_matches_independent_expm(model: Model) -> None:
    from cnidose.models.checks import steady_state_metric

    covs = _reference_covariates(model)
    dose = 5.0 if model.meta["drug"] == "tacrolimus" else 200.0
    for tau in (12.0, 24.0):
        engine, _ = steady_state_metric(model, covs, dose, tau, "trough")
        independent = _independent_trough(model, covs, dose, tau)
        assert engine == pytest.approx(independent, rel=1e-6), (tau, engine, independent)


def test_domain_lies_within_plausible_values(model: Model) -> None:
    for name, c in model.covariates.items():
        std = STANDARD_COVARIATES.get(name)
        if std is None or c.domain is None:
            continue
        lo, hi = (x / c.factor for x in c.domain)
        assert std.plausible[0] <= lo <= hi <= std.plausible[1], name
