"""Adapting a published model to a centre (issue 15, item 2): does `cnidose adapt` recover a known population,
and do its forecasts improve out of sample where the centre differs?

    python benchmarks/adaptation.py [N_PATIENTS] [FOLDS] [COHORT ...]

For each cohort of ``benchmarks/tdm_cohorts.py`` (default: as-published, centre-cl-0.7), ``N`` patients (default 40)
simulated from Andrews 2019 are adapted on (typical values, prior SD 0.3), and printed: each typical value
against the truth in standard errors, the time taken; then ``FOLDS``-fold cross-validation by patient (default 5):
the parent's and the adapted model's forecasts of the held-out patients' levels (a priori and Bayesian, strategy
map), and the paired change in |PE| and in 100 |ln(pred/obs)| with 95 % bootstrap intervals by patient.

Measured on the 2-core development machine (2026-12-03), ``python benchmarks/adaptation.py 40 5``:

as-published (the data are the published model's): 2 iterations, 15.6 s; -2 ln L 867.0 -> 866.7; every typical
value within 0.51 SE of the truth (TVCL 23.94, TVV1 682.8, TVV2 5423, TVQ 11.23; SE(log) 0.078, 0.138, 0.226,
0.154). Cross-validated (5 folds, 294 s): Bayesian forecasts (280) |PE| +0.11 [-0.03, +0.26], 100 |ln(pred/obs)|
+0.24 [+0.10, +0.39] (a small loss: the folds' estimates scatter about the truth), median PE -7.3 % -> -8.0 %;
a priori (40) 100 |ln(pred/obs)| +1.11 [-0.53, +2.71].

centre-cl-0.7 (the centre's patients clear 30 % less: true TVCL 16.1): 2 iterations, 15.3 s; -2 ln L 1080.1 ->
1061.1; TVCL 17.74 (+1.25 SE from the truth; the published 23 is 3.3 SE away), TVV1 708.7, TVV2 5041, TVQ 10.96
(all within 0.4 SE). Cross-validated (244 s): Bayesian forecasts (280) |PE| -1.05 points [-1.74, -0.36],
100 |ln(pred/obs)| -1.85 [-2.54, -1.20], median PE -12.3 % -> -8.4 %, within 20 % 58.8 -> 66.2 % (all steps);
a priori (40, the day-3 trough) median PE -14.0 % -> +6.4 %, 100 |ln(pred/obs)| +0.82 [-5.83, +7.78] (no
difference: between-patient variability dominates one a-priori level), |PE| +14.9 [+3.7, +27.1] (|PE| punishes
over-prediction more than under-prediction, so an unbiased a-priori forecast scores worse on it than a low one).
What limits speed: the E-step's MAP fits (the first with the global search for Andrews' wide ETA_Q prior, about
10 s for 40 patients; then 1.2 s per iteration) and, for cross-validation, the forecasts (0.45 s each).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from tdm_cohorts import COHORTS, cohort

from cnidose.dosing.adaptation import cross_validate
from cnidose.estimation.population import adapt
from cnidose.models.library import resolve_model


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    folds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    names = sys.argv[3:] or ["as-published", "centre-cl-0.7"]
    model = resolve_model("andrews2019_tac_adult_kidney")
    for name in names:
        spec = COHORTS[name]
        inds = cohort(model, n, 11, **spec)
        truth = {"TVCL": model.parameters["TVCL"].value * spec.get("cl_scale", 1.0)}
        t0 = time.perf_counter()
        a = adapt(model, inds)
        dt = time.perf_counter() - t0
        print(f"## {name}: {n} patients, {a.n_observations} levels; {a.iterations} iterations, {dt:.1f} s; "
              f"-2 ln L {a.objective_published:.1f} -> {a.objective:.1f}")
        for v in a.values:
            true = truth.get(v.parameter, model.parameters[v.parameter].value)
            z = np.log(v.estimate / true) / v.se_log
            print(f"  {v.parameter:<6} published {v.published:<8g} true {true:<8.4g} adapted {v.estimate:<8.4g} "
                  f"SE(log) {v.se_log:.3f}  (adapted - true) / SE = {z:+.2f}")
        t0 = time.perf_counter()
        cv = cross_validate(model, inds, folds=folds, seed=1)
        print(f"  cross-validation, {folds} folds ({time.perf_counter() - t0:.0f} s):")
        for s in cv.summaries:
            print(f"    {s.model:<40} n {s.n:4d}  bias {s.median_pe:+6.1f} %  MAPE {s.mape:5.1f} %  "
                  f"within 20 % {s.within_20:5.1f} %")
        for p in cv.paired:
            print(f"    {p.kind:<9} |PE| change {p.change:+6.2f} points [{p.low:+.2f}, {p.high:+.2f}]; "
                  f"|ln(pred/obs)| x 100 change {p.change_log:+6.2f} [{p.low_log:+.2f}, {p.high_log:+.2f}]; median PE "
                  f"{p.bias_parent:+.1f} % -> {p.bias_adapted:+.1f} % ({p.n} forecasts, {p.patients} patients)")


if __name__ == "__main__":
    main()
