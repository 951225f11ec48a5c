"""MAP estimation speed figures (a script, not a test).

Run: ``python benchmarks/bench_map.py [--shared ../shared] [--models 001 101] [--yardstick 100]``

For each model of the mapbayr suite given (default 001 and 101), prints
1. the median wall time of ``fit_map(model, [individual])`` (the public API, one individual at a time,
   everything included: data binding, optimisation, restarts, covariance) over the first 200 individuals;
2. the wall time of the command line, ``cnidose fit``, on the first 1,000 and on all 4,000 individuals
   (a fresh process: interpreter start, imports, CSV reading, fitting, writing);
3. the yardstick: a plain SciPy fit (L-BFGS-B on the same objective, one individual at a time through the
   event engine), timed on ``--yardstick`` individuals and given per individual.
Then the posterior, the Størset 2014 forecast, intravenous steady states and every library model, one patient at a
time (each function's docstring). Measured 2026-12-07, intravenous steady states: 24.7 ms of CPU per fit with exact
derivatives against 69.4 ms with differences (the same run; 33.9 against 96.4 ms in a slower one). Measured
2026-12-08: model 001's 4,000 individuals by superposition without compiled code 0.46 s with the closed form's exact
derivatives, 0.50 s with differences; the command line 0.96 s; Størset 2014 7.9 ms (best of 5, median).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cnidose.estimation import fit_map  # noqa: E402
from cnidose.estimation.cohort import build_groups  # noqa: E402
from cnidose.estimation.map import _ofv  # noqa: E402
from cnidose.models import load_model  # noqa: E402
from cnidose.records.nonmem import read_nonmem_csv  # noqa: E402


def plain_scipy(model, individual) -> float:  # type: ignore[no-untyped-def]
    """The straightforward approach: L-BFGS-B on the objective, engine predictions, numerical gradient."""
    from scipy.optimize import minimize

    g = build_groups(model, [individual], fast=False)[0][0]
    w = np.zeros(1, np.int64)

    def f(x: np.ndarray) -> float:
        pts = x[None, None, :]
        v = float(_ofv(g, w, pts, g.predict(pts, w))[0, 0])
        return v if np.isfinite(v) else 1e300

    return float(minimize(f, np.zeros(g.dim), method="L-BFGS-B").fun)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("CNIDOSE_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--models", nargs="*", default=["001", "101"])
    ap.add_argument("--yardstick", type=int, default=100)
    args = ap.parse_args()
    suite = Path(args.shared) / "validation" / "map-nonmem"
    for run in args.models:
        model_path = REPO / "validation" / "map-nonmem" / f"model{run}.toml"
        data_path = suite / "data" / f"data_to_fit{run}.csv"
        m = load_model(model_path)
        inds = read_nonmem_csv(data_path).individuals()
        fit_map(m, inds[:5])  # warm up imports
        times = []
        for ind in inds[:200]:
            t0 = time.perf_counter()
            fit_map(m, [ind])
            times.append(time.perf_counter() - t0)
        print(f"model {run}: public API, one individual: median {np.median(times) * 1e3:.1f} ms "
              f"(p90 {np.percentile(times, 90) * 1e3:.1f} ms, 200 individuals)")
        lines = data_path.read_text().splitlines()
        with tempfile.TemporaryDirectory() as tmp:
            for n in (1000, 4000):
                sub = Path(tmp) / f"d{n}.csv"
                sub.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if _id(ln) <= n]) + "\n")
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "cnidose.cli", "fit", "-m", str(model_path), "-d", str(sub),
                                "-o", str(Path(tmp) / "out.csv"), "--no-progress"], check=True,
                               capture_output=True)
                print(f"model {run}: command line, {n} individuals: {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        for ind in inds[: args.yardstick]:
            plain_scipy(m, ind)
        per = (time.perf_counter() - t0) / args.yardstick
        print(f"model {run}: yardstick plain SciPy L-BFGS-B + engine: {per * 1e3:.0f} ms per individual "
              f"({args.yardstick} individuals; about {per * 4000:.0f} s for 4,000)")
    closed_form_figures(suite)
    posterior_figures()
    storset_figures()
    steady_infusion_figures()
    library_figures()


def closed_form_figures(suite: Path, run: str = "001", repeats: int = 3) -> None:
    """A cohort fitted by superposition without compiled code (as ``cnidose fit`` runs model 001): ``fit_map`` of all
    4,000 individuals with the closed form's exact derivatives and with central differences, in the same run (best
    of ``repeats`` each, wall time)."""
    model = load_model(REPO / "validation" / "map-nonmem" / f"model{run}.toml")
    inds = read_nonmem_csv(suite / "data" / f"data_to_fit{run}.csv").individuals()
    before = os.environ.get("CNIDOSE_COMPILED")
    os.environ["CNIDOSE_COMPILED"] = "0"
    try:
        best: dict[str, float] = {}
        for _ in range(repeats):
            for how in ("exact", "differences"):
                t0 = time.perf_counter()
                fit_map(model, inds, derivatives=how)
                best[how] = min(best.get(how, np.inf), time.perf_counter() - t0)
    finally:
        if before is None:
            os.environ.pop("CNIDOSE_COMPILED")
        else:
            os.environ["CNIDOSE_COMPILED"] = before
    print(f"model {run}, {len(inds)} individuals by superposition (no compiled code), fit_map: exact derivatives "
          f"{best['exact']:.2f} s, central differences {best['differences']:.2f} s (best of {repeats})")


def storset_figures(n: int = 20, troughs: int = 6) -> None:
    """Issue 14's real-data-shaped forecast: Størset 2014 (time-varying post-operative day, prednisolone and
    haematocrit; between-occasion effects on F and ka; the red-cell binding transform), one patient with 6
    troughs (:func:`bench_forecast.storset_cohort`, cut after the 6th), ``fit_map`` one patient at a time, with
    exact derivatives (the compiled kernel) and with central differences through the engine, in the same run."""
    import dataclasses

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_forecast import storset_cohort

    from cnidose.models import resolve_model

    m = resolve_model("storset2014_tac_adult_kidney")
    patients = []
    for ind in storset_cohort(m, n, 7):
        obs = np.flatnonzero(ind.evid == 0)
        end = int(obs[troughs - 1]) + 1
        patients.append(dataclasses.replace(
            ind, time=ind.time[:end], evid=ind.evid[:end], amt=ind.amt[:end], cmt=ind.cmt[:end], rate=ind.rate[:end],
            ii=ind.ii[:end], addl=ind.addl[:end], ss=ind.ss[:end], mdv=ind.mdv[:end], rows=ind.rows[:end],
            covariates={k: v[:end] for k, v in ind.covariates.items()}))
    for how in ("exact", "differences"):
        fit_map(m, patients[:2], derivatives=how)  # warm-up (and the kernel's compilation on a new machine)
        # CPU time, each patient fitted `repeats` times: the best of a patient's repeats is the least disturbed by a
        # shared machine's other work
        repeats = 5 if how == "exact" else 1
        times = np.full((repeats, len(patients)), np.inf)
        for r in range(repeats):
            for k, p in enumerate(patients):
                t0 = time.process_time()
                fit_map(m, [p], derivatives=how)
                times[r, k] = time.process_time() - t0
        print(f"Størset 2014, one patient with {troughs} troughs, derivatives {how}: median "
              f"{np.median(times) * 1e3:.1f} ms of CPU (p90 {np.percentile(times, 90) * 1e3:.1f} ms; median of each "
              f"patient's best of {repeats}: {np.median(times.min(axis=0)) * 1e3:.1f} ms; {n} patients)")


def posterior_figures() -> None:
    """A tacrolimus patient (Andrews 2019, 5 mg every 12 h) with two troughs: MAP, 2,000 posterior draws and
    the probability that the next trough is in 10-15 ng/mL."""
    from cnidose.estimation.posterior import sample_posterior
    from cnidose.models import resolve_model
    from cnidose.pk.events import split_individuals

    m = resolve_model("andrews2019_tac_adult_kidney")
    rows = [(0.0, 1, 5.0, 1, 12.0, 20, np.nan, 1), (59.5, 0, 0.0, 2, 0.0, 0, 12.0, 0),
            (107.5, 0, 0.0, 2, 0.0, 0, 14.5, 0), (131.5, 2, 0.0, 2, 0.0, 0, np.nan, 1)]
    cols = {k: [r[j] for r in rows] for j, k in enumerate(("TIME", "EVID", "AMT", "CMT", "II", "ADDL", "DV", "MDV"))}
    cols["ID"] = [1] * 4
    for k, v in {"CYP3A5": 0, "AGE": 50, "ALB": 40, "BSA": 1.9, "SCR": 150, "HCT": 0.32, "LBW": 60}.items():
        cols[k] = [v] * 4
    patient = split_individuals(cols)[0]
    fit_map(m, [patient])  # warm-up
    t_map, t_post = [], []
    for seed in range(10):
        t0 = time.perf_counter()
        r = fit_map(m, [patient])[0]
        t1 = time.perf_counter()
        post = sample_posterior(m, patient, n_draws=2000, seed=seed, map_result=r)
        p = post.probability_in_range(patient, 3, 10.0, 15.0)
        t2 = time.perf_counter()
        t_map.append(t1 - t0)
        t_post.append(t2 - t1)
    print(f"posterior (andrews2019, 2 troughs): MAP {np.median(t_map) * 1e3:.0f} ms; 2,000 draws ({post.method}, "
          f"ESS {post.ess:.0f}) + probability in range {np.median(t_post) * 1e3:.0f} ms (median of 10); "
          f"P(10-15 ng/mL) = {p:.3f}")


def steady_infusion_figures(n: int = 10) -> None:
    """Intravenous tacrolimus at steady state (Antignac 2007): a continuous infusion at steady state (SS 1, AMT 0),
    a 4-hour infusion every 12 h at steady state (SS 1, then SS 2), then oral doses; five troughs (random levels,
    5-12 ng/mL). CPU time of ``fit_map`` with the kernel's exact derivatives and with central differences through
    the engine, the median of each patient's best of 3."""
    from cnidose.models.library import resolve_model
    from cnidose.pk.events import split_individuals

    model = resolve_model("antignac2007_tac_kidney_iv_oral")
    rng = np.random.default_rng(3)
    rows = [(0.0, 1, 0.0, 0.08, 0.0, 1, 2), (20.0, 0, 0, 0, 0, 0, 2), (24.0, 1, 1.0, 0.25, 12.0, 1, 2),
            (35.5, 0, 0, 0, 0, 0, 2), (36.0, 1, 1.0, 0.25, 12.0, 2, 2), (47.5, 0, 0, 0, 0, 0, 2),
            (48.0, 1, 4.0, 0.0, 12.0, 0, 1), (59.5, 0, 0, 0, 0, 0, 2), (60.0, 1, 4.0, 0.0, 12.0, 0, 1),
            (71.5, 0, 0, 0, 0, 0, 2)]
    patients = []
    for i in range(n):
        cols = {"ID": [float(i + 1)] * len(rows), "TIME": [r[0] for r in rows], "EVID": [float(r[1]) for r in rows],
                "AMT": [r[2] for r in rows], "RATE": [r[3] for r in rows], "II": [r[4] for r in rows],
                "SS": [float(r[5]) for r in rows], "CMT": [float(r[6]) for r in rows], "ADDL": [0.0] * len(rows),
                "MDV": [1.0 - float(r[1] == 0) for r in rows], "POD": [1.0 + r[0] // 24 for r in rows],
                "PRED": [20.0] * len(rows),
                "DV": [float("nan") if r[1] else float(rng.uniform(5, 12)) for r in rows]}
        patients.append(split_individuals({k: np.asarray(v) for k, v in cols.items()})[0])
    for how in ("exact", "differences"):
        fit_map(model, patients[:1], derivatives=how)  # warm-up
        times = np.full((3, n), np.inf)
        for r in range(3):
            for k, p in enumerate(patients):
                t0 = time.process_time()
                res = fit_map(model, [p], derivatives=how)[0]
                times[r, k] = time.process_time() - t0
        print(f"intravenous steady states (Antignac 2007), derivatives {res.derivatives}: "
              f"{np.median(times.min(axis=0)) * 1e3:.1f} ms of CPU per fit ({n} patients)")


def library_figures(n: int = 5) -> None:
    """Every library model, one patient at a time: 14 days of 3 mg every 12 h (Martial 2021 once daily, its
    Envarsus regimen), troughs on days 3, 6, 9 and 13 simulated from the model (between-subject effects drawn
    from its prior, a 15 % log-normal error), covariates at the middle of their domains (haematocrit 0.33,
    the first level of categorical ones), one occasion. CPU time of ``fit_map``, the median of each patient's best
    of 2, and the path: derivatives exact or by differences, superposition or the event engine."""
    from cnidose.models.library import library_ids, resolve_model
    from cnidose.pk.events import split_individuals

    for mid in library_ids():
        m = resolve_model(mid)
        cov: dict[str, float] = {}
        for name, c in m.covariates.items():
            if c.levels:
                cov[name] = float(sorted(c.levels, key=float)[0])
            elif name == "HCT":
                cov[name] = 0.33
            elif c.domain:
                cov[name] = (c.domain[0] + c.domain[1]) / 2
            else:
                cov[name] = 1.0
        hours = (0.0,) if mid.startswith("martial2021") else (0.0, 12.0)
        rng = np.random.default_rng(1)
        chol = np.linalg.cholesky(m.omega)
        patients = []
        for i in range(1, n + 1):
            rows = [(24.0 * d + h, 1.0, 3.0, np.nan) for d in range(14) for h in hours]
            rows += [(24.0 * d + 23.5, 0.0, 0.0, 1.0) for d in (3, 6, 9, 13)]
            rows.sort(key=lambda r: (r[0], -r[1]))
            cols = {"ID": np.full(len(rows), float(i)), "TIME": np.array([r[0] for r in rows]),
                    "EVID": np.array([r[1] for r in rows]), "AMT": np.array([r[2] for r in rows]),
                    "DV": np.array([r[3] for r in rows]), "MDV": np.array([r[1] for r in rows]),
                    **{k: np.full(len(rows), v) for k, v in cov.items()}}
            ind = split_individuals(cols)[0]
            eta = chol @ rng.standard_normal(chol.shape[0])
            pred = m.simulate(ind, eta[None]).prediction[0][ind.evid == 0]
            ind.covariates["DV"][ind.evid == 0] = np.round(pred * np.exp(0.15 * rng.standard_normal(pred.size)), 3)
            patients.append(ind)
        fit_map(m, patients[:1])  # warm-up
        times = np.full((2, n), np.inf)
        for r in range(2):
            for k, p in enumerate(patients):
                t0 = time.process_time()
                res = fit_map(m, [p])[0]
                times[r, k] = time.process_time() - t0
        fast = build_groups(m, patients[:1])[0][0].fast
        print(f"{mid}: {np.median(times.min(axis=0)) * 1e3:.0f} ms of CPU per fit (derivatives {res.derivatives}, "
              f"{'superposition' if fast else 'engine or kernel'})")


def _id(line: str) -> int:
    return int(line.split(",", 1)[0])


if __name__ == "__main__":
    main()
