"""Clinical knowledge base: table-driven tests per rule, each side of every threshold, with the source line."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cnidose.cli import app
from cnidose.clinical import assess, knowledge, parse_record
from cnidose.errors import InputError
from cnidose.models.covariates import DERIVATIONS

START = dt.date(2026, 1, 10)
AS_OF = dt.date(2026, 6, 1)


def day(n: int) -> str:
    return (START + dt.timedelta(days=n)).isoformat()


def psoriasis(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "cnidose.patient/1", "id": "P1", "birth_date": "1980-03-01", "sex": "female", "weight_kg": 70,
        "agent": "cyclosporine", "indication": "psoriasis", "region": "EU", "therapy_start": START.isoformat(),
        "labs": [{"name": "creatinine", "value": 80, "unit": "umol/L", "date": day(-10)},
                 {"name": "creatinine", "value": 80, "unit": "umol/L", "date": day(-3)}],
        "blood_pressure": [{"date": day(-10), "systolic": 125, "diastolic": 80},
                           {"date": day(-3), "systolic": 122, "diastolic": 78}],
    }
    for k, v in extra.items():
        if isinstance(v, list) and k in doc:
            doc[k] = doc[k] + v
        else:
            doc[k] = v
    return doc


def run(doc: dict[str, Any], as_of: dt.date = AS_OF) -> Any:
    return assess(parse_record(doc, as_of=as_of), as_of)


def rules(a: Any) -> dict[str, Any]:
    return {x.rule: x for x in a.alerts}


def creat(n: int, value: float) -> dict[str, Any]:
    return {"name": "creatinine", "value": value, "unit": "umol/L", "date": day(n)}


# -- psoriasis cyclosporine: the acceptance example ------------------------------------------------------------------
def test_psoriasis_creatinine_rule_reduce_then_stop() -> None:
    """EU SmPC: eGFR > 25 % below baseline on more than one measurement -> reduce 25-50 %; not improved
    within one month -> discontinue (clinical-rules.md 3.1 [V])."""
    two = psoriasis(labs=[creat(20, 80 * 1.28), creat(34, 80 * 1.28)])
    a = rules(run(two, dt.date(2026, 2, 20)))
    assert "eu-egfr-25" in a and "Reduce the cyclosporine dose by 25-50 %" in a["eu-egfr-25"].message
    assert "SmPC (EU)" in a["eu-egfr-25"].source and a["eu-egfr-25"].date == dt.date.fromisoformat(day(34))
    assert "eu-egfr-stop" not in a
    three = psoriasis(labs=[creat(20, 80 * 1.28), creat(34, 80 * 1.28), creat(66, 80 * 1.28)])
    a = rules(run(three, dt.date(2026, 3, 20)))
    assert a["eu-egfr-stop"].severity == "critical" and "Discontinue" in a["eu-egfr-stop"].message
    improved = psoriasis(labs=[creat(20, 80 * 1.28), creat(34, 80 * 1.28), creat(66, 82)])
    assert "eu-egfr-stop" not in rules(run(improved, dt.date(2026, 3, 20)))


@pytest.mark.parametrize(("rise", "fires_25", "fires_35"), [
    (1.27, False, False),  # eGFR fall 24.9 %
    (1.28, True, False),  # 25.7 %
    (1.43, True, False),  # 34.9 %
    (1.44, True, True),  # 35.4 %
])
def test_egfr_fall_thresholds(rise: float, fires_25: bool, fires_35: bool) -> None:
    a = rules(run(psoriasis(labs=[creat(20, 80 * rise), creat(34, 80 * rise)])))
    assert ("eu-egfr-25" in a) is fires_25 and ("eu-egfr-35" in a) is fires_35


def test_egfr_fall_needs_more_than_one_measurement() -> None:
    assert "eu-egfr-25" not in rules(run(psoriasis(labs=[creat(20, 80 * 1.5)])))


@pytest.mark.parametrize(("value", "fires"), [(99.0, False), (100.0, True)])  # baseline 80: +23.75 % / +25 %
def test_us_creatinine_rise_reduce(value: float, fires: bool) -> None:
    """Neoral/Gengraf USPI (US records only): creatinine >= 25 % above pretreatment -> reduce 25-50 % and
    repeat serum creatinine (clinical-verification.md 1.1 P2, P8)."""
    a = rules(run(psoriasis(labs=[creat(20, value)], region="US")))
    assert ("us-creatinine-25" in a) is fires
    if fires:
        assert "Reduce the dose by 25-50 %; repeat serum creatinine" in a["us-creatinine-25"].message
    assert "us-creatinine-25" not in rules(run(psoriasis(labs=[creat(20, value)])))  # an EU record


@pytest.mark.parametrize(("readings", "fires"), [
    ([(150, 85)], False), ([(150, 85), (145, 80)], True), ([(140, 90), (140, 90)], False),
    ([(120, 95), (130, 91)], True),
])
def test_hypertension_two_readings(readings: list[tuple[int, int]], fires: bool) -> None:
    """Gengraf USPI: two readings > 140 systolic or > 90 diastolic; BAD: reduce and/or treat."""
    bp = [{"date": day(15 + 7 * k), "systolic": s, "diastolic": d} for k, (s, d) in enumerate(readings)]
    assert ("bp-two-readings" in rules(run(psoriasis(blood_pressure=bp)))) is fires


@pytest.mark.parametrize(("days", "info", "warning"), [(112, False, False), (113, True, False), (731, True, True)])
def test_treatment_duration(days: int, info: bool, warning: bool) -> None:
    a = rules(run(psoriasis(), START + dt.timedelta(days=days)))
    assert ("bad-16-weeks" in a) is info and ("consensus-2-years" in a) is warning


def test_selection_and_baseline() -> None:
    assert run(psoriasis()).selection == "pass"
    a = run(psoriasis(conditions=["Uncontrolled hypertension"]))
    assert a.selection == "stop" and "uncontrolled hypertension" in a.selection_reasons[0]
    a = run(psoriasis(medications=[{"name": "methotrexate", "start": day(-100)}]))
    assert a.selection == "stop" and "methotrexate" in a.selection_reasons[0]
    doc = psoriasis()
    doc["labs"] = doc["labs"][:1]
    a = run(doc)
    assert a.selection == "caution" and "serum creatinine on 2 occasions (1 found)" in a.selection_reasons[0]


def test_follow_up_schedule() -> None:
    """Every 2 weeks for 3 months, then monthly (Gengraf USPI)."""
    due = run(psoriasis(), dt.date(2026, 2, 1)).due
    assert due[0].date == START + dt.timedelta(days=28) and "serum creatinine" in due[0].what
    later = run(psoriasis(), START + dt.timedelta(days=100)).due
    assert [d.date for d in later] == [START + dt.timedelta(days=121)]


# -- transplant: interactions, exposure, PTDM ------------------------------------------------------------------------
def transplant(**extra: Any) -> dict[str, Any]:
    doc = {"schema": "cnidose.patient/1", "id": "T1", "birth_date": "1965-07-01", "sex": "male",
           "agent": "tacrolimus", "indication": "kidney transplant", "therapy_start": START.isoformat()}
    doc.update(extra)
    return doc


def test_voriconazole_alert_and_exposure_adjustment() -> None:
    a = run(transplant(medications=[{"name": "Voriconazole", "start": day(10)}]))
    al = rules(a)["interaction:voriconazole"]
    assert al.severity == "critical" and "one-third" in al.message and "Vfend" in al.source
    (e,) = a.exposure
    assert e.factor == 3.0 and e.start == dt.date.fromisoformat(day(10)) and e.end is None
    stopped = run(transplant(medications=[{"name": "voriconazole", "start": day(10), "stop": day(20)}]))
    (e,) = stopped.exposure
    assert e.end == dt.date.fromisoformat(day(23))  # the stated offset, 3 days
    assert "engineering default" in e.source


def test_other_interactions() -> None:
    a = run(transplant(medications=[{"name": "rifampin", "start": day(5)}, {"name": "ibuprofen", "start": day(6)},
                                    {"name": "paracetamol", "start": day(6)}]))
    r = rules(a)
    assert r["interaction:rifampicin"].severity == "critical" and "interaction:ibuprofen" in r
    assert a.exposure[0].factor == pytest.approx(0.34)
    assert any("paracetamol: not in the interaction knowledge base" in n for n in a.notes)
    c = run(psoriasis(medications=[{"name": "atorvastatin", "start": day(5), "daily_mg": 20}]))
    assert rules(c)["interaction:atorvastatin:dose"].severity == "critical"
    ok = run(psoriasis(medications=[{"name": "atorvastatin", "start": day(5), "daily_mg": 10}]))
    assert "interaction:atorvastatin:dose" not in rules(ok)


@pytest.mark.parametrize(("lab", "value", "unit", "fires"), [
    ("fasting glucose", 7.0, "mmol/L", True), ("fasting glucose", 6.9, "mmol/L", False),
    ("fasting glucose", 127, "mg/dL", True), ("fasting glucose", 125, "mg/dL", False),
    ("hba1c", 6.5, "%", True), ("hba1c", 6.4, "%", False), ("hba1c", 48, "mmol/mol", True),
    ("ogtt 2h glucose", 11.1, "mmol/L", True), ("ogtt 2h glucose", 11.0, "mmol/L", False),
])
def test_ptdm_criteria(lab: str, value: float, unit: str, fires: bool) -> None:
    """WHO/ADA criteria used for post-transplant diabetes (clinical-rules.md 5.3 [V])."""
    ids = {"fasting glucose": "ptdm-fpg", "hba1c": "ptdm-hba1c", "ogtt 2h glucose": "ptdm-ogtt"}
    a = run(transplant(labs=[{"name": lab, "value": value, "unit": unit, "date": day(40)}]))
    assert (ids[lab] in rules(a)) is fires


# -- calculators ------------------------------------------------------------------------------------------------------
def test_calculators_by_their_defining_formulas() -> None:
    """CKD-EPI 2021 (kidney.org): 142 x min(Scr/k,1)^a x max(Scr/k,1)^-1.200 x 0.9938^age [x 1.012 F];
    bedside Schwartz: 0.413 x height / Scr (mg/dL)."""
    f = DERIVATIONS["egfr_ckd_epi_2021"]
    scr = np.array([0.5, 0.7, 1.0, 2.0]) * 88.4
    female = 142 * np.minimum(scr / 88.4 / 0.7, 1) ** -0.241 * np.maximum(scr / 88.4 / 0.7, 1) ** -1.2 \
        * 0.9938**60 * 1.012
    np.testing.assert_allclose(f(scr, np.full(4, 60.0), np.ones(4)), female, atol=0.05)
    male = 142 * np.minimum(scr / 88.4 / 0.9, 1) ** -0.302 * np.maximum(scr / 88.4 / 0.9, 1) ** -1.2 * 0.9938**60
    np.testing.assert_allclose(f(scr, np.full(4, 60.0), np.zeros(4)), male, atol=0.05)
    s = DERIVATIONS["egfr_schwartz_bedside"](np.array([120.0]), np.array([0.5 * 88.4]))
    assert s[0] == pytest.approx(0.413 * 120 / 0.5, abs=0.2)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("patch", "field", "message"), [
    ({"labs": [{"name": "creatinine", "value": 0, "unit": "umol/L", "date": "2026-01-01"}]}, "labs[0].value",
     "not a possible creatinine"),
    ({"labs": [{"name": "creatinine", "value": 10000, "unit": "umol/L", "date": "2026-01-01"}]}, "labs[0].value",
     "not a possible creatinine"),
    ({"labs": [{"name": "creatinine", "value": 80, "unit": "mmol", "date": "2026-01-01"}]}, "labs[0].unit",
     "use umol/L"),
    ({"labs": [{"name": "creatinine", "value": 80, "unit": "umol/L", "date": "2027-01-01"}]}, "labs[0].date",
     "in the future"),
    ({"sex": "unknown"}, "sex", "female or male"),
    ({"schema": "other/9"}, "schema", "cnidose.patient/1"),
])
def test_bad_records_name_the_field(patch: dict[str, Any], field: str, message: str) -> None:
    doc = psoriasis()
    doc.update(patch)
    with pytest.raises(InputError) as info:
        parse_record(doc, as_of=AS_OF)
    assert f"[{field}]" in str(info.value) and message in str(info.value)


def test_unknown_drug_suggests_close_matches() -> None:
    with pytest.raises(InputError, match=r"\[medications\[0\]\.name\] unknown drug 'vorikonazole': did you mean "
                                         r"voriconazole"):
        run(transplant(medications=[{"name": "vorikonazole", "start": day(3)}]))


# -- the data ---------------------------------------------------------------------------------------------------------
def test_every_rule_and_interaction_has_a_source() -> None:
    interactions, protocols = knowledge()
    assert interactions["format"] == 1 and protocols["format"] == 1
    for d in interactions["drugs"]:
        assert d["kind"] and "offset_source" in d, d["name"]
        for agent, eff in d["effects"].items():
            assert agent in ("tacrolimus", "cyclosporine", "voclosporin")
            assert eff["source"].strip() and eff["action"].strip()
            assert eff["severity"] in ("info", "warning", "critical")
    from cnidose.clinical.engine import _RULES

    known = set(_RULES)
    for p in protocols["protocols"]:
        for r in p.get("rules", []):
            assert r["type"] in known and r["source"].strip() and r["action"].strip(), r["id"]
        for s in p.get("schedule", []):
            assert s["source"].strip()


# -- voclosporin, topical agents, other protocols --------------------------------------------------------------------
def lupus(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "cnidose.patient/1", "id": "L1", "birth_date": "1990-05-05", "sex": "female",
        "agent": "voclosporin", "indication": "lupus nephritis", "therapy_start": START.isoformat(),
        "labs": [creat(-7, 95)], "blood_pressure": [{"date": day(-7), "systolic": 130, "diastolic": 85}]}
    for k, v in extra.items():
        doc[k] = doc[k] + v if isinstance(v, list) and k in doc else v
    return doc


def _egfr_of(scr_umol: float, age: float = 35.8) -> float:
    return float(DERIVATIONS["egfr_ckd_epi_2021"](np.array([scr_umol]), np.array([age]), np.array([1.0]))[0])


@pytest.mark.parametrize(("scr", "reduce", "stop"), [
    (95 * 1.12, False, False),  # eGFR 69 -> 60: fall 13 %
    (95 * 1.27, True, False),  # -> 52: fall 25 %
    (95 * 1.40, False, True),  # -> 46: fall 33 %
])
def test_voclosporin_egfr_rules(scr: float, reduce: bool, stop: bool) -> None:
    """Lupkynis label: eGFR < 60 and fall > 20 % and < 30 % -> reduce 7.9 mg BID; >= 30 % -> discontinue."""
    base = _egfr_of(95)
    now = _egfr_of(scr)
    a = rules(run(lupus(labs=[creat(30, scr)])))
    assert now < 60 or not (reduce or stop)
    assert ("vcs-reduce" in a) is reduce and ("vcs-stop" in a) is stop, (base, now)


def test_voclosporin_selection() -> None:
    assert run(lupus()).selection == "pass"
    high = lupus(blood_pressure=[{"date": day(-2), "systolic": 170, "diastolic": 100}])
    a = run(high)
    assert a.selection == "stop" and "165/105" in a.selection_reasons[0]
    low_egfr = lupus()
    low_egfr["labs"] = [creat(-7, 150)]  # eGFR about 40
    assert run(low_egfr).selection == "caution"
    vori = run(lupus(medications=[{"name": "voriconazole", "start": day(5)}]))
    assert rules(vori)["interaction:voriconazole"].message.endswith("Contraindicated: voclosporin with a strong "
                                                                     "CYP3A4 inhibitor.")
    assert vori.selection == "caution"
    assert [d.date for d in run(lupus(), START + dt.timedelta(days=20)).due] == [START + dt.timedelta(days=28)] * 2


@pytest.mark.parametrize(("birth", "agent", "strength", "selection"), [
    ("2025-06-01", "tacrolimus", 0.03, "stop"),  # 1.6 years: under 2
    ("2018-01-01", "tacrolimus", 0.03, "pass"),  # 8 years, 0.03 %
    ("2018-01-01", "tacrolimus", 0.1, "stop"),  # 8 years, 0.1 % not allowed before 16
    ("2005-01-01", "tacrolimus", 0.1, "pass"),  # 21 years
    ("2025-06-01", "pimecrolimus", 1.0, "stop"),
    ("2020-01-01", "pimecrolimus", 1.0, "pass"),
])
def test_topical_age_and_strength(birth: str, agent: str, strength: float, selection: str) -> None:
    """Protopic: < 2 y not recommended; 2-15 y 0.03 % only; >= 16 y 0.03 or 0.1 %. Elidel: >= 2 y."""
    doc = {"schema": "cnidose.patient/1", "id": "D1", "birth_date": birth, "sex": "male", "agent": agent,
           "indication": "atopic dermatitis", "route": "topical", "strength_percent": strength,
           "therapy_start": START.isoformat()}
    a = run(doc)
    assert a.selection == selection
    assert any(x.rule.endswith(":counselling") and "Boxed warning" in x.message for x in a.alerts)


def test_oral_cyclosporine_for_atopic_dermatitis_and_uc() -> None:
    ad = psoriasis(indication="atopic dermatitis")
    assert "ad-8-weeks" in rules(run(ad, START + dt.timedelta(days=57)))
    assert "ad-8-weeks" not in rules(run(ad, START + dt.timedelta(days=56)))
    uc = psoriasis(indication="ulcerative colitis")
    assert "uc-bridge-6-months" in rules(run(uc, START + dt.timedelta(days=184)))


def test_kidney_transplant_bk_schedule_and_codes() -> None:
    due = run(transplant(), START + dt.timedelta(days=40)).due
    assert due[0].what == "BK virus NAT (plasma)" and due[0].date == START + dt.timedelta(days=60)
    # a verified LOINC code may stand for the lab name
    a = run(transplant(labs=[{"name": "1558-6", "value": 7.2, "unit": "mmol/L", "date": day(40)}]))
    assert "ptdm-fpg" in rules(a)
    import tomllib
    from importlib import resources

    codes = tomllib.loads((resources.files("cnidose.clinical") / "data" / "codes.toml").read_text())
    assert codes["loinc"]["tacrolimus"]["code"] == "11253-2" and codes["rxnorm"]["cyclosporine"]["rxcui"] == "3008"


def test_cli_assess(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps(psoriasis(labs=[creat(20, 102.4), creat(34, 102.4)])))
    r = CliRunner().invoke(app, ["assess", str(f), "--as-of", "2026-02-20"])
    assert r.exit_code == 0, r.output
    assert "selection: pass" in r.output and "Reduce the cyclosporine dose by 25-50 %" in r.output
    assert "due 2026-02-21" in r.output  # day 42 of the 2-weekly schedule
    r = CliRunner().invoke(app, ["assess", str(f), "--as-of", "2026-02-20", "--json"])
    d = json.loads(r.stdout)
    assert d["selection"] == "pass" and any(a["rule"] == "eu-egfr-25" for a in d["alerts"])
    bad = copy.deepcopy(psoriasis())
    bad["labs"][0]["date"] = "2030-01-01"
    f.write_text(json.dumps(bad))
    r = CliRunner().invoke(app, ["assess", str(f), "--as-of", "2026-02-20"])
    assert r.exit_code == 2 and "labs[0].date" in r.output


def test_unit_aware_calculators() -> None:
    from cnidose.clinical import calculators as c

    a = c.egfr_ckd_epi_2021(1.0, "mg/dL", 50, "female")
    assert a == pytest.approx(c.egfr_ckd_epi_2021(88.4, "umol/L", 50, "female"))
    assert a == pytest.approx(142 * (1.0 / 0.7) ** -1.2 * 0.9938**50 * 1.012, abs=0.05)
    # the NKF eGFR calculator (kidney.org), as quoted second-hand [S], whole numbers only: 55-year-old man, 1.2 mg/dL
    assert round(c.egfr_ckd_epi_2021(1.2, "mg/dL", 55, "male")) == 71
    assert c.egfr_schwartz(0.5, "mg/dL", 120) == pytest.approx(99.1, abs=0.1)  # 0.413 x 120 / 0.5
    assert c.ibw_devine(152.4, "male") == pytest.approx(50.0) and c.ibw_devine(182.88, "female") == pytest.approx(
        45.5 + 2.3 * 12)
    assert c.bsa(70, 175) == pytest.approx(np.sqrt(70 * 175 / 3600))
    with pytest.raises(InputError, match="mg/dL"):
        c.egfr_ckd_epi_2021(1.0, "mmol", 50, "female")
    with pytest.raises(InputError, match="not a possible value"):
        c.creatinine_umol_per_l(0, "umol/L")
    with pytest.raises(InputError, match="children"):
        c.egfr_ckd_epi_2021(0.5, "mg/dL", 10, "male")


def test_readme_example_record() -> None:
    from .conftest import REPO

    r = CliRunner().invoke(app, ["assess", str(REPO / "examples" / "psoriasis_patient.json"), "--as-of", "2026-02-20"])
    assert r.exit_code == 0, r.output
    assert "selection: caution" in r.output and "atorvastatin 20 mg/day exceeds 10 mg/day" in r.output


def _schema(name: str) -> Any:
    from importlib import resources

    return json.loads((resources.files("cnidose.clinical") / "data" / name).read_text())


def test_knowledge_files_validate_against_their_schema() -> None:
    import jsonschema

    schema = _schema("knowledge.schema.json")
    interactions, protocols = knowledge()
    jsonschema.validate(interactions, schema)
    jsonschema.validate(protocols, schema)
    broken = copy.deepcopy(protocols)
    del broken["protocols"][0]["rules"][0]["source"]  # a rule without a source fails
    with pytest.raises(jsonschema.ValidationError, match="source"):
        jsonschema.validate(broken, schema)


def test_patient_record_schema() -> None:
    import jsonschema

    from .conftest import REPO

    schema = _schema("patient.schema.json")
    for name in ("psoriasis_patient.json", "kidney_transplant_patient.json"):
        example = json.loads((REPO / "examples" / name).read_text())
        jsonschema.validate(example, schema)
        bad = copy.deepcopy(example)
        bad["labs"][0]["colour"] = "red"
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    jsonschema.validate(psoriasis(), _schema("patient-1.schema.json"))  # version 1 is still read


@pytest.mark.parametrize(("values", "fires"), [([5000.0, 20000.0], False), ([20000.0, 15000.0], True),
                                               ([20000.0, 9000.0], False)])
def test_bk_viraemia_persistent(values: list[float], fires: bool) -> None:
    """KDIGO 2009 R13.1.2: reduce immunosuppression when BKV NAT is persistently > 10^7 copies/L."""
    labs = [{"name": "bk virus nat", "value": v, "unit": "copies/mL", "date": day(60 + 14 * k)}
            for k, v in enumerate(values)]
    assert ("bk-viraemia" in rules(run(transplant(labs=labs)))) is fires


def test_schwartz_published_worked_example() -> None:
    """doctaverse.pages.dev 'Bedside Schwartz eGFR' worked example: height 100 cm, creatinine 0.4 mg/dL ->
    103 mL/min/1.73 m2 (published rounded to an integer)."""
    from cnidose.clinical import calculators as c

    assert abs(c.egfr_schwartz(0.4, "mg/dL", 100) - 103) <= 0.5
