"""Cohort scale: batch fitting and virtual trials, serial vs local processes vs a real Dask cluster."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnidose.cohort import batch_fit
from cnidose.cohort.trial import load_protocol, run_trial
from cnidose.errors import InputError
from cnidose.models import load_model
from cnidose.records.nonmem import read_nonmem_csv

from .conftest import REPO

PROTOCOL = REPO / "examples" / "trial_cpic.toml"


def _same(a: list, b: list) -> bool:  # type: ignore[type-arg]
    return len(a) == len(b) and all(
        np.array_equal(x.eta, y.eta) and x.ofv == y.ofv and x.status == y.status
        and np.array_equal(x.covariance, y.covariance) for x, y in zip(a, b, strict=True))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """A real dask.distributed scheduler and two single-threaded workers, separate processes, on loopback."""
    pytest.importorskip("distributed", reason="install the dask extra: pip install -e '.[dev,dask]'")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    time.sleep(1.5)
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
                                       "--no-dashboard", "--memory-limit", "0"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    from distributed import Client

    deadline = time.time() + 60
    with Client(addr, timeout=30) as c:
        while len(c.scheduler_info()["workers"]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(c.scheduler_info()["workers"]) == 2
    yield addr
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def test_batch_fit_on_dask_equals_serial(shared: Path, dask_cluster: str) -> None:
    m = load_model(REPO / "validation" / "map-nonmem" / "model001.toml")
    inds = read_nonmem_csv(shared / "validation" / "map-nonmem" / "data" / "data_to_fit001.csv").individuals()[:2000]
    serial = batch_fit(m, inds, chunk_size=250)
    dask = batch_fit(m, inds, backend="dask", scheduler=dask_cluster, chunk_size=250)
    assert _same(serial, dask)
    assert [r.id for r in dask] == [float(i.id) for i in inds]


def test_batch_fit_on_processes_equals_serial(shared: Path) -> None:
    m = load_model(REPO / "validation" / "map-nonmem" / "model101.toml")
    inds = read_nonmem_csv(shared / "validation" / "map-nonmem" / "data" / "data_to_fit101.csv").individuals()[:300]
    assert _same(batch_fit(m, inds, chunk_size=100), batch_fit(m, inds, backend="processes", workers=2,
                                                               chunk_size=100))


def test_trial_same_seed_same_result_on_every_backend(dask_cluster: str) -> None:
    p = load_protocol(PROTOCOL)
    a = run_trial(p, n=3000, chunk_size=1000)
    b = run_trial(p, n=3000, chunk_size=1000, backend="dask", scheduler=dask_cluster)
    np.testing.assert_array_equal(a.attainment, b.attainment)
    np.testing.assert_array_equal(a.percentiles, b.percentiles)
    # weekly adjustment moves patients into range
    assert a.attainment[-1] > a.attainment[0] + 0.2
    assert a.n == 3000 and a.days == 28


def test_trial_bad_input(tmp_path: Path) -> None:
    p = load_protocol(PROTOCOL)
    with pytest.raises(InputError, match="must be positive"):
        run_trial(p, n=0)
    bad = copy.deepcopy(p)
    bad["regimen"]["titrate_daily"] = True
    with pytest.raises(InputError, match=r"\[regimen.titrate_daily\]: unknown rule"):
        run_trial(bad)
    other = copy.deepcopy(p)
    other["regimen"]["product"] = "Neoral"
    with pytest.raises(InputError, match="Neoral is cyclosporine"):
        run_trial(other, n=10)
    nomodel = copy.deepcopy(p)
    nomodel["model"] = "voclosporin_model_that_does_not_exist"
    with pytest.raises(InputError, match="not a library id"):
        run_trial(nomodel, n=10)
    missing = copy.deepcopy(p)
    del missing["covariates"]["SCR"]
    with pytest.raises(InputError, match=r"no values for covariate.*SCR"):
        run_trial(missing, n=10)


def test_unreachable_scheduler_fails_fast() -> None:
    pytest.importorskip("distributed")
    p = load_protocol(PROTOCOL)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="does not answer"):
        run_trial(p, n=100, backend="dask", scheduler=f"tcp://127.0.0.1:{_free_port()}")
    assert time.perf_counter() - t0 < 15.0
