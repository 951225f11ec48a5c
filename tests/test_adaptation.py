"""Adapting a published model to a centre (`cnidose adapt`, issue 15 item 2): the population fit recovers a
known population, a shifted centre's clearance, a wider Omega; the written model file names its parent, data and
fit and loads; out-of-sample forecasts improve where the centre differs."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cnidose.cli import app
from cnidose.dosing.adaptation import ADAPTED_SUFFIX, adapted_model, cross_validate, paired_change
from cnidose.dosing.evaluate import evaluate
from cnidose.errors import CnidoseError, InputError, ModelFileError
from cnidose.estimation import fit_map
from cnidose.estimation.population import (
    adapt,
    conditional_moments,
    laplace_criterion,
    prior_covariance,
    residual_parameters,
    typical_values,
)
from cnidose.models.checks import run_checks
from cnidose.models.fileformat import parse_model, rewrite_model
from cnidose.models.library import resolve_model

ROOT = Path(__file__).resolve().parents[1]
ANDREWS = ROOT / "src/cnidose/models/library/andrews2019_tac_adult_kidney.toml"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("tdm_cohorts", ROOT / "benchmarks/tdm_cohorts.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TDM = _generator()


@pytest.fixture(scope="module")
def andrews() -> Any:
    return resolve_model("andrews2019_tac_adult_kidney")


def _write_csv(inds: list[Any], path: Path) -> None:
    cols = ["ID", "TIME", "EVID", "AMT", "II", "ADDL", "MDV", "DV", "OCC", *TDM.COVARIATES]
    lines = [",".join(cols)]
    for ind in inds:
        for r in range(len(ind)):
            vals = {"ID": ind.id, "TIME": ind.time[r], "EVID": ind.evid[r], "AMT": ind.amt[r], "II": ind.ii[r],
                    "ADDL": ind.addl[r], "MDV": ind.mdv[r], **{k: v[r] for k, v in ind.covariates.items()}}
            lines.append(",".join("." if not np.isfinite(float(vals[c])) else f"{float(vals[c]):g}" for c in cols))
    path.write_text("\n".join(lines) + "\n")


# -- which parameter is an effect's typical value ----------------------------------------------------------------
def test_typical_values_are_found_by_equivalence_on_the_data(andrews: Any) -> None:
    inds = TDM.cohort(andrews, 3, 1)
    found, missing = typical_values(andrews, inds)
    assert found == {"ETA_CL": "TVCL", "ETA_V1": "TVV1", "ETA_V2": "TVV2", "ETA_Q": "TVQ"} and not missing
    # an additive effect has no typical value; two parameters multiplying one effect alike are ambiguous
    text = ANDREWS.read_text().replace('Q = { expr = "TVQ * exp(ETA_Q)"', 'Q = { expr = "TVQ + 5 * ETA_Q"')
    text = text.replace('V2 = { expr = "TVV2 * exp(ETA_V2)"', 'V2 = { expr = "TVV2 * SCALE_V2 * exp(ETA_V2)"')
    text = text.replace('TVKA = {', 'SCALE_V2 = { value = 1.0, unit = "1" }\nTVKA = {')
    odd = parse_model(text.encode(), source="odd.toml")
    found, missing = typical_values(odd, TDM.cohort(odd, 3, 1))
    assert found == {"ETA_CL": "TVCL", "ETA_V1": "TVV1"}
    assert "no parameter multiplies" in missing["ETA_Q"] and "ambiguous" in missing["ETA_V2"]
    # a formulation factor (PROGRAF_KTR if PROGRAF == 1 else 1) is no typical value, even where every patient of
    # the data takes the one formulation
    from cnidose.records.nonmem import read_nonmem_csv

    woillard = resolve_model("woillard2011_tac_prograf_advagraf")
    found, missing = typical_values(woillard, read_nonmem_csv(ROOT / "examples/tacrolimus_patients.csv").individuals())
    assert found["ETA_KTR"] == "TVKTR" and found["ETA_V1"] == "TVV1" and not missing
    with pytest.raises(CnidoseError, match=r"ID 1: column CF"):
        typical_values(resolve_model("monchaud2012_tac_lung"),
                       read_nonmem_csv(ROOT / "examples/tacrolimus_patients.csv").individuals())


def test_laplace_criterion_counts_the_occasion_effects(andrews: Any) -> None:
    ind = TDM.cohort(andrews, 1, 2)[0]
    r = fit_map(andrews, [ind])[0]
    assert any("_OCC" in n for n in r.names)
    prior = prior_covariance(andrews, r.names)
    k = r.names.index("KAPPA_CL_OCC2")
    assert prior[k, k] == pytest.approx(andrews.iov.omega[0, 0]) and np.count_nonzero(prior[k]) == 1
    _, logdet_prior = np.linalg.slogdet(prior)
    _, logdet_post = np.linalg.slogdet(r.covariance)
    assert laplace_criterion(andrews, r) == pytest.approx(r.ofv + logdet_prior - logdet_post + 2 * r.log_levels)
    # importance sampling agrees with Laplace on a well-informed patient to within a fraction of a unit
    mo = conditional_moments(andrews, [ind], [r], n_draws=2000)[0]
    assert mo is not None and mo.sampled and mo.ess > 100
    assert abs(mo.minus2ll - (laplace_criterion(andrews, r) - 2 * r.log_levels)) < 1.5
    with pytest.raises(ValueError, match="not a random effect"):
        prior_covariance(andrews, ("KAPPA_V1_OCC1",))


# -- the population fit ------------------------------------------------------------------------------------------
def test_adapt_reproduces_a_known_population(andrews: Any) -> None:
    """Data simulated from the published model: every typical value within 2 standard errors of the truth."""
    inds = TDM.cohort(andrews, 30, 3)
    a = adapt(andrews, inds)
    assert a.converged and a.n_subjects == 30 and a.n_observations == 240 and not a.excluded
    for v in a.values:
        z = np.log(v.estimate / v.published) / v.se_log
        assert abs(z) < 2.0, (v, z)
        assert 0.05 < v.se_log < 0.35
    assert a.objective <= a.objective_published + 0.5


def test_adapt_recovers_a_centre_with_lower_clearance_and_forecasts_better_out_of_sample(andrews: Any) -> None:
    """A centre whose patients clear 30 % less: the adapted CL is the centre's (within 2 SE), the published one
    lies outside the interval, and on *new* patients of that centre the a-priori forecasts improve."""
    centre = TDM.cohort(andrews, 30, 5, cl_scale=0.7)
    a = adapt(andrews, centre)
    cl = next(v for v in a.values if v.parameter == "TVCL")
    assert abs(np.log(cl.estimate / (0.7 * 23.0))) < 2 * cl.se_log
    assert np.log(23.0 / cl.estimate) > 2 * cl.se_log
    assert a.objective < a.objective_published - 5
    new = TDM.cohort(andrews, 25, 99, cl_scale=0.7)
    fc = evaluate([andrews, adapted_model(andrews, a)], new, max_step=2)
    prior, bayes = paired_change(fc, andrews.id, andrews.id + ADAPTED_SUFFIX, bootstrap=500)
    # the Bayesian forecasts (fitted on 1-2 levels) improve, with the interval below zero
    assert bayes.kind == "Bayesian" and bayes.n == 50 and bayes.high < 0, bayes
    # a priori, the bias shrinks (|PE| itself is asymmetric: an over-prediction costs more than an equal under-)
    names = (andrews.id, andrews.id + ADAPTED_SUFFIX)
    bias = {m: float(np.median([f.error for f in fc if f.model == m and f.step == 0])) for m in names}
    assert prior.n == 25 and abs(bias[andrews.id + ADAPTED_SUFFIX]) < abs(bias[andrews.id]), bias


def test_adapt_omega_widens_towards_a_more_heterogeneous_centre(andrews: Any) -> None:
    inds = TDM.cohort(andrews, 30, 7, omega_scale=4.0)
    a = adapt(andrews, inds, omega=True, omega_df=5.0, max_iter=8)  # 17 iterations to converge: 0.484
    k = list(a.effects).index("ETA_CL")
    assert a.omega_adapted and a.omega[k, k] > 2.0 * a.omega_published[k, k]
    assert abs(np.log(a.omega[k, k] / (4 * a.omega_published[k, k]))) < np.log(2.0)
    assert not a.converged and "not converged in 8 iterations" in a.warnings[0]


def test_adapt_residual_error_recovers_the_simulated_one(andrews: Any) -> None:
    """Levels simulated with the model's own residual error (proportional 0.245): the adapted SD is within 2 SE."""
    a = adapt(andrews, TDM.cohort(andrews, 30, 3, residual="model"), residual=True)
    prop = next(v for v in a.values if v.parameter == "PROP_MS")
    assert a.converged and prop.effect == "residual" and abs(np.log(prop.estimate / 0.245)) < 2 * prop.se_log
    ia = next(v for v in a.values if v.parameter == "PROP_IA")
    assert ia.ratio == pytest.approx(prop.ratio)  # one factor on every SD
    # few levels, an occasion effect for each: the prior keeps the residual SD from collapsing
    few = adapt(andrews, TDM.cohort(andrews, 2, 3, residual="model"), residual=True, max_iter=10)
    assert next(v for v in few.values if v.parameter == "PROP_MS").ratio > 0.5


