"""Load on the web API (a script, not a test).

Run: ``python benchmarks/bench_web.py [--clients 50] [--seconds 60] [--mode read|recommend|both] [--workers N]``

Starts ``cnidose serve`` (one uvicorn process) on loopback over a fresh SQLite demo database, signs in
``--clients`` concurrent clients, and for ``--seconds`` each client repeatedly
- ``read``: fetches the demo transplant patient's chart with its stored recommendation
  (``GET /api/v1/patients/{id}``), or
- ``recommend``: asks for a fresh recommendation (``POST /api/v1/patients/{id}/recommendation``: MAP fit,
  posterior, candidate regimens, the curve with its band, the clinical rules; stored as a draft).
Prints requests, throughput, p50/p95/max latency and errors per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def _start(port: int, data: str, workers: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "XDG_DATA_HOME": data, "CNIDOSE_SECRET_KEY": "bench"}
    env.pop("CNIDOSE_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "cnidose.cli", "serve", "--demo", "--port", str(port),
                             "--workers", str(workers)],
                            env=env, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


async def _run(base: str, clients: int, seconds: float, mode: str) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, timeout=120) as probe:
        csrf0 = (await probe.post("/api/v1/session", json={"username": "clinician",
                                                            "password": "clinician-demo"})).json()["csrf"]
        pid = (await probe.get("/api/v1/patients")).json()[0]["id"]
        if mode == "read":  # something stored to read
            await probe.post(f"/api/v1/patients/{pid}/recommendation", headers={"X-CSRF-Token": csrf0})
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            csrf = (await c.post("/api/v1/session", json={"username": "clinician",
                                                          "password": "clinician-demo"})).json()["csrf"]
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    if mode == "read":
                        r = await c.get(f"/api/v1/patients/{pid}")
                    else:
                        r = await c.post(f"/api/v1/patients/{pid}/recommendation", headers={"X-CSRF-Token": csrf})
                    ok = r.status_code in (200, 201)
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--mode", choices=["read", "recommend", "both"], default="both")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        proc = _start(port, data, args.workers)
        try:
            for mode in (["read", "recommend"] if args.mode == "both" else [args.mode]):
                lat, err = asyncio.run(_run(f"http://127.0.0.1:{port}", args.clients, args.seconds, mode))
                lat.sort()
                n = len(lat)
                p50, p95 = lat[n // 2] * 1000, lat[min(n - 1, int(0.95 * n))] * 1000
                print(f"{mode} ({args.workers} worker(s)): {args.clients} clients x {args.seconds:g} s: {n} "
                      f"requests, {n / args.seconds:.1f}/s, p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
                      f"max {lat[-1] * 1000:.0f} ms, {err} errors")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
