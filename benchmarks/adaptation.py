"""Adapting a published model to a centre (issue 15, item 2): does `cnidose adapt` recover a known population,
and do its forecasts improve out of sample where the centre differs?

    python benchmarks/adaptation.py [N_PATIENTS] [FOLDS] [COHORT ...]

For each cohort of ``benchmarks/tdm_cohorts.py`` (default: as-published, centre-cl-0.7), ``N`` patients (default 40)
simulated from Andrews 2019 are adapted on (typical values, prior SD 0.3), and printed: each typical value
against the truth in standard errors, the time taken; then ``FOLDS``-fold cross-validation by patient (default 5):
the parent's and the adapted model's forecasts of the held-out patients' levels (a priori and Bayesian, strategy
map), and the paired change in |PE| with its 95 % bootstrap interval.
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