def test_adapt_refuses_what_it_cannot_do(andrews: Any) -> None:
    inds = TDM.cohort(andrews, 2, 1)
    with pytest.raises(ValueError, match="prior_sd"):
        adapt(andrews, inds, prior_sd=0.0)
    text = ANDREWS.read_text().replace('names = ["ETA_CL", "ETA_V1", "ETA_V2", "ETA_Q"]\ncv_percent = [38.6, 49.2, '
                                       '53.0, 78.7]', 'names = ["ETA_CL", "ETA_V1", "ETA_V2", "ETA_Q"]\n'
                                       'cv_percent = [0, 0, 0, 0]')
    flat = parse_model(text.encode(), source="flat.toml")
    with pytest.raises(CnidoseError, match="no between-subject"):
        adapt(flat, inds)
    with pytest.raises(InputError, match="folds"):
        cross_validate(andrews, inds, folds=3)
    literal = ANDREWS.read_text().replace('proportional = "PROP_IA if IMMUNOASSAY == 1 else PROP_MS"',
                                          'proportional = "0.2"')
    with pytest.raises(CnidoseError, match="written without parameters"):
        residual_parameters(parse_model(literal.encode(), source="literal.toml"))


# -- the model file ----------------------------------------------------------------------------------------------
def test_rewrite_model_names_parent_data_and_fit_and_keeps_the_rest() -> None:
    text = ANDREWS.read_text()
    record = {"parent": "andrews2019_tac_adult_kidney 1.0.0", "data": "centre.csv", "subjects": 30,
              "estimates": [{"parameter": "TVCL", "published": 23.0, "estimate": 16.5}]}
    new = rewrite_model(text, id="andrews_centre", version="1.0.0+centre", title="Andrews, centre",
                        values={"TVCL": 16.5}, variances=[0.2, 0.25, 0.3, 0.5], adaptation=record,
                        value_source={"TVCL": "adapted to centre.csv (published 23, Table 2)"})
    m = parse_model(new.encode(), source="new.toml")
    assert (m.id, m.version, m.parameters["TVCL"].value) == ("andrews_centre", "1.0.0+centre", 16.5)
    assert m.parameters["TVCL"].source.startswith("adapted to centre.csv")
    assert m.parameters["TVV1"].value == 692.0 and np.allclose(np.diag(m.omega), [0.2, 0.25, 0.3, 0.5])
    assert m.meta["confirmed"] is False and m.meta["adaptation"]["data"] == "centre.csv"
    assert tomllib.loads(new)["adaptation"]["estimates"][0]["estimate"] == 16.5
    # the comments stay; the checks of published values go; the covariate-effect (ratio) checks stay and pass
    assert text.splitlines()[0] in new
    assert {c.kind for c in m.checks} == {"ratio"} and len(m.checks) == 4
    assert all(r.passed for r in run_checks(m))
    with pytest.raises(ModelFileError, match="cannot rewrite"):
        rewrite_model(text, id="x", version="1", title="x", values={"NOT_THERE": 1.0}, variances=None,
                      adaptation=record)
    multi = text.replace("cv_percent = [38.6, 49.2, 53.0, 78.7]", "cv_percent = [\n  38.6, 49.2,\n  53.0, 78.7]")
    with pytest.raises(ModelFileError, match="cannot rewrite this model file's layout"):
        rewrite_model(multi, id="x", version="1", title="x", values={}, variances=[0.1, 0.2, 0.3, 0.4],
                      adaptation=record)
    # a parameter written as its own table is edited too
    table = text.replace('TVQ = { value = 11.6, unit = "L/h", description = "Q/F", source = "Table 2" }\n', '')
    table = table.replace("[random_effects]\n", '[parameters.TVQ]\nvalue = 11.6\nunit = "L/h"\nsource = "Table 2"\n\n'
                          "[random_effects]\n", 1)
    m2 = parse_model(rewrite_model(table, id="y", version="1", title="y", values={"TVQ": 9.5}, variances=None,
                                   adaptation=record).encode())
    assert m2.parameters["TVQ"].value == 9.5 and m2.parameters["TVCL"].value == 23.0


