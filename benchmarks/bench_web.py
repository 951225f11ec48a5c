"""Load on the web API (a script, not a test).

Run: ``python benchmarks/bench_web.py [--clients 50] [--seconds 60] [--mode read|recommend|fresh|all]
[--workers N] [--patients K] [--database URL]``

Starts ``cnidose serve --demo`` on loopback over a fresh SQLite demo database, copies the demo kidney-transplant
patient ``--patients`` times through the FHIR API (export, then import under a new MRN), signs in ``--clients``
concurrent clients (client i works on patient i mod K) and for ``--seconds`` each client repeatedly

- ``read``: fetches its patient's chart (``GET /api/v1/patients/{id}``);
- ``recommend``: asks for a recommendation (``POST /api/v1/patients/{id}/recommendation``). The first request
  on a patient computes it (MAP fit, posterior, candidate regimens, curve with its band, clinical rules; stored
  as a draft, 201); the following ones, on the unchanged chart, get the stored assessment back (200, reused);
- ``fresh``: records a new trough and then asks for the recommendation, so that every recommendation is
  computed (only the recommendation request is timed).

``--warm`` computes every patient's recommendation before the timed runs (the steady state; without it the
first minute includes computing them). Prints, per mode: requests, throughput, p50/p95/max latency, errors, and
how many recommendations were computed. The client is a minimal keep-alive HTTP/1.1 client on asyncio (one
connection per client), so that the load generator takes as little of the machine's CPU as it can; it shares
the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Conn:
    """One keep-alive HTTP/1.1 connection with a cookie jar (enough for this app's JSON API)."""

    def __init__(self, port: int):
        self.port = port
        self.cookies: dict[str, str] = {}
        self.csrf = ""
        self.headers: list[str] = []  # extra header lines (e.g. X-Forwarded-For behind a simulated proxy)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: object = None, raw: bytes | None = None
                      ) -> tuple[int, bytes]:
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", f"Content-Length: {len(data)}"]
        if body is not None or raw is not None:
            head.append("Content-Type: application/json")
        head.extend(self.headers)
        if self.cookies:
            head.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        if self.csrf and method != "GET":
            head.append(f"X-CSRF-Token: {self.csrf}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        status_line = await self.reader.readline()
        if not status_line and reused:  # an idle keep-alive connection the server closed: reconnect, as browsers do
            self.close()
            self.writer = None
            return await self.request(method, path, body, raw)
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = (await self.reader.readline()).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "set-cookie":
                k, _, v = value.split(";", 1)[0].partition("=")
                self.cookies[k] = v
        if not chunked:
            return status, await self.reader.readexactly(length)
        parts = []
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(chunk[:-2])

    async def sign_in(self) -> None:
        status, body = await self.request("POST", "/api/v1/session", {"username": "clinician",
                                                                       "password": "clinician-demo"})
        if status != 200:
            raise SystemExit(f"sign-in failed: {status} {body[:200]!r}")
        self.csrf = json.loads(body)["csrf"]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _start(port: int, data: str, workers: int, database: str | None, extra: tuple[str, ...] = ()
           ) -> subprocess.Popen[bytes]:
    """``cnidose serve --demo`` on loopback with its data under ``data`` (``extra``: more options), once it
    accepts connections."""
    env = {**os.environ, "XDG_DATA_HOME": data}
    env.pop("CNIDOSE_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "cnidose.cli", "serve", "--demo", "--port", str(port),
                             "--workers", str(workers), *(["--database", database] if database else []), *extra],
                            env=env, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


async def _patients(port: int, k: int) -> list[int]:
    """The demo transplant patient and k - 1 copies of it (FHIR export, imported under new MRNs)."""
    c = Conn(port)
    await c.sign_in()
    _, body = await c.request("GET", "/api/v1/patients")
    first = next(p["id"] for p in json.loads(body) if p["mrn"] == "DEMO-TX-1")
    _, bundle = await c.request("GET", f"/api/v1/patients/{first}/fhir")
    ids = [first]
    for i in range(1, k):
        text = bundle.decode().replace("DEMO-TX-1", f"BENCH-TX-{i}")
        status, body = await c.request("POST", "/api/v1/fhir", json.loads(text))
        if status != 201:
            raise SystemExit(f"could not copy the demo patient: {status} {body[:300]!r}")
        ids.append(int(json.loads(body)["id"]))
    c.close()
    return ids


async def _run(port: int, clients: int, seconds: float, mode: str, pids: list[int]
               ) -> tuple[list[float], int, int]:
    latencies: list[float] = []
    errors = computed = unrecommended = 0
    conns = [Conn(port) for _ in range(clients)]
    await asyncio.gather(*(c.sign_in() for c in conns))
    stop = time.monotonic() + seconds
    # new troughs an hour ago, a second apart (the demo patient's doses run up to today)
    t_level = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)

    async def one(i: int, c: Conn) -> None:
        nonlocal errors, computed, t_level, unrecommended
        pid = pids[i % len(pids)]
        while time.monotonic() < stop:
            try:
                if mode == "fresh":  # a new trough (untimed), then the recommendation on the new chart
                    t_level += dt.timedelta(seconds=1)
                    await c.request("POST", f"/api/v1/patients/{pid}/levels",
                                    {"value": 8.0, "observed_at": t_level.isoformat()})
                t0 = time.perf_counter()
                if mode == "read":
                    status, body = await c.request("GET", f"/api/v1/patients/{pid}")
                else:
                    status, body = await c.request("POST", f"/api/v1/patients/{pid}/recommendation")
                latencies.append(time.perf_counter() - t0)
                errors += status not in (200, 201)
                computed += status == 201
                if status == 201 and b'"recommendation"' not in body:  # computed, but no regimen came out
                    unrecommended += 1
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors += 1
                c.close()
                c.writer = None

    await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    for c in conns:
        c.close()
    if unrecommended:
        print(f"  {unrecommended} computed assessments had no recommendation in them", flush=True)
    return latencies, errors, computed


