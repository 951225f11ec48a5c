"""Model files: refusal of malformed files (file, key, line), covariate handling, results' notices, CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnidose.cli import app
from cnidose.errors import DataError, ModelFileError
from cnidose.models import load_model, parse_model, resolve_model
from cnidose.models.covariates import DERIVATIONS
from cnidose.models.units import UnitError, convert, parse_unit
from cnidose.pk.events import Individual, split_individuals
from cnidose.records.nonmem import read_nonmem_csv, simulate_dataset

LIB = Path(__file__).resolve().parents[1] / "src" / "cnidose" / "models" / "library"
ANDREWS = LIB / "andrews2019_tac_adult_kidney.toml"
STORSET = LIB / "storset2014_tac_adult_kidney.toml"
REF = {"CYP3A5": 0, "AGE": 55.72, "ALB": 42, "BSA": 1.93, "SCR": 134.98, "HCT": 0.34, "LBW": 58.94}


# -- malformed files -------------------------------------------------------------------------------------------------
def _refused(text: str, tmp_path: Path) -> ModelFileError:
    f = tmp_path / "broken.toml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ModelFileError) as info:
        load_model(f)
    err = info.value
    assert err.source == str(f)
    return err


def _line_of(text: str, needle: str) -> int:
    return next(k for k, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    text = ANDREWS.read_text().replace('scale_unit = "L"', 'scale_unit = "L"\nscal = "V1"')
    err = _refused(text, tmp_path)
    assert err.field == "observations.CWB.scal" and err.line == _line_of(text, 'scal = "V1"')
    assert f"broken.toml:{err.line} [observations.CWB.scal]: unknown key (did you mean 'scale'?)" in str(err)


def test_unknown_top_level_and_parameter_keys(tmp_path: Path) -> None:
    err = _refused("colour = 1\n" + ANDREWS.read_text(), tmp_path)
    assert err.field == "colour" and err.line == 1
    text = ANDREWS.read_text().replace('TVQ = { value = 11.6, unit = "L/h",', 'TVQ = { valeu = 11.6, unit = "L/h",')
    err = _refused(text, tmp_path)
    assert err.field == "parameters.TVQ.valeu" and err.line == _line_of(text, "valeu")


def test_bad_expression_is_refused_with_line(tmp_path: Path) -> None:
    text = ANDREWS.read_text().replace('expr = "TVQ * exp(ETA_Q)"', 'expr = "TVQ * __import__(ETA_Q)"')
    err = _refused(text, tmp_path)
    assert err.field == "pk.Q.expr" and err.line == _line_of(text, "__import__")
    text = ANDREWS.read_text().replace('expr = "TVQ * exp(ETA_Q)"', 'expr = "TVQ * exp(ETA_Q"')
    assert "cannot parse" in str(_refused(text, tmp_path))
    text = ANDREWS.read_text().replace('expr = "TVQ * exp(ETA_Q)"', 'expr = "TVQ * exp(ETA_QQ)"')
    err = _refused(text, tmp_path)
    assert "unknown name(s) ETA_QQ" in str(err) and err.line == _line_of(text, "ETA_QQ")


@pytest.mark.parametrize(("old", "new", "field", "message"), [
    # a flow rate in mL/min per L is not 1/h
    ('Q = { expr = "TVQ * exp(ETA_Q)", unit = "L/h" }', 'Q = { expr = "TVQ * exp(ETA_Q)", unit = "mL/min" }',
     "pk.Q", "which is not 1/h"),
    # haematocrit is a fraction or a percentage, never a mass
    ('unit = "L/L"\ndescription = "haematocrit"', 'unit = "kg"\ndescription = "haematocrit"',
     "covariates.HCT.unit", "standard covariate in L/L"),
    # a lag time in litres
    ('ALAG1 = { expr = "TLAG", unit = "h" }', 'ALAG1 = { expr = "TLAG", unit = "L" }', "pk.ALAG1", "expected a unit"),
    # concentration scale that is not a volume
    ('scale_unit = "L"\nunit = "ng/mL"', 'scale_unit = "h"\nunit = "ng/mL"', "observations.CWB.scale_unit",
     "is in L, not h"),
    # an unknown unit symbol
    ('TVV2 = { value = 5340.0, unit = "L"', 'TVV2 = { value = 5340.0, unit = "litre"', "parameters.TVV2.unit",
     "unknown unit symbol"),
])
def test_wrong_unit_is_refused(tmp_path: Path, old: str, new: str, field: str, message: str) -> None:
    text = ANDREWS.read_text()
    assert old in text
    err = _refused(text.replace(old, new), tmp_path)
    assert err.field == field and message in str(err) and err.line is not None


def test_omega_not_positive_definite_is_refused(tmp_path: Path) -> None:
    text = STORSET.read_text().replace('correlations = [["ETA_CL", "ETA_V1", 0.43], ["ETA_CL", "ETA_Q", 0.62]]',
                                       'correlations = [["ETA_CL", "ETA_V1", 0.9], ["ETA_CL", "ETA_Q", 0.9], '
                                       '["ETA_V1", "ETA_Q", -0.9]]')
    err = _refused(text, tmp_path)
    assert err.field == "random_effects.correlations" and "not positive definite" in str(err)
    assert err.line == _line_of(text, "correlations = ")
    text = ANDREWS.read_text().replace("cv_percent = [38.6, 49.2, 53.0, 78.7]",
                                       "cv_percent = [38.6, -49.2, 53.0, 78.7]")
    assert "non-negative" in str(_refused(text, tmp_path))
    text = ANDREWS.read_text().replace('cv_conversion = "sqrt"\nsource = "Table 2 (IIV %)',
                                       'cv_conversion = "exp"\nsource = "Table 2 (IIV %)')
    assert "cv_conversion" in str(_refused(text, tmp_path))


def test_missing_pieces_are_named(tmp_path: Path) -> None:
    text = ANDREWS.read_text()
    err = _refused(text.replace('V1 = { expr = "TVV1 * (LBW / 58.94) ** LBW_V1 * exp(ETA_V1)", unit = "L" }\n', ""),
                   tmp_path)
    assert "needs V1" in str(err) or "unknown name(s) V1" in str(err)
    err = _refused(text.replace("[units]\ndose = \"mg\"\n", "[units]\n"), tmp_path)
    assert err.field == "units.dose" and "missing" in str(err)
    err = _refused(text.replace('format = 1', 'format = 2'), tmp_path)
    assert err.field == "format"
    err = _refused(text.replace('version = "1.0.0"\n', "version = 1\n", 1), tmp_path)
    assert err.field == "version" and "expected text" in str(err)
    err = _refused(text + "\n[pk\n", tmp_path)
    assert "not valid TOML" in str(err) and err.line is not None


def test_a_covariate_from_the_medication_list_is_a_0_1_covariate(tmp_path: Path) -> None:
    heart = LIB / "kirubakaran2023_tac_adult_heart.toml"
    cov = load_model(heart).covariates["AZOLE"]
    assert cov.medications == ("itraconazole", "voriconazole", "fluconazole") and cov.after_days == 7.0
    text = heart.read_text()
    err = _refused(text.replace('medications = ["itraconazole", "voriconazole", "fluconazole"]', "medications = [1]"),
                   tmp_path)
    assert err.field == "covariates.AZOLE.medications" and err.line == _line_of(text, "medications = [")
    err = _refused(text.replace('medications = ["itraconazole", "voriconazole", "fluconazole"]\n', ""), tmp_path)
    assert err.field == "covariates.AZOLE.medication_after_days"
    err = _refused(text.replace("medication_after_days = 7", "medication_after_days = -1"), tmp_path)
    assert err.field == "covariates.AZOLE.medication_after_days"
    text = ANDREWS.read_text().replace('[covariates.AGE]\n', '[covariates.AGE]\nmedications = ["aspirin"]\n')
    err = _refused(text, tmp_path)
    assert err.field == "covariates.AGE.levels" and "levels 0 and 1" in str(err)
    shown = CliRunner().invoke(app, ["models", "show", "kirubakaran2023_tac_adult_heart"])
    assert shown.exit_code == 0 and ("from a patient record: 1 while itraconazole or voriconazole or fluconazole is on "
                                     "the medication list and 7 days after it stops") in shown.stdout


def test_model_ids_and_names_do_not_clash(tmp_path: Path) -> None:
    text = ANDREWS.read_text().replace('[covariates.AGE]', '[covariates.TVCL]\nunit = "1"\n\n[covariates.AGE]')
    assert "both as a parameter and as a covariate" in str(_refused(text, tmp_path))


# -- units and derived covariates ------------------------------------------------------------------------------------
def test_units() -> None:
    assert convert(1.0, "mg/L", "ng/mL") == pytest.approx(1000.0)
    assert convert(1.0, "ug/L", "ng/mL") == pytest.approx(1.0)
    assert convert(35.0, "%", "L/L") == pytest.approx(0.35)
    assert convert(1.0, "mg/dL", "mg/L") == pytest.approx(10.0)
    assert convert(1.0, "d", "h") == pytest.approx(24.0)
    assert parse_unit("L/h").per(parse_unit("L")) == parse_unit("1/h")
    assert parse_unit("mL/min").per(parse_unit("L")) != parse_unit("1/h")
    with pytest.raises(UnitError):
        convert(1.0, "mg", "mL")
    with pytest.raises(UnitError, match="unknown unit symbol"):
        parse_unit("furlong")


def test_derived_covariates_by_their_published_formulas() -> None:
    wt, ht = np.array([70.0, 60.0]), np.array([175.0, 160.0])
    sex = np.array([0.0, 1.0])
    np.testing.assert_allclose(DERIVATIONS["bsa_mosteller"](wt, ht), np.sqrt(wt * ht / 3600))
    np.testing.assert_allclose(DERIVATIONS["bsa_dubois"](wt, ht), 0.007184 * wt**0.425 * ht**0.725)
    bmi = wt / (ht / 100) ** 2
    np.testing.assert_allclose(DERIVATIONS["ffm_janmahasatian"](wt, ht, sex),
                               [9270 * 70 / (6680 + 216 * bmi[0]), 9270 * 60 / (8780 + 244 * bmi[1])])
    np.testing.assert_allclose(DERIVATIONS["lbw_james"](wt, ht, sex),
                               [1.1 * 70 - 128 * (70 / 175) ** 2, 1.07 * 60 - 148 * (60 / 160) ** 2])
    np.testing.assert_allclose(DERIVATIONS["lbw_boer"](wt, ht, sex),
                               [0.407 * 70 + 0.267 * 175 - 19.2, 0.252 * 60 + 0.473 * 160 - 48.3])
    # bedside Schwartz: 0.413 x height / SCr(mg/dL) == 36.5 x height / SCr(umol/L) (within the 88.4 rounding)
    assert DERIVATIONS["egfr_schwartz_bedside"](np.array(120.0), np.array(44.2)) == pytest.approx(
        0.413 * 120 / 0.5, rel=2e-3)
    # CKD-EPI 2021: creatinine at the sex-specific kappa gives 142 x 0.9938^age (x 1.012 for women)
    got = DERIVATIONS["egfr_ckd_epi_2021"](np.array([0.9 * 88.4, 0.7 * 88.4]), np.array([50.0, 50.0]), sex)
    np.testing.assert_allclose(got, [142 * 0.9938**50, 142 * 0.9938**50 * 1.012])
    # above kappa the exponent is -1.200
    got = DERIVATIONS["egfr_ckd_epi_2021"](np.array([1.8 * 88.4]), np.array([60.0]), np.array([0.0]))
    assert got[0] == pytest.approx(142 * 2.0**-1.2 * 0.9938**60)


# -- covariates in use: defaults, derivation, domain, plausibility ---------------------------------------------------
def _ind(covs: Mapping[str, float | list[float]], n: int = 2) -> Individual:
    cols: dict[str, object] = {"ID": [1] * n, "TIME": list(range(n)), "AMT": [5] + [0] * (n - 1),
                               "CMT": [1] + [2] * (n - 1)}
    for k, v in covs.items():
        cols[k] = v if isinstance(v, list) else [v] * n
    return split_individuals(cols, rows=list(range(2, n + 2)))[0]  # type: ignore[arg-type]


def test_missing_required_covariate_is_an_error_naming_it() -> None:
    m = load_model(ANDREWS)
    covs = dict(REF)
    del covs["SCR"]
    with pytest.raises(DataError, match=r"column SCR.*SCR \(umol/L\) is required by model andrews2019"):
        m.simulate(_ind(covs))
    covs = dict(REF, SCR=[134.98, float("nan")])
    with pytest.raises(DataError, match=r"row 3, column SCR.*missing"):
        m.simulate(_ind(covs))


def test_declared_default_is_used_and_reported() -> None:
    m = load_model(ANDREWS)
    covs = dict(REF)
    del covs["ALB"]
    sim = m.simulate(_ind(covs))
    notes = {n.covariate: n for n in sim.notices}
    assert notes["ALB"].kind == "default" and "model default 42 g/L used" in notes["ALB"].message
    assert "CYP3A4_22" in notes  # unknown genotype pooled with *1, said so
    assert sim.model.startswith("andrews2019_tac_adult_kidney 1.0.0 sha256:")


def test_derived_covariate_is_computed_and_reported() -> None:
    m = load_model(ANDREWS)
    covs = dict(REF)
    del covs["BSA"]
    covs.update(WT=70.0, HT=175.0, SEX=0)
    sim = m.simulate(_ind(covs))
    note = next(n for n in sim.notices if n.covariate == "BSA")
    assert note.kind == "derived" and "bsa_mosteller" in note.message and "does not name" in note.message
    bsa = math.sqrt(70 * 175 / 3600)
    expected_cl = 23.0 * (bsa / 1.93) ** 0.88
    assert sim.parameters["CL"][0, 0] == pytest.approx(expected_cl, rel=1e-12)
    del covs["HT"]
    with pytest.raises(DataError, match=r"BSA .* absent from the data \(or WT, HT, SEX to derive it\)|"
                                        r"BSA .* absent from the data \(or WT, HT to derive it\)"):
        m.simulate(_ind(covs))


def test_covariate_outside_domain_warns_and_the_warning_reaches_the_result(tmp_path: Path) -> None:
    m = load_model(ANDREWS)
    sim = m.simulate(_ind(dict(REF, AGE=[55.0, 85.0])))
    dom = [n for n in sim.notices if n.kind == "domain"]
    assert len(dom) == 1 and dom[0].covariate == "AGE" and dom[0].row == 3
    assert "AGE = 85 y is outside the domain of model andrews2019_tac_adult_kidney (15-79.4 y)" in dom[0].message
    # a domain-only covariate (time since transplant) also warns
    sim = m.simulate(_ind(dict(REF, POD=200.0)))
    assert any(n.covariate == "POD" and n.kind == "domain" for n in sim.notices)
    # and through the data-set path and the CLI
    data = tmp_path / "d.csv"
    data.write_text("ID,TIME,AMT,CMT,EVID,CYP3A5,AGE,ALB,BSA,SCR,HCT,LBW\n"
                    "1,0,5,1,1,0,85,42,1.93,135,0.34,59\n1,12,0,2,0,0,85,42,1.93,135,0.34,59\n")
    table = simulate_dataset(m, read_nonmem_csv(data))
    assert any(n.kind == "domain" and n.covariate == "AGE" for n in table.notices)
    r = CliRunner().invoke(app, ["simulate", "-m", "andrews2019_tac_adult_kidney", "-d", str(data)])
    assert r.exit_code == 0
    assert "warning: AGE = 85 y is outside the domain" in r.output


def test_unit_mixups_in_data_are_refused_naming_record_and_field() -> None:
    m = load_model(ANDREWS)
    with pytest.raises(DataError, match=r"row 3, column HCT: HCT = 34 is not a plausible haematocrit.*check the unit"):
        m.simulate(_ind(dict(REF, HCT=[0.34, 34.0])))
    with pytest.raises(DataError, match=r"column SCR: SCR = 1.5 is not a plausible serum creatinine in umol/L"):
        m.simulate(_ind(dict(REF, SCR=1.5)))
    with pytest.raises(DataError, match=r"CYP3A5 = 2 is not a valid code"):
        m.simulate(_ind(dict(REF, CYP3A5=2)))


def test_model_unit_differs_from_data_unit() -> None:
    """Woillard 2011 writes haematocrit in %; data carry the fraction."""
    m = resolve_model("woillard2011_tac_prograf_advagraf")
    p = m.pk_at({"PROGRAF": 1, "HCT": 0.35, "CYP3A5": 0})
    assert p["CL"] == pytest.approx(21.2)
    p = m.pk_at({"PROGRAF": 1, "HCT": 0.28, "CYP3A5": 0})
    assert p["CL"] == pytest.approx(21.2 * (28 / 35) ** -1.14)


# -- random effects, IOV, transforms, residual error -----------------------------------------------------------------
def test_iov_applies_per_occasion() -> None:
    m = load_model(ANDREWS)
    ind = _ind(dict(REF, OCC=[1, 1, 2, 2]), n=4)
    prep = m.prepare(ind)
    assert prep.n_occasions == 2 and prep.occasion.tolist() == [0, 0, 1, 1]
    kappas = np.array([[[0.0], [0.2]]])
    cl = m.individual_parameters(prep, kappas=kappas)["CL"][0]
    np.testing.assert_allclose(cl, [23.0, 23.0, 23.0 * math.exp(0.2), 23.0 * math.exp(0.2)])
    with pytest.raises(ValueError, match=r"kappas must have shape \(B, 2, 1\)"):
        m.individual_parameters(prep, kappas=np.zeros((1, 3, 1)))


def test_storset_whole_blood_transform_and_plasma_scale() -> None:
    m = resolve_model("storset2014_tac_adult_kidney")
    covs = {"FFM": 60, "CYP3A5": 0, "PRED": 0, "POD": 10, "HCT": 0.45}
    ind = m.individual_from_covariates(covs, [1.0, 4.0, 12.0], dose=5.0)
    sim = m.simulate(ind, return_amounts=True)
    amounts = sim.amounts
    assert amounts is not None
    cp = amounts[0, 1:, 1] / 6290.0 * 1000.0  # plasma, ng/mL
    np.testing.assert_allclose(sim.prediction[0, 1:], cp * (1 + 418 * 0.45 / (cp + 3.8)), rtol=1e-12)


def test_residual_variance() -> None:
    m = load_model(ANDREWS)
    ind = _ind(dict(REF, IMMUNOASSAY=[0, 1, 0]), n=3)
    sim = m.simulate(ind)
    var, log_scale = m.residual_variance(ind, sim.parameters, sim.prediction)
    f = sim.prediction[0]
    np.testing.assert_allclose(var[0, 1:], [(0.177 * f[1]) ** 2 + 0.88**2, (0.245 * f[2]) ** 2])
    assert not log_scale.any()
    press = resolve_model("press2010_csa_adult_kidney")
    ind2 = press.individual_from_covariates({"WT": 76, "PRED": 0}, [2.0], dose=200)
    sim2 = press.simulate(ind2)
    var2, log2 = press.residual_variance(ind2, sim2.parameters, sim2.prediction)
    assert log2[1] and var2[0, 1] == pytest.approx(0.07)


def test_transit_chain_is_expanded_in_compartment_order() -> None:
    m = resolve_model("woillard2011_tac_prograf_advagraf")
    assert m.structure.compartments == ("DEPOT", "TRANSIT1", "TRANSIT2", "TRANSIT3", "CENTRAL", "PERIPHERAL")
    assert m.observations[0].compartment == 5


# -- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_models_list_filters_and_json() -> None:
    r = CliRunner().invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert {row["id"] for row in rows} >= {"andrews2019_tac_adult_kidney", "press2010_csa_adult_kidney"}
    r = CliRunner().invoke(app, ["models", "list", "--drug", "ciclosporin", "--age-group", "paediatric", "--json"])
    assert [row["id"] for row in json.loads(r.output)] == ["fanta2007_csa_paed"]
    r = CliRunner().invoke(app, ["models", "list", "--formulation", "advagraf"])
    assert r.exit_code == 0 and "benkali2010_tac_advagraf" in r.output and "andrews2019" not in r.output


def test_cli_models_show() -> None:
    r = CliRunner().invoke(app, ["models", "show", "andrews2019_tac_adult_kidney"])
    assert r.exit_code == 0
    assert "doi:10.1111/bcp.13838" in r.output and "TVCL" in r.output and "domain 15-79.4" in r.output
    r = CliRunner().invoke(app, ["models", "show", "press2010_csa_adult_kidney", "--json"])
    d = json.loads(r.output)
    assert d["random_effects"]["variance"] == [0.09, 0.03, 0.12]
    assert d["observations"][0]["error"]["model"] == "exponential"
    r = CliRunner().invoke(app, ["models", "show", "no-such-model"])
    assert r.exit_code == 2 and "not a library id" in r.output
    # the routes and the transit input are part of the structure a reviewer reads
    r = CliRunner().invoke(app, ["models", "show", "antignac2007_tac_kidney_iv_oral"])
    assert "intravenous doses (IV = 1) into CENTRAL" in r.output
    r = CliRunner().invoke(app, ["models", "show", "martial2021_tac_envarsus_liver", "--json"])
    assert json.loads(r.output)["structure"]["transit_input"] == {"into": "DEPOT", "n": "NTR", "mtt": "MTT"}


def test_cli_models_check(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["models", "check", "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.output)
    assert results and all(x["passed"] for x in results)
    assert {x["model"] for x in results} >= {"andrews2019_tac_adult_kidney", "woillard2014_csa_hsct",
                                             "fukudo2005_tac_calcineurin", "clinnephrol2017_tac_nfat"}
    # the concentration-effect models alone, by id
    r = CliRunner().invoke(app, ["models", "check", "fukudo2005_csa_calcineurin", "--json"])
    assert r.exit_code == 0 and [x["check"] for x in json.loads(r.output)] == ["E/Emax at 200 ng/mL"]
    # a check that fails makes the command fail
    broken = tmp_path / "m.toml"
    broken.write_text(ANDREWS.read_text().replace("expected = 23.0", "expected = 24.0"))
    r = CliRunner().invoke(app, ["models", "check", str(broken)])
    assert r.exit_code == 1 and "FAIL  andrews2019_tac_adult_kidney: reference CL/F" in r.output


def test_library_file_edit_changes_the_hash() -> None:
    raw = ANDREWS.read_bytes()
    a = parse_model(raw)
    b = parse_model(raw.replace(b'version = "1.0.0"', b'version = "1.0.1"'))
    assert a.content_hash != b.content_hash and b.version == "1.0.1"
