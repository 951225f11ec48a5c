"""Batch MAP fit of the shared suite's 4,000-individual data sets through Dask equals the serial result, bit
for bit (estimates, posterior covariance, objective, status).

Run: ``python validation/map-nonmem/dask_equal.py [MODEL ...] [--workers 2] [--chunk-size 500]``
(default: every model of the suite but 201, whose ODE fits take minutes per hundred individuals).
Starts a loopback Dask cluster (scheduler and workers as separate processes) and prints, per model, the
number of individuals, how many are identical, and both wall times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

import mapsuite  # noqa: E402

from cnidose.cohort import batch_fit  # noqa: E402
from cnidose.cohort.executor import loopback_cluster  # noqa: E402


def _same(a: object, b: object) -> bool:
    return (np.array_equal(a.eta, b.eta) and a.ofv == b.ofv and a.status == b.status  # type: ignore[attr-defined]
            and (a.covariance is None) == (b.covariance is None)  # type: ignore[attr-defined]
            and (a.covariance is None or np.array_equal(a.covariance, b.covariance)))  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=500)
    args = ap.parse_args()
    models = args.models or sorted(p.stem.removeprefix("model") for p in HERE.glob("model*.toml")
                                   if p.stem != "model201")
    bad = 0
    with loopback_cluster(args.workers) as addr:
        for name in models:
            model = mapsuite.load(name)
            inds = mapsuite.individuals(name, None)
            t0 = time.perf_counter()
            serial = batch_fit(model, inds, chunk_size=args.chunk_size)
            t1 = time.perf_counter()
            dask = batch_fit(model, inds, backend="dask", scheduler=addr, chunk_size=args.chunk_size)
            t2 = time.perf_counter()
            same = sum(_same(a, b) for a, b in zip(serial, dask, strict=True))
            bad += same != len(inds)
            print(f"model {name}: {len(inds)} individuals, {same} identical; serial {t1 - t0:.1f} s, "
                  f"Dask ({args.workers} workers) {t2 - t1:.1f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
