"""The compiled ODE path (cnidose.pk.compiled): the same answers as SciPy's integrator, and a cache that
only ever imports what cnidose wrote into a folder private to the user.

The differential test (tests/test_pk_differential.py, case "mm-compiled") checks the compiled path against an
independent reference over random event histories; here: the model-file route (equations generated from a
model's expressions), agreement with the SciPy path on MAP fits of shared model 201, failures named per batch
member, and the cache's refusals.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cnidose.errors import NumericalError
from cnidose.models import load_model
from cnidose.models.expr import compile_expression, scalar_source
from cnidose.pk import OdeStructure, compiled, simulate, split_individuals
from cnidose.pk.solvers import OdeSolver
from tests.conftest import REPO

MODEL_201 = REPO / "validation" / "map-nonmem" / "model201.toml"


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A new private cache folder, and no kernel remembered from earlier tests."""
    d = tmp_path / "kernels"
    monkeypatch.setenv("CNIDOSE_CACHE_DIR", str(d))
    compiled._load.cache_clear()
    yield d
    compiled._load.cache_clear()


def _structure_201() -> OdeStructure:
    s = load_model(MODEL_201).structure
    assert isinstance(s, OdeStructure)
    return s


def test_scalar_source_evaluates_as_the_vectorised_expression() -> None:
    src = "max(A, 0.5) * exp(-K * 2) / (1 + abs(B) ** 1.5) if K > 0 and not B == 3 else log(A) - sqrt(K)"
    e = compile_expression(src)
    code = scalar_source(e, {"A": "a", "B": "b", "K": "k"})
    for a, b, k in [(0.3, -2.0, 0.7), (2.0, 3.0, 0.4), (1.5, 1.0, 0.0), (4.0, 3.0, -0.0)]:
        want = float(np.asarray(e({"A": np.array(a), "B": np.array(b), "K": np.array(k)})))
        got = eval(code, {"math": math}, {"a": a, "b": b, "k": k})
        assert got == pytest.approx(want, rel=1e-15), (a, b, k)


def test_a_model_file_gives_equations_in_the_order_of_its_parameters() -> None:
    s = _structure_201()
    assert len(s.equations) == s.n == 2
    # the derivative at a point, from the generated equations and from the vectorised right-hand side
    x = np.array([[120.0, 35.0]])
    p = {k: np.array([1.0 + i]) for i, k in enumerate(s.parameters)}
    ns = {"x": x[0], "p": [float(p[k][0]) for k in s.parameters], "math": math}
    got = [eval(e, ns) for e in s.equations]
    assert s.rhs is not None
    np.testing.assert_allclose(got, s.rhs(x, p)[0], rtol=1e-15)


def test_the_compiled_and_the_scipy_path_agree(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model 201 near saturation and far from it, bolus and infused doses, steady state and a parameter change
    at an EVID 2 record: the compiled path equals SciPy's integration of the same system to ~1e-9."""
    s = _structure_201()
    cols = {"ID": [1] * 8, "TIME": [0, 0, 6, 12, 20, 24, 30, 48], "EVID": [1, 1, 0, 2, 0, 1, 0, 0],
            "AMT": [5000, 2000, 0, 0, 0, 8000, 0, 0], "RATE": [0, 1000, 0, 0, 0, 0, 0, 0],
            "II": [12, 0, 0, 0, 0, 24, 0, 0], "SS": [1, 0, 0, 0, 0, 0, 0, 0], "ADDL": [0, 0, 0, 0, 0, 1, 0, 0],
            "CMT": [1, 2, 2, 0, 2, 1, 2, 2]}
    ind, = split_individuals(cols)
    rng = np.random.default_rng(201)
    B = 6
    params = {"KA": rng.uniform(0.3, 3, (B, 1)) * np.ones((1, 8)), "VC": rng.uniform(30, 150, (B, 1)) * np.ones(8),
              "VMAX": rng.uniform(2000, 20000, (B, 1)) * np.ones(8), "KM": rng.uniform(10, 5000, (B, 1)) * np.ones(8)}
    params["VMAX"][:, 3:] *= 0.6  # the capacity falls at the EVID 2 record
    assert OdeSolver(s, B)._kernel is not None
    fast = simulate(s, ind, params, return_amounts=True)
    assert list(fresh.glob("cnidose_ode_*.py")), "the kernel's source is kept in the private folder"
    monkeypatch.setenv("CNIDOSE_COMPILED", "0")
    assert OdeSolver(s, B)._kernel is None
    slow = simulate(s, ind, params, return_amounts=True)
    assert fast.amounts is not None and slow.amounts is not None
    scale = np.max(np.abs(slow.amounts))
    np.testing.assert_allclose(fast.amounts, slow.amounts, rtol=1e-8, atol=1e-10 * scale)


def test_map_fits_of_model_201_agree_between_the_paths(fresh: Path, monkeypatch: pytest.MonkeyPatch,
                                                       shared: Path) -> None:
    """The first individuals of the shared MAP suite for model 201: the same ETAs on both paths."""
    import sys

    from cnidose.estimation import fit_map

    sys.path.insert(0, str(REPO / "validation" / "map-nonmem"))
    import mapsuite

    m = mapsuite.load("201")
    inds = mapsuite.individuals("201", 1)  # one individual of each sampling design
    fast = fit_map(m, inds)
    monkeypatch.setenv("CNIDOSE_COMPILED", "0")
    slow = fit_map(m, inds)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.eta, b.eta, atol=1e-5, err_msg=str(a.id))
        assert a.ofv == pytest.approx(b.ofv, abs=1e-6)


