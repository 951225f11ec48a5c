"""Batch MAP fitting and forecast evaluation of a whole data set, chunk by chunk, on any backend
(identical results).

Models hold compiled expressions and are not sent between processes: each chunk carries the model
file's bytes, parsed once per worker process (cached by content hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cnidose.cohort.executor import Backend, chunked, run_chunks
from cnidose.dosing.evaluate import Forecast, Strategy, evaluate
from cnidose.estimation.map import MapResult, fit_map
from cnidose.models.fileformat import parse_model
from cnidose.models.model import Fitting, Model, Notice
from cnidose.pk.events import Individual

__all__ = ["Payload", "batch_evaluate", "batch_fit", "model_payload"]

_MODELS: dict[str, Model] = {}


Payload = tuple[bytes, str, str, Fitting, bytes]


def model_payload(model: Model) -> Payload:
    """What a worker needs to rebuild ``model``: the file's bytes, its source name, the dose-value reading, the
    fitting options and the between-subject covariance (a strategy may have widened it)."""
    if not model.source:
        raise ValueError("the model has no source file")
    return (Path(model.source).read_bytes(), model.source, model.dose_values, model.fitting,
            np.ascontiguousarray(model.iiv.omega, dtype=np.float64).tobytes())


def _model(payload: Payload) -> Model:
    raw, source, dose_values, fitting, omega = payload
    key = hashlib.sha256(raw + omega).hexdigest() + dose_values + repr(fitting)
    if key not in _MODELS:
        model = parse_model(raw, source=source)
        if dose_values != model.dose_values:
            model = replace(model, dose_values=dose_values)  # type: ignore[arg-type]
        if fitting != model.fitting:
            model = replace(model, fitting=fitting)
        om = np.frombuffer(omega, dtype=np.float64).reshape(model.iiv.omega.shape)
        if not np.array_equal(om, model.iiv.omega):
            model = replace(model, iiv=replace(model.iiv, omega=om.copy()))
        _MODELS[key] = model
    return _MODELS[key]


def _fit_chunk(chunk: list[Individual], payload: Payload, covariance: str) -> list[MapResult]:
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


def _evaluate_chunk(chunk: list[Individual], payloads: list[Payload], max_step: int | None,
                    strategies: tuple[Strategy, ...] = (Strategy(),), combine: tuple[str, ...] = (),
                    calibration: bool = False) -> tuple[list[Forecast], list[str], list[Notice]]:
    problems: list[str] = []
    notices: list[Notice] = []
    forecasts = evaluate([_model(p) for p in payloads], chunk, max_step=max_step, problems=problems,
                         notices=notices, strategies=strategies, combine=combine, calibration=calibration)
    return forecasts, problems, notices


def batch_evaluate(models: Sequence[Model], individuals: Sequence[Individual], *, max_step: int | None = None,
                   backend: Backend = "serial", scheduler: str | None = None, workers: int | None = None,
                   chunk_size: int = 200, progress: Callable[[int, int], None] | None = None,
                   problems: list[str] | None = None, notices: list[Notice] | None = None,
                   strategies: Sequence[Strategy] = (Strategy(),), combine: Sequence[str] = (),
                   calibration: bool = False) -> list[Forecast]:
    """:func:`cnidose.dosing.evaluate.evaluate` partitioned by individual, on any backend; the forecasts
    (and skipped individuals' messages) come back in the serial order: model, strategy, step, individual."""
    chunks = chunked(list(individuals), chunk_size)
    payloads = [model_payload(m) for m in models]
    parts = run_chunks(_evaluate_chunk, chunks, backend=backend, scheduler=scheduler, workers=workers,
                       progress=progress, extra=(payloads, max_step, tuple(strategies), tuple(combine),
                                                  calibration))
    rank = {m.id: k for k, m in enumerate(models)}
    rank.update({c: len(models) + k for k, c in enumerate(combine)})
    srank = {s.name: k for k, s in enumerate(strategies)}
    forecasts = sorted((f for part in parts for f in part[0]),
                       key=lambda f: (rank[f.model], srank.get(f.strategy, 0), f.step))
    if problems is not None:
        problems += sorted((msg for part in parts for msg in part[1]), key=lambda msg: rank[msg.split(":", 1)[0]])
    if notices is not None:
        notices += [n for part in parts for n in part[2]]
    return forecasts
