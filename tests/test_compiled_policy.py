"""When a run loads the compiled kernels (issue 14: their cost must not land on a clinician's request).

Loading them costs a fresh process about a second even from the disk cache; a command-line run loads them only
where they pay (:func:`cnidose.estimation.cohort.compiled_pays`), and the estimates are the same either way.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnidose.estimation.cohort import compiled_pays
from cnidose.models import load_model
from cnidose.models.kernel import model_kernel
from cnidose.models.library import resolve_model
from cnidose.pk.compiled import compiled_enabled
from cnidose.pk.events import Individual
from cnidose.records.nonmem import read_nonmem_csv

from .conftest import REPO

EXAMPLE = REPO / "examples" / "tacrolimus_patients.csv"


def _two_occasions(ind: Individual, ident: float) -> Individual:
    """The example patient with its second half in a second occasion: fitted on the engine path."""
    occ = np.where(np.arange(len(ind)) < len(ind) // 2, 1.0, 2.0)
    return dataclasses.replace(ind, id=ident, covariates={**ind.covariates, "OCC": occ})


def test_the_kernels_pay_for_ode_models_and_for_enough_fits_on_the_engine_path() -> None:
    m = resolve_model("andrews2019_tac_adult_kidney")
    ex = read_nonmem_csv(EXAMPLE).individuals()
    assert m.iov is not None and m.iov.occasion == "OCC"
    # superposition (one occasion, constant covariates): the kernels never pay, however many
    assert not compiled_pays([m], ex * 500)
    engine = [_two_occasions(ex[k % 2], k + 1) for k in range(40)]
    assert m.prepare(engine[0]).n_occasions == 2
    assert not compiled_pays([m], engine[:39])
    assert compiled_pays([m], engine)
    # evaluation fits each individual once per level; strategies repeat every fit
    levels = sum(int(np.sum((i.evid == 0) & (i.mdv == 0))) for i in engine[:16])
    assert levels >= 40 and compiled_pays([m], engine[:16], per_level=True)
    assert compiled_pays([m], engine[:20], repeats=2) and not compiled_pays([m], engine[:19], repeats=2)
    # a large data set is judged by an even sample of 256, its count scaled: 60 engine-path individuals spread
    # among 1,000 others pay, 10 do not
    many = ex * 500
    spread = list(many)
    for k in range(60):
        spread.insert(k * 17, engine[k % 40])
    assert compiled_pays([m], spread)
    assert not compiled_pays([m], [*many[:500], *engine[:10], *many[500:]])
    # an ODE model: the compiled integrator, even for one patient
    assert compiled_pays([load_model(REPO / "validation" / "map-nonmem" / "model201.toml")], [])


def test_switching_compiled_code_off_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    m = resolve_model("andrews2019_tac_adult_kidney")
    monkeypatch.setenv("CNIDOSE_COMPILED", "0")
    assert not compiled_enabled() and model_kernel(m) is None
    monkeypatch.delenv("CNIDOSE_COMPILED")
    assert compiled_enabled()


def _fit(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[dict[str, list[str]], str]:
    out = tmp_path / f"{name}.csv"
    code = ("import sys, runpy\nsys.argv = ['cnidose', 'fit', '-m', 'andrews2019_tac_adult_kidney', '-d', "
            f"{str(EXAMPLE)!r}, '-o', {str(out)!r}, '--no-progress']\n"
            "try:\n    runpy.run_module('cnidose.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('numba' in sys.modules, 'scipy.special' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    with out.open() as f:
        rows = {row["ID"]: row for row in csv.DictReader(f)}
    cols = [c for c in next(iter(rows.values())) if c.startswith("ETA_") or c == "OFV"]
    assert "ETA_CL" in cols
    return {k: [v[c] for c in cols] for k, v in rows.items()}, r.stdout.strip()


def test_a_short_command_line_fit_loads_no_compiled_code_and_estimates_the_same(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CNIDOSE_COMPILED"}
    short, loaded = _fit(tmp_path, "short", env)
    # Numba not even imported: the run saves its loading (about a second); nor SciPy's special functions (a
    # quarter second; no level is BLQ, and the wide-prior search's normal quantiles come from the standard library)
    assert loaded == "False False"
    forced, loaded_forced = _fit(tmp_path, "forced", {**env, "CNIDOSE_COMPILED": "1"})
    assert loaded_forced.startswith("True")
    assert short.keys() == forced.keys() and len(short) == 2
    for k in short:  # exact derivatives or differences: the same optimum
        assert np.allclose(np.asarray(short[k], float), np.asarray(forced[k], float), rtol=1e-5, atol=1e-5)


def test_the_command_line_gives_the_choice_back_when_it_ends(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cnidose.cli import app

    monkeypatch.delenv("CNIDOSE_COMPILED", raising=False)
    r = CliRunner().invoke(app, ["fit", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE), "-o",
                                 str(tmp_path / "e.csv"), "--no-progress"])
    assert r.exit_code == 0, r.output
    # the short run chose no compiled code; the process after it is as before
    assert "CNIDOSE_COMPILED" not in os.environ and compiled_enabled()


def test_a_record_recommendation_loads_neither_the_database_nor_compiled_code() -> None:
    """`cnidose recommend --patient RECORD.json` (one patient, a library model on the closed form): no SQLAlchemy
    (the store is not used; 0.4 s to import), no Numba, no SciPy special functions, no pydantic (Typer 0.29 parses
    every command's options through it, 0.2-0.3 s: pinned below 0.29 in pyproject)."""
    env = {k: v for k, v in os.environ.items() if k != "CNIDOSE_COMPILED"}
    code = ("import sys, runpy\nsys.argv = ['cnidose', 'recommend', '--patient', "
            f"{str(REPO / 'examples' / 'kidney_transplant_patient.json')!r}, '--as-of', '2026-12-01']\n"
            "try:\n    runpy.run_module('cnidose.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print([m for m in ('sqlalchemy', 'numba', 'scipy.special', 'pydantic') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "give " in r.stdout and r.stdout.strip().splitlines()[-1] == "[]"