def test_cli_adapt_writes_a_model_that_fit_and_models_show_read(tmp_path: Path, andrews: Any) -> None:
    data = tmp_path / "centre.csv"
    _write_csv(TDM.cohort(andrews, 8, 5, cl_scale=0.7), data)
    out = tmp_path / "adapted.toml"
    runner = CliRunner()
    res = runner.invoke(app, ["adapt", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-o", str(out),
                              "--cv", "2", "--max-step", "1", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["subjects"] == 8 and record["validation"]["folds"] == 2
    assert {p["forecasts"] for p in record["validation"]["paired"]} == {"a priori", "Bayesian"}
    assert "only 8 patients" in " ".join(record["warnings"])
    m = resolve_model(str(out))
    assert m.id == "andrews2019_tac_adult_kidney_centre" and m.meta["adaptation"]["data_sha256"]
    shown = runner.invoke(app, ["models", "show", str(out)])
    assert shown.exit_code == 0 and "adapted from andrews2019_tac_adult_kidney" in shown.stdout
    fitted = runner.invoke(app, ["fit", "-m", str(out), "-d", str(data)])
    assert fitted.exit_code == 0 and "8 converged" in fitted.output
    # an existing file is not overwritten without --force; bad options are refused before any work
    again = runner.invoke(app, ["adapt", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-o", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    bad = runner.invoke(app, ["adapt", "-m", "andrews2019_tac_adult_kidney", "-d", str(data), "-o",
                              str(tmp_path / "b.toml"), "--prior-sd", "0"])
    assert bad.exit_code == 2 and "--prior-sd" in bad.output and not (tmp_path / "b.toml").exists()
    for args, said in ((["-d", str(tmp_path / "none.csv"), "-o", str(tmp_path / "c.toml")], "no such file"),
                       (["-d", str(data), "-o", str(tmp_path / "no" / "c.toml")], "does not exist")):
        res = runner.invoke(app, ["adapt", "-m", "andrews2019_tac_adult_kidney", *args])
        assert res.exit_code == 2 and said in res.output, res.output


def test_a_centres_models_join_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CNIDOSE_MODELS names the centre's model directory: its models are listed, checked and resolved by id
    like the shipped ones; a centre file with a shipped model's id is refused."""
    from cnidose.models.library import library_ids, library_models

    text = rewrite_model(ANDREWS.read_text(), id="ours", version="1+c", title="Ours", values={"TVCL": 17.0},
                         variances=None, adaptation={"parent": "andrews2019_tac_adult_kidney 1.0.0"})
    (tmp_path / "ours.toml").write_text(text)
    monkeypatch.setenv("CNIDOSE_MODELS", str(tmp_path))
    assert "ours" in library_ids() and "andrews2019_tac_adult_kidney" in library_ids()
    assert resolve_model("ours").parameters["TVCL"].value == 17.0
    assert any(m.id == "ours" for m in library_models())
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0 and any(r["id"] == "ours" for r in json.loads(listed.stdout))
    checked = runner.invoke(app, ["models", "check", "ours"])
    assert checked.exit_code == 0 and checked.stdout.count("PASS  ours") == 4 and "FAIL" not in checked.stdout
    (tmp_path / "andrews2019_tac_adult_kidney.toml").write_text(text)
    with pytest.raises(ModelFileError, match="id of a shipped model"):
        library_ids()
    monkeypatch.setenv("CNIDOSE_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelFileError, match="not a directory"):
        resolve_model("ours")


def test_model_choice_by_drug_organ_age_and_formulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_model: the formulation must be one the model describes (never an immediate-release model for a
    prolonged-release product), organ and age group must match, and among equals a centre's adaptation wins,
    then the curated default, then a model checked against its publication; every step is said."""
    from cnidose.models.library import choose_model

    prefer = {("tacrolimus", "kidney", "adult"): "andrews2019_tac_adult_kidney"}
    c = choose_model("tacrolimus", "kidney", "adult", "Prograf", prefer=prefer)
    assert c.id == "andrews2019_tac_adult_kidney" and "is the default" in c.explanation()
    assert any(a.startswith("storset2014_tac_adult_kidney (not the default)") for a in c.alternatives)
    without = choose_model("tacrolimus", "kidney", "adult", "Prograf")
    assert without.id in ("andrews2019_tac_adult_kidney", "storset2014_tac_adult_kidney")  # both confirmed
    assert "checked against its primary publication" in without.explanation()
    adv = choose_model("tacrolimus", "kidney", "adult", "Advagraf", prefer=prefer)
    assert adv.id in ("benkali2010_tac_advagraf", "woillard2011_tac_prograf_advagraf")
    assert "andrews2019" not in " ".join(adv.alternatives)  # a Prograf-only model is not a candidate
    env = choose_model("tacrolimus", "kidney", "adult", "Envarsus XR", prefer=prefer)
    assert env.id is None and "describes Envarsus XR" in env.explanation()
    assert choose_model("tacrolimus", "lung", "adult", "Prograf").id == "monchaud2012_tac_lung"
    liver = choose_model("tacrolimus", "liver", "adult", "Prograf")
    assert liver.id == "ji2018_tac_liver_ldlt"
    assert choose_model("tacrolimus", "liver", "adult", "Envarsus XR").id == "martial2021_tac_envarsus_liver"
    heart = choose_model("tacrolimus", "heart", "adult", "Prograf")
    assert heart.id == "kirubakaran2023_tac_adult_heart"
    assert "is the only one (not yet checked against" in heart.explanation()
    paed_heart = choose_model("tacrolimus", "heart", "paediatric", "Prograf")
    assert paed_heart.id is None and "no library model is for tacrolimus, heart, paediatric" in \
        paed_heart.explanation()
    assert choose_model("tacrolimus", "kidney", "paediatric", None).id == "andrews2017_tac_paed_kidney"
    assert choose_model("voclosporin", "lupus", "adult", "Lupkynis").id is None
    # a centre's adaptation of a qualifying model comes first, and says so
    text = rewrite_model(ANDREWS.read_text(), id="centre_andrews", version="1+c", title="Ours",
                         values={"TVCL": 17.0}, variances=None,
                         adaptation={"parent": "andrews2019_tac_adult_kidney 1.0.0 sha256:0"})
    (tmp_path / "centre_andrews.toml").write_text(text)
    monkeypatch.setenv("CNIDOSE_MODELS", str(tmp_path))
    ours = choose_model("tacrolimus", "kidney", "adult", "Prograf", prefer=prefer)
    assert ours.id == "centre_andrews" and "adaptation of andrews2019_tac_adult_kidney" in ours.explanation()
    assert any(a.startswith("andrews2019_tac_adult_kidney (not this centre's adaptation)") for a in ours.alternatives)
    # not for another formulation than its parent's
    assert choose_model("tacrolimus", "kidney", "adult", "Advagraf", prefer=prefer).id != "centre_andrews"