def test_a_failure_names_the_batch_member(fresh: Path) -> None:
    s = _structure_201()
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 4], "EVID": [1, 0], "AMT": [100, 0], "CMT": [1, 2]})
    params = {"KA": np.array([[1.0], [1.0], [1.0]]), "VC": np.array([[70.0], [70.0], [70.0]]),
              "VMAX": np.array([[100.0], [100.0], [100.0]]), "KM": np.array([[2.0], [-0.7], [2.0]])}
    # member 1: KM + C reaches zero as the concentration rises, and the derivative is not finite there
    with pytest.raises(NumericalError, match="batch member 1"):
        simulate(s, ind, {k: v * np.ones((1, 2)) for k, v in params.items()})


def test_a_stiff_member_gives_up_at_once(fresh: Path) -> None:
    """Regression: an optimiser's trial step can reach an absorption rate constant of 1e8/h; the explicit
    integrator then needs billions of steps. It gave up only after 10 million (about 10 s a member, and four
    individuals of shared model 201 took 25-30 s each); now after 100,000, naming the member."""
    import time

    s = _structure_201()
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 24], "EVID": [1, 0], "AMT": [100, 0], "CMT": [1, 2]})
    params = {"KA": np.array([[1.0], [1e8]]), "VC": np.array([[70.0], [70.0]]),
              "VMAX": np.array([[100.0], [100.0]]), "KM": np.array([[2.0], [2.0]])}
    # compiled before the clock starts (Numba compiles at the first call, here into a fresh cache folder)
    assert compiled.kernel(s.equations) is not None
    simulate(s, ind, {k: v[:1] * np.ones((1, 2)) for k, v in params.items()})
    t0 = time.perf_counter()
    with pytest.raises(NumericalError, match="batch member 1 \\(too many steps\\)"):
        simulate(s, ind, {k: v * np.ones((1, 2)) for k, v in params.items()})
    assert time.perf_counter() - t0 < 3.0


def test_no_kernel_from_a_folder_others_can_write(fresh: Path) -> None:
    fresh.mkdir(mode=0o700)
    os.chmod(fresh, 0o770)
    assert compiled.cache_dir() is None
    assert compiled.kernel(_structure_201().equations) is None
    os.chmod(fresh, 0o700)
    assert compiled.cache_dir() == fresh


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing a folder's owner needs root")
def test_no_kernel_from_a_folder_another_user_owns(fresh: Path) -> None:
    fresh.mkdir(mode=0o700)
    os.chown(fresh, 65534, 65534)  # nobody
    assert compiled.cache_dir() is None


def test_no_kernel_from_a_file_that_is_not_ours(fresh: Path) -> None:
    """A file under the kernel's name with other content (planted, or corrupted) is never imported."""
    eq = _structure_201().equations
    assert compiled.kernel(eq) is not None
    (path,) = fresh.glob("cnidose_ode_*.py")
    compiled._load.cache_clear()
    marker = fresh / "imported"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n" + path.read_text())
    assert compiled.kernel(eq) is None
    assert not marker.exists()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_without_numba_scipy_integrates(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    s = _structure_201()
    assert compiled.kernel(s.equations) is None
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 4], "EVID": [1, 0], "AMT": [100, 0], "CMT": [1, 2]})
    sim = simulate(s, ind, {"KA": np.array([1.0, 1.0]), "VC": np.array([70.0, 70.0]),
                            "VMAX": np.array([100.0, 100.0]), "KM": np.array([2.0, 2.0])})
    assert np.isfinite(sim.prediction).all() and sim.prediction[0, 1] > 0


def test_the_first_compilation_on_a_machine_is_announced(fresh: Path) -> None:
    """A kernel module that Numba has not compiled here yet is announced (the command line says a first fit will
    pause); once compiled and cached, loading it again is silent."""
    seen: list[str] = []
    compiled.on_first_compilation(seen.append)
    try:
        text = "from numba import njit\n\n\n@njit(cache=True)\ndef twice(x):\n    return 2.0 * x\n"
        module = compiled.load("cnidose_test_", text)
        assert module is not None and len(seen) == 1 and seen[0].startswith("cnidose_test_")
        assert module.twice(2.0) == 4.0  # compiled, and written to the cache
        compiled._load.cache_clear()
        assert compiled.load("cnidose_test_", text) is not None
        assert len(seen) == 1
    finally:
        compiled.on_first_compilation(None)