async def _warm(port: int, pids: list[int]) -> tuple[list[float], int, int]:
    """Every patient's recommendation once (one request per patient, as many at a time as there are patients)."""
    errors = computed = 0
    conns = [Conn(port) for _ in pids]
    await asyncio.gather(*(c.sign_in() for c in conns))

    async def one(c: Conn, pid: int) -> None:
        nonlocal errors, computed
        status, body = await c.request("POST", f"/api/v1/patients/{pid}/recommendation")
        errors += status not in (200, 201) or b'"recommendation"' not in body
        computed += status == 201

    await asyncio.gather(*(one(c, pid) for c, pid in zip(conns, pids, strict=True)))
    for c in conns:
        c.close()
    return [], errors, computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--mode", choices=["read", "recommend", "fresh", "all"], default="all")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--patients", type=int, default=None, help="distinct patients (default: one per client)")
    ap.add_argument("--warm", action="store_true", help="recommend: compute every patient's recommendation "
                                                         "before the timed run (the steady state)")
    ap.add_argument("--database", default=None, help="an EMPTY database's SQLAlchemy URL (default: a fresh SQLite "
                                                     "file); the demo data and the copies are written into it")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = "SQLite" if args.database is None else args.database.split(":")[0]
    print(f"{os.cpu_count()} CPUs; server: cnidose serve --demo --workers {args.workers} ({db}); "
          f"{args.clients} clients on loopback", flush=True)
    with tempfile.TemporaryDirectory() as data:
        proc = _start(port, data, args.workers, args.database)
        try:
            pids = asyncio.run(_patients(port, args.patients or args.clients))
            if args.warm:
                t0 = time.perf_counter()
                _, err, computed = asyncio.run(_warm(port, pids))
                print(f"warm-up: {computed} recommendations computed in {time.perf_counter() - t0:.1f} s, "
                      f"{err} errors", flush=True)
            for mode in (["read", "recommend", "fresh"] if args.mode == "all" else [args.mode]):
                lat, err, computed = asyncio.run(_run(port, args.clients, args.seconds, mode, pids))
                lat.sort()
                n = len(lat)
                p50, p95 = lat[n // 2] * 1000, lat[min(n - 1, int(0.95 * n))] * 1000
                extra = f", {computed} computed" if mode != "read" else ""
                print(f"{mode}: {len(pids)} patients, {args.seconds:g} s: {n} requests, {n / args.seconds:.1f}/s, "
                      f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {lat[-1] * 1000:.0f} ms, {err} errors{extra}",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
