"""Clinicians at work while an anonymous client floods sign-in and booking (a script, not a test).

Run: ``python benchmarks/bench_abuse.py [--clinicians 50] [--attackers 16] [--seconds 60] [--think 1.0]
[--workers 1]``

Starts ``cnidose serve --demo`` on loopback over a fresh SQLite demo database, with 127.0.0.1 as the trusted
proxy, so that every simulated client has its own address in ``X-Forwarded-For`` as it would behind the
hospital's reverse proxy. ``--clinicians`` clients (clinicians 10.1.x.y, all as the demo user ``clinician``,
the account the attacker targets) sign in once, then for ``--seconds`` each repeatedly reads the patient list,
reads a patient's chart and asks for that patient's recommendation (the stored one comes back), waiting
``--think`` seconds between requests (on average); in the second half of each phase, each signs in again from its
browser (with the device cookie of its first sign-in), the request an attack on the account aims at. During the
attack, three more clinicians sign in from machines they never used (no device cookie), honouring Retry-After.

The run has two phases of ``--seconds`` each: without an attacker (the baseline), then with ``--attackers``
concurrent anonymous connections, each sending as fast as the server answers a mix of
- wrong passwords for ``clinician`` from one address, and from a new address each time (a botnet: the proxy
  forwards a fresh X-Forwarded-For), and unknown user names;
- sign-ins with a 900 kB user name (refused by the schema before any work);
- booking requests from rotating addresses, and bookings with a 100 kB reason.

Prints, per phase: the clinicians' requests, p50/p95/max latency and errors (any answer but 200/201), their
sign-ins (latency and answers), the attacker's requests by answer, and the growth of the database file, the
audit log and the appointments, and of the server's memory (resident set of the server process and its children).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import random
import re
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

from benchmarks.bench_web import Conn, _start

PASSWORD = {"username": "clinician", "password": "clinician-demo"}


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (Linux /proc), MB."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _db_counts(db: Path) -> tuple[float, int, int]:
    with sqlite3.connect(db) as conn:
        audit = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        visits = conn.execute("SELECT count(*) FROM appointments").fetchone()[0]
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 1e6  # with the WAL
    return size, int(audit), int(visits)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


async def _sign_in_clinicians(port: int, n: int) -> list[Conn]:
    conns = []
    for i in range(n):  # one after another, as a ward's morning (each browser gets its device cookie)
        c = Conn(port)
        c.headers = [f"X-Forwarded-For: 10.1.{i // 200}.{i % 200 + 1}"]
        await c.sign_in()
        conns.append(c)
    return conns


async def _clinicians(port: int, conns: list[Conn], seconds: float, think: float, pids: list[int]
                      ) -> tuple[list[float], collections.Counter[int], list[float], collections.Counter[int]]:
    latencies: list[float] = []
    answers: collections.Counter[int] = collections.Counter()
    sign_ins: list[float] = []
    sign_in_answers: collections.Counter[int] = collections.Counter()
    start = time.monotonic()
    stop = start + seconds

    async def one(i: int, c: Conn) -> None:
        rng = random.Random(i)
        pid = pids[i % len(pids)]
        signed_again = False
        await asyncio.sleep(rng.random() * think)
        while time.monotonic() < stop:
            if not signed_again and time.monotonic() > start + seconds / 2 + rng.random() * seconds / 4:
                signed_again = True
                t0 = time.perf_counter()
                try:
                    status, body = await c.request("POST", "/api/v1/session", PASSWORD)
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    status, body = 0, b""
                    c.close()
                    c.writer = None
                sign_ins.append(time.perf_counter() - t0)
                sign_in_answers[status] += 1
                if status == 200:
                    c.csrf = json.loads(body)["csrf"]
                continue
            method, path = rng.choice([("GET", "/api/v1/patients"), ("GET", f"/api/v1/patients/{pid}"),
                                       ("POST", f"/api/v1/patients/{pid}/recommendation")])
            t0 = time.perf_counter()
            try:
                status, _ = await c.request(method, path)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                status = 0
                c.close()
                c.writer = None
            latencies.append(time.perf_counter() - t0)
            answers[status] += 1
            await asyncio.sleep(think * (0.5 + rng.random()))

    await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    return latencies, answers, sign_ins, sign_in_answers


async def _new_devices(port: int, n: int, stop: float) -> list[str]:
    """Clinicians signing in from machines they never used (no device cookie), honouring Retry-After: they are
    judged with the attacker's failures on the account, so they wait."""
    async def one(i: int) -> str:
        await asyncio.sleep(5 + i * 3)
        c = Conn(port)
        c.headers = [f"X-Forwarded-For: 10.2.0.{i + 1}"]
        t0, tries = time.monotonic(), 0
        while time.monotonic() < stop:
            tries += 1
            status, body = await c.request("POST", "/api/v1/session", PASSWORD)
            if status == 200:
                c.close()
                return f"in after {time.monotonic() - t0:.1f} s ({tries} tries)"
            wait = re.search(r"in (\d+) s", json.loads(body).get("detail", ""))  # the answer's Retry-After
            await asyncio.sleep(min(float(wait.group(1)) if wait else 1.0, 30))
        c.close()
        return f"not in after {time.monotonic() - t0:.0f} s ({tries} tries)"

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _attacker(port: int, k: int, stop: float, tally: collections.Counter[str]) -> None:
    rng = random.Random(1000 + k)
    c = Conn(port)
    huge_name = json.dumps({"username": "x" * 900_000, "password": "x"}).encode()
    when = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    while time.monotonic() < stop:
        kind = rng.choice(["guess-one-address", "guess-botnet", "unknown-user", "huge-name", "booking",
                           "huge-reason"])
        if kind == "guess-one-address":
            c.headers = ["X-Forwarded-For: 203.0.113.66"]
        else:
            c.headers = [f"X-Forwarded-For: 198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}"]
        body: object = None
        raw = None
        path = "/api/v1/session"
        if kind.startswith("guess"):
            body = {"username": "clinician", "password": f"guess{rng.random()}"}
        elif kind == "unknown-user":
            body = {"username": f"user{rng.randrange(10**9)}", "password": "x"}
        elif kind == "huge-name":
            raw = huge_name
        else:
            path = "/api/v1/bookings"
            start = when + dt.timedelta(days=rng.randrange(1, 300), hours=rng.randrange(24),
                                        minutes=15 * rng.randrange(4))
            body = {"starts_at": start.isoformat(), "minutes": 60, "contact_name": "Flood",
                    "contact_email": f"flood{rng.randrange(10**6)}@example.org",
                    "reason": "x" * (100_000 if kind == "huge-reason" else 200)}
        try:
            status, _ = await c.request("POST", path, body, raw=raw)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            status = 0
            c.close()
            c.writer = None
        tally[f"{kind} {status}"] += 1
    c.close()


