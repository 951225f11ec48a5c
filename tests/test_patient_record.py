"""The patient record, version 2 (issue 13): one representation for the rules, the models and the pages.

Each example of the issue, each new rule on both sides of its thresholds (table-driven, with the source the rule
cites), the EU/US variants, the round trips (patient/2 -> database -> FHIR bundle -> patient/2), and the NONMEM
export's EXPOSURE column.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnidose.clinical import assess, parse_record
from cnidose.clinical.record import RecordError, resolve_indication
from cnidose.records.analysis import analyse

REPO = Path(__file__).resolve().parents[1]
TX = dt.date(2026, 11, 11)
AS_OF = dt.date(2026, 11, 30)


def at(day: float, hour: int = 8, minute: int = 0) -> str:
    t = dt.datetime(TX.year, TX.month, TX.day, hour, minute, tzinfo=dt.UTC) + dt.timedelta(days=day)
    return t.isoformat().replace("+00:00", "Z")


def kidney() -> dict[str, Any]:
    return json.loads((REPO / "examples" / "kidney_transplant_patient.json").read_text())


def run(doc: dict[str, Any], as_of: dt.date = AS_OF) -> Any:
    return assess(parse_record(doc, as_of=as_of), as_of)


def rules(doc: dict[str, Any], as_of: dt.date = AS_OF) -> dict[str, Any]:
    return {a.rule: a for a in run(doc, as_of).alerts}


# -- the examples of the issue ---------------------------------------------------------------------------------------
def test_the_demo_transplant_patient_has_alerts_with_actions_and_sources() -> None:
    """Creatinine 118 -> 151 umol/L, troughs 12.6 and 13.9 against 4-11, blood pressure 152/95: was "No alerts"."""
    a = rules(kidney())
    rise = a["tx-creatinine-rise"].message
    assert "28 % above the post-transplant baseline (118" in rise
    assert "latest trough 13.9 ng/mL" in a["tx-creatinine-rise"].message and "KDIGO" in a["tx-creatinine-rise"].source
    assert "tx-trough-target" in a and "13.9 ng/mL above the target 4-11" in a["tx-trough-target"].message
    assert "US Prograf label, Table 1" in a["tx-trough-target"].source
    assert "tx-bp-target" in a and "latest 152/95" in a["tx-bp-target"].message
    assert "KDOQI" in a["tx-bp-target"].source


def test_voriconazole_on_9_mg_a_day_gives_3_mg_a_day() -> None:
    doc = kidney()
    doc["regimens"][0]["dose"] = 4.5  # 9 mg/day
    doc["medications"].append({"name": "voriconazole", "start": "2026-11-28", "daily_mg": 400})
    a = rules(doc)["interaction:voriconazole"]
    assert "one third of 9 mg/day is 3 mg/day: 1.5 mg twice daily (1 x 1 mg + 1 x 0.5 mg Prograf)" in a.message
    assert a.severity == "critical" and "Vfend" in a.source


def test_voclosporin_egfr_fall_gives_15_8_mg_twice_daily() -> None:
    doc = {"schema": "cnidose.patient/2", "id": "LN1", "birth_date": "1990-05-05", "sex": "female",
           "indication": "lupus nephritis", "therapy": {"agent": "voclosporin", "product": "Lupkynis",
                                                        "start": "2026-06-01"},
           "regimens": [{"product": "Lupkynis", "dose": 23.7, "interval_h": 12, "start": "2026-06-01T08:00:00Z"}],
           "labs": [{"name": "creatinine", "value": 100, "unit": "umol/L", "date": "2026-05-25"},
                    {"name": "creatinine", "value": 125, "unit": "umol/L", "date": "2026-07-01"}]}
    a = rules(doc, dt.date(2026, 7, 2))["vcs-reduce"]
    assert "from 23.7 to 15.8 mg twice daily (31.6 mg/day)" in a.message and "Lupkynis label" in a.source


@pytest.mark.parametrize(("typed", "key", "severity"), [
    ("plaque psoriasis", "psoriasis", None), ("severe plaque psoriasis", "psoriasis", "severe"),
    ("Psoriasis vulgaris", "psoriasis", None), ("renal transplant", "kidney transplant", None),
    ("moderate to severe atopic eczema", "atopic dermatitis", "moderate to severe"),
])
def test_indications_resolve_to_the_rule_base_key(typed: str, key: str, severity: str | None) -> None:
    got, code, sev = resolve_indication(typed)
    assert (got, sev) == (key, severity) and code.code


def test_plaque_psoriasis_gets_the_psoriasis_protocol() -> None:
    doc = json.loads((REPO / "examples" / "psoriasis_patient.json").read_text())
    assert doc["indication"] == "plaque psoriasis"
    a = run(doc, dt.date(2026, 2, 20))
    assert a.selection == "caution" and any(x.rule == "eu-egfr-25" for x in a.alerts) and a.due


def test_an_unknown_indication_is_an_error_listing_the_known_ones() -> None:
    doc = kidney()
    doc["indication"] = "psoriatic nail disease"
    with pytest.raises(RecordError, match=r"\[indication\] unknown indication .*known: kidney transplant, .*psoriasis"):
        parse_record(doc, as_of=AS_OF)
    doc["indication"] = {"system": "ICD-10-CM", "code": "L40.0"}
    assert parse_record(doc, as_of=AS_OF).indication == "psoriasis"


def _topical(agent: str, birth: str, route: str | None) -> dict[str, Any]:
    therapy: dict[str, Any] = {"agent": agent, "start": "2026-10-01"}
    if route is not None:
        therapy["route"] = route
    return {"schema": "cnidose.patient/2", "id": "D1", "birth_date": birth, "sex": "male",
            "indication": "atopic dermatitis", "therapy": therapy}


def test_pimecrolimus_without_a_route_is_topical_and_stops_a_one_year_old() -> None:
    rec = parse_record(_topical("pimecrolimus", "2025-09-01", None), as_of=AS_OF)
    assert rec.route == "topical"
    a = assess(rec, AS_OF)
    assert a.selection == "stop" and "not for patients under 2 years" in a.selection_reasons[0]


def test_a_route_is_required_where_the_agent_has_several() -> None:
    with pytest.raises(RecordError, match=r"\[therapy.route\] tacrolimus is given oral, intravenous"):
        parse_record(_topical("tacrolimus", "2000-01-01", None), as_of=AS_OF)
    v1 = {"schema": "cnidose.patient/1", "id": "V1", "birth_date": "2000-01-01", "sex": "male", "agent": "tacrolimus",
          "indication": "atopic dermatitis", "therapy_start": "2026-10-01"}
    rec = parse_record(v1, as_of=AS_OF)  # patient/1 still read: oral, as it defaulted, and said
    assert rec.route == "oral" and "oral assumed" in rec.notes[0]


def test_eu_and_us_records_differ_where_the_labels_differ() -> None:
    base = _topical("tacrolimus", "1990-01-01", "topical")
    base["therapy"]["strength_percent"] = 0.1
    eu, us = rules(base, dt.date(2026, 10, 20)), rules({**base, "region": "US"}, dt.date(2026, 10, 20))
    assert "protopic-eu-2-weeks" in eu and "protopic-eu-2-weeks" not in us  # day 19: EU re-evaluates after 2 weeks
    assert "protopic-eu-step-down" in eu and "twice weekly" in eu["protopic-eu-step-down"].message
    assert "protopic-6-weeks" not in us
    assert "protopic-6-weeks" in rules({**base, "region": "US"}, dt.date(2026, 11, 20))
    assert "0.03 % or 0.1 % (16 years and older)" in eu["protopic-strength-frequency"].message


# -- psoriasis and atopic dermatitis: the missing protocol steps ---------------------------------------------------
def psoriasis(region: str = "EU", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "cnidose.patient/2", "id": "P1", "birth_date": "1980-03-01", "sex": "female", "region": region,
        "indication": "psoriasis", "therapy": {"agent": "cyclosporine", "product": "Neoral", "route": "oral",
                                               "start": "2026-01-10"},
        "regimens": [{"product": "Neoral", "dose": 100, "interval_h": 12, "start": "2026-01-10T08:00:00Z"}],
        "covariates": [{"name": "WT", "value": 70, "unit": "kg", "time": "2026-01-05T08:00:00Z"}],
        "labs": [{"name": "creatinine", "value": 80, "unit": "umol/L", "date": "2026-01-01"},
                 {"name": "creatinine", "value": 80, "unit": "umol/L", "date": "2026-01-07"}]}
    for k, v in extra.items():
        doc[k] = doc[k] + v if isinstance(v, list) and k in doc else v
    return doc


def creat(day: str, value: float) -> dict[str, Any]:
    return {"name": "creatinine", "value": value, "unit": "umol/L", "date": day}


def test_us_psoriasis_creatinine_rise_reduces_by_25_to_50_percent_in_mg() -> None:
    """Neoral/Gengraf USPI D&A (clinical-verification.md 1.1 P2): reduce 25-50 % for creatinine >= 25 % above."""
    a = rules(psoriasis("US", labs=[creat("2026-02-01", 100)]), dt.date(2026, 2, 2))["us-creatinine-25"]
    assert "a 25-50 % reduction of 100 mg twice daily (200 mg/day) is 100-150 mg/day" in a.message
    assert "50 mg (2 x 25 mg), 75 mg (3 x 25 mg)" in a.message


def test_us_psoriasis_stop_when_the_reduction_did_not_control_the_rise() -> None:
    doc = psoriasis("US", labs=[creat("2026-02-01", 100), creat("2026-03-01", 101)],
                    regimens=[{"product": "Neoral", "dose": 75, "interval_h": 12, "start": "2026-02-03T08:00:00Z"}])
    doc["regimens"][0]["stop"] = "2026-02-03T08:00:00Z"
    a = rules(doc, dt.date(2026, 3, 2))
    assert "us-creatinine-stop" in a and "Discontinue" in a["us-creatinine-stop"].message
    doc["labs"][-1]["value"] = 88  # back within 25 %
    assert "us-creatinine-stop" not in rules(doc, dt.date(2026, 3, 2))


def test_eu_egfr_rule_fires_with_one_baseline_and_says_so() -> None:
    doc = psoriasis(labs=[creat("2026-02-01", 102.4), creat("2026-02-15", 102.4)])
    doc["labs"] = doc["labs"][1:]  # one pre-treatment value
    a = rules(doc, dt.date(2026, 2, 20))["eu-egfr-25"]
    assert "baseline from 1 measurement (the SmPC asks for at least 2)" in a.message and "100-150 mg/day" in a.message


def test_atopic_dermatitis_steps() -> None:
    ad = psoriasis(labs=[creat("2026-02-01", 80 * 1.44), creat("2026-02-15", 80 * 1.44)])
    ad["indication"] = "atopic dermatitis"
    a = rules(ad, dt.date(2026, 2, 20))
    assert "ad-eu-egfr-35" in a and "Consider a further dose reduction" in a["ad-eu-egfr-35"].message
    us = rules({**ad, "region": "US"}, dt.date(2026, 2, 20))
    assert "ad-us-creatinine-25" in us and "ad-eu-egfr-35" not in us
    assert "-1 mg/kg/day at 70 kg: from 100 mg twice daily (200 mg/day) to 130 mg/day" in \
        us["ad-us-creatinine-25"].message and "AAD 2014" in us["ad-us-creatinine-25"].source


def test_psoriasis_hypertension_reduction_as_a_mg_range() -> None:
    bp = [{"time": "2026-02-01T09:00:00Z", "systolic": 150, "diastolic": 85},
          {"time": "2026-02-15T09:00:00Z", "systolic": 146, "diastolic": 88}]
    a = rules(psoriasis(blood_pressure=bp), dt.date(2026, 2, 20))["bp-two-readings"]
    assert "Reduce the dose by 25-50 %" in a.message and "100-150 mg/day" in a.message


# -- the new transplant rules, each side of every threshold ---------------------------------------------------------
def transplant(levels: list[tuple[float, float]] | None = None, labs: list[dict[str, Any]] | None = None,
               bp: list[tuple[float, int, int]] | None = None, **extra: Any) -> dict[str, Any]:
    doc = kidney()
    if levels is not None:
        doc["levels"] = [{"time": at(d, 7, 50) if isinstance(d, int) else at(d), "value": v, "sample": "trough"}
                         for d, v in levels]
    if labs is not None:
        doc["labs"] = labs
    if bp is not None:
        doc["blood_pressure"] = [{"time": at(d, 9), "systolic": s, "diastolic": di} for d, s, di in bp]
    doc.update(extra)
    return doc


@pytest.mark.parametrize(("value", "fires", "severity"), [
    (3.9, True, "warning"), (4.0, False, None), (11.0, False, None), (11.1, True, "info")])
def test_trough_against_the_target(value: float, fires: bool, severity: str | None) -> None:
    """US Prograf label Table 1: adult kidney with MMF, month 1-12: 4-11 ng/mL (one trough above: info)."""
    a = rules(transplant(levels=[(15, value)]))
    assert ("tx-trough-target" in a) is fires
    if fires:
        assert a["tx-trough-target"].severity == severity


def test_trough_timing_tolerance() -> None:
    """A trough 12 h after a 12-hourly dose; 1 h tolerance (engineering default)."""
    ok = rules(transplant(levels=[(15, 8.0)]))  # 07:50, 11 h 50 min after the 20:00 dose
    assert "tx-trough-timing" not in ok
    late = rules(transplant(levels=[(15 + 1 / 24, 8.0)]))  # 09:00, one hour after the 08:00 dose
    assert "drawn 1.0 h after the last dose" in late["tx-trough-timing"].message


@pytest.mark.parametrize(("values", "fires"), [([8.0, 10.0, 6.0], False), ([8.0, 12.0, 5.5], True)])
def test_intrapatient_variability(values: list[float], fires: bool) -> None:
    """CV > 30 % of troughs on an unchanged dose after month 3 (Yin et al. 2021): CV 25 % vs 38 %."""
    days = [100, 107, 114]
    doc = transplant(levels=list(zip(days, values, strict=True)))
    doc["administrations"] = [{"time": at(d, h), "dose": 5} for d in range(90, 115) for h in (8, 20)]
    a = rules(doc, TX + dt.timedelta(days=116))
    assert ("tx-trough-ipv" in a) is fires
    early = transplant(levels=list(zip([10, 14, 18], values, strict=True)))
    assert "tx-trough-ipv" not in rules(early)  # the stable phase only


def lab(day: float, value: float, name: str = "creatinine", unit: str = "umol/L") -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "time": at(day, 7)}


@pytest.mark.parametrize(("last", "fires"), [(147.0, False), (148.0, True)])  # baseline 118: +24.6 % / +25.4 %
def test_transplant_creatinine_rise_above_the_post_transplant_baseline(last: float, fires: bool) -> None:
    a = rules(transplant(labs=[lab(1, 180), lab(9, 118), lab(17, last)]))
    assert ("tx-creatinine-rise" in a) is fires


@pytest.mark.parametrize(("first", "last", "fires"), [(100.0, 126.0, False), (100.0, 127.0, True)])
def test_transplant_aki_within_48_hours(first: float, last: float, fires: bool) -> None:
    """KDIGO 2012: a rise of 26.5 umol/L or more within 48 h."""
    a = rules(transplant(labs=[lab(14, first), lab(15.5, last)]))
    assert ("tx-creatinine-aki" in a) is fires
    if fires:
        assert a["tx-creatinine-aki"].severity == "critical"


@pytest.mark.parametrize(("last", "fires"), [(149.0, False), (150.0, True)])
def test_transplant_aki_one_and_a_half_times_within_7_days(last: float, fires: bool) -> None:
    a = rules(transplant(labs=[lab(10, 100), lab(16, last)]))  # 6 days apart: 1.49 x / 1.5 x
    assert ("tx-creatinine-aki" in a) is fires


@pytest.mark.parametrize(("readings", "fires"), [
    ([(5, 129, 79), (9, 128, 78)], False), ([(5, 130, 70), (9, 120, 80)], True), ([(5, 140, 85)], False)])
def test_transplant_blood_pressure_target(readings: list[tuple[float, int, int]], fires: bool) -> None:
    """KDOQI guideline 10.1: < 130/80 mmHg after kidney transplantation; two readings at or above."""
    assert ("tx-bp-target" in rules(transplant(bp=readings))) is fires


@pytest.mark.parametrize(("k", "grade"), [(5.4, None), (5.5, "mild"), (6.0, "moderate"), (6.5, "severe")])
def test_hyperkalaemia_grades(k: float, grade: str | None) -> None:
    """UK Kidney Association 2023: >= 5.5 mmol/L; mild 5.5-5.9, moderate 6.0-6.4, severe >= 6.5."""
    a = rules(transplant(labs=[lab(15, k, "potassium", "mmol/L")]))
    assert ("tx-hyperkalaemia" in a) is (grade is not None)
    if grade:
        assert f"({grade})" in a["tx-hyperkalaemia"].message


@pytest.mark.parametrize(("mg", "fires"), [(0.61, False), (0.59, True)])
def test_hypomagnesaemia(mg: float, fires: bool) -> None:
    """< 0.60 mmol/L (1.46 mg/dL; StatPearls)."""
    assert ("tx-hypomagnesaemia" in rules(transplant(labs=[lab(15, mg, "magnesium", "mmol/L")]))) is fires


def test_withdrawn_entries_leave_the_rules() -> None:
    doc = kidney()
    for lv in doc["levels"][-2:]:
        lv["status"], lv["status_reason"] = "entered-in-error", "wrong patient's sample"
    assert "tx-trough-target" not in rules(doc)
    doc["levels"][0]["status"] = "entered-in-error"  # a withdrawal needs its reason
    with pytest.raises(RecordError, match=r"levels\[0\].status_reason"):
        parse_record(doc, as_of=AS_OF)


def test_genotype_drives_the_models_covariate() -> None:
    from cnidose.records.exchange import record_to_nonmem

    doc = kidney()
    exp = record_to_nonmem(parse_record(doc, as_of=AS_OF))
    k = exp.header.index("CYP3A5")
    assert {r[k] for r in exp.rows} == {0.0}  # *3/*3: a non-expresser
    doc["genotypes"][0]["result"] = "*1/*3"
    exp = record_to_nonmem(parse_record(doc, as_of=AS_OF))
    assert {r[k] for r in exp.rows} == {1.0}
    doc["genotypes"][0]["result"] = "*1/*9"
    with pytest.raises(RecordError, match=r"genotypes\[0\].result.*\*9"):
        parse_record(doc, as_of=AS_OF)


# -- one use case, every face -----------------------------------------------------------------------------------------
def test_nonmem_export_carries_the_interaction_as_exposure() -> None:
    from cnidose.records.exchange import record_to_nonmem

    doc = kidney()
    doc["medications"].append({"name": "voriconazole", "start": "2026-11-25", "daily_mg": 400})
    rec = parse_record(doc, as_of=AS_OF)
    exposure = [{"agent": x.agent, "factor": x.factor, "start": x.start.isoformat(),
                 "end": x.end.isoformat() if x.end else None} for x in assess(rec, AS_OF).exposure]
    exp = record_to_nonmem(rec, exposure=exposure)
    j, t, ev = exp.header.index("EXPOSURE"), exp.header.index("TIME"), exp.header.index("EVID")
    boundary = [r for r in exp.rows if r[ev] == 2]
    assert len(boundary) == 1 and boundary[0][j] == 1.0  # at 00:00 UTC on the start day
    after = [r[j] for r in exp.rows if r[t] > boundary[0][t]]
    assert after and set(after) == {3.0}
    assert {r[j] for r in exp.rows if r[t] < boundary[0][t]} == {1.0}


def test_cli_recommend_and_the_use_case_give_the_same_answer(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cnidose.cli import app

    doc = kidney()
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["recommend", "--patient", str(path), "--as-of", "2026-11-30", "--json",
                                 "--draws", "300"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    direct = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=300)
    assert cli["recommendation"]["summary"] == direct["recommendation"]["summary"]
    assert cli["recommendation"]["chosen"]["dose"] < 5  # troughs above range: a lower dose
    assert [a["rule"] for a in cli["clinical"]["alerts"]] == [a["rule"] for a in direct["clinical"]["alerts"]]
    text = CliRunner().invoke(app, ["recommend", "--patient", str(path), "--as-of", "2026-11-30", "--draws", "300"])
    assert text.exit_code == 0, text.output
    assert "why this model: tacrolimus, kidney, adult, Prograf; andrews2019_tac_adult_kidney is the default" \
        in text.stdout


def test_the_model_follows_the_formulation_and_says_why() -> None:
    """The same patient on Prograf is fitted with the kidney default (Andrews 2019); on Envarsus XR, which no
    library model describes, there is no fit, and the reason names the formulation -- an immediate-release
    model is never used silently for a once-daily prolonged-release product."""
    doc = kidney()
    out = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert out["model_choice"]["id"] == "andrews2019_tac_adult_kidney"
    assert out["model"].startswith("andrews2019_tac_adult_kidney")
    assert "is the default for tacrolimus, kidney, adult" in out["model_inputs"]["model"]["why"]
    for r in doc["regimens"]:
        r["product"] = "Envarsus XR"
    env = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert env["model_choice"]["id"] is None and "recommendation" not in env
    assert any("describes Envarsus XR" in w for w in env["warnings"]), env["warnings"]


def test_a_liver_recipient_is_fitted_with_the_graft_donors_genotype() -> None:
    """A liver graft metabolises tacrolimus: the record's donor CYP3A5 and donor type reach the data (DONOR_CYP3A5,
    LIVING_DONOR), the liver model is chosen, and an expresser recipient of an expresser graft is fitted with the
    higher clearance (Ji 2018: x 2.314, against x 1.523 with a non-expresser graft)."""
    from cnidose.records.exchange import record_to_nonmem

    doc = kidney()
    doc["indication"] = {"system": "ICD-10-CM", "code": "Z94.4"}
    doc["transplant"] |= {"organ": "liver", "donor_type": "living", "donor_cyp3a5": "*1/*3"}
    doc["genotypes"][0]["result"] = "*1/*1"
    rec = parse_record(doc, as_of=AS_OF)
    ex = record_to_nonmem(rec)
    row = ex.rows[0]
    assert row[ex.header.index("DONOR_CYP3A5")] == 1.0 and row[ex.header.index("LIVING_DONOR")] == 1.0
    out = analyse(rec, AS_OF, n_draws=200)
    assert out["model_choice"]["id"] == "ji2018_tac_liver_ldlt", out["model_choice"]
    cl_rede = out["model_inputs"]
    doc["transplant"]["donor_cyp3a5"] = "*3/*3"
    other = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert other["model_choice"]["id"] == "ji2018_tac_liver_ldlt"
    assert cl_rede != other["model_inputs"]  # the graft's genotype is an input of the fit


def heart(meds: list[dict[str, Any]]) -> dict[str, Any]:
    doc = kidney()
    doc["indication"] = {"system": "ICD-10-CM", "code": "Z94.1"}
    doc["transplant"] |= {"organ": "heart"}
    doc["medications"] += meds
    return doc


def test_a_heart_recipients_azole_comes_from_the_medication_list_with_the_papers_week_after() -> None:
    """Kirubakaran 2023 codes an azole antifungal as AZOLE = 1 while it is taken and for 7 days after: itraconazole
    taken 11-14 November gives 1 up to 22 November 00:00 UTC and 0 after; the heart model is chosen for a heart
    recipient and shows AZOLE among its inputs."""
    from cnidose.records.exchange import record_to_nonmem

    rec = parse_record(heart([{"name": "Itraconazole", "start": "2026-11-11", "stop": "2026-11-14",
                               "daily_mg": 400}]), as_of=AS_OF)
    ex = record_to_nonmem(rec, medication_covariates={"AZOLE": (("itraconazole", "voriconazole"), 7.0)})
    t, j, ev = ex.header.index("TIME"), ex.header.index("AZOLE"), ex.header.index("EVID")
    cut = (dt.datetime(2026, 11, 22, tzinfo=dt.UTC) - ex.origin).total_seconds() / 3600
    # each row holds the value over the interval it ends, with a row of its own at the change (as EXPOSURE)
    assert [r[ev] for r in ex.rows if r[t] == cut] == [2]
    assert {r[j] for r in ex.rows if r[t] <= cut} == {1.0} and {r[j] for r in ex.rows if r[t] > cut} == {0.0}
    assert any(n.startswith("AZOLE: 1 while itraconazole") for n in ex.notes)
    assert "AZOLE" not in record_to_nonmem(rec).header  # no model asked for it
    entered = heart([])
    entered["covariates"].append({"name": "AZOLE", "value": 1, "unit": "1", "time": at(1)})
    with pytest.raises(RecordError, match="AZOLE is not entered: it is read from the medication list") as info:
        parse_record(entered, as_of=AS_OF)
    assert info.value.field == f"covariates[{len(entered['covariates']) - 1}].name"
    from cnidose.records.units import FieldError, covariate_value

    for name in ("AZOLE", "POD"):  # nor stored as an entry the record would then refuse
        with pytest.raises(FieldError, match=f"{name} is not entered") as err:
            covariate_value(name, 1, "1" if name == "AZOLE" else "d")
        assert err.value.field == "name"
    out = analyse(rec, AS_OF, n_draws=200)
    assert out["model_choice"]["id"] == "kirubakaran2023_tac_adult_heart", out["model_choice"]
    shown = {c["name"]: c for c in out["model_inputs"]["covariates"]}
    assert shown["AZOLE"]["value"] == 0.0 and shown["AZOLE"]["shown"] == "no azole antifungal"
    assert "recommendation" in out
    assert not any(w.startswith("AZOLE is 1 at the last record") for w in out["warnings"])
    later = analyse(parse_record(heart([{"name": "itraconazole", "start": "2026-11-11", "stop": "2026-11-29"}]),
                                 as_of=AS_OF), AS_OF, n_draws=200)
    assert any(w.startswith("AZOLE is 1 at the last record (itraconazole; AZOLE 0 from 2026-12-07)")
               for w in later["warnings"]), later["warnings"]


def test_an_azole_in_the_heart_model_is_not_also_an_exposure_multiplier() -> None:
    """Voriconazole multiplies tacrolimus exposure by 3 in the rule base (its label); the heart model already has
    an azole's effect in AZOLE (CL/F 4.2 against 21.1 L/h), so applying both would count it twice. The warning says
    which one is used; a kidney recipient on the same drug still gets the multiplier."""
    doc = heart([{"name": "voriconazole", "start": "2026-11-25", "daily_mg": 400}])
    out = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert out["model_choice"]["id"] == "kirubakaran2023_tac_adult_heart"
    assert out["exposure"] == []
    assert any(w.startswith("voriconazole: in the model as a covariate (AZOLE)") for w in out["warnings"])
    assert not any("applied to the model (CL/F divided by" in w for w in out["warnings"])
    assert {c["name"]: c["value"] for c in out["model_inputs"]["covariates"]}["AZOLE"] == 1.0
    assert any(a["rule"] == "interaction:voriconazole" for a in out["clinical"]["alerts"])  # the label's advice stays
    assert any(w.startswith("AZOLE is 1 at the last record (voriconazole; ongoing): the forecasts and the "
                            "recommended dose assume it stays 1") for w in out["warnings"]), out["warnings"]
    assert not any("has no term for it" in w for w in out["warnings"])
    doc["indication"], doc["transplant"]["organ"] = {"system": "ICD-10-CM", "code": "Z94.0"}, "kidney"
    kid = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert [x["drug"] for x in kid["exposure"]] == ["voriconazole"]
    assert not any("has no term for it" in w for w in kid["warnings"])


def test_an_inhibitor_the_model_does_not_know_is_named_in_the_recommendation() -> None:
    """Posaconazole is a strong CYP3A inhibitor; the heart model's AZOLE names itraconazole, voriconazole and
    fluconazole only, and the rule base has no exposure number for it, so the model treats the patient as without
    it: the recommendation says so rather than leave a five-fold clearance difference unmentioned."""
    out = analyse(parse_record(heart([{"name": "posaconazole", "start": "2026-11-20", "daily_mg": 300}]),
                               as_of=AS_OF), AS_OF, n_draws=200)
    assert out["model_choice"]["id"] == "kirubakaran2023_tac_adult_heart"
    hit = [w for w in out["warnings"] if w.startswith("posaconazole (inhibitor) is on the medication list, but the "
                                                      "model has no term for it")]
    assert hit and "its AZOLE covariate names itraconazole, voriconazole, fluconazole" in hit[0], out["warnings"]
    assert {c["name"]: c["value"] for c in out["model_inputs"]["covariates"]}["AZOLE"] == 0.0
    stopped = analyse(parse_record(heart([{"name": "posaconazole", "start": "2026-10-01", "stop": "2026-10-20"}]),
                                   as_of=AS_OF), AS_OF, n_draws=200)
    assert not any("has no term for it" in w for w in stopped["warnings"])  # stopped before the first record
    later = dt.date(2026, 12, 2)  # the last dose is on 30 November; voriconazole started after it, before today
    since = analyse(parse_record(heart([{"name": "voriconazole", "start": "2026-12-01"}]), as_of=later), later,
                    n_draws=200)
    assert {c["name"]: c["value"] for c in since["model_inputs"]["covariates"]}["AZOLE"] == 1.0
    assert any(w.startswith("AZOLE is 1 at the last record (voriconazole; ongoing)") for w in since["warnings"])


def test_an_interacting_drug_started_after_the_last_record_changes_the_recommendation() -> None:
    """Voriconazole started the day after the last dose and level, before the assessment date: its exposure x3 (the
    label) must reach the recommendation. Before, the rows ended at the last record, whose EXPOSURE was 1, so the
    recommendation was the same as without voriconazole while a warning said the multiplier was applied."""
    later = dt.date(2026, 12, 2)
    base = analyse(parse_record(kidney(), as_of=later), later, n_draws=300)
    doc = kidney()
    doc["medications"].append({"name": "voriconazole", "start": "2026-12-01", "daily_mg": 400})
    vori = analyse(parse_record(doc, as_of=later), later, n_draws=300)
    assert [x["drug"] for x in vori["exposure"]] == ["voriconazole"]
    b, v = base["recommendation"]["chosen"], vori["recommendation"]["chosen"]
    assert v["dose"] <= b["dose"] / 2, (b, v)  # about a third of the dose for the same aim
    # the current regimen's forecast rises towards three-fold (Andrews 2019's slow peripheral compartment: about
    # two-fold after the forecast's five days)
    cur_b, cur_v = base["forecast"]["current"]["p50"][-1], vori["forecast"]["current"]["p50"][-1]
    assert 1.5 < cur_v / cur_b < 3.0, (cur_b, cur_v)


def test_sublingual_doses_are_read_as_oral_and_the_warning_says_so() -> None:
    doc = kidney()
    doc["administrations"] = [{"time": at(0.5), "dose": 1.0, "unit": "mg", "product": "Prograf",
                               "route": "sublingual"}]
    out = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert any("1 sublingual dose(s) read as oral" in w for w in out["warnings"]), out["warnings"]


def test_a_pre_transplant_level_does_not_block_the_fit() -> None:
    doc = kidney()
    doc["administrations"].insert(0, {"time": at(-3, 8), "dose": 5})  # given before the transplant
    doc["levels"].insert(0, {"id": "level:early", "time": at(-2, 7), "value": 6.0, "flags": [
        "drawn before the transplant (2026-11-11)"]})
    out = analyse(parse_record(doc, as_of=AS_OF), AS_OF, n_draws=200)
    assert out.get("recommendation") is not None, out["warnings"]
    assert any(f["entry"] == "level:early" for f in out["flagged"])
    assert out["recommendation"]["summary"].startswith("Inputs flagged or left out")


# -- round trips --------------------------------------------------------------------------------------------------
def _canon(doc: dict[str, Any]) -> dict[str, Any]:
    """A record document without its storage metadata (ids, who and when), lists in a stable order."""
    d = parse_record(doc, as_of=None).to_document()
    for key, v in d.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            for e in v:
                for meta in ("id", "entered_by", "entered_at"):
                    e.pop(meta, None)
            d[key] = sorted(v, key=lambda e: json.dumps(e, sort_keys=True))
    return d


def test_patient2_database_fhir_patient2_round_trip(tmp_path: Path) -> None:
    from cnidose.records.db import make_engine, upgrade
    from cnidose.records.exchange import chart_to_record_document, import_record
    from cnidose.records.fhir import export_bundle, import_bundle
    from cnidose.records.store import SYSTEM, Store

    doc = kidney()
    doc["levels"][1] |= {"status": "entered-in-error", "status_reason": "haemolysed"}
    doc["levels"][2]["flags"] = ["a confirmed warning"]
    doc["severity"] = "high immunological risk"
    doc["medications"].append({"name": "voriconazole", "start": "2026-11-25", "stop": "2026-11-28", "daily_mg": 400})
    doc["conditions"] = ["type 2 diabetes"]
    stores = []
    for k in range(2):
        engine = make_engine(f"sqlite:///{tmp_path / f'db{k}.db'}")
        upgrade(engine)
        stores.append(Store(engine))
    pid = import_record(stores[0], SYSTEM, copy.deepcopy(doc), family_name="Dvořák", given_name="Jiří")
    back = chart_to_record_document(stores[0].chart(SYSTEM, pid))
    assert _canon(back) == _canon(doc)
    bundle = export_bundle(stores[0].chart(SYSTEM, pid))
    pid2 = import_bundle(stores[1], SYSTEM, bundle)
    again = chart_to_record_document(stores[1].chart(SYSTEM, pid2))
    assert _canon(again) == _canon(doc)
    assert stores[1].chart(SYSTEM, pid2).patient["family_name"] == "Dvořák"


def test_the_page_forecast_treats_the_next_occasion_as_the_strategy_does() -> None:
    """The forecast curves continue the patient as the recommendation does: with occ-last the last occasion's
    effect carries over (each draw's own, so the band is narrower than a new occasion drawn from its prior, which
    adds Andrews 2019's between-occasion variability on CL/F); the fit and the posterior are the same."""
    rec = parse_record(kidney(), as_of=AS_OF)
    plain = analyse(rec, AS_OF, n_draws=300)
    last = analyse(rec, AS_OF, n_draws=300, strategy="occ-last")
    assert plain["model"].startswith("andrews2019_tac_adult_kidney")  # a model with between-occasion variability
    assert last["recommendation"]["inputs"]["occasion"] == "last"
    assert plain["curve"] == last["curve"]  # the same fit and posterior draws

    def spread(out: Any) -> float:
        f = out["forecast"]["current"]
        return float(np.median(np.log(np.array(f["p90"]) / np.array(f["p10"]))))

    assert spread(last) < spread(plain) - 0.02, (spread(last), spread(plain))  # 0.41 against 0.45
