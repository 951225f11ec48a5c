"""Run a function over chunks of work: serially, on local processes, or on a Dask cluster.

Work is partitioned into chunks (of individuals or virtual patients) large enough to keep the
vectorised engine fed; results come back in chunk order whichever backend ran them, so the same
inputs (and seeds) give identical results. The Dask backend uses ``distributed.Client`` against an
existing scheduler (``tcp://HOST:PORT``); a scheduler that does not answer is a clear error within
``connect_timeout`` seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal, TypeVar

from cnidose.errors import InputError

__all__ = ["Backend", "chunked", "run_chunks"]

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
        if not scheduler:
            raise InputError("the dask backend needs --scheduler tcp://HOST:PORT")
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