async def _phase(port: int, args: argparse.Namespace, conns: list[Conn], pids: list[int], attack: bool
                 ) -> tuple[list[float], collections.Counter[int], list[float], collections.Counter[int],
                            collections.Counter[str], list[str]]:
    tally: collections.Counter[str] = collections.Counter()
    stop = time.monotonic() + args.seconds
    work = asyncio.create_task(_clinicians(port, conns, args.seconds, args.think, pids))
    attackers = [asyncio.create_task(_attacker(port, k, stop, tally)) for k in range(args.attackers if attack else 0)]
    newcomers = asyncio.create_task(_new_devices(port, 3 if attack else 0, stop))
    lat, answers, sign_ins, sign_answers = await work
    for a in attackers:
        a.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    return lat, answers, sign_ins, sign_answers, tally, await newcomers


async def _patients(port: int) -> list[int]:
    c = Conn(port)
    c.headers = ["X-Forwarded-For: 10.0.0.1"]
    await c.sign_in()
    _, body = await c.request("GET", "/api/v1/patients")
    pids = []
    for p in json.loads(body):  # the stored recommendations the clinicians will read (computed once)
        status, _ = await c.request("POST", f"/api/v1/patients/{p['id']}/recommendation")
        if status in (200, 201):
            pids.append(int(p["id"]))
    c.close()
    return pids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clinicians", type=int, default=50)
    ap.add_argument("--attackers", type=int, default=16, help="concurrent anonymous connections")
    ap.add_argument("--seconds", type=float, default=60.0, help="each phase")
    ap.add_argument("--think", type=float, default=1.0, help="mean seconds between a clinician's requests")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"{os.cpu_count()} CPUs; cnidose serve --demo --workers {args.workers} (SQLite); {args.clinicians} "
          f"clinicians (think {args.think:g} s), {args.attackers} attacking connections; {args.seconds:g} s a phase",
          flush=True)
    with tempfile.TemporaryDirectory() as data:
        proc = _start(port, data, args.workers, None, ("--trusted-proxies", "127.0.0.1"))
        db = Path(data) / "cnidose" / "cnidose-demo.db"
        try:
            loop = asyncio.new_event_loop()
            pids = loop.run_until_complete(_patients(port))
            conns = loop.run_until_complete(_sign_in_clinicians(port, args.clinicians))
            for attack in (False, True):
                size0, audit0, visits0 = _db_counts(db)
                rss0 = _rss_mb(proc.pid)
                t0 = time.monotonic()
                lat, answers, sign_ins, sign_answers, tally, newcomers = loop.run_until_complete(
                    _phase(port, args, conns, pids, attack))
                wall = time.monotonic() - t0
                size1, audit1, visits1 = _db_counts(db)
                rss1 = _rss_mb(proc.pid)
                errors = sum(v for k, v in answers.items() if k not in (200, 201))
                print(f"\n{'under attack' if attack else 'baseline'} ({wall:.0f} s):", flush=True)
                print(f"  clinicians: {len(lat)} requests, p50 {_pct(lat, 0.5):.0f} ms, p95 {_pct(lat, 0.95):.0f} "
                      f"ms, max {_pct(lat, 1.0):.0f} ms, {errors} errors {dict(answers)}")
                print(f"  clinicians' sign-ins from their browsers: {len(sign_ins)}, p50 {_pct(sign_ins, 0.5):.0f} "
                      f"ms, p95 {_pct(sign_ins, 0.95):.0f} ms, max {_pct(sign_ins, 1.0):.0f} ms, "
                      f"answers {dict(sign_answers)}")
                if attack:
                    print(f"  clinicians on new machines (no device cookie): {'; '.join(newcomers)}")
                    total = sum(tally.values())
                    print(f"  attacker: {total} requests ({total / wall:.0f}/s):")
                    for key, v in sorted(tally.items()):
                        print(f"    {key}: {v}")
                print(f"  database {size0:.1f} -> {size1:.1f} MB, audit log {audit0} -> {audit1} rows, "
                      f"appointments {visits0} -> {visits1}; server memory {rss0:.0f} -> {rss1:.0f} MB", flush=True)
            for c in conns:
                c.close()
            loop.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
