"""Entry, plausibility and withdrawal through the JSON API (issue 13): every flag asks for confirmation (409)
and is kept with the entry; impossible entries are refused naming the field; an entry marked entered in error
leaves the rules and the fit; a level dated before the transplant no longer makes the patient unfittable."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cnidose.records.db import make_engine, upgrade
from cnidose.records.demo import seed_demo
from cnidose.records.store import SYSTEM, Actor, Store
from cnidose.web.app import create_app
from cnidose.web.security import hash_password

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Store, dict[str, int]]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store)
    store.create_user(SYSTEM, "clin", hash_password("clin-pw"), "clinician")
    c = TestClient(create_app(store, secret_key="t"))
    token = c.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).json()["csrf"]
    yield c, {"X-CSRF-Token": token}, store, ids
    engine.dispose()


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _post_confirmed(c: TestClient, h: dict[str, str], url: str, body: dict[str, Any], flag: str) -> int:
    r = c.post(url, json=body, headers=h)
    assert r.status_code == 409, r.text
    assert any(flag in f for f in r.json()["flags"]), r.json()
    assert c.post(url, json=body | {"confirm": False}, headers=h).status_code == 409  # still not stored
    r = c.post(url, json=body | {"confirm": True}, headers=h)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _flags_of(store: Store, pid: int, kind: str, eid: int) -> list[str]:
    chart = store.chart(SYSTEM, pid)
    rows = {"observation": chart.observations, "dose": chart.doses, "regimen": chart.regimens}[kind]
    return next(r["flags"] for r in rows if r["id"] == eid) or []


@pytest.mark.parametrize(("kind", "make", "flag"), [
    ("observation", lambda p: ("levels", {"value": 150, "observed_at": _iso(NOW - dt.timedelta(hours=3))}),
     "implausible for the regimen"),
    ("observation", lambda p: ("levels", {"value": 9, "observed_at": _iso(NOW - dt.timedelta(days=40))}),
     "drawn before the transplant"),
    ("observation", lambda p: ("levels", {"value": 9, "observed_at": _iso(NOW - dt.timedelta(days=40))}),
     "no tacrolimus dose is recorded before"),
    ("dose", lambda p: ("doses", {"amount": 50, "product": "Prograf", "given_at": _iso(NOW - dt.timedelta(hours=3))}),
     "10 times the regimen's 5 mg"),
    ("dose", lambda p: ("doses", {"amount": 5, "product": "Advagraf", "given_at": _iso(NOW - dt.timedelta(hours=3))}),
     "not the regimen's (Prograf)"),
    ("regimen", lambda p: ("regimens", {"product": "Tacni", "dose": 4, "interval_h": 12,
                                        "start_at": _iso(NOW - dt.timedelta(hours=3))}),
     "not among cnidose's tacrolimus products"),
])
def test_each_flag_asks_for_confirmation_and_stays_with_the_entry(api: Any, kind: str, make: Any, flag: str) -> None:
    c, h, store, ids = api
    pid = ids["DEMO-TX-1"]
    path, body = make(pid)
    eid = _post_confirmed(c, h, f"/api/v1/patients/{pid}/{path}", body, flag)
    assert any(flag in f for f in _flags_of(store, pid, kind, eid))
    audit = store.audit_log(Actor("root", "admin"), patient_id=pid)
    assert any(a["object_id"] == str(eid) and a["detail"] and "confirmed" in a["detail"] for a in audit)


def test_duplicates_are_flagged(api: Any) -> None:
    c, h, store, ids = api
    pid = ids["DEMO-TX-1"]
    chart = store.chart(SYSTEM, pid)
    last = [o for o in chart.observations if o["category"] == "level"][-1]
    _post_confirmed(c, h, f"/api/v1/patients/{pid}/levels", {"value": last["value"],
                                                             "observed_at": _iso(last["observed_at"])}, "duplicate")
    dose = chart.doses[-1]
    _post_confirmed(c, h, f"/api/v1/patients/{pid}/doses", {"amount": dose["amount_mg"], "product": dose["product"],
                                                            "given_at": _iso(dose["given_at"])}, "duplicate")


@pytest.mark.parametrize(("path", "body", "field", "text"), [
    ("levels", {"value": 9, "observed_at": _iso(NOW + dt.timedelta(days=1))}, "observed_at", "in the future"),
    ("doses", {"amount": 5, "product": "Prgoraf", "given_at": _iso(NOW - dt.timedelta(hours=1))}, "product",
     "did you mean Prograf?"),
    ("labs", {"name": "creatinine", "value": 90, "unit": "umol/L", "observed_at": _iso(NOW + dt.timedelta(days=2))},
     "observed_at", "in the future"),
    ("genotypes", {"gene": "CYP3A5", "result": "*1/*9", "source": "lab"}, "result", "*9"),
])
def test_impossible_entries_are_refused_naming_the_field(api: Any, path: str, body: dict[str, Any], field: str,
                                                          text: str) -> None:
    c, h, _, ids = api
    r = c.post(f"/api/v1/patients/{ids['DEMO-TX-1']}/{path}", json=body | {"confirm": True}, headers=h)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field and text in r.json()["detail"][0]["msg"]


def test_entered_in_error_through_the_api_leaves_the_rules(api: Any) -> None:
    c, h, store, ids = api
    pid = ids["DEMO-TX-1"]
    assert "tx-trough-target" in {a["rule"] for a in _alerts(store, pid)}
    levels = [o for o in store.chart(SYSTEM, pid).observations if o["category"] == "level"]
    for o in levels[-2:]:  # the two troughs above the range
        r = c.post(f"/api/v1/entries/observation/{o['id']}/entered-in-error", json={"reason": "mislabelled tube"},
                   headers=h)
        assert r.status_code == 200, r.text
    assert "tx-trough-target" not in {a["rule"] for a in _alerts(store, pid)}
    doc = c.get(f"/api/v1/patients/{pid}/record", headers=h).json()
    withdrawn = [x for x in doc["levels"] if x.get("status") == "entered-in-error"]
    assert len(withdrawn) == 2 and withdrawn[0]["status_reason"] == "mislabelled tube"
    r = c.post(f"/api/v1/entries/observation/{levels[-1]['id']}/entered-in-error", json={"reason": "again"},
               headers=h)
    assert r.status_code == 422  # already withdrawn
    assert c.post("/api/v1/entries/nonsense/1/entered-in-error", json={"reason": "x"}, headers=h).status_code == 404


def _alerts(store: Store, pid: int) -> list[dict[str, Any]]:
    from cnidose.web.services import clinical_assessment

    return clinical_assessment(store.chart(SYSTEM, pid), NOW.date())["alerts"]


def test_regimen_change_medication_stop_genotype_and_record_fields(api: Any) -> None:
    c, h, store, ids = api
    pid = ids["DEMO-TX-1"]
    start = _iso(NOW - dt.timedelta(hours=2))
    assert c.post(f"/api/v1/patients/{pid}/regimens", json={"product": "Prograf", "dose": 3, "interval_h": 12,
                                                            "start_at": start}, headers=h).status_code == 201
    regs = [r for r in store.chart(SYSTEM, pid).regimens if r["status"] == "final"]
    assert regs[-1]["dose_mg"] == 3 and regs[-1]["stop_at"] is None and regs[-2]["stop_at"] is not None
    mid = c.post(f"/api/v1/patients/{pid}/medications", json={
        "name": "voriconazole", "start_on": NOW.date().isoformat(), "daily_mg": 400}, headers=h).json()["id"]
    vori = next(a for a in _alerts(store, pid) if a["rule"] == "interaction:voriconazole")
    assert "one third of 6 mg/day is 2 mg/day: 1 mg twice daily" in vori["message"]
    assert c.post(f"/api/v1/medications/{mid}/stop", json={"stop_on": NOW.date().isoformat()},
                  headers=h).status_code == 200
    assert c.post(f"/api/v1/patients/{pid}/genotypes", json={
        "gene": "CYP3A5", "result": "*1/*3", "source": "genotyping report"}, headers=h).status_code == 201
    assert c.post(f"/api/v1/patients/{pid}/blood-pressure", json={"systolic": 124, "diastolic": 76,
                                                                  "observed_at": start}, headers=h).status_code == 201
    r = c.patch(f"/api/v1/patients/{pid}", json={"region": "US", "severity": "high risk"}, headers=h)
    assert r.status_code == 200
    doc = c.get(f"/api/v1/patients/{pid}/record", headers=h).json()
    assert doc["region"] == "US" and doc["severity"] == "high risk"
    assert doc["genotypes"][-1]["result"] == "*1/*3" and doc["medications"][-1]["stop"] == NOW.date().isoformat()
    assert c.patch(f"/api/v1/patients/{pid}", json={"indication": "psoriatic nails"}, headers=h).status_code == 422


def test_a_pre_transplant_level_no_longer_blocks_the_fit(api: Any) -> None:
    c, h, store, ids = api
    pid = ids["DEMO-TX-1"]
    tx = store.chart(SYSTEM, pid).patient["transplant_date"]
    early = dt.datetime(tx.year, tx.month, tx.day, 6, tzinfo=dt.UTC) - dt.timedelta(days=10)
    _post_confirmed(c, h, f"/api/v1/patients/{pid}/levels", {"value": 6.0, "observed_at": _iso(early)},
                    "drawn before the transplant")
    r = c.post(f"/api/v1/patients/{pid}/recommendation", headers=h)
    assert r.status_code == 201, r.text
    result = r.json()["result"]
    assert result.get("recommendation") is not None, result["warnings"]
    assert result["recommendation"]["summary"].startswith("Inputs flagged or left out")
    assert any("drawn before the transplant" in w for w in result["warnings"])
