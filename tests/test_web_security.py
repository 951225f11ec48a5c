"""The web app against a hostile user (issue 16): each test reproduces one finding of the review and holds it.

Sessions are revocable and time out; sign-in throttling slows guessing without locking anyone out, ignores
X-Forwarded-For from untrusted peers, keeps bounded memory and costs the same for unknown users; input is
bounded (body size, field lengths, dates) and never a 500; booking is rate-limited, validates e-mail, answers
opaque references, hides others' bookings and never holds two confirmed visits in one slot, whoever writes
(two server processes, FHIR import) on SQLite and PostgreSQL; every response has the security headers; page
messages never come from the query string; the iCalendar export is RFC 5545.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cnidose.records.db import make_engine, upgrade
from cnidose.records.demo import seed_demo
from cnidose.records.store import SYSTEM, Actor, Store
from cnidose.web.app import create_app
from cnidose.web.security import AddressResolver, Guard, hash_password
from tests.test_records import _pg_engine

TODAY = dt.date(2026, 11, 25)
ROOMY = {"login": "10000/minute", "booking": "10000/hour", "booking-all": "10000/day"}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Store, dict[str, int], Path]]:
    db = tmp_path / "cnidose.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store, TODAY)
    for name, role in (("clin", "clinician"), ("pharm", "pharmacist"), ("root", "admin")):
        store.create_user(SYSTEM, name, hash_password(f"{name}-pw"), role)
    store.create_user(SYSTEM, "karel", hash_password("karel-pw"), "patient", patient_id=ids["DEMO-TX-1"])
    yield store, ids, db
    engine.dispose()


def _app(store: Store, **kw: Any) -> Any:
    return create_app(store, today=lambda: TODAY, **({"rate_limits": ROOMY} | kw))


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m
    return m.group(1)


def _api(app: Any, user: str, **kw: Any) -> tuple[TestClient, dict[str, str]]:
    c = TestClient(app, follow_redirects=False, **kw)
    r = c.post("/api/v1/session", json={"username": user, "password": f"{user}-pw"})
    assert r.status_code == 200, r.text
    return c, {"X-CSRF-Token": r.json()["csrf"]}


def _future(days: int = 30, hour: int = 9) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).replace(hour=hour, minute=0, second=0, microsecond=0)


# -- sessions --------------------------------------------------------------------------------------------------
def test_logout_ends_the_session_even_for_a_copied_cookie(site: tuple[Store, dict[str, int], Path]) -> None:
    store, ids, _ = site
    app = _app(store)
    c = TestClient(app, follow_redirects=False)
    token = _csrf(c.get("/login").text)
    assert c.post("/login", data={"username": "clin", "password": "clin-pw", "csrf": token}).status_code == 303
    stolen = c.cookies["cnidose_session"]
    page_csrf = _csrf(c.get(f"/patients/{ids['DEMO-TX-1']}").text)
    thief = TestClient(app, cookies={"cnidose_session": stolen})
    assert thief.get("/api/v1/patients").status_code == 200
    assert c.post("/logout", data={"csrf": page_csrf}).status_code == 303
    assert thief.get("/api/v1/patients").status_code == 401
    r = thief.post(f"/api/v1/patients/{ids['DEMO-TX-1']}/levels", json={"value": 8, "observed_at":
                   "2026-11-24T08:00:00Z"}, headers={"X-CSRF-Token": page_csrf})
    assert r.status_code == 401
    # the API's own sign-out too
    c2, h = _api(app, "clin")
    copy = TestClient(app, cookies={"cnidose_session": c2.cookies["cnidose_session"]})
    assert c2.delete("/api/v1/session", headers=h).status_code == 200
    assert copy.get("/api/v1/patients").status_code == 401 and c2.get("/api/v1/patients").status_code == 401
    # the session table holds only the token's hash
    with store.engine.connect() as conn:
        ids_stored = {r[0] for r in conn.exec_driver_sql("SELECT id FROM sessions")}
    assert stolen not in ids_stored


def test_a_password_change_and_an_administrator_end_sessions(site: tuple[Store, dict[str, int], Path]) -> None:
    store, _, _ = site
    app = _app(store)
    here, h = _api(app, "pharm")
    elsewhere, _ = _api(app, "pharm")
    r = here.post("/api/v1/account/password", json={"current": "wrong", "new": "a-much-longer-pw"}, headers=h)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "current"
    assert elsewhere.get("/api/v1/patients").status_code == 200  # nothing changed
    r = here.post("/api/v1/account/password", json={"current": "pharm-pw", "new": "short"}, headers=h)
    assert r.status_code == 422
    r = here.post("/api/v1/account/password", json={"current": "pharm-pw", "new": "a-much-longer-pw"}, headers=h)
    assert r.status_code == 200
    assert here.get("/api/v1/patients").status_code == 200  # this session stays
    assert elsewhere.get("/api/v1/patients").status_code == 401  # every other one ends
    assert TestClient(app).post("/api/v1/session", json={"username": "pharm", "password": "pharm-pw"}
                                ).status_code == 401
    # an administrator revokes every session of a user, then deactivates the account
    victim, _ = _api(app, "clin")
    admin, ah = _api(app, "root")
    uid = store.user("clin")["id"]  # type: ignore[index]
    assert victim.get("/api/v1/patients").status_code == 200
    r = admin.post(f"/api/v1/users/{uid}/sessions/revoke", headers=ah)
    assert r.status_code == 200 and r.json()["revoked"] >= 1
    assert victim.get("/api/v1/patients").status_code == 401
    victim, _ = _api(app, "clin")
    assert admin.post(f"/api/v1/users/{uid}/deactivate", headers=ah).status_code == 200
    assert victim.get("/api/v1/patients").status_code == 401
    assert TestClient(app).post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}
                                ).status_code == 401
    # and nobody else may
    other, oh = _api(app, "karel")
    assert other.post(f"/api/v1/users/{uid}/sessions/revoke", headers=oh).status_code == 403
    # the account page: the form, its errors in the page, and the change
    page = TestClient(app, follow_redirects=False)
    token = _csrf(page.get("/login").text)
    assert page.post("/login", data={"username": "karel", "password": "karel-pw", "csrf": token}).status_code == 303
    html = page.get("/account").text
    assert 'action="/account/password"' in html and 'maxlength="1024"' in html and "karel" in html
    token = _csrf(html)
    r = page.post("/account/password", data={"current": "wrong", "new": "another-long-pw", "csrf": token})
    assert r.status_code == 422 and "the current password is wrong" in r.text and 'id="password-error"' in r.text
    r = page.post("/account/password", data={"current": "karel-pw", "new": "another-long-pw", "csrf": token})
    assert r.status_code == 200 and 'id="password-changed"' in r.text
    assert other.get("/api/v1/patients").status_code == 401  # karel's API session ended
    assert page.get("/account").status_code == 200  # this one goes on


def test_sessions_time_out_when_idle_and_at_their_absolute_limit(site: tuple[Store, dict[str, int], Path]) -> None:
    store, _, _ = site
    idle = _app(store, session_idle_min=1.0 / 60)  # 1 s idle
    c, _ = _api(idle, "clin")
    assert c.get("/api/v1/patients").status_code == 200
    time.sleep(1.3)
    assert c.get("/api/v1/patients").status_code == 401
    absolute = _app(store, session_hours=1.5 / 3600)  # 1.5 s in all, however busy
    c, _ = _api(absolute, "clin")
    c = TestClient(absolute, cookies={"cnidose_session": c.cookies["cnidose_session"]})  # a client that keeps it
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:
        assert c.get("/api/v1/patients").status_code == 200
        time.sleep(0.2)
    time.sleep(0.5)
    assert c.get("/api/v1/patients").status_code == 401


def test_cookies_are_http_only_same_site_and_secure_when_asked(site: tuple[Store, dict[str, int], Path]) -> None:
    store, _, _ = site
    for secure in (True, False):
        r = TestClient(_app(store, secure_cookies=secure)).post(
            "/api/v1/session", json={"username": "clin", "password": "clin-pw"})
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and ("secure" in cookie) == secure
    r = TestClient(_app(store), base_url="https://testserver").post(
        "/api/v1/session", json={"username": "clin", "password": "clin-pw"})
    assert "secure" in r.headers["set-cookie"].lower()  # over HTTPS, always
    assert "strict-transport-security" in {k.lower() for k in
                                           TestClient(_app(store, secure_cookies=True)).get("/login").headers}


# -- sign-in throttling ----------------------------------------------------------------------------------------
def test_failures_from_one_address_slow_it_not_the_users_behind_other_addresses(
        site: tuple[Store, dict[str, int], Path]) -> None:
    """20 failures (all free) from one address for many user names: that address waits 1 s; another address signs
    in at once, and so does the same address after the wait (behind a NAT, nobody is locked out)."""
    store, _, _ = site
    app = _app(store)
    nat = TestClient(app, client=("203.0.113.7", 40000))
    for i in range(20):
        r = nat.post("/api/v1/session", json={"username": f"guess{i}", "password": "x"})
        assert r.status_code == 401, (i, r.text)
    assert nat.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 429
    other = TestClient(app, client=("198.51.100.2", 40000))
    assert other.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 200
    time.sleep(1.1)
    assert nat.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 200


def test_x_forwarded_for_is_read_from_trusted_proxies_only(site: tuple[Store, dict[str, int], Path]) -> None:
    store, _, _ = site
    # untrusted peer: rotating X-Forwarded-For does not give fresh addresses
    app = _app(store)
    c = TestClient(app, client=("203.0.113.9", 40000))
    for i in range(21):
        c.post("/api/v1/session", json={"username": f"u{i}", "password": "x"},
               headers={"X-Forwarded-For": f"10.0.{i}.1"})
    r = c.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"},
               headers={"X-Forwarded-For": "10.9.9.9"})
    assert r.status_code == 429
    # behind a trusted proxy the forwarded address is the client's
    app = _app(store, trusted_proxies="127.0.0.1/32")
    proxy = TestClient(app, client=("127.0.0.1", 40000))
    for i in range(21):
        proxy.post("/api/v1/session", json={"username": f"u{i}", "password": "x"},
                   headers={"X-Forwarded-For": "203.0.113.50"})
    assert proxy.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"},
                      headers={"X-Forwarded-For": "203.0.113.50"}).status_code == 429
    assert proxy.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"},
                      headers={"X-Forwarded-For": "203.0.113.51"}).status_code == 200
    resolve = AddressResolver("127.0.0.1, 10.0.0.0/8")
    assert resolve("127.0.0.1", "198.51.100.1, 10.1.2.3") == "198.51.100.1"  # right-most untrusted hop
    assert resolve("127.0.0.1", "spoofed, 198.51.100.1") == "198.51.100.1"
    assert resolve("203.0.113.1", "198.51.100.1") == "203.0.113.1"


def test_an_attack_on_an_account_does_not_slow_its_user_on_a_known_device(
        site: tuple[Store, dict[str, int], Path]) -> None:
    """The attacker polls the account's progressive delay, so without device cookies the attacker would win every
    attempt the delay lets through and the user would be locked out in effect. A device that signed in as the user
    before is judged on its own failures only: after 30 wrong passwords for "clin" from elsewhere (and from the
    user's own address, a shared NAT), the user's browser signs in at once; the attacker's are slowed; a device
    cookie of another user, or a made-up one, counts for nothing; the device's own failures slow it too."""
    store, _, _ = site
    app = _app(store, rate_limits={**ROOMY, "login-device": "10000/minute"})
    user = TestClient(app, client=("192.0.2.10", 40000))
    assert user.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 200
    device = user.cookies.get("cnidose_device")
    assert device and len(device) >= 40
    attacker = TestClient(app, client=("203.0.113.66", 40000))
    nat = TestClient(app, client=("192.0.2.10", 40001))  # the user's own address, another machine
    codes, i, stop = [], 0, time.monotonic() + 5  # both poll for 5 s: failures at ~0, 0.3, 0.6, 1.6, 3.6 s
    while time.monotonic() < stop:
        c = (attacker, nat)[i % 2]
        codes.append(c.post("/api/v1/session", json={"username": "clin", "password": f"guess{i}"}).status_code)
        i += 1
    assert 4 <= codes.count(401) <= 6 and codes.count(429) > 20, codes  # the delay has grown to 4 s
    r = user.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"})
    assert r.status_code == 200, r.text
    # the right password from a device without the cookie is still slowed (the delay is the account's)
    assert attacker.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 429
    # a device cookie issued to another user, or invented, is an unknown device
    other, _ = _api(app, "pharm")
    other.cookies.set("cnidose_session", "")
    assert other.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 429
    forged = TestClient(app, cookies={"cnidose_device": "x" * 43})
    assert forged.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 429
    # the known device's own failures count against it
    for _ in range(3):
        assert user.post("/api/v1/session", json={"username": "clin", "password": "wrong"}).status_code == 401
    assert user.post("/api/v1/session", json={"username": "clin", "password": "clin-pw"}).status_code == 429
    # a known device's sign-in does not issue a second device row
    with store.engine.connect() as conn:
        n = conn.exec_driver_sql("SELECT count(*) FROM sign_in_devices").scalar()
    assert n == 2  # clin's and pharm's


def test_device_rows_per_user_are_bounded(site: tuple[Store, dict[str, int], Path]) -> None:
    """A client that signs in without keeping cookies gets a new device row each time; only the newest 50 stay."""
    from cnidose.records.store import DEVICES_PER_USER

    store, _, _ = site
    uid = int(store.user("clin")["id"])  # type: ignore[index]
    tokens = [store.remember_device(uid, max_age=dt.timedelta(days=180)) for _ in range(DEVICES_PER_USER + 5)]
    with store.engine.connect() as conn:
        n = conn.exec_driver_sql("SELECT count(*) FROM sign_in_devices").scalar()
    assert n == DEVICES_PER_USER
    assert store.device_user(tokens[-1], max_age=dt.timedelta(days=180)) == uid


def test_a_flood_of_refused_sign_ins_does_not_grow_the_audit_log(site: tuple[Store, dict[str, int], Path]) -> None:
    """Throttled attempts (no hash computed) are audited once a minute per user name and address, not each."""
    store, _, _ = site
    app = _app(store)
    c = TestClient(app, client=("203.0.113.77", 40000))
    codes = [c.post("/api/v1/session", json={"username": "clin", "password": "x"}).status_code
             for _ in range(300)]
    assert 3 <= codes.count(401) <= 6 and codes.count(429) >= 294  # the delay grows with each checked failure
    log = store.audit_log(Actor("root", "admin", 3), limit=1000)
    assert sum(x["action"] == "login-throttled" for x in log) == 1
    assert sum(x["action"] == "login-failed" for x in log) == codes.count(401)  # a real account: every one


def test_a_botnet_of_unknown_user_names_writes_at_most_30_audit_rows_a_minute(
        site: tuple[Store, dict[str, int], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong passwords for user names that do not exist, from a new address each time (through the trusted
    proxy): each costs a hash, but the audit log takes at most 30 such rows a minute, and says how many it left
    out."""
    import cnidose.web.app as web

    monkeypatch.setattr(web, "SIGN_IN_FLOOR_S", 0.0)  # the test's own time; the floor is tested above
    store, _, _ = site
    app = _app(store, trusted_proxies="127.0.0.1/32")
    proxy = TestClient(app, client=("127.0.0.1", 40000))
    for i in range(45):
        r = proxy.post("/api/v1/session", json={"username": f"nobody{i}", "password": "x"},
                       headers={"X-Forwarded-For": f"198.18.{i}.1"})
        assert r.status_code == 401
    log = store.audit_log(Actor("root", "admin", 3), limit=1000)
    rows = [x for x in log if x["action"] == "login-unknown-user"]
    assert len(rows) == 30


def test_a_hash_with_older_parameters_is_upgraded_at_sign_in(site: tuple[Store, dict[str, int], Path]) -> None:
    """argon2-cffi's default parameters (64 MiB, t = 3, p = 4) were used before; such a hash still verifies, is
    replaced by one with today's parameters at the next sign-in, and no session ends."""
    from argon2 import PasswordHasher

    from cnidose.web.security import needs_rehash

    store, _, _ = site
    uid = store.create_user(SYSTEM, "olduser", PasswordHasher().hash("olduser-pw"), "clinician")
    assert needs_rehash(str(store.user("olduser")["password_hash"]))  # type: ignore[index]
    app = _app(store)
    first, _ = _api(app, "olduser")
    assert not needs_rehash(str(store.user("olduser")["password_hash"]))  # type: ignore[index]
    assert first.get("/api/v1/patients").status_code == 200  # the first session goes on
    _api(app, "olduser")  # and the new hash verifies
    log = store.audit_log(Actor("root", "admin", 3), limit=50)
    assert any(x["action"] == "update" and str(x["object_id"]) == str(uid) and "upgraded" in str(x["detail"])
               for x in log)


def test_the_hash_gate_bounds_hashing_and_keeps_a_slot_for_known_devices() -> None:
    """One hash at a time for unknown devices and one more reserved for known ones; waiters hold no thread, are
    bounded in number and in time, and get "busy" (False) when no slot comes."""
    import asyncio

    from cnidose.web.security import HashGate

    async def scenario() -> list[object]:
        gate = HashGate(general=1, reserved=1, queue=3, wait_s=0.3)
        out: list[object] = []
        async with gate.slot(False) as first:
            out.append(first)  # True: the general slot
            t0 = time.monotonic()
            async with gate.slot(False) as second:
                out.append((second, round(time.monotonic() - t0, 1)))  # False after ~0.3 s
            async with gate.slot(True) as known:
                out.append(known)  # True at once: the reserved slot
                async with gate.slot(True) as known2:
                    out.append(known2)  # False: both slots are taken
            # the queue bound: three waiters at most, the fourth is refused at once
            async def waiter() -> bool:
                async with gate.slot(False) as got:
                    return got
            results = await asyncio.gather(*(waiter() for _ in range(4)))
            out.append(sorted(results))
        async with gate.slot(False) as again:
            out.append(again)  # released: free again
        return out

    out = asyncio.run(scenario())
    assert out == [True, (False, 0.3), True, False, [False, False, False, False], True]


def test_throttle_memory_is_bounded_and_counts_expire() -> None:
    g = Guard(max_keys=1000, window_s=0.5)
    for i in range(20_000):
        g.fail(f"user{i}", f"addr{i % 3000}")
    assert len(g) <= 1000
    g = Guard(window_s=0.3)
    for _ in range(10):
        g.fail("u", "a")
    assert g.wait("u", "a") > 0
    time.sleep(0.4)
    assert g.wait("u", "a") == 0  # forgotten after the window


def test_huge_user_names_are_refused_before_anything_is_stored(site: tuple[Store, dict[str, int], Path]) -> None:
    """100 sign-ins with 900 kB user names: 422, no audit row, the database and the throttle do not grow."""
    store, _, db = site
    app = _app(store)
    c = TestClient(app, follow_redirects=False)
    token = _csrf(c.get("/login").text)
    admin = Actor("root", "admin", store.user("root")["id"])  # type: ignore[index]
    rows = len(store.audit_log(admin, limit=100_000))
    size = db.stat().st_size
    big = "x" * 900_000
    for _ in range(50):
        assert c.post("/login", data={"username": big, "password": "p", "csrf": token}).status_code == 422
        assert c.post("/api/v1/session", json={"username": big, "password": "p"}).status_code == 422
    new = store.audit_log(admin, limit=100_000)
    assert len(new) == rows + 1 and new[0]["object_type"] == "audit-log", new[: len(new) - rows]  # our own read
    assert db.stat().st_size <= size + 100_000
    # at the limit (64 characters) a failure is audited with the name, cut to 64
    assert c.post("/api/v1/session", json={"username": "y" * 64, "password": "p"}).status_code == 401
    assert store.audit_log(admin, limit=1)[0]["username"] == "y" * 64
    # a body over 1 MB is refused unread; a chunked body without a length too
    assert c.post("/api/v1/session", content=b"{" + b" " * 1_100_000 + b"}",
                  headers={"Content-Type": "application/json"}).status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"username": "clin", '
        yield b'"password": "clin-pw"}'

    r = c.post("/api/v1/session", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 411


def test_an_unknown_user_costs_the_same_hash_as_a_known_one(site: tuple[Store, dict[str, int], Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The same hash work for an unknown user name (a dummy hash); and every checked attempt takes at least the
    floor, so a user whose hash has older, slower parameters is not told apart either."""
    from argon2 import PasswordHasher

    import cnidose.web.app as web

    store, _, _ = site
    for name in ("old1", "old2", "old3"):
        store.create_user(SYSTEM, name, PasswordHasher().hash(f"{name}-pw"), "clinician")
    app = _app(store)

    def timed(name: str) -> float:
        c = TestClient(app, client=(f"192.0.2.{len(name)}", 1))
        t0 = time.perf_counter()
        assert c.post("/api/v1/session", json={"username": name, "password": "wrong"}).status_code == 401
        return time.perf_counter() - t0

    def medians() -> tuple[float, float, float]:
        # the three kinds interleaved (each name once, as many failures as the account throttle allows twice): a busy
        # machine (the tests' other work, a CI neighbour) slows each kind alike, where one kind timed after another
        # took the load of its own moment (0.124 s known against 0.053 s unknown once, on a loaded machine)
        times: tuple[list[float], list[float], list[float]] = ([], [], [])
        for r in range(3):
            for k, names in enumerate((("clin", "pharm", "root"), ("nobody1", "nobody2", "nobody3"),
                                       ("old1", "old2", "old3"))):
                times[k].append(timed(names[r]))
        return statistics.median(times[0]), statistics.median(times[1]), statistics.median(times[2])

    monkeypatch.setattr(web, "SIGN_IN_FLOOR_S", 0.0)
    known, unknown, _ = medians()
    assert known > 0.01 and 0.5 < unknown / known < 2.0, (known, unknown)  # the hash work itself
    monkeypatch.undo()
    known, unknown, old = medians()
    assert min(known, unknown, old) >= web.SIGN_IN_FLOOR_S
    assert max(known, unknown, old) / min(known, unknown, old) < 1.3, (known, unknown, old)


# -- no 500s, bounded input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["9999-12-31T23:59:00Z", "0001-01-01T00:00:00+05:03", "0001-01-01T00:00:00Z",
                                  "1899-12-31T23:45:00Z", "0", "1700000000"])
def test_dates_out_of_range_are_a_422_naming_the_field(site: tuple[Store, dict[str, int], Path], when: str) -> None:
    store, ids, _ = site
    app = _app(store)
    anon = TestClient(app, raise_server_exceptions=False)
    r = anon.post("/api/v1/bookings", json={"starts_at": when, "contact_name": "A", "contact_email": "a@example.org"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "starts_at", r.text
    c, h = _api(app, "clin")
    kid = ids["DEMO-TX-1"]
    for path, body, field in ((f"/api/v1/patients/{kid}/levels", {"value": 8}, "observed_at"),
                              (f"/api/v1/patients/{kid}/labs", {"name": "creatinine", "value": 100, "unit": "umol/L"},
                               "observed_at"),
                              (f"/api/v1/patients/{kid}/doses", {"amount": 3}, "given_at")):
        r = c.post(path, json=body | {field: when}, headers=h)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, (path, r.text)
    r = c.get("/api/v1/calendar", params={"start": when, "end": "2027-01-01T00:00:00Z"})
    assert r.status_code == 422
    # the forms too
    page = TestClient(app, follow_redirects=False, raise_server_exceptions=False)
    token = _csrf(page.get("/book").text)
    r = page.post("/book", data={"starts_at": when[:16], "contact_name": "A", "contact_email": "a@example.org",
                                 "csrf": token})
    assert r.status_code == 422, r.text[:300]
    login = page.get("/login")
    token = _csrf(login.text)
    page.post("/login", data={"username": "clin", "password": "clin-pw", "csrf": token})
    form = _csrf(page.get(f"/patients/{kid}").text)
    r = page.post(f"/patients/{kid}/levels", data={"value": "8", "unit": "ng/mL", "observed_at": when[:16],
                                                   "csrf": form})
    assert r.status_code == 422, r.status_code


def test_the_calendar_refuses_a_range_it_cannot_mean(site: tuple[Store, dict[str, int], Path]) -> None:
    store, _, _ = site
    c, _ = _api(_app(store), "clin")
    assert c.get("/api/v1/calendar", params={"start": "2027-01-02T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
                 ).status_code == 422
    assert c.get("/api/v1/calendar", params={"start": "1900-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}
                 ).status_code == 422
    assert c.get("/api/v1/calendar", params={"start": "2027-01-01T00:00:00Z", "end": "2027-02-01T00:00:00Z"}
                 ).status_code == 200


def test_forms_refuse_what_the_api_refuses(site: tuple[Store, dict[str, int], Path]) -> None:
    """A 1 MB booking reason (once stored through the form) and a 100 kB one are refused by the form as by the API;
    the forms' fields carry the same maxlength."""
    store, _, _ = site
    app = _app(store)
    page = TestClient(app, follow_redirects=False)
    html = page.get("/book").text
    token = _csrf(html)
    assert 'name="reason" maxlength="2000"' in html and 'name="contact_email" maxlength="254"' in html
    when = _future(10).isoformat()
    for reason in ("r" * 100_000, "r" * 999_000):
        r = page.post("/book", data={"starts_at": when[:16], "reason": reason, "contact_name": "A",
                                     "contact_email": "a@example.org", "csrf": token})
        assert r.status_code in (413, 422)
        r = TestClient(app).post("/api/v1/bookings", json={"starts_at": when, "reason": reason,
                                                           "contact_name": "A", "contact_email": "a@example.org"})
        assert r.status_code in (413, 422)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT max(length(reason)) FROM appointments").scalar() or 0 <= 2000
    login = page.get("/login").text
    assert 'name="username" maxlength="64"' in login


# -- booking ---------------------------------------------------------------------------------------------------
def test_public_booking_is_rate_limited_validated_and_opaque(site: tuple[Store, dict[str, int], Path]) -> None:
    store, _, _ = site
    app = create_app(store, today=lambda: TODAY)  # the default limits: 5 an hour per address
    anon = TestClient(app, client=("203.0.113.20", 1))
    refs = []
    for i in range(5):
        r = anon.post("/api/v1/bookings", json={"starts_at": _future(20 + i).isoformat(), "contact_name": "A",
                                                "contact_email": "a@example.org"})
        assert r.status_code == 201, r.text
        refs.append(r.json()["reference"])
        assert set(r.json()) == {"reference", "status"}  # no id: the public learns nothing sequential
    r = anon.post("/api/v1/bookings", json={"starts_at": _future(30).isoformat(), "contact_name": "A",
                                            "contact_email": "a@example.org"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 60
    assert all(len(x) >= 16 and not x.isdigit() for x in refs) and len(set(refs)) == 5
    other = TestClient(app, client=("203.0.113.21", 1))
    for email in ("a@b", "a@@example.org", "no-at-sign", "a@example..org", "a b@example.org"):
        r = other.post("/api/v1/bookings", json={"starts_at": _future(40).isoformat(), "contact_name": "A",
                                                 "contact_email": email})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "contact_email", (email, r.text)
    other = TestClient(app, client=("203.0.113.22", 1))  # the first has used its 5 an hour
    r = other.post("/api/v1/bookings", json={"starts_at": _future(40).isoformat(), "minutes": 480,
                                             "contact_name": "A", "contact_email": "a@example.org"})
    assert r.status_code == 422
    r = other.post("/api/v1/bookings", json={"starts_at": _future(40).isoformat(), "minutes": 120,
                                             "contact_name": "A", "contact_email": "a@example.org"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "minutes"  # the public: at most an hour
    r = other.post("/api/v1/bookings", json={"starts_at": _future(40).replace(minute=7).isoformat(),
                                             "contact_name": "A", "contact_email": "a@example.org"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "starts_at"


def test_a_clash_tells_the_public_nothing_about_the_booking_in_the_way(
        site: tuple[Store, dict[str, int], Path]) -> None:
    store, ids, _ = site
    app = _app(store)
    when = _future(15, 11)
    store.book(SYSTEM, department="dermatology", starts_at=when, patient_id=ids["DEMO-DERM-1"],
               reason="secret reason")
    r = TestClient(app).post("/api/v1/bookings", json={"starts_at": when.isoformat(), "contact_name": "A",
                                                       "contact_email": "a@example.org"})
    assert r.status_code == 409
    msg = r.json()["detail"][0]["msg"]
    assert msg == "that time is not available: please choose another"
    c, h = _api(app, "clin")
    r = c.post("/api/v1/bookings", json={"starts_at": when.isoformat()}, headers=h)
    assert r.status_code == 409 and "overlaps confirmed appointment" in r.json()["detail"][0]["msg"]


def test_a_fhir_import_cannot_double_book(site: tuple[Store, dict[str, int], Path]) -> None:
    store, ids, _ = site
    app = _app(store)
    c, h = _api(app, "clin")
    bundle = c.get(f"/api/v1/patients/{ids['DEMO-DERM-1']}/fhir").json()
    when = _future(50, 10)
    store.book(SYSTEM, department="dermatology", starts_at=when, patient_id=ids["DEMO-TX-1"])
    ref = None
    for e in bundle["entry"]:
        res = e["resource"]
        if res["resourceType"] == "Patient":
            res["identifier"][0]["value"] = "IMPORT-CLASH-1"
            ref = f"Patient/{res['id']}"
    bundle["entry"].append({"resource": {
        "resourceType": "Appointment", "status": "booked", "serviceType": [{"text": "dermatology"}],
        "appointmentType": {"text": "follow-up"},
        "start": when.isoformat().replace("+00:00", "Z"),
        "end": (when + dt.timedelta(minutes=30)).isoformat().replace("+00:00", "Z"),
        "participant": [{"actor": {"reference": ref}, "status": "accepted"}]}})
    before = len(store.patients(SYSTEM))
    r = c.post("/api/v1/fhir", json=bundle, headers=h)
    assert r.status_code == 409, r.text
    assert len(store.patients(SYSTEM)) == before  # all or nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(url: str, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "CNIDOSE_DATABASE_URL": url}
    return subprocess.Popen([sys.executable, "-m", "cnidose.cli", "serve", "--database", url, "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_up(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
            return
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.3)


@pytest.fixture(params=["sqlite", "postgresql"])
def served_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cnidose.db'}"
    else:
        yield from _pg_engine()


def test_two_server_processes_never_confirm_two_visits_in_one_slot(served_db: str) -> None:
    """Two ``cnidose serve`` processes on one database; 24 clinicians book the same slot at once, half through each:
    exactly one visit is confirmed, the others get 409; five rounds."""
    engine = make_engine(served_db)
    upgrade(engine)
    store = Store(engine)
    store.create_user(SYSTEM, "clin", hash_password("clin-pw"), "clinician")
    ports = [_free_port(), _free_port()]
    procs = [_serve(served_db, p) for p in ports]
    try:
        for proc, port in zip(procs, ports, strict=True):
            _wait_up(proc, port)
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/api/v1/session", json={"username": "clin", "password": "clin-pw"})
        cookies, headers = dict(r.cookies), {"X-CSRF-Token": r.json()["csrf"]}

        def book(i: int, when: str) -> int:
            with httpx.Client(base_url=f"http://127.0.0.1:{ports[i % 2]}", cookies=cookies, timeout=60) as c:
                return c.post("/api/v1/bookings", json={"starts_at": when, "minutes": 30}, headers=headers).status_code

        for trial in range(5):
            when = _future(60 + trial, 9).isoformat()
            with concurrent.futures.ThreadPoolExecutor(24) as pool:
                codes = list(pool.map(lambda i, w=when: book(i, w), range(24)))
            assert codes.count(201) == 1 and codes.count(409) == 23, (trial, codes)
        with engine.connect() as conn:
            n = conn.exec_driver_sql("SELECT count(*) FROM appointments WHERE status = 'confirmed'").scalar()
        assert n == 5
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        engine.dispose()


# -- headers, page text, iCalendar -----------------------------------------------------------------------------
def test_every_response_has_the_security_headers(site: tuple[Store, dict[str, int], Path]) -> None:
    store, ids, _ = site
    app = _app(store)
    c = TestClient(app, follow_redirects=False)
    token = _csrf(c.get("/login").text)
    c.post("/login", data={"username": "clin", "password": "clin-pw", "csrf": token})
    kid = ids["DEMO-TX-1"]
    for path in ("/login", "/", f"/patients/{kid}", f"/patients/{kid}/report", f"/patients/{kid}/report.pdf",
                 "/api/v1/patients", f"/api/v1/patients/{kid}", "/api/v1/openapi.json", "/no-such-page",
                 "/static/app.css", "/vendor/htmx.min.js"):
        r = c.get(path)
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in \
            csp.split("script-src", 1)[1].split(";")[0], (path, csp)
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer", path
        static = path.startswith(("/static/", "/vendor/"))
        assert (r.headers.get("cache-control") == "no-store") != static, (path, r.headers.get("cache-control"))
    # no inline script on any page (the CSP would block it)
    for path in ("/login", "/", f"/patients/{kid}", "/calendar", "/book"):
        # (a JSON data island is not a script: the browser never runs it)
        assert not re.search(r'<script(?![^>]*\b(src=|type="application/json"))[^>]*>', c.get(path).text), path


def test_page_messages_never_come_from_the_query_string(site: tuple[Store, dict[str, int], Path]) -> None:
    store, ids, _ = site
    c = TestClient(_app(store), follow_redirects=False)
    token = _csrf(c.get("/login").text)
    c.post("/login", data={"username": "clin", "password": "clin-pw", "csrf": token})
    for path in (f"/patients/{ids['DEMO-TX-1']}", "/", "/patients", "/calendar", "/book", "/login"):
        r = c.get(path, params={"error": "PATIENT DECEASED", "error_field": "value", "message": "PATIENT DECEASED",
                                "done": "PATIENT DECEASED"})
        assert "PATIENT DECEASED" not in r.text, path


def test_icalendar_is_rfc_5545(site: tuple[Store, dict[str, int], Path]) -> None:
    store, ids, _ = site
    start = _future(41, 9)
    reason = "line one\rBEGIN:VEVENT\r\nSUMMARY:spoof\n" + "long reason, " * 20 + "ünïcödé " * 12
    aid = store.book(SYSTEM, department="nephrology", starts_at=start, patient_id=ids["DEMO-TX-1"],
                     kind="follow-up", reason=reason)
    c, _ = _api(_app(store), "karel")
    raw = c.get(f"/appointments/{aid}.ics").content
    assert re.search(rb"\r(?!\n)", raw) is None and re.search(rb"(?<!\r)\n", raw) is None  # CRLF only
    lines = raw.split(b"\r\n")
    assert all(len(x) <= 75 for x in lines), max(len(x) for x in lines)
    assert raw.count(b"\r\nBEGIN:VEVENT") == 1 and b"\r\nSUMMARY:spoof" not in raw  # no injected event
    import icalendar

    ev = icalendar.Calendar.from_ical(raw).walk("VEVENT")[0]
    assert str(ev["description"]) == reason.strip().replace("\r\n", "\n").replace("\r", "\n")
