"""The web app through its HTTP interface (FastAPI's test client): the role matrix over every route, sign-in
throttling, CSRF, field errors (pages and API), the audit trail, iCalendar, and the OpenAPI schema."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Route

from cnidose.records.db import make_engine, upgrade
from cnidose.records.demo import seed_demo
from cnidose.records.store import SYSTEM, Actor, Store
from cnidose.web.app import create_app
from cnidose.web.security import hash_password

TODAY = dt.date(2026, 11, 25)
#: rate limits the matrix cannot reach (its clients all share one address); the limits are tested on their own
ROOMY = {"login": "10000/minute", "booking": "10000/hour", "booking-all": "10000/day"}
USERS = {"clin": ("clinician", None), "pharm": ("pharmacist", None), "root": ("admin", None),
         "karel": ("patient", "DEMO-TX-1"), "petra": ("patient", "DEMO-DERM-1")}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Store, dict[str, int]]]:
    db = tmp_path_factory.mktemp("web") / "cnidose.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store, TODAY)
    for name, (role, mrn) in USERS.items():
        store.create_user(SYSTEM, name, hash_password(f"{name}-pw"), role, patient_id=ids[mrn] if mrn else None)
    app = create_app(store, secret_key="test-secret", today=lambda: TODAY, rate_limits=ROOMY)
    yield app, store, ids
    engine.dispose()


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field on the page"
    return m.group(1)


def client(app: Any, user: str | None) -> tuple[TestClient, str]:
    """A client signed in as ``user`` (None: anonymous) and its CSRF token."""
    c = TestClient(app, follow_redirects=False)
    token = _csrf(c.get("/login").text)
    if user is None:
        return c, token
    r = c.post("/login", data={"username": user, "password": f"{user}-pw", "csrf": token, "next": "/"})
    assert r.status_code == 303, r.text
    r = c.post("/api/v1/session", json={"username": user, "password": f"{user}-pw"})
    return c, r.json()["csrf"]


def test_role_matrix_over_every_route(site: tuple[Any, Store, dict[str, int]]) -> None:
    """Every route of the app is in this table; each role reaches exactly the routes it should (no read or
    write without the right role), and nothing answers 500."""
    app, store, ids = site
    kid, pso = ids["DEMO-TX-1"], ids["DEMO-DERM-1"]
    staff = {"clin", "pharm"}
    everyone = {None, "clin", "pharm", "root", "karel", "petra"}
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).replace(minute=0, second=0, microsecond=0)
    slot = iter(range(10_000))

    def when() -> str:
        return (future + dt.timedelta(hours=next(slot))).isoformat()

    def draft() -> int:
        return store.save_assessment(SYSTEM, kid, kind="assessment", inputs={}, result={}, model_ref=None,
                                     package_version="test")

    uid = store.create_user(SYSTEM, "spare", hash_password("spare-password"), "clinician")
    appt = store.book(SYSTEM, department="dermatology", starts_at=future - dt.timedelta(days=1), patient_id=kid)
    at = "2026-11-24T08:00"
    # (method, path template, allowed users, body maker)
    table: list[tuple[str, str, set[str | None], Any]] = [
        ("GET", "/", everyone - {None}, None), ("GET", "/login", everyone, None),
        ("GET", "/patients", staff | {"karel", "petra"}, None),
        ("GET", "/patients/{pid}", staff | {"karel"}, None),
        ("POST", "/patients/{pid}/levels", staff, {"value": "8.1", "unit": "ng/mL", "observed_at": at}),
        ("POST", "/patients/{pid}/doses", staff, {"amount": "3", "unit": "mg", "given_at": at, "product": "Prograf"}),
        ("POST", "/patients/{pid}/labs", staff, {"name": "creatinine", "value": "120", "unit": "umol/L",
                                                 "observed_at": at}),
        ("POST", "/patients/{pid}/regimens", staff, {"product": "Prograf", "dose": "4", "interval_h": "12",
                                                     "start_at": at, "route": "oral"}),
        ("POST", "/patients/{pid}/medications", staff, {"name": "fluconazole", "start_on": "2026-11-20"}),
        ("POST", "/patients/{pid}/medications/{mid}/stop", staff, {"stop_on": "2026-11-23"}),
        ("POST", "/patients/{pid}/vitals", staff, {"systolic": "128", "diastolic": "78", "observed_at": at}),
        ("POST", "/patients/{pid}/covariates", staff, {"name": "WT", "value": "80", "unit": "kg",
                                                       "measured_at": at}),
        ("POST", "/patients/{pid}/genotypes", staff, {"gene": "CYP3A5", "result": "*3/*3", "source": "lab"}),
        ("POST", "/patients/{pid}/record", staff, {"region": "EU"}),
        ("POST", "/patients/{pid}/entries/{kind}/{eid}/withdraw", staff, {"reason": "typing error"}),
        ("POST", "/patients/{pid}/assess", staff, {}),
        ("POST", "/assessments/{aid}/sign", staff, lambda: {"decision": "continue", "pid": str(kid)}),
        ("POST", "/patients/{pid}/follow-ups", staff, {}),
        ("GET", "/appointments/{appt_id}.ics", staff | {"karel"}, None),
        ("GET", "/book", everyone, None),
        ("POST", "/book", everyone - {"root"}, lambda: {"starts_at": when()[:16], "reason": "eczema",
                                                        "contact_name": "A", "contact_email": "a@example.org"}),
        ("GET", "/calendar", staff, None),
        ("POST", "/appointments/{appt_id}/status", staff, {"status": "confirmed"}),
        ("GET", "/patients/{pid}/report", staff | {"karel"}, None),
        ("GET", "/patients/{pid}/report.pdf", staff | {"karel"}, None),
        ("GET", "/admin/audit", {"root"}, None),
        ("POST", "/login", everyone, None),  # exercised by client() for every user
        ("POST", "/api/v1/session", everyone, None),
        ("GET", "/api/v1/patients", staff | {"karel", "petra"}, None),
        ("GET", "/api/v1/patients/{pid}", staff | {"karel"}, None),
        ("POST", "/api/v1/patients/{pid}/levels", staff, {"value": 8.0, "observed_at": at + ":00Z"}),
        ("POST", "/api/v1/patients/{pid}/doses", staff, {"amount": 3, "given_at": at + ":00Z"}),
        ("POST", "/api/v1/patients/{pid}/labs", staff, {"name": "creatinine", "value": 120, "unit": "umol/L",
                                                        "observed_at": at + ":00Z"}),
        ("PATCH", "/api/v1/patients/{pid}", staff, {"region": "EU"}),
        ("GET", "/api/v1/patients/{pid}/record", staff | {"karel"}, None),
        ("POST", "/api/v1/patients/{pid}/regimens", staff, {"product": "Prograf", "dose": 4, "interval_h": 12,
                                                            "start_at": at + ":00Z"}),
        ("POST", "/api/v1/patients/{pid}/medications", staff, {"name": "fluconazole", "start_on": "2026-11-20"}),
        ("POST", "/api/v1/medications/{mid}/stop", staff, {"stop_on": "2026-11-23"}),
        ("POST", "/api/v1/patients/{pid}/blood-pressure", staff, {"systolic": 128, "diastolic": 78,
                                                                  "observed_at": at + ":00Z"}),
        ("POST", "/api/v1/patients/{pid}/covariates", staff, {"name": "WT", "value": 80, "unit": "kg",
                                                              "measured_at": at + ":00Z"}),
        ("POST", "/api/v1/patients/{pid}/genotypes", staff, {"gene": "CYP3A5", "result": "*3/*3", "source": "lab"}),
        ("POST", "/api/v1/entries/{kind}/{eid}/entered-in-error", staff, {"reason": "typing error"}),
        ("POST", "/api/v1/patients/{pid}/recommendation", staff, {}),
        ("GET", "/api/v1/assessments/{aid}", staff, None),  # a draft: a patient sees signed ones only
        ("POST", "/api/v1/assessments/{aid}/sign", staff, {"decision": "continue"}),
        ("POST", "/api/v1/bookings", everyone - {"root"}, lambda: {"starts_at": when(), "contact_name": "B",
                                                        "contact_email": "b@example.org"}),
        ("GET", "/api/v1/calendar", staff, None),
        ("GET", "/api/v1/patients/{pid}/fhir", staff | {"karel"}, None),
        ("POST", "/api/v1/fhir", staff, {"resourceType": "Bundle", "type": "collection", "entry": []}),
        ("GET", "/api/v1/openapi.json", everyone, None), ("GET", "/vendor/{name}", everyone, None),
        ("GET", "/account", everyone - {None}, None),
        ("POST", "/account/password", everyone - {None}, {"current": "wrong", "new": "a-new-password"}),
        ("POST", "/api/v1/account/password", everyone - {None}, {"current": "wrong", "new": "a-new-password"}),
        ("POST", "/api/v1/users/{uid}/sessions/revoke", {"root"}, {}),
        ("POST", "/api/v1/users/{uid}/deactivate", {"root"}, {}),
        ("DELETE", "/api/v1/session", everyone - {None}, None),  # ends the session: the last two
        ("POST", "/logout", everyone, {}),
    ]
    routes = {(m, r.path) for r in app.routes if isinstance(r, Route) for m in (r.methods or set()) - {"HEAD"}}
    assert routes == {(m, p) for m, p, _, _ in table}, "a route is missing from the matrix"
    for user in sorted(everyone, key=str):
        c, token = client(app, user)
        for method, template, allowed, body in table:
            if template in ("/login", "/api/v1/session"):
                continue
            path = template.format(pid=kid, uid=uid, aid=draft() if "{aid}" in template else 0, appt_id=appt,
                                   name="htmx.min.js",
                                   mid=store.add_medication(SYSTEM, kid, name="fluconazole", start_on="2026-11-20")
                                   if "{mid}" in template else 0, kind="covariate",
                                   eid=store.add_covariate(SYSTEM, kid, "WT", 81, "kg", "2026-11-24T08:00:00Z")
                                   if "{eid}" in template else 0)
            data = body() if callable(body) else body
            if method == "GET":
                r = c.get(path, params={"start": "2026-01-01T00:00:00Z", "end": "2027-12-31T00:00:00Z"}
                          if path == "/api/v1/calendar" else None)
            elif method == "PATCH":
                r = c.patch(path, json=data, headers={"X-CSRF-Token": token})
            elif method == "DELETE":
                r = c.delete(path, headers={"X-CSRF-Token": token})
            elif path.startswith("/api/"):
                r = c.post(path, json=data, headers={"X-CSRF-Token": token})
            else:
                r = c.post(path, data={**(data or {}), "csrf": token})
            # 404 for an object that exists is a denial that hides it (a patient asking for a draft)
            denied = r.status_code in (401, 403, 404) or (r.status_code == 303 and r.headers["location"].startswith(
                "/login") and template != "/logout")
            assert r.status_code < 500, (user, method, path, r.text[:300])
            assert denied == (user not in allowed), (user, method, path, r.status_code, r.text[:200])
        if user == "petra":  # a patient reaches their own record, not another's
            c, _ = client(app, user)
            assert c.get(f"/patients/{pso}").status_code == 200 and c.get(f"/patients/{kid}").status_code == 403


def test_sign_in_is_slowed_not_locked_and_audited(site: tuple[Any, Store, dict[str, int]]) -> None:
    """Three free failures per account, then a wait of 1, 2, 4 ... s (at most 30 s) after each failure; the right
    password is accepted as soon as the wait is over (no lockout), and every failure and refusal is audited."""
    _, store, _ = site
    app = create_app(store, secret_key="test-secret", today=lambda: TODAY)  # its own throttle
    c, token = client(app, None)
    for _ in range(3):
        r = c.post("/login", data={"username": "pharm", "password": "wrong", "csrf": token})
        assert r.status_code == 401 and "wrong user name or password" in r.text
    r = c.post("/login", data={"username": "pharm", "password": "pharm-pw", "csrf": token})  # 1 s to wait
    assert r.status_code == 429 and "try again in" in r.text and r.headers["Retry-After"] in ("1", "2")
    r = TestClient(app).post("/api/v1/session", json={"username": "pharm", "password": "pharm-pw"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) <= 2  # per account, from any client
    assert c.post("/login", data={"username": "clin", "password": "clin-pw", "csrf": token}).status_code == 303
    time.sleep(1.1)
    r = c.post("/login", data={"username": "pharm", "password": "wrong", "csrf": token})
    assert r.status_code == 401  # 4th failure: now 2 s
    r = c.post("/login", data={"username": "pharm", "password": "pharm-pw", "csrf": token})
    assert r.status_code == 429 and r.headers["Retry-After"] in ("2", "3")
    time.sleep(2.1)
    r = c.post("/login", data={"username": "pharm", "password": "pharm-pw", "csrf": token})
    assert r.status_code == 303  # the wait is over: the user gets in, and the count starts again
    log = store.audit_log(Actor("root", "admin", 3), limit=50)
    assert sum(1 for x in log if x["action"] == "login-failed" and x["username"] == "pharm") >= 4
    assert any(x["action"] == "login-throttled" for x in log)
    # the form needs its CSRF cookie
    r = TestClient(app, follow_redirects=False).post("/login", data={"username": "clin", "password": "clin-pw",
                                                                     "csrf": "forged"})
    assert r.status_code == 403


def test_csrf_is_required_for_every_change(site: tuple[Any, Store, dict[str, int]]) -> None:
    app, _, ids = site
    c, _ = client(app, "clin")
    r = c.post(f"/patients/{ids['DEMO-TX-1']}/levels", data={"value": "8", "unit": "ng/mL",
                                                              "observed_at": "2026-11-24T08:00", "csrf": "x"})
    assert r.status_code == 403
    r = c.post(f"/api/v1/patients/{ids['DEMO-TX-1']}/levels", json={"value": 8, "observed_at": "2026-11-24T08:00Z"})
    assert r.status_code == 403 and "X-CSRF-Token" in r.text


def test_field_errors_are_shown_next_to_the_field_and_returned_as_422(site: tuple[Any, Store, dict[str, int]]
                                                                       ) -> None:
    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "clin")
    before = len(store.chart(SYSTEM, kid).observations)
    page = c.get(f"/patients/{kid}").text
    r = c.post(f"/patients/{kid}/levels", data={"value": "8000", "unit": "ng/mL", "observed_at": "2026-11-24T08:00",
                                                "csrf": _csrf(page)})
    assert r.status_code == 422 and 'data-field="value"' in r.text and "if the unit is ng/L" in r.text
    r = c.post(f"/patients/{kid}/levels", data={"value": "eight", "unit": "ng/mL", "observed_at": "2026-11-24T08:00",
                                                "csrf": _csrf(page)})
    assert r.status_code == 422 and 'data-field="value"' in r.text
    r = c.post(f"/api/v1/patients/{kid}/levels", json={"value": -2, "observed_at": "2026-11-24T08:00:00Z"},
               headers={"X-CSRF-Token": token})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "value"]
    r = c.post(f"/api/v1/patients/{kid}/levels", json={"value": "x", "observed_at": "yesterday"},
               headers={"X-CSRF-Token": token})
    assert r.status_code == 422 and {tuple(d["loc"]) for d in r.json()["detail"]} == {("body", "value"),
                                                                                       ("body", "observed_at")}
    r = c.post(f"/api/v1/patients/{kid}/doses", json={"amount": 500, "given_at": "2026-11-24T08:00:00Z"},
               headers={"X-CSRF-Token": token})
    assert r.status_code == 422 and "ug would be an ordinary dose" in r.json()["detail"][0]["msg"]
    assert len(store.chart(SYSTEM, kid).observations) == before


def test_recommendation_through_the_api_is_stored_with_its_provenance_and_signed(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    app, _, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "pharm")
    c.post(f"/api/v1/patients/{kid}/levels", json={"value": 9.1, "observed_at": "2026-11-24T07:40:00Z"},
           headers={"X-CSRF-Token": token})  # a chart no assessment has seen
    r = c.post(f"/api/v1/patients/{kid}/recommendation", headers={"X-CSRF-Token": token})
    assert r.status_code == 201, r.text
    a = r.json()
    full = c.get(f"/api/v1/assessments/{a['id']}").json()["result"]
    plots = ("curve", "forecast", "pd_curve")
    assert a["reused"] is False and {k: v for k, v in full.items() if k not in plots} == a["result"]
    rec = a["result"]["recommendation"]
    assert a["status"] == "draft" and a["model_ref"].startswith("andrews2019_tac_adult_kidney 1.0.0 sha256:")
    assert rec["chosen"]["dose"] > 0 and rec["target"]["source"] and "curve" not in a["result"]
    assert "forecast" not in a["result"] and full["forecast"]["proposed"]["p50"]
    assert "pd_curve" not in a["result"] and full["pd_curve"]["series"] and a["result"]["pd"]["models"]
    assert c.get(a["curve_url"]).json()["result"]["curve"]["observed"]
    assert a["inputs"]["chart_sha256"] and a["package_version"]
    r = c.post(f"/api/v1/assessments/{a['id']}/sign", json={"decision": "as recommended"},
               headers={"X-CSRF-Token": token})
    assert r.status_code == 200
    r = c.post(f"/api/v1/assessments/{a['id']}/sign", json={"decision": "again"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 422 and "signed and cannot change" in r.text


def test_a_recommendation_on_unchanged_inputs_is_reused_and_computed_once(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """The analysis is a function of its inputs: asking again on the same chart returns the stored assessment
    (200, reused) instead of a duplicate; a new entry makes a new one (201); concurrent requests on new inputs
    store exactly one."""
    from concurrent.futures import ThreadPoolExecutor

    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "clin")
    h = {"X-CSRF-Token": token}

    def n_assessments() -> int:
        return len(store.chart(SYSTEM, kid).assessments)

    c.post(f"/api/v1/patients/{kid}/levels", json={"value": 8.4, "observed_at": "2026-11-24T07:50:00Z"}, headers=h)
    first = c.post(f"/api/v1/patients/{kid}/recommendation", headers=h)
    again = c.post(f"/api/v1/patients/{kid}/recommendation", headers=h)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["reused"] and again.json()["id"] == first.json()["id"]
    assert again.json()["result"] == first.json()["result"]
    n0 = n_assessments()
    # the page's button reuses it too
    r = c.post(f"/patients/{kid}/assess", data={"csrf": token}, follow_redirects=False)
    assert r.headers["location"].endswith(f"#assessment-{first.json()['id']}") and n_assessments() == n0
    # a new level: new inputs, a new assessment, computed once however many ask at the same time
    c.post(f"/api/v1/patients/{kid}/levels", json={"value": 8.9, "observed_at": "2026-11-24T08:05:00Z"}, headers=h)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: c.post(f"/api/v1/patients/{kid}/recommendation", headers=h), range(6)))
    assert sorted(r.status_code for r in got) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in got}) == 1 and n_assessments() == n0 + 1
    assert got[0].json()["inputs"]["observations"] == first.json()["inputs"]["observations"] + 1
    # entered in error changes the inputs as well (the entry stays, with its status)
    level = max(o["id"] for o in store.chart(SYSTEM, kid).observations)
    store.mark_entered_in_error(SYSTEM, "observation", level, "wrong patient")
    r = c.post(f"/api/v1/patients/{kid}/recommendation", headers=h)
    assert r.status_code == 201 and r.json()["id"] != got[0].json()["id"]


def test_every_patient_read_and_write_is_audited(site: tuple[Any, Store, dict[str, int]]) -> None:
    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "clin")
    admin = Actor("root", "admin", store.user("root")["id"])  # type: ignore[index]
    n0 = len(store.audit_log(admin, patient_id=kid, limit=100_000))
    c.get(f"/patients/{kid}")
    c.post(f"/api/v1/patients/{kid}/levels", json={"value": 7.5, "observed_at": "2026-11-24T19:50:00Z"},
           headers={"X-CSRF-Token": token})
    c.get(f"/api/v1/patients/{kid}")
    rows = store.audit_log(admin, patient_id=kid, limit=100_000)
    new = [(r["username"], r["action"], r["object_type"]) for r in rows[: len(rows) - n0]]
    assert ("clin", "read", "patient") in new and ("clin", "create", "observation") in new
    assert all(r["at"] and r["username"] and r["action"] and r["object_type"] for r in rows)


def test_icalendar_export(site: tuple[Any, Store, dict[str, int]]) -> None:
    app, store, ids = site
    start = (dt.datetime.now(dt.UTC) + dt.timedelta(days=40)).replace(hour=9, minute=0, second=0, microsecond=0)
    aid = store.book(SYSTEM, department="nephrology", starts_at=start, patient_id=ids["DEMO-TX-1"],
                     kind="follow-up", reason="trough, creatinine; review")
    c, _ = client(app, "karel")
    r = c.get(f"/appointments/{aid}.ics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/calendar")
    assert f"DTSTART:{start.strftime('%Y%m%dT%H%M%SZ')}" in r.text and "trough\\, creatinine\\; review" in r.text
    assert r.text.startswith("BEGIN:VCALENDAR\r\n") and r.text.endswith("END:VCALENDAR\r\n")


def test_openapi_schema_lists_the_api(site: tuple[Any, Store, dict[str, int]]) -> None:
    app, _, _ = site
    spec = TestClient(app).get("/api/v1/openapi.json").json()
    assert {"/api/v1/patients", "/api/v1/patients/{pid}/levels", "/api/v1/patients/{pid}/recommendation",
            "/api/v1/assessments/{aid}/sign", "/api/v1/bookings", "/api/v1/session"} <= set(spec["paths"])
    assert not any(p.startswith("/patients") for p in spec["paths"])  # pages are not API


def test_pages_load_their_scripts_from_the_app_itself(site: tuple[Any, Store, dict[str, int]]) -> None:
    """Plotly and htmx come from the installed packages, served by the app; pages reference nothing else."""
    import re

    app, _, ids = site
    c, _ = client(app, "clin")
    page = c.get(f"/patients/{ids['DEMO-TX-1']}").text
    scripts = re.findall(r'<script[^>]* src="([^"]+)"', page)
    assert scripts == ["/vendor/plotly.min.js", "/vendor/htmx.min.js", "/static/app.js"]
    assert 'hx-post="/patients/' in page and 'id="patient-main"' in page
    htmx = c.get("/vendor/htmx.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text[:2000] and len(htmx.content) > 20_000
    assert c.get("/vendor/plotly.min.js").text.startswith("/**")
    assert c.get("/vendor/anything.js").status_code == 404


def test_coded_covariates_shown_by_meaning(site: tuple[Any, Store, dict[str, int]]) -> None:
    """A genotype is shown by its meaning and code, never as a bare code with the unit "1" ("0 1"); measured
    covariates keep their unit."""
    import re

    app, _, ids = site
    c, _ = client(app, "clin")
    page = c.get(f"/patients/{ids['DEMO-TX-1']}").text
    rows = re.findall(r"<td>CYP3A5</td><td>([^<]*)</td>", page)  # the covariate tables (and the genotypes')
    assert "non-expresser (*3/*3, *3/*6) (0)" in rows, rows
    assert not any(re.fullmatch(r"-?\d+(\.\d+)?( 1)?", r) for r in rows), rows
    assert re.search(r"<td>WT</td><td>82 kg</td>", page)
    assert not re.search(r"<td>-?\d+(\.\d+)? 1</td>", page)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_demo_starts_on_sqlite(tmp_path: Path, workers: int) -> None:
    """``cnidose serve --demo`` (the README's run command) on a fresh data directory: answers the sign-in page
    and signs in a printed demo user; with two worker processes the session holds across them."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    env.pop("CNIDOSE_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "cnidose.cli", "serve", "--demo", "--port", str(port),
                             "--workers", str(workers)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.3)
        assert r.status_code == 200
        r = httpx.post(f"http://127.0.0.1:{port}/api/v1/session", json={"username": "clinician",
                                                                        "password": "clinician-demo"})
        assert r.status_code == 200 and r.json()["role"] == "clinician"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", cookies=r.cookies) as c:
            assert all(c.get("/api/v1/patients").status_code == 200 for _ in range(6))
        assert (tmp_path / "cnidose" / "cnidose-demo.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_report_pdf(site: tuple[Any, Store, dict[str, int]]) -> None:
    """The PDF report is a valid PDF (read back by pypdf) with the patient, the recommendation and its
    provenance, and the levels."""
    import io

    pypdf = pytest.importorskip("pypdf")
    app, _, ids = site
    c, token = client(app, "clin")
    kid = ids["DEMO-TX-1"]
    assert c.post(f"/api/v1/patients/{kid}/recommendation", headers={"X-CSRF-Token": token}).status_code == 201
    r = c.get(f"/patients/{kid}/report.pdf")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    reader = pypdf.PdfReader(io.BytesIO(r.content))
    text = " ".join(" ".join(page.extract_text() for page in reader.pages).split())  # lines wrap
    assert "Demo, Karel · MRN DEMO-TX-1" in text and "give " in text and "andrews2019_tac_adult_kidney" in text
    assert "13.9 ng/mL" in text and "choice rule: aim at " in text and "(aimed at " in text
    assert "haematocrit (HCT): 0.3 L/L" in text and "Model chosen: Tacrolimus IR, adult kidney transplant" in text
    assert sum(len(page.images) for page in reader.pages) == 1  # the concentration plot


def test_patients_see_signed_recommendations_only_and_every_signature_is_named(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """A draft is the clinicians' own: the patient's page, chart and the API show it only once it is signed; the
    page, the report and the PDF name who signed and when (issue 17, item 4)."""
    import io

    pypdf = pytest.importorskip("pypdf")
    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    clin, token = client(app, "clin")
    # the newest assessment, a draft (what earlier tests computed or signed does not matter)
    aid = store.save_assessment(SYSTEM, kid, kind="assessment", inputs={}, result={}, model_ref=None,
                                package_version="test")
    karel, _ = client(app, "karel")
    assert karel.get(f"/api/v1/assessments/{aid}").status_code == 404
    assert f'id="assessment-{aid}"' not in karel.get(f"/patients/{kid}").text
    assert all(a["status"] == "signed" for a in karel.get(f"/api/v1/patients/{kid}").json()["assessments"])
    assert "Draft: not signed." in clin.get(f"/patients/{kid}/report").text
    r = clin.post(f"/api/v1/assessments/{aid}/sign", json={"decision": "Give 2 mg every 12 h"},
                  headers={"X-CSRF-Token": token})
    assert r.status_code == 200, r.text
    seen = karel.get(f"/api/v1/assessments/{aid}").json()
    assert seen["status"] == "signed" and seen["signed_by_name"] == "clin"
    page = karel.get(f"/patients/{kid}").text
    assert f'id="assessment-{aid}"' in page and 'class="signer">clin<' in page
    assert 'class="signer">clin<' in clin.get(f"/patients/{kid}/report").text
    pdf = pypdf.PdfReader(io.BytesIO(clin.get(f"/patients/{kid}/report.pdf").content))
    text = " ".join(" ".join(pg.extract_text() for pg in pdf.pages).split())
    assert "Regimen signed: Give 2 mg every 12 h Signed by clin, " in text


def test_pdf_writer_keeps_every_character_and_breaks_pages() -> None:
    """fpdf2 with DejaVu Sans: Czech, Greek, symbols and PDF delimiters come back exactly; long reports break
    into numbered pages."""
    import io

    pypdf = pytest.importorskip("pypdf")
    from cnidose.web.pdf import report_pdf

    blocks = [("h1", "Dvořák, Jiří — Παπαδόπουλος, Γιώργος (with parentheses) \\ and backslash")] + [
        ("p", f"line {k}: trough ≤ 10 µg/L, 80 % interval 5–9") for k in range(160)]
    reader = pypdf.PdfReader(io.BytesIO(report_pdf(blocks, title="t")))
    assert len(reader.pages) >= 2
    text = " ".join(" ".join(p.extract_text() for p in reader.pages).split())  # lines wrap
    assert "Dvořák, Jiří — Παπαδόπουλος, Γιώργος (with parentheses) \\ and backslash" in text
    assert "line 159: trough ≤ 10 µg/L, 80 % interval 5–9" in text and f"page 1/{len(reader.pages)}" in text
    # a script the font cannot draw (Chinese) is written as code points, so the name never vanishes silently
    text = pypdf.PdfReader(io.BytesIO(report_pdf([("h1", "王小明")], title="t"))).pages[0].extract_text()
    assert "[U+738B][U+5C0F][U+660E]" in text


def test_pdf_names_czech_and_greek_patients_exactly_with_the_signer_and_the_signed_regimen(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """Issue 17, item 6: the demo transplant record imported under a Czech and under a Greek name, fitted, and a
    regimen other than the recommended one chosen from the candidate table and signed: the PDF prints each name
    exactly, the signer, and the regimen signed (not the regimen recorded before it), with the plot."""
    import io

    from cnidose.records.exchange import chart_to_record_document, import_record

    pypdf = pytest.importorskip("pypdf")
    app, store, ids = site
    doc = chart_to_record_document(store.chart(SYSTEM, ids["DEMO-TX-1"]))
    c, token = client(app, "pharm")
    for family, given in (("Dvořák", "Jiří"), ("Παπαδόπουλος", "Γιώργος")):
        pid = import_record(store, SYSTEM, {**doc, "id": f"U-{family}"},
                            family_name=family, given_name=given)
        a = c.post(f"/api/v1/patients/{pid}/recommendation", headers={"X-CSRF-Token": token}).json()
        rec = a["result"]["recommendation"]
        other = next(i for i, x in enumerate(rec["candidates"]) if x["in_target"] and x != rec["chosen"])
        # a candidate the assessment does not have, or neither a candidate nor a decision: refused at the field
        for body, said in (({"candidate": len(rec["candidates"])}, "has no candidate"),
                           ({"decision": "  "}, "choose a regimen or write the decision")):
            r = c.post(f"/api/v1/assessments/{a['id']}/sign", json=body, headers={"X-CSRF-Token": token})
            assert r.status_code == 422 and said in r.text
        r = c.post(f"/api/v1/assessments/{a['id']}/sign", json={"candidate": other, "decision": "recheck in 5 days"},
                   headers={"X-CSRF-Token": token})
        assert r.status_code == 200, r.text
        dose = rec["candidates"][other]["dose"]
        assert r.json()["decision"].startswith(f"Give {dose:g} mg Prograf every 12 h (")
        assert r.json()["decision"].endswith(". recheck in 5 days")
        reader = pypdf.PdfReader(io.BytesIO(c.get(f"/patients/{pid}/report.pdf").content))
        text = " ".join(" ".join(pg.extract_text() for pg in reader.pages).split())
        assert f"{family}, {given} · MRN U-{family}" in text
        assert f"Regimen signed: Give {dose:g} mg Prograf every 12 h (" in text and "Signed by pharm, " in text
        assert sum(len(pg.images) for pg in reader.pages) == 1


def test_analysis_guesses_nothing(site: tuple[Any, Store, dict[str, int]]) -> None:
    """Without a recorded regimen or transplant date there is no recommendation, and the page says why."""
    from cnidose.web.services import analyse

    _, store, _ = site
    pid = store.add_patient(SYSTEM, mrn="NO-RX-1", family_name="Bare", given_name="Record", birth_date="1975-02-02",
                            sex="female", agent="tacrolimus", indication="kidney transplant")
    store.add_dose(SYSTEM, pid, product="Prograf", amount=3, unit="mg", given_at="2026-11-20T08:00:00Z")
    store.add_level(SYSTEM, pid, value=6.0, unit="ng/mL", observed_at="2026-11-21T07:50:00Z")
    out = analyse(store.chart(SYSTEM, pid), TODAY)
    assert "recommendation" not in out
    assert any("record the current regimen" in w and "the transplant date" in w for w in out["warnings"])


def test_an_interaction_on_the_medication_list_enters_the_fit_and_the_recommendation(tmp_path: Path) -> None:
    """Voriconazole on the chart: the rule base's exposure multiplier (x3 for tacrolimus) divides CL/F from its
    start in the analysis, the warning says so with its source, and the dose recommended goes down."""
    from cnidose.web.services import analyse

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(engine)
    store = Store(engine)
    kid = seed_demo(store, TODAY)["DEMO-TX-1"]
    before = analyse(store.chart(SYSTEM, kid), TODAY)
    assert before["exposure"] == [] and "recommendation" in before
    store.add_medication(SYSTEM, kid, name="voriconazole", start_on=TODAY - dt.timedelta(days=4), daily_mg=400)
    after = analyse(store.chart(SYSTEM, kid), TODAY)
    (x,) = after["exposure"]
    assert (x["drug"], x["factor"], x["start"], x["end"]) == ("voriconazole", 3.0, "2026-11-21", None)
    assert any("voriconazole: tacrolimus exposure x3 from 2026-11-21 (ongoing) applied" in w and "Vfend" in w
               for w in after["warnings"])
    assert any("multiplies exposure by 3" in w for w in after["warnings"])  # the regimen assumes it goes on
    assert after["recommendation"]["chosen"]["dose"] < before["recommendation"]["chosen"]["dose"]
    assert any(a["rule"] == "interaction:voriconazole" for a in after["clinical"]["alerts"])
    engine.dispose()


def test_due_follow_ups_go_to_the_patients_department_and_none_is_dropped_silently(tmp_path: Path) -> None:
    """A dermatology patient's follow-ups go to dermatology (indications.toml), a transplant patient's to the
    transplant clinic; a visit due today is booked at a quarter hour still ahead; a day with no free slot is said
    ("not booked ... book it by hand"), not skipped; booking again books nothing twice (issue 17, item 7)."""
    from cnidose.web.services import clinical_assessment

    today = dt.date.today()
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store, today)
    store.create_user(SYSTEM, "clin", hash_password("clin-pw"), "clinician")
    app = create_app(store, today=lambda: today, rate_limits=ROOMY)
    c, token = client(app, "clin")
    derm, kid = ids["DEMO-DERM-1"], ids["DEMO-TX-1"]
    r = c.post(f"/patients/{derm}/follow-ups", data={"csrf": token})
    assert r.status_code == 200 and 'id="follow-up-report"' in r.text
    visits = store.chart(SYSTEM, derm).appointments
    due = clinical_assessment(store.chart(SYSTEM, derm), today)["due"]
    assert visits and {a["department"] for a in visits} == {"dermatology"}
    assert all(_utc(a["starts_at"]) > dt.datetime.now(dt.UTC) for a in visits)
    assert r.text.count("booked: ") == len(due) or "not booked" in r.text
    r = c.post(f"/patients/{derm}/follow-ups", data={"csrf": token})
    # nothing is booked twice (a visit due today whose slots have passed -- late in the day -- is said again)
    report = re.findall(r"<li class=\"(?:ok|warn)\">([^<]*)</li>", r.text)
    assert report == ["nothing new to book"] or all(line.startswith("not booked: ") for line in report)
    assert report and len(store.chart(SYSTEM, derm).appointments) == len(visits)
    # every slot of the transplant patient's first due day is taken: that visit is reported, the others booked
    first = dt.date.fromisoformat(clinical_assessment(store.chart(SYSTEM, kid), today)["due"][0]["date"])
    for minute in range(9 * 60, 17 * 60, 15):
        store.book(SYSTEM, department="transplant clinic", patient_id=derm, minutes=15,
                   starts_at=dt.datetime(first.year, first.month, first.day, minute // 60, minute % 60,
                                         tzinfo=dt.UTC))
    r = c.post(f"/patients/{kid}/follow-ups", data={"csrf": token})
    assert f"on {first}: no free transplant clinic slot left that day: book it by hand" in r.text
    booked = store.chart(SYSTEM, kid).appointments
    assert booked and {a["department"] for a in booked} == {"transplant clinic"}
    assert all(_utc(a["starts_at"]).date() != first for a in booked)
    engine.dispose()


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def test_times_are_typed_and_shown_in_the_apps_time_zone_and_stored_in_utc(tmp_path: Path) -> None:
    """With the app in Europe/Prague (UTC+1 in November), a trough typed at 07:45 is stored at 06:45 UTC and shown
    at 07:45 on the page, the plot and the PDF, each naming the zone; the forms say which zone they read (issue
    17, item 5)."""
    import io
    import json as _json

    pypdf = pytest.importorskip("pypdf")
    engine = make_engine(f"sqlite:///{tmp_path / 'tz.db'}")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store, TODAY)
    store.create_user(SYSTEM, "clin", hash_password("clin-pw"), "clinician")
    app = create_app(store, today=lambda: TODAY, timezone="Europe/Prague", rate_limits=ROOMY)
    c, token = client(app, "clin")
    kid = ids["DEMO-TX-1"]
    page = c.get(f"/patients/{kid}").text
    assert "Drawn at (Europe/Prague)" in page and "Times are in Europe/Prague." in page
    r = c.post(f"/patients/{kid}/levels", data={"csrf": token, "value": "9.1", "unit": "ng/mL",
                                                 "observed_at": "2026-11-24T07:45", "sample": "trough",
                                                 "confirm": "1"})
    assert r.status_code in (200, 303), r.text[:300]
    level = next(o for o in store.chart(SYSTEM, kid).observations if o["category"] == "level" and o["value"] == 9.1)
    stored = level["observed_at"]
    stored = stored if stored.tzinfo else stored.replace(tzinfo=dt.UTC)
    assert stored == dt.datetime(2026, 11, 24, 6, 45, tzinfo=dt.UTC)
    page = c.get(f"/patients/{kid}").text
    row = re.search(rf'<tr class="final" id="observation-{level["id"]}"><td>([^<]*)</td>', page)
    assert row is not None and row.group(1) == "2026-11-24 07:45"  # the wall-clock time typed
    assert c.post(f"/api/v1/patients/{kid}/recommendation", headers={"X-CSRF-Token": token}).status_code == 201
    page = c.get(f"/patients/{kid}").text
    m = re.search(r'<script type="application/json" id="curve-data">(.*?)</script>', page, re.S)
    assert m is not None
    curve = _json.loads(m.group(1))
    assert curve["timezone"] == "Europe/Prague" and "2026-11-24T07:45:00" in curve["levels"]["time"]
    assert curve["fit"]["time"] and curve["forecast"]["time"][0] >= curve["levels"]["time"][-1]
    pdf = pypdf.PdfReader(io.BytesIO(c.get(f"/patients/{kid}/report.pdf").content))
    text = " ".join(" ".join(pg.extract_text() for pg in pdf.pages).split())
    assert "2026-11-24 07:45 Europe/Prague 9.1 ng/mL" in text
    engine.dispose()


def test_the_patient_list_finds_by_name_or_mrn_and_its_badges_say_what_they_count(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """Search by every word of the query in the name or the MRN; a badge per severity with its count, and each
    alert's text in the row (not only in a tooltip); "no alerts" when there is none (issue 17, item 7)."""
    app, _, _ = site
    c, _ = client(app, "clin")
    html = c.get("/patients", params={"q": "karel demo"}).text
    assert "DEMO-TX-1" in html and "DEMO-DERM-1" not in html and "1 patient(s) matching" in html
    html = c.get("/patients", params={"q": "derm-1"}).text
    assert "DEMO-DERM-1" in html and "DEMO-TX-1" not in html
    assert "0 patient(s) matching" in c.get("/patients", params={"q": "nobody"}).text
    assert c.get("/patients", params={"q": "x" * 65}).status_code == 422
    html = c.get("/patients").text
    badges = re.findall(r'<span class="badge (\w+)">([^<]*)</span>', html)
    assert badges and all(text.split()[-1] == sev or (sev, text) == ("ok", "no alerts") for sev, text in badges)
    assert all(re.fullmatch(r"\d+ (critical|warning|info)|no alerts", text) for _, text in badges)
    assert '<ul class="alert-lines"><li>' in html


def test_errors_on_pages_are_pages_and_a_refused_entry_keeps_what_was_typed(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """Without JavaScript: a refused entry comes back (422) with the message next to its field and the typed
    values in the form, and htmx is told to swap that form's box only; errors on pages are pages with a way back
    (a clashing or invalid calendar action, a missing patient, a wrong CSRF token), while the API answers JSON;
    the calendar names each patient and links every department (issue 17, items 1 and 7)."""
    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "clin")
    r = c.post(f"/patients/{kid}/levels", data={"csrf": token, "value": "8000", "unit": "ng/mL", "sample": "trough",
                                               "observed_at": "2026-11-24T07:40"})
    assert r.status_code == 422 and r.headers["HX-Retarget"] == r.headers["HX-Reselect"] == "#level-box"
    box = r.text[r.text.index('id="level-box"'):r.text.index('id="dose-box"')]
    assert 'id="level-error"' in box and "if the unit is ng/L" in box and 'value="8000"' in box
    assert 'value="2026-11-24T07:40"' in box and 'aria-invalid="true" aria-describedby="level-error"' in box
    assert 'id="form-error"' not in r.text  # said at the field, not at the top of the page
    soon = dt.datetime.combine(dt.date.today() + dt.timedelta(days=3), dt.time(10, 15), tzinfo=dt.UTC)
    appt = store.book(SYSTEM, department="transplant clinic", kind="follow-up", patient_id=kid, starts_at=soon)
    r = c.post(f"/appointments/{appt}/status", data={"csrf": token, "status": "bogus",
                                                     "department": "transplant clinic"},
               headers={"referer": "http://testserver/calendar?department=transplant%20clinic"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
    assert 'id="error-page"' in r.text and 'href="/calendar?department=transplant%20clinic"' in r.text
    r = c.post(f"/appointments/{appt}/status", data={"csrf": "wrong", "status": "cancelled"},
               headers={"referer": "https://elsewhere.example/x"})
    assert r.status_code == 403 and 'id="error-page"' in r.text and 'href="/" id="error-back"' in r.text
    r = c.get("/patients/99999999")
    assert r.status_code == 404 and 'id="error-page"' in r.text
    assert c.get("/no/such/page").status_code == 404 and 'id="error-page"' in c.get("/no/such/page").text
    assert c.get("/api/v1/patients/99999999").headers["content-type"] == "application/json"
    now, _ = client(create_app(store, today=dt.date.today, rate_limits=ROOMY), "clin")  # the calendar from today
    page = now.get("/calendar", params={"department": "transplant clinic"}).text
    assert "Demo, Karel" in page and "DEMO-TX-1" in page and "patient " + str(kid) not in page
    for dept in ("dermatology", "transplant%20clinic", "nephrology", "gastroenterology"):
        assert f'href="/calendar?department={dept}"' in page


@pytest.mark.parametrize(("organ", "product", "iv", "model"), [
    ("kidney", "Prograf", False, "andrews2019_tac_adult_kidney"),
    ("kidney", "Prograf", True, "antignac2007_tac_kidney_iv_oral"),
    ("kidney", "Advagraf", False, "woillard2011_tac_prograf_advagraf"),
    ("liver", "Prograf", False, "ji2018_tac_liver_ldlt"),
    ("liver", "Envarsus XR", False, "martial2021_tac_envarsus_liver"),
    ("lung", "Prograf", False, "monchaud2012_tac_lung"),
    ("heart", "Prograf", False, "kirubakaran2023_tac_adult_heart"),
    ("heart", "Advagraf", False, None),
])
def test_the_page_says_which_model_a_fit_will_use_and_why(site: tuple[Any, Store, dict[str, int]], organ: str,
                                                          product: str, iv: bool, model: str | None) -> None:
    """Issue 18: every formulation (Prograf, Advagraf, Envarsus, intravenous) and organ (kidney, liver, lung, heart)
    the library covers is chosen for a patient by organ, formulation, route and age, and the page says which model
    and why before any fit; for a heart recipient on Advagraf, which no heart model describes, it says why there is
    none."""
    from cnidose.records.exchange import chart_to_record_document, import_record

    app, store, ids = site
    doc = chart_to_record_document(store.chart(SYSTEM, ids["DEMO-TX-1"]))
    code = {"kidney": "Z94.0", "liver": "Z94.4", "lung": "Z94.2", "heart": "Z94.1"}[organ]
    doc["indication"] = {"system": "ICD-10-CM", "code": code}
    doc["transplant"]["organ"] = organ
    for r in doc["regimens"]:
        r["product"] = product
        if product in ("Advagraf", "Envarsus XR"):
            r["interval_h"] = 24
    if iv:
        tx = dt.date.fromisoformat(doc["transplant"]["date"])
        doc["administrations"].append({"time": f"{tx}T08:00:00Z", "dose": 1.0, "unit": "mg", "product": "Prograf",
                                       "route": "intravenous", "infusion_h": 24.0})
    pid = import_record(store, SYSTEM, {**doc, "id": f"U-{organ}-{product}-{iv}"}, family_name="Model",
                        given_name=organ)
    c, _ = client(app, "clin")
    page = c.get(f"/patients/{pid}").text
    note = page[page.index('id="model-used"'):]
    note = note[:note.index("</p>")]
    if model is None:
        assert ("No pharmacokinetic model for this patient: no library model for tacrolimus, heart, adult describes "
                "Advagraf" in note), note
    else:
        assert f'id="model-to-use">{model}</span>' in note, note
        assert f"{organ}, adult, {product}" in note
        if iv:
            assert "intravenous doses" in note


def test_without_a_model_the_assessment_shows_the_rules_and_the_dose_per_kg(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """A psoriasis patient on cyclosporine (no PK model in the library): the button says it assesses by the rules,
    and the stored assessment shows the selection with its reasons, the current dose in mg/kg/day, the alerts with
    their dose actions and sources, and what is due -- not an empty card with a Sign button (issue 17)."""
    app, store, ids = site
    derm = ids["DEMO-DERM-1"]
    c, token = client(app, "clin")
    page = c.get(f"/patients/{derm}").text
    assert "Assess by the rules" in page and 'id="no-model-note"' in page
    # and why there is no model, in the library's words (models.library.choose_model)
    assert ("No pharmacokinetic model for this patient: no library model is for cyclosporine, psoriasis, adult"
            in page)
    assert c.post(f"/patients/{derm}/assess", data={"csrf": token}).status_code == 303
    page = c.get(f"/patients/{derm}").text
    rules = page[page.index('class="rules"'):]
    rules = rules[:rules.index("</div>")]
    chart = store.chart(SYSTEM, derm)
    weight = max((x for x in chart.covariates if x["name"] == "WT" and x["status"] == "final"),
                 key=lambda x: x["measured_at"])["value"]
    reg = next(r for r in chart.regimens if r["status"] == "final" and r["stop_at"] is None)
    per_kg = reg["dose_mg"] * 24 / reg["interval_h"] / weight
    assert "Selection: <span class=\"sel-caution\">caution</span>" in rules and "baseline work-up incomplete" in rules
    assert f"{per_kg:.2f} mg/kg/day</strong> at {weight:g} kg" in rules
    assert "Reduce the cyclosporine dose by 25-50 %" in rules and "Sandimmun Neoral SmPC" in rules
    assert "Due: " in rules and "serum creatinine" in rules


def test_the_clinician_sets_the_aim_on_the_page_and_in_the_api(site: tuple[Any, Store, dict[str, int]]) -> None:
    """Issue 15, item 5: the level the dose choice aims at is the target's middle unless the clinician sets one
    (page form, API ``?aim=``); the same rule in both; a different aim is a different assessment, the same aim
    reuses it; an aim outside the target is refused at its field, before any fit, and nothing is stored."""
    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "pharm")
    low = c.post(f"/api/v1/patients/{kid}/recommendation", params={"aim": 5}, headers={"X-CSRF-Token": token})
    assert low.status_code in (200, 201), low.text
    rec = low.json()["result"]["recommendation"]
    assert rec["inputs"]["aim"] == 5.0 and "(aimed at 5)" in rec["summary"]
    assert low.json()["inputs"]["settings"]["aim"] == 5.0
    again = c.post(f"/api/v1/patients/{kid}/recommendation", params={"aim": 5}, headers={"X-CSRF-Token": token})
    assert again.status_code == 200 and again.json()["id"] == low.json()["id"]  # the same inputs: reused
    middle = c.post(f"/api/v1/patients/{kid}/recommendation", headers={"X-CSRF-Token": token}).json()
    assert middle["id"] != low.json()["id"] and middle["result"]["recommendation"]["inputs"]["aim"] == 7.5
    assert rec["chosen"]["median"] <= middle["result"]["recommendation"]["chosen"]["median"]
    n = len(store.chart(SYSTEM, kid).assessments)
    r = c.post(f"/api/v1/patients/{kid}/recommendation", params={"aim": 30}, headers={"X-CSRF-Token": token})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "aim"]
    assert "outside the target 4-11" in r.text and len(store.chart(SYSTEM, kid).assessments) == n
    # the page: the same form field, the same refusal at the field with what was typed
    page = c.post(f"/patients/{kid}/assess", data={"csrf": token, "aim": "30"})
    assert page.status_code == 422 and page.headers["HX-Retarget"] == "#assess-box"
    box = page.text[page.text.index('id="assess-box"'):]
    assert 'id="assess-error"' in box and "outside the target" in box and 'value="30"' in box
    r = c.post(f"/patients/{kid}/assess", data={"csrf": token, "aim": "5"})
    assert r.status_code == 303 and r.headers["location"] == f"/patients/{kid}#assessment-{low.json()['id']}"
    assert len(store.chart(SYSTEM, kid).assessments) == n  # the API's assessment for these inputs, not a copy


def test_the_clinician_chooses_the_fitting_strategy_on_the_page_and_in_the_api(
        site: tuple[Any, Store, dict[str, int]]) -> None:
    """Issue 15, item 1: the forecasting strategy is a setting of the assessment -- page select, API
    ``?strategy=`` -- stored with its inputs and shown; spellings of one strategy are one assessment; an unknown
    one is refused at its field before any fit."""
    app, store, ids = site
    kid = ids["DEMO-TX-1"]
    c, token = client(app, "pharm")
    plain = c.post(f"/api/v1/patients/{kid}/recommendation", headers={"X-CSRF-Token": token}).json()
    logged = c.post(f"/api/v1/patients/{kid}/recommendation", params={"strategy": "forget:14 + log"},
                    headers={"X-CSRF-Token": token})
    assert logged.status_code in (200, 201), logged.text
    body = logged.json()
    assert body["id"] != plain["id"] and body["inputs"]["settings"]["strategy"] == "log+forget:14"
    assert "strategy" not in plain["inputs"]["settings"]  # the standard one is not a setting
    rec = body["result"]["recommendation"]
    assert rec["inputs"]["strategy"] == "log+forget:14" and rec["inputs"]["fitting"] == {
        "log_scale": True, "half_life_h": 336.0, "drift_per_week": None}
    assert body["result"]["strategy"]["name"] == "log+forget:14"
    assert rec["inputs"]["eta_map"] != plain["result"]["recommendation"]["inputs"]["eta_map"]
    same = c.post(f"/api/v1/patients/{kid}/recommendation", params={"strategy": "log+forget:14"},
                  headers={"X-CSRF-Token": token})
    assert same.status_code == 200 and same.json()["id"] == body["id"]
    n = len(store.chart(SYSTEM, kid).assessments)
    for bad in ("bayes", "forget:0", "flat:1000"):
        r = c.post(f"/api/v1/patients/{kid}/recommendation", params={"strategy": bad}, headers={"X-CSRF-Token": token})
        assert r.status_code == 422 and "strategy" in r.text, (bad, r.text)
    assert len(store.chart(SYSTEM, kid).assessments) == n
    page = c.get(f"/patients/{kid}").text
    assert 'name="strategy"' in page and 'value="log+forget:14"' in page
    assert '<option value="log+forget:14" selected>' in page  # the newest assessment's strategy, kept
    assert "fit: levels fitted on the log scale" in page  # the stored assessment says how it was fitted
    r = c.post(f"/patients/{kid}/assess", data={"csrf": token, "strategy": "log+forget:14"})
    assert r.status_code == 303 and r.headers["location"] == f"/patients/{kid}#assessment-{body['id']}"
    r = c.post(f"/patients/{kid}/assess", data={"csrf": token, "strategy": "flat:3"})  # not offered on the page
    assert r.status_code == 422 and "not a strategy of this page" in r.text
    assert len(store.chart(SYSTEM, kid).assessments) == n
