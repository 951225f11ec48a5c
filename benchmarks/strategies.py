"""Do the forecasting strategies recover what they target? Simulated TDM cohorts with one misspecification each,
evaluated with plain MAP and with the strategy meant for it (issue 15, item 4; minutes of CPU).

    python benchmarks/strategies.py [N_PATIENTS] [SEED]

Each cohort: adults on tacrolimus 5 mg every 12 h (Andrews 2019, the library's kidney model, with its covariate
effects), six troughs on days 2-7, each its own occasion (OCC), 10 % proportional assay error. The
misspecifications:

- ``omega x4``: between-patient variability four times the model's (a centre more heterogeneous than the
  published population): flattened priors (``flat:4``) should forecast better; on the cohort as published they
  should not lose much.
- ``persistent occasion shift``: a between-occasion effect on CL drawn once per patient and kept (a drift the
  occasions share): carrying the last occasion's effect forward (``occ-last``) should forecast better; with the
  model's own independent occasions it should not.

Prints, per cohort and strategy, the forecasts' median PE, median APE and share within ±20 %, each with its 95 %
bootstrap interval by patient. Limited by the MAP fits of the IOV model (about 0.1-0.5 s each, issue 14).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from cnidose.dosing.evaluate import evaluate, strategy, summarise
from cnidose.models.library import resolve_model
from cnidose.records.nonmem import DataSet

HEADER = ("ID", "TIME", "EVID", "AMT", "CMT", "II", "ADDL", "DV", "MDV", "CYP3A5", "AGE", "ALB", "SCR", "HCT", "WT",
          "HT", "SEX", "OCC")


def cohort(model, n: int, seed: int, *, omega_scale: float = 1.0, persistent_sd: float | None = None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    rows: list[list[object]] = []
    for i in range(1, n + 1):
        base = [int(rng.random() < 0.2), round(rng.uniform(25, 70), 1), round(rng.uniform(32, 45), 1),
                round(rng.uniform(90, 200)), round(rng.uniform(0.28, 0.40), 3), round(rng.uniform(55, 100), 1),
                round(rng.uniform(155, 190)), int(rng.random() < 0.4)]
        rows.append([i, 0, 1, 5, ".", 12, 19, ".", 1, *base, 1])
        for k in range(6):  # troughs just before the morning dose of days 2..7
            rows.append([i, 36 + 24 * k, 0, 0, ".", 0, 0, 1.0, 0, *base, k + 1])
    cells = tuple(tuple(str(c) for c in r) for r in rows)
    inds = DataSet(HEADER, cells, tuple(range(2, len(cells) + 2)), "simulated").individuals()
    chol = np.linalg.cholesky(model.iiv.omega * omega_scale)
    nk = len(model.iov)
    sd = np.sqrt(np.diag(model.iov.omega))
    out = []
    j = 0
    for ind in inds:
        eta = (chol @ rng.standard_normal(chol.shape[0]))[None]
        n_occ = model.prepare(ind).n_occasions
        if persistent_sd is None:
            kap = rng.standard_normal((n_occ, nk)) * sd
        else:
            kap = np.repeat(rng.standard_normal((1, nk)) * persistent_sd, n_occ, axis=0)
        pred = model.simulate(ind, eta, kappas=kap[None]).prediction[0]
        dv = pred * np.exp(0.10 * rng.standard_normal(pred.size))
        for r in range(len(ind)):
            row = list(cells[j])
            if row[2] == "0":
                row[7] = f"{dv[r]:.4g}"
            out.append(tuple(row))
            j += 1
    return DataSet(HEADER, tuple(out), tuple(range(2, len(out) + 2)), "simulated").individuals()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    m = resolve_model("andrews2019_tac_adult_kidney")
    cases = (("omega x4", {"omega_scale": 4.0}, ("map", "flat:4")),
             ("as published", {}, ("map", "flat:4", "occ-last")),
             ("persistent occasion shift sd 0.4", {"persistent_sd": 0.4}, ("map", "occ-last")))
    for label, kw, specs in cases:
        t0 = time.perf_counter()
        inds = cohort(m, n, seed, **kw)  # type: ignore[arg-type]
        fc = evaluate([m], inds, strategies=[strategy(s) for s in specs], max_step=5)
        fc = [f for f in fc if f.step > 0]  # Bayesian forecasts (the a-priori step is the same for all)
        for s in summarise(fc, by_step=False, bootstrap=1000, seed=seed):
            ci = s.ci or {}

            def iv(key: str, ci: dict[str, tuple[float, float]] = ci) -> str:
                return f"[{ci[key][0]:.1f}, {ci[key][1]:.1f}]" if key in ci else ""

            print(f"{label:34} {s.strategy:9} n={s.n:4} bias {s.median_pe:6.1f} % {iv('median_pe'):15} "
                  f"MAPE {s.mape:5.1f} % {iv('mape'):13} within 20 % {s.within_20:5.1f} % {iv('within_20')}")
        print(f"  ({time.perf_counter() - t0:.0f} s, {n} patients)")


if __name__ == "__main__":
    main()
