"""NONMEM dosing suite (nmtests run 1001, 29 cases) and time-varying case (run 2001).

Every record must reproduce NONMEM's CP at the 5 significant digits NONMEM
printed (table format S1PE11.4), by every solution method.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnidose.models import load_model
from cnidose.records.nonmem import read_nonmem_csv, simulate_dataset

from .conftest import REPO

pytestmark = pytest.mark.validation
MODELS = REPO / "validation" / "nonmem-dosing"


def sig5(x: float) -> float:
    return float(f"{x:.4e}")


def reference(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["ID"]) for r in rows]), np.array([float(r["TIME"]) for r in rows]),
            np.array([float(r["CP"]) for r in rows]))


def check(model_file: Path, data_file: Path, ref_file: Path, method: str) -> int:
    model = load_model(model_file)
    data = read_nonmem_csv(data_file)
    table = simulate_dataset(model, data, method=method)  # type: ignore[arg-type]
    ids, times, cp = reference(ref_file)
    assert len(table.pred) == len(cp)
    assert np.array_equal(data.numeric("TIME"), times) and np.array_equal(data.numeric("ID"), ids)
    wrong = [(int(ids[k]), times[k], table.pred[k], cp[k]) for k in range(len(cp)) if sig5(table.pred[k]) != cp[k]]
    assert not wrong, f"{len(wrong)} records differ from NONMEM, first: {wrong[:5]}"
    assert np.array_equal(table.pred, table.ipred)  # no ETA columns in these data
    return len(cp)


@pytest.mark.parametrize("method", ["auto", "expm", "ode"])
def test_dosing_suite_every_record(shared: Path, method: str) -> None:
    d = shared / "validation" / "nonmem-dosing"
    assert check(MODELS / "model.toml", d / "inputs.csv", d / "nonmem.csv", method) == 3837


@pytest.mark.parametrize("method", ["auto", "ode"])
def test_time_varying_covariate(shared: Path, method: str) -> None:
    d = shared / "validation" / "nonmem-dosing" / "tv"
    assert check(MODELS / "model-tv.toml", d / "inputs.csv", d / "nonmem.csv", method) == 34


def test_time_varying_uses_value_at_end_of_interval(shared: Path) -> None:
    """Using the previous record's WT instead would miss NONMEM by up to 4 % (suite README)."""
    d = shared / "validation" / "nonmem-dosing" / "tv"
    model = load_model(MODELS / "model-tv.toml")
    ind, = read_nonmem_csv(d / "inputs.csv").individuals()
    shifted = dict(ind.covariates)
    shifted["WT"] = np.r_[ind.covariates["WT"][0], ind.covariates["WT"][:-1]]
    from dataclasses import replace
    wrong = model.simulate(replace(ind, covariates=shifted)).prediction[0]
    _, _, cp = reference(d / "nonmem.csv")
    assert any(sig5(a) != b for a, b in zip(wrong, cp, strict=True))


def test_cli_reproduces_suite(shared: Path, tmp_path: Path) -> None:
    d = shared / "validation" / "nonmem-dosing"
    out = tmp_path / "out.csv"
    proc = subprocess.run([sys.executable, "-m", "cnidose.cli", "simulate", "--model", str(MODELS / "model.toml"),
                           "--data", str(d / "inputs.csv"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    _, _, cp = reference(d / "nonmem.csv")
    assert len(rows) == 3837
    assert {"ID", "time", "evid", "cmt", "PRED", "IPRED", "LAGT", "DV"} <= set(rows[0])
    assert all(sig5(float(r["PRED"])) == c for r, c in zip(rows, cp, strict=True))
