"""Run a function over chunks of work: serially, on local processes, or on a Dask cluster.

Work is partitioned into chunks (of individuals or virtual patients) large enough to keep the
vectorised engine fed; results come back in chunk order whichever backend ran them, so the same
inputs (and seeds) give identical results. The Dask backend uses ``distributed.Client`` against an
existing scheduler (``tcp://HOST:PORT``), or, without one, a loopback cluster of ``workers`` processes
started for the run; a scheduler that does not answer is a clear error within ``connect_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal, TypeVar

from cnidose.errors import InputError

__all__ = ["Backend", "chunked", "loopback_cluster", "run_chunks"]

Backend = Literal["serial", "processes", "dask"]
T = TypeVar("T")
R = TypeVar("R")


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of at most ``size`` items."""
    if size <= 0:
        raise InputError(f"chunk size must be positive, got {size}")
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def run_chunks(fn: Callable[..., R], chunks: Sequence[Any], *, backend: Backend = "serial",
               scheduler: str | None = None, workers: int | None = None, connect_timeout: float = 5.0,
               progress: Callable[[int, int], None] | None = None, extra: tuple[Any, ...] = ()) -> list[R]:
    """``[fn(chunk, *extra) for chunk in chunks]``, on the chosen backend, in chunk order."""
    n = len(chunks)
    if backend == "serial":
        out = []
        for k, c in enumerate(chunks):
            out.append(fn(c, *extra))
            if progress is not None:
                progress(k + 1, n)
        return out
    if backend == "processes":
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, c, *extra) for c in chunks]
            out = []
            for k, f in enumerate(futures):
                out.append(f.result())
                if progress is not None:
                    progress(k + 1, n)
            return out
    if backend == "dask":
        if not scheduler:  # no cluster given: a loopback one of ``workers`` processes, for this run only
            with loopback_cluster(workers or os.cpu_count() or 1) as addr:
                return run_chunks(fn, chunks, backend="dask", scheduler=addr, connect_timeout=connect_timeout,
                                  progress=progress, extra=extra)
        try:
            distributed: Any = importlib.import_module("distributed")
        except ImportError:
            raise InputError("the dask backend needs the optional extra: pip install 'cnidose[dask]'") from None
        try:
            client = distributed.Client(scheduler, timeout=connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"the Dask scheduler {scheduler} does not answer ({type(exc).__name__}: {exc})") from None
        try:
            remote = client.map(fn, chunks, *[[e] * n for e in extra], pure=False)
            for done, _ in enumerate(distributed.as_completed(remote), start=1):
                if progress is not None:
                    progress(done, n)
            return list(client.gather(remote))
        finally:
            client.close()
    raise InputError(f"unknown backend {backend!r} (serial, processes, dask)")


@contextlib.contextmanager
def loopback_cluster(n_workers: int = 2, *, threads: int = 1, start_timeout: float = 60.0) -> Iterator[str]:
    """A real ``dask.distributed`` scheduler and ``n_workers`` worker processes on 127.0.0.1; yields the
    scheduler address and stops every process on exit. For tests, benchmarks and one-machine runs."""
    try:
        distributed: Any = importlib.import_module("distributed")
    except ImportError:
        raise InputError("a Dask cluster needs the optional extra: pip install 'cnidose[dask]'") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    addr = f"tcp://127.0.0.1:{port}"
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], **quiet)]
    try:
        procs += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads",
                                    str(threads), "--no-dashboard", "--memory-limit", "0"], **quiet)
                  for _ in range(n_workers)]
        deadline = time.monotonic() + start_timeout
        client = None
        while client is None:
            try:
                client = distributed.Client(addr, timeout=2)
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise InputError(f"the loopback Dask scheduler did not start within {start_timeout:g} s") from None
        with client:
            while len(client.scheduler_info()["workers"]) < n_workers:
                if time.monotonic() > deadline:
                    raise InputError(f"{n_workers} Dask workers did not join within {start_timeout:g} s")
                time.sleep(0.2)
        yield addr
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
