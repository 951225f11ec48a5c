"""Batch MAP fitting and forecast evaluation of a whole data set, chunk by chunk, on any backend
(identical results).

Models hold compiled expressions and are not sent between processes: each chunk carries the model
file's bytes, parsed once per worker process (cached by content hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cnidose.cohort.executor import Backend, chunked, run_chunks
from cnidose.dosing.evaluate import Forecast, evaluate
from cnidose.estimation.map import MapResult, fit_map
from cnidose.models.fileformat import parse_model
from cnidose.models.model import Model
from cnidose.pk.events import Individual

__all__ = ["batch_evaluate", "batch_fit", "model_payload"]

_MODELS: dict[str, Model] = {}


def model_payload(model: Model) -> tuple[bytes, str]:
    """What a worker needs to rebuild ``model``: the file's bytes and its source name."""
    if not model.source:
        raise ValueError("the model has no source file")
    return Path(model.source).read_bytes(), model.source


def _model(payload: tuple[bytes, str]) -> Model:
    raw, source = payload
    key = hashlib.sha256(raw).hexdigest()
    if key not in _MODELS:
        _MODELS[key] = parse_model(raw, source=source)
    return _MODELS[key]


def _fit_chunk(chunk: list[Individual], payload: tuple[bytes, str], covariance: str) -> list[MapResult]:
    return fit_map(_model(payload), chunk, covariance=covariance)  # type: ignore[arg-type]


def batch_fit(model: Model, individuals: Sequence[Individual], *, backend: Backend = "serial",
              scheduler: str | None = None, workers: int | None = None, chunk_size: int = 500,
              covariance: str = "expected", progress: Callable[[int, int], None] | None = None
              ) -> list[MapResult]:
    """MAP estimates of every individual, in input order; one individual's failure is its status."""
    chunks = chunked(list(individuals), chunk_size)
    payload: Any = model_payload(model)
    parts = run_chunks(_fit_chunk, chunks, backend=backend, scheduler=scheduler, workers=workers,
                       progress=progress, extra=(payload, covariance))
    return [r for part in parts for r in part]


def _evaluate_chunk(chunk: list[Individual], payloads: list[tuple[bytes, str]], max_step: int | None
                    ) -> tuple[list[Forecast], list[str]]:
    problems: list[str] = []
    forecasts = evaluate([_model(p) for p in payloads], chunk, max_step=max_step, problems=problems)
    return forecasts, problems


def batch_evaluate(models: Sequence[Model], individuals: Sequence[Individual], *, max_step: int | None = None,
                   backend: Backend = "serial", scheduler: str | None = None, workers: int | None = None,
                   chunk_size: int = 200, progress: Callable[[int, int], None] | None = None,
                   problems: list[str] | None = None) -> list[Forecast]:
    """:func:`cnidose.dosing.evaluate.evaluate` partitioned by individual, on any backend; the forecasts
    (and skipped individuals' messages) come back in the serial order: model, step, individual."""
    chunks = chunked(list(individuals), chunk_size)
    payloads = [model_payload(m) for m in models]
    parts = run_chunks(_evaluate_chunk, chunks, backend=backend, scheduler=scheduler, workers=workers,
                       progress=progress, extra=(payloads, max_step))
    rank = {m.id: k for k, m in enumerate(models)}
    forecasts = sorted((f for part in parts for f in part[0]), key=lambda f: (rank[f.model], f.step))
    if problems is not None:
        problems += sorted((msg for part in parts for msg in part[1]), key=lambda msg: rank[msg.split(":", 1)[0]])
    return forecasts
