"""Durability: writer processes, and the web server, are killed (SIGKILL) in the middle of concurrent writes; afterwards
every acknowledged write is present in full, no write is present in part, and every stored row has its
audit row. On SQLite (WAL, synchronous=FULL) and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

from sqlalchemy import text

from cnidose.records.db import make_engine, upgrade
from cnidose.records.store import SYSTEM, Store

from .test_records import db_url  # noqa: F401  (the SQLite/PostgreSQL fixture)

WRITER = r"""
import datetime as dt, sys
from cnidose.records.db import make_engine
from cnidose.records.store import SYSTEM, Store
store = Store(make_engine(sys.argv[1]))
pid, w = int(sys.argv[2]), sys.argv[3]
t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
for i in range(100000):
    doses = [{"drug": "tacrolimus", "product": f"w{w}-b{i}", "amount": 1 + k % 5, "unit": "mg",
              "given_at": t0 + dt.timedelta(hours=12 * k)} for k in range(10)]
    store.add_doses_and_levels(SYSTEM, pid, doses, [])
    print(f"ack w{w}-b{i}", flush=True)
"""


def test_killed_writers_leave_no_partial_and_lose_no_acknowledged_write(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    store = Store(engine)
    pid = store.add_patient(SYSTEM, mrn="DUR-1", family_name="Crash", given_name="Test", birth_date="1970-01-01",
                            sex="unknown", agent="tacrolimus", indication="kidney transplant")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(pid), str(w)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for w in range(3)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # let every writer acknowledge a few writes, then kill them mid-flight
        time.sleep(0.5)
        if all(p.poll() is None for p in procs) and engine.connect().execute(
                text("SELECT count(*) FROM doses")).scalar_one() >= 200:
            break
    for p in procs:
        p.send_signal(signal.SIGKILL)
    acked: set[str] = set()
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL, err[-2000:]
        acked |= {line.split()[1] for line in out.splitlines() if line.startswith("ack ")}
    assert len(acked) >= 10
    engine.dispose()
    engine = make_engine(db_url)
    with engine.connect() as c:
        per_batch = Counter(row[0] for row in c.execute(text("SELECT product FROM doses")))
        audited = c.execute(text("SELECT count(*) FROM audit_log WHERE object_type = 'dose'")).scalar_one()
        doses = c.execute(text("SELECT count(*) FROM doses")).scalar_one()
    assert all(n == 10 for n in per_batch.values()), {b: n for b, n in per_batch.items() if n != 10}
    assert acked <= set(per_batch)  # every acknowledged write is there (at most one per writer beyond: in flight)
    assert len(set(per_batch) - acked) <= len(procs)
    assert audited == doses
    engine.dispose()


def test_killed_server_keeps_every_acknowledged_api_write(db_url: str, tmp_path: object) -> None:  # noqa: F811
    """``cnidose serve`` on the database, four clients posting levels concurrently through the API, the server
    killed (SIGKILL) mid-stream: every level the API acknowledged (201) is stored, each with its audit row,
    and no level is stored twice or in part."""
    import socket
    import threading

    import httpx

    from cnidose.web.security import hash_password

    engine = make_engine(db_url)
    upgrade(engine)
    store = Store(engine)
    pid = store.add_patient(SYSTEM, mrn="DUR-2", family_name="Crash", given_name="Server", birth_date="1970-01-01",
                            sex="unknown", agent="tacrolimus", indication="kidney transplant")
    store.create_user(SYSTEM, "writer", hash_password("writer-pw"), "clinician")
    engine.dispose()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cnidose.cli", "serve", "--database", db_url, "--port",
                               str(port)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "CNIDOSE_SECRET_KEY": "durability"})
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/login", timeout=2)
            break
        except httpx.TransportError:
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    acked: list[str] = []
    lock = threading.Lock()

    def client(w: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as c:
            csrf = c.post("/api/v1/session", json={"username": "writer", "password": "writer-pw"}).json()["csrf"]
            for i in range(100_000):
                # a unique, recognisable value per write: 1 + w/10 + i/10000 ng/mL
                value = round(1 + w / 10 + i / 10_000, 4)
                try:
                    r = c.post(f"/api/v1/patients/{pid}/levels", headers={"X-CSRF-Token": csrf},
                               json={"value": value, "observed_at": "2026-01-01T00:00:00Z", "confirm": True})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 201:
                    with lock:
                        acked.append(f"{value:.4f}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(acked) < 60 and time.monotonic() < deadline + 60:
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 60
    engine = make_engine(db_url)
    with engine.connect() as c:
        stored = Counter(f"{v:.4f}" for (v,) in c.execute(text("SELECT value FROM observations")))
        audited = c.execute(text("SELECT count(*) FROM audit_log WHERE object_type = 'observation' "
                                 "AND action = 'create'")).scalar_one()
    engine.dispose()
    assert all(n == 1 for n in stored.values())  # nothing twice
    assert set(acked) <= set(stored)  # every acknowledged write is there
    assert len(set(stored) - set(acked)) <= 4  # at most the writes in flight when the server died
    assert audited == sum(stored.values())
