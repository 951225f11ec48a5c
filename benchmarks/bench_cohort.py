"""Cohort-scale speed figures (a script, not a test).

Run: ``python benchmarks/bench_cohort.py [--n 1000000] [--dask]``

Prints
1. time and peak memory (resident set, this process) for N virtual patients x 28 days of twice-daily
   tacrolimus (Andrews 2019: 2-compartment, first-order absorption with lag, covariates sampled), a
   daily trough, closed form, no dose adjustment -- run locally (serial) in chunks of 100,000;
2. the same with weekly proportional dose adjustment (examples/trial_cpic.toml);
3. with ``--dask``: the same on a loopback Dask cluster with 1 worker and then 2 workers (separate
   processes, one thread each), and the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cnidose.cohort.executor import loopback_cluster  # noqa: E402
from cnidose.cohort.trial import load_protocol, run_trial  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dask", action="store_true")
    args = ap.parse_args()
    protocol = copy.deepcopy(load_protocol(REPO / "examples" / "trial_cpic.toml"))
    protocol.pop("adjust", None)  # a fixed regimen: the closed-form cost alone
    run_trial(protocol, n=1000)  # warm-up
    t0 = time.perf_counter()
    r = run_trial(protocol, n=args.n, chunk_size=100_000)
    t = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(f"{args.n:,} virtual patients x 28 days BID, daily trough (Andrews 2019, closed form), serial: "
          f"{t:.2f} s, peak resident memory {peak:.2f} GiB; day-28 attainment {r.attainment[-1]:.1%}")
    adjusted = copy.deepcopy(load_protocol(REPO / "examples" / "trial_cpic.toml"))  # weekly proportional
    t0 = time.perf_counter()
    run_trial(adjusted, n=args.n, chunk_size=100_000)
    print(f"the same with weekly proportional adjustment (4 simulations of the 28 days): "
          f"{time.perf_counter() - t0:.2f} s")
    if args.dask:
        times = {}
        for w in (1, 2):
            with loopback_cluster(w) as addr:
                run_trial(protocol, n=10_000, chunk_size=10_000, backend="dask", scheduler=addr)  # warm workers
                t0 = time.perf_counter()
                run_trial(protocol, n=args.n, chunk_size=100_000, backend="dask", scheduler=addr)
                times[w] = time.perf_counter() - t0
            print(f"Dask on loopback, {w} worker(s): {times[w]:.2f} s")
        print(f"speed-up 1 -> 2 workers: {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
