"""Compare cnidose's MAP estimates with NONMEM's on the mapbayr reference suite.

Used by ``tests/test_validation_map_nonmem.py`` (a subset in CI, everything with
``CNIDOSE_FULL_VALIDATION=1``) and runnable as a report::

    python validation/map-nonmem/mapsuite.py [--full] [MODEL ...]

prints, per model: individuals, share that agree with NONMEM (every ETA within 0.001), number that
beat NONMEM (differ, with an objective no higher than NONMEM's + 0.001), number that do worse
(must be 0), the worst objective reproduction at NONMEM's ETAs, and the fit time.
"""

from __future__ import annotations

import csv
import gzip
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODELS = ("001", "002", "003", "004", "005", "006", "007", "008", "101", "102", "201", "301", "302", "401", "402",
          "403", "404", "405", "406", "407", "408", "501", "502", "503", "504", "511", "512", "513")
SLOW = {"201": 25, "301": 40, "302": 40}  # engine-path models: individuals per design in the CI subset


def shared_dir() -> Path:
    return Path(os.environ.get("CNIDOSE_SHARED", REPO.parent / "shared")) / "validation" / "map-nonmem"


@lru_cache(maxsize=1)
def _etas() -> dict[str, dict[int, dict[int, float]]]:
    out: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    with open(shared_dir() / "nonmem_etas.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            out[r["model"]][int(r["ID"])][int(r["eta_index"])] = float(r["eta_value"])
    return out


@lru_cache(maxsize=1)
def _obj() -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    with open(shared_dir() / "nonmem_obj.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            out[r["model"]][int(r["ID"])] = float(r["OFV_ofvfile"])
    return out


@lru_cache(maxsize=1)
def _etc() -> dict[str, dict[int, dict[tuple[int, int], float]]]:
    out: dict[str, dict[int, dict[tuple[int, int], float]]] = defaultdict(lambda: defaultdict(dict))
    with gzip.open(shared_dir() / "nonmem_etc.csv.gz", "rt", newline="") as fh:
        for r in csv.DictReader(fh):
            out[r["model"]][int(r["ID"])][(int(r["i"]), int(r["j"]))] = float(r["value"])
    return out


def nonmem_eta(model: str, ident: int, n: int) -> np.ndarray:
    e = _etas()[model][ident]
    return np.array([e[k + 1] for k in range(n)])


def nonmem_ofv(model: str, ident: int) -> float:
    return _obj()[model][ident]


def nonmem_etc(model: str, ident: int, n: int) -> np.ndarray:
    c = np.zeros((n, n))
    for (i, j), v in _etc()[model][ident].items():
        c[i - 1, j - 1] = c[j - 1, i - 1] = v
    return c


def individuals(model: str, per_design: int | None):
    """The model's data set; ``per_design`` individuals from each of the 4 sampling designs (None: all)."""
    from cnidose.records.nonmem import read_nonmem_csv

    inds = read_nonmem_csv(shared_dir() / "data" / f"data_to_fit{model}.csv").individuals()
    if per_design is None:
        return inds
    return [i for i in inds if (int(i.id) - 1) % 1000 < per_design]


def load(model: str):
    from cnidose.models import load_model

    return load_model(HERE / f"model{model}.toml")


@dataclass
class Report:
    model: str
    n: int
    agree: int
    beat: int
    worse: list[tuple[int, float, float, float]]  # id, max |d eta|, our OFV, NONMEM's OFV
    ofv_repro: float  # worst |OFV(NONMEM's ETAs) - OFV_ofvfile| / max(|OFV_ofvfile|, 1)
    seconds: float
    statuses: dict[str, int]


def run(model: str, per_design: int | None) -> tuple[Report, list, list]:
    from cnidose.estimation import fit_map, objective

    m = load(model)
    inds = individuals(model, per_design)
    t0 = time.perf_counter()
    res = fit_map(m, inds)
    secs = time.perf_counter() - t0
    n_eta = len(m.eta_names)
    agree = beat = 0
    worse = []
    statuses: dict[str, int] = {}
    for r in res:
        statuses[r.status] = statuses.get(r.status, 0) + 1
        nm = nonmem_eta(model, int(r.id), n_eta)
        d = float(np.max(np.abs(r.eta - nm)))
        if d <= 1e-3:
            agree += 1
        elif r.ofv <= nonmem_ofv(model, int(r.id)) + 1e-3:
            beat += 1
        else:
            worse.append((int(r.id), d, r.ofv, nonmem_ofv(model, int(r.id))))
    # objective at NONMEM's ETAs (a sample of up to 200 individuals: it refits nothing)
    repro = 0.0
    for ind in inds[:: max(1, len(inds) // 200)]:
        o = nonmem_ofv(model, int(ind.id))
        val = objective(m, ind, nonmem_eta(model, int(ind.id), n_eta))
        repro = max(repro, abs(val - o) / max(abs(o), 1.0))
    return Report(model, len(res), agree, beat, worse, repro, secs, statuses), res, inds


def etc_agreement(model: str, res: list) -> float:
    """Share of individuals whose expected-information covariance matches NONMEM's ETC within 1 % in every
    element (off-diagonal elements relative to sqrt(C_ii C_jj))."""
    ok = 0
    for r in res:
        nm = nonmem_etc(model, int(r.id), len(r.eta))
        scale = np.sqrt(np.outer(np.diag(nm), np.diag(nm)))
        ok += bool(r.covariance is not None and np.all(np.abs(r.covariance - nm) <= 0.01 * scale))
    return ok / len(res)


def main(argv: list[str]) -> int:
    full = "--full" in argv
    models = [a for a in argv if not a.startswith("--")] or list(MODELS)
    bad = 0
    print(f"{'model':>5} {'n':>5} {'agree':>7} {'beat':>5} {'worse':>5} {'OFV repro':>10} {'time s':>7}")
    for model in models:
        per = None if full else SLOW.get(model, 25)
        rep, res, _ = run(model, per)
        bad += len(rep.worse)
        etc = f"  ETC within 1 %: {etc_agreement(model, res):.2%}" if model in ("001", "101", "401", "405") else ""
        print(f"{model:>5} {rep.n:>5} {rep.agree / rep.n:>7.2%} {rep.beat:>5} {len(rep.worse):>5} "
              f"{rep.ofv_repro:>10.1e} {rep.seconds:>7.2f}{etc}", flush=True)
        for w in rep.worse[:5]:
            print("      worse:", w)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main(sys.argv[1:]))
