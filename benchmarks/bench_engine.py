"""Engine speed figures (a script, not a test).

Run: ``python benchmarks/bench_engine.py [--shared ../shared] [--patients 100000]``

Prints
1. records/second on the NONMEM dosing suite (3,837 records, 29 cases), closed form;
2. wall time for N virtual patients x 28 days of twice-daily dosing with a daily
   trough, 2-compartment oral with first-order absorption and lag, closed form,
   with lag fixed and with lag varying between patients;
3. this machine's exp() throughput, the floor those figures are measured against.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cnidose.models import load_model  # noqa: E402
from cnidose.pk import simulate, split_individuals, two_compartment  # noqa: E402
from cnidose.records.nonmem import read_nonmem_csv, simulate_dataset  # noqa: E402


def best_of(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("CNIDOSE_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--patients", type=int, default=100_000)
    args = ap.parse_args()

    suite = Path(args.shared) / "validation" / "nonmem-dosing"
    model = load_model(REPO / "validation" / "nonmem-dosing" / "model.toml")
    data = read_nonmem_csv(suite / "inputs.csv")
    n_rec = len(data.cells)
    t = best_of(lambda: simulate_dataset(model, data))
    print(f"dosing suite: {n_rec} records in {t * 1e3:.1f} ms -> {n_rec / t:,.0f} records/s "
          f"(closed form, one individual at a time, model evaluation included)")

    # 28 days, 5 mg every 12 h (one record with ADDL), trough every morning before the dose.
    days = 28
    times = [0.0] + [24.0 * d for d in range(1, days + 1)]
    ind, = split_individuals({"ID": [1] * len(times), "TIME": times, "AMT": [5.0] + [0.0] * days,
                              "II": [12.0] + [0.0] * days, "ADDL": [2 * days - 1] + [0] * days,
                              "CMT": [1] + [2] * days})
    n = args.patients
    rng = np.random.default_rng(1)

    # Illustrative values of tacrolimus-like magnitude (not a published model): this
    # measures speed only; the model library supplies the real numbers.
    def draw(tv: float, cv: float) -> np.ndarray:
        return tv * np.exp(rng.normal(0.0, cv, size=(n, 1)))

    p = {"CL": draw(20.0, 0.3), "V1": draw(100.0, 0.3), "Q": draw(50.0, 0.3), "V2": draw(500.0, 0.3),
         "KA": draw(1.0, 0.5), "ALAG1": 0.5}
    p["S2"] = p["V1"] / 1000.0  # mg / L -> ng/mL
    structure = two_compartment()
    t_fixed = best_of(lambda: simulate(structure, ind, p))
    trough = simulate(structure, ind, p).prediction[:, 1:]
    print(f"{n:,} patients x {days} days BID (56 doses, 28 troughs), 2-cmt oral + lag, closed form: "
          f"{t_fixed:.3f} s  (median day-28 trough {np.median(trough[:, -1]):.2f} ng/mL)")
    p_lag = dict(p, ALAG1=draw(0.5, 0.3))
    t_var = best_of(lambda: simulate(structure, ind, p_lag), repeat=2)
    print(f"  same with lag varying between patients: {t_var:.3f} s")

    x = rng.normal(size=1_000_000)
    t_exp = best_of(lambda: np.exp(x), repeat=5)
    per = t_exp / x.size
    print(f"exp() throughput: {1 / per / 1e6:,.0f} M/s ({per * 1e9:.2f} ns each)")
    n_exp = n * 3 * (2 * days * 2 + days)  # worst case: every step recomputes 3 exponentials
    print(f"  a step-by-step solution needing 3 exp per patient per step ({n_exp / 1e6:.0f} M exp) "
          f"would take >= {n_exp * per:.2f} s on exp alone; the engine caches exp(lambda*dt) per distinct dt "
          f"when every patient shares the schedule")


if __name__ == "__main__":
    main()
