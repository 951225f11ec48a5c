"""Does it matter how a chart's levels are coded into occasions? (issue 15, occasion-aware forecasting)

    python benchmarks/occasion_coding.py MODEL COHORT N_PATIENTS

A patient record exported for a fit (``cnidose.records.exchange``) has no occasion column: the whole history is
one occasion, so a model's between-occasion effects act as extra between-subject effects, and the forecast draws
the next occasion's effect from its prior (Abrantes 2019). A centre's data set often numbers each trough as its own
occasion. This script forecasts each level from the ones before it (plain MAP, :func:`cnidose.dosing.evaluate`)
on a simulated TDM cohort (:mod:`tdm_cohorts`; Størset 2014: :func:`bench_forecast.storset_cohort`) coded both
ways, and prints median PE, median APE and the share within ±20 % of each, and the paired change of |PE| (one
occasion minus one per trough; mean over patients of each patient's mean, with a 95 % bootstrap interval by
patient; negative: one occasion forecasts better).

Measured 2026-12-07 on the 2-core machine (seed 11):

- Andrews 2019, ``as-published``, 40 patients, 280 forecasts: per trough -7.3 / 15.5 / 67.9 %, one occasion
  -6.2 / 14.9 / 68.6 %; change -0.12 [-0.58, +0.44].
- Størset 2014 (occasion effects on F and ka), 30 patients, 210 forecasts: per trough -6.0 / 14.3 / 65.7 %, one
  occasion -2.7 / 14.6 / 68.1 %; change +0.54 [-0.59, +2.21].
- Andrews 2019, ``persistent-iov`` (occasion effects that carry over, AR(1) 0.8), 40 patients: per trough
  -4.9 / 12.4 / 73.9 %, one occasion -4.6 / 11.8 / 76.8 %; change -0.59 [-0.93, -0.28].

So the record's single occasion forecasts as well as one occasion per trough where the model's assumption holds,
and better where a patient's deviation persists from trough to trough (the single occasion's effect is part of
what the fit carries forward through the between-subject effects).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forecast import storset_cohort
from tdm_cohorts import COHORTS, cohort

from cnidose.dosing.evaluate import evaluate
from cnidose.models.library import resolve_model


def main() -> None:
    name, coh, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    m = resolve_model(name)
    inds = storset_cohort(m, n, 11) if name.startswith("storset2014") else cohort(m, n, 11, **COHORTS[coh])
    one = [dataclasses.replace(i, covariates={k: v for k, v in i.covariates.items() if k != "OCC"}) for i in inds]
    errors = {}
    for label, data in (("one occasion per trough", inds), ("one occasion", one)):
        fc = [f for f in evaluate([m], data) if f.step > 0]
        pe = np.array([f.error for f in fc]) * 100
        errors[label] = (np.array([f.id for f in fc]), np.abs(pe))
        print(f"{name} {coh}, {label}: {pe.size} forecasts, median PE {np.median(pe):+.1f} %, median APE "
              f"{np.median(np.abs(pe)):.1f} %, within ±20 % {np.mean(np.abs(pe) <= 20) * 100:.1f} %")
    ids, per_trough = errors["one occasion per trough"]
    single = errors["one occasion"][1]
    patients = np.unique(ids)
    change = np.array([np.mean(single[ids == i] - per_trough[ids == i]) for i in patients])
    rng = np.random.default_rng(0)
    boot = [np.mean(change[rng.integers(0, patients.size, patients.size)]) for _ in range(1000)]
    print(f"one occasion minus one per trough, |PE|: {change.mean():+.2f} points "
          f"[{np.percentile(boot, 2.5):+.2f}, {np.percentile(boot, 97.5):+.2f}]")


if __name__ == "__main__":
    main()
