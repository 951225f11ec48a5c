"""Iterative-forecasting speed on real-data-shaped cohorts (a script, not a test; issues 14 and 15).

    python benchmarks/bench_forecast.py [N_PATIENTS] [MODEL ...]

For each model (default: Størset 2014 and Andrews 2019), writes a cohort of ``N_PATIENTS`` (default 38: eight
troughs each, 304 forecasts) as NONMEM CSV and times ``cnidose evaluate --model M --data FILE --strategy map``
in a fresh process (interpreter start, imports, reading, every fit, the summary), serially and with
``--backend processes --workers 2``, and prints the forecasts, the wall time and the time per forecast.

The cohorts have what makes real TDM data slow to fit: a trough on days 3, 4, 5, 7, 10, 14, 21 and 28 after
transplantation, each its own occasion (between-occasion variability), and covariates that change every day
(Størset: post-operative day, prednisolone tapering 20 -> 5 mg/d, haematocrit rising 0.30 -> 0.38; Andrews:
constant covariates, as :mod:`tdm_cohorts`). Doses: 5 mg (8 mg for CYP3A5 expressers) every 12 h, the daily
dose as its own record. Levels are simulated from the model itself (its IIV and IOV) with a 10 % log-normal
assay error.

Measured 2026-12-03 on the project's 2-core machine (``python benchmarks/bench_forecast.py``), 304 forecasts:

==========  ===========================  ==================  ==================  =====================
model       before (e9c062c), serial     9ef8be6, serial     6086b28, serial     6086b28, 2 processes
==========  ===========================  ==================  ==================  =====================
Størset     194 s wall, 172 s CPU        29.9 s (98 ms)      14.5 s (48 ms)      7.5 s (25 ms)
Andrews     83 s wall, 81 s CPU          15.3 s (50 ms)      7.1 s (23 ms)       3.9 s (13 ms)
==========  ===========================  ==================  ==================  =====================

Measured 2026-12-07 with the compiled model kernels and exact derivatives (:mod:`cnidose.models.kernel`), on a
development machine about 1.3x slower than the one above: Størset 7.9 s serially (26 ms per forecast) and 5.0 s on
2 processes; Andrews 4.2 s and 2.7 s. Later the same day, with the wide-prior search predicting only the points
that might compete (:func:`cnidose.estimation.map._screen_values`): Størset 5.4 s serially (18 ms per forecast) and
4.0 s on 2 processes; Andrews 4.4 s and 3.0 s (it gains nothing there: no effect of its has a wide prior).

(The e9c062c figures: ``PYTHONPATH=<e9c062c>/src python -m cnidose.cli evaluate ...`` on the same files with one
BLAS thread; the Størset run shared the machine with another job part of the time, so its CPU time is the fairer
figure.)

What it took: the wide-prior search of the MAP (Størset's ka, Andrews' Q) made nearly free on unimodal
objectives (its starts are optimised only when they may leave the estimate's basin; rays and cloud only along
wide effects; occasion effects by rays alone), one engine run per patient for all its trial points, a
closed-form eigen-decomposition in the engine, the matrix exponential only for the members that need it, one BLAS
thread (9ef8be6); then the engine's fast path for TDM-shaped records (:mod:`cnidose.pk.eigenpath`: every distinct
parameter set decomposed in one batched call, the state carried record by record in eigen-coordinates), which
halved the time again. What limits it now: about 18 engine runs per MAP fit of about 1 ms each (a Python loop over
the 37 records, and the batched decomposition and inverse), and the optimiser's own bookkeeping around them.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from cnidose.models.library import resolve_model  # noqa: E402
from cnidose.models.model import Model  # noqa: E402
from cnidose.pk.events import Individual, split_individuals  # noqa: E402

DAYS = (3, 4, 5, 7, 10, 14, 21, 28)
COLUMNS = ("ID", "TIME", "EVID", "AMT", "II", "ADDL", "DV", "MDV", "OCC", "CYP3A5", "WT", "HT", "SEX", "PRED",
           "POD", "HCT")


def storset_cohort(model: Model, n: int, seed: int) -> list[Individual]:
    """Størset-shaped patients (module docstring): daily dose and covariate records, one occasion per trough."""
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(model.iiv.omega)
    assert model.iov is not None
    iov_sd = np.sqrt(np.diag(model.iov.omega))
    nominal = np.array([24.0 * d - 0.5 for d in DAYS])
    out: list[Individual] = []
    for i in range(1, n + 1):
        wt, ht, sex = float(rng.uniform(55, 100)), float(rng.uniform(155, 190)), float(rng.random() < 0.4)
        cyp = float(rng.random() < 0.2)
        dose = 8.0 if cyp else 5.0
        rows: list[dict[str, float]] = []
        for day in range(DAYS[-1] + 1):
            occ = int(np.searchsorted(nominal, 24.0 * day + 12.0)) + 1
            cov = {"CYP3A5": cyp, "WT": wt, "HT": ht, "SEX": sex, "PRED": max(5.0, 20.0 - 15.0 * day / 21.0),
                   "POD": float(day), "HCT": 0.30 + 0.08 * min(day, 28) / 28.0}
            rows.append({"ID": i, "TIME": 24.0 * day, "EVID": 1, "AMT": dose, "II": 12.0, "ADDL": 1, "DV": np.nan,
                         "MDV": 1, "OCC": min(occ, len(DAYS)), **cov})
            if day in DAYS:
                j = DAYS.index(day)
                rows.append({"ID": i, "TIME": nominal[j], "EVID": 0, "AMT": 0.0, "II": 0.0, "ADDL": 0, "DV": 1.0,
                             "MDV": 0, "OCC": j + 1, **cov})
        rows.sort(key=lambda r: (r["TIME"], r["EVID"]))
        ind = split_individuals({k: np.array([r[k] for r in rows], dtype=np.float64) for k in COLUMNS})[0]
        prep = model.prepare(ind)
        eta = chol @ rng.standard_normal(chol.shape[0])
        kappa = rng.standard_normal((prep.n_occasions, iov_sd.size)) * iov_sd
        pred = model.simulate(ind, eta[None], kappas=kappa[None]).prediction[0][ind.evid == 0]
        dv = np.round(pred * np.exp(0.10 * rng.standard_normal(pred.size)), 2)
        k = 0
        for r in rows:
            if r["EVID"] == 0:
                r["DV"] = float(dv[k])
                k += 1
        out += split_individuals({c: np.array([r[c] for r in rows], dtype=np.float64) for c in COLUMNS})
    return out


def write_csv(inds: list[Individual], path: Path) -> None:
    """The individuals as NONMEM CSV (the record columns and every covariate column)."""
    covs = list(inds[0].covariates)
    cols = ["ID", "TIME", "EVID", "AMT", "II", "ADDL", "MDV", *covs]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for ind in inds:
            for r in range(len(ind)):
                vals = {"ID": ind.id, "TIME": ind.time[r], "EVID": ind.evid[r], "AMT": ind.amt[r], "II": ind.ii[r],
                        "ADDL": ind.addl[r], "MDV": ind.mdv[r], **{k: v[r] for k, v in ind.covariates.items()}}
                w.writerow(["." if not np.isfinite(float(vals[c])) else f"{float(vals[c]):.6g}" for c in cols])


def cohort_for(name: str, n: int, seed: int) -> list[Individual]:
    model = resolve_model(name)
    if name.startswith("storset2014"):
        return storset_cohort(model, n, seed)
    from tdm_cohorts import COHORTS, cohort

    return cohort(model, n, seed, **COHORTS["as-published"])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 38
    names = sys.argv[2:] or ["storset2014_tac_adult_kidney", "andrews2019_tac_adult_kidney"]
    exe = Path(sys.executable).with_name("cnidose")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            data = Path(tmp) / f"{name}.csv"
            write_csv(cohort_for(name, n, 1), data)
            t0 = time.perf_counter()
            out = Path(tmp) / f"{name}.forecasts.csv"
            for label, extra in (("serial", []), ("2 processes", ["--backend", "processes", "--workers", "2",
                                                                 "--chunk-size", str(max(1, n // 2))])):
                t0 = time.perf_counter()
                run = subprocess.run([str(exe), "evaluate", "--model", name, "--data", str(data), "--strategy", "map",
                                      "--out", str(out), "--no-progress", *extra], capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if run.returncode != 0:
                    raise SystemExit(run.stderr[-2000:])
                n_fc = len(out.read_text().splitlines()) - 1
                print(f"{name:34} {label:12} {n} patients, {n_fc} forecasts: {wall:6.2f} s "
                      f"({1000 * wall / max(n_fc, 1):.0f} ms per forecast)", flush=True)

if __name__ == "__main__":
    main()
