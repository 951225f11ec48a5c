"""The observations an individual contributes to the objective, and the per-observation objective terms.

Data items read from each individual's records (case-insensitive columns):

``DV``
    the measured level, in the observation type's unit, on observation records (EVID 0, MDV 0).
``BLQ``
    optional; 1 marks a level below the limit of quantification. The likelihood of such a record
    is the M3 term, the probability that the model's level lies below the limit.
``LLOQ``
    optional; the limit (same unit as DV). Without it, DV on a BLQ record is taken as the limit.

An observation type with an ``exponential`` error model is fitted on the log scale. The model's
:class:`~cnidose.models.model.Fitting` may fit every type on the log scale (``log_scale``) and weigh older
levels less (``half_life``).

Objective (the NONMEM definition of the shared validation suite; no 2π, no ln|Ω|)::

    OFV(η) = Σ_j [ (y_j − f_j)² / V_j + ln V_j ] + Σ_BLQ −2 ln Φ((L_j − f_j) / √V_j) + ηᵀ Ω⁻¹ η
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import CnidoseError, DataError
from cnidose.models.model import Model, Prepared

__all__ = ["ObservationData", "observation_data", "observation_data_many", "terms"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class ObservationData:
    """One individual's observations, ready for the objective (arrays of length O)."""

    rec: IntArray  # record index within the individual
    rows: IntArray  # source rows, for messages
    y: FloatArray  # DV, log-transformed for log-scale types
    blq: BoolArray
    limit: FloatArray  # LLOQ (transformed like y) where blq
    log: BoolArray  # fitted on the log scale
    prop: FloatArray  # proportional SD
    add: FloatArray  # additive SD (observation unit)
    sd_log: FloatArray  # SD on the log scale (exponential error)
    if_zero: FloatArray  # prediction used in the proportional term where the prediction is 0 (NaN: none)

    def __len__(self) -> int:
        return int(self.rec.size)


def observation_data(model: Model, prep: Prepared) -> ObservationData:
    """Collect and check the observations of ``prep``; DataError names the record and the field."""
    ind = prep.individual
    covs = ind.covariates
    dv = covs.get("DV")
    sel = (ind.evid == 0) & (ind.mdv == 0)
    rec = np.flatnonzero(sel)
    if rec.size and dv is None:
        raise DataError("observation records need a DV column", column="DV")
    if not rec.size:
        empty = np.zeros(0)
        return ObservationData(rec, ind.rows[rec], empty, np.zeros(0, bool), empty, np.zeros(0, bool),
                               empty, empty, empty, empty)
    assert dv is not None
    y = dv[rec].astype(np.float64)
    rows = ind.rows[rec]
    blq_col = covs.get("BLQ")
    blq = np.zeros(rec.size, bool) if blq_col is None else np.nan_to_num(blq_col[rec]) == 1
    if blq_col is not None:
        bad = ~np.isin(np.nan_to_num(blq_col[rec], nan=0.0), (0.0, 1.0))
        if bad.any():
            raise DataError("BLQ must be 0 or 1", row=int(rows[np.flatnonzero(bad)[0]]), column="BLQ")
    lloq_col = covs.get("LLOQ")
    limit = np.full(rec.size, np.nan)
    if blq.any():
        limit[blq] = y[blq] if lloq_col is None else lloq_col[rec][blq]
        missing = blq & ~np.isfinite(limit)
        if missing.any():
            raise DataError("a BLQ record needs its limit (LLOQ column, or DV)",
                            row=int(rows[np.flatnonzero(missing)[0]]), column="LLOQ")
    nan = ~blq & ~np.isfinite(y)
    if nan.any():
        raise DataError("observation record without a level (DV is missing or NaN); set MDV=1 to keep it "
                        "as a prediction-only record", row=int(rows[np.flatnonzero(nan)[0]]), column="DV")
    types = prep.obs_type[rec]
    if np.any(types < 0):
        j = int(np.flatnonzero(types < 0)[0])
        cmt = int(ind.cmt[rec[j]]) or model.structure.default_obs
        raise DataError(f"model {model.id} has no observation type for compartment {cmt}",
                        row=int(rows[j]), column="CMT")
    prop, add, sd_log, if_zero = (np.zeros(rec.size) for _ in range(4))
    if_zero[:] = np.nan
    log = np.zeros(rec.size, bool)
    env0 = _error_env(model, prep, rec)
    for k, ob in enumerate(model.observations):
        m = types == k
        if not m.any():
            continue
        e = ob.error
        if e is None:
            raise DataError(f"observation type {ob.name} of model {model.id} has no error model; it cannot be "
                            "fitted", row=int(rows[np.flatnonzero(m)[0]]), column="DV")

        def value(expr: Any, _m: BoolArray = m) -> FloatArray:
            return np.zeros(int(_m.sum())) if expr is None else np.broadcast_to(
                np.asarray(expr(env0), dtype=np.float64), (rec.size,))[_m]

        prop[m], add[m], sd_log[m] = value(e.proportional), value(e.additive), value(e.exponential)
        if e.prediction_if_zero is not None:
            if_zero[m] = e.prediction_if_zero
        log[m] = e.log_scale
    for name, arr in (("proportional SD", prop), ("additive SD", add), ("log-scale SD", sd_log)):
        if np.any(~np.isfinite(arr) | (arr < 0)):
            j = int(np.flatnonzero(~np.isfinite(arr) | (arr < 0))[0])
            raise DataError(f"the model's {name} is not a finite non-negative number here", row=int(rows[j]))
    level = np.where(blq, limit, y)
    negative = level < 0
    if negative.any():
        raise DataError(f"impossible level {level[np.flatnonzero(negative)[0]]:g} (negative)",
                        row=int(rows[np.flatnonzero(negative)[0]]), column="DV")
    nonpos_log = log & (level <= 0)
    if nonpos_log.any():
        raise DataError("a level of 0 cannot be fitted on the log scale (exponential error): mark it BLQ",
                        row=int(rows[np.flatnonzero(nonpos_log)[0]]), column="DV")
    fitting = model.fitting
    if fitting.log_scale:  # transform both sides: SD on the log scale at the measured level (Fitting)
        natural = ~log
        if np.any(natural & (level <= 0)):
            j = int(np.flatnonzero(natural & (level <= 0))[0])
            raise DataError("a level of 0 cannot be fitted on the log scale (the log strategy): mark it BLQ",
                            row=int(rows[j]), column="DV")
        with np.errstate(divide="ignore"):
            sd_nat = np.sqrt(prop**2 + (add / np.where(natural, level, 1.0)) ** 2)
        sd_log = np.where(natural, sd_nat, sd_log)
        prop, add = np.where(natural, 0.0, prop), np.where(natural, 0.0, add)
        if_zero = np.where(natural, np.nan, if_zero)
        log = np.ones(rec.size, bool)
    if fitting.half_life is not None:  # exponential forgetting, the levels' total weight kept (Fitting)
        t = ind.time[rec]
        age = np.maximum(t.max() - t, 0.0)
        v = np.exp2(np.minimum(age / fitting.half_life, 100.0))
        inflate = np.sqrt(v * np.mean(1.0 / v))
        prop, add, sd_log = prop * inflate, add * inflate, sd_log * inflate
    y = np.where(log & ~blq, np.log(np.where(log & ~blq, y, 1.0)), y)
    limit = np.where(log & blq, np.log(np.where(log & blq, limit, 1.0)), limit)
    return ObservationData(rec, rows, y, blq, limit, log, prop, add, sd_log, if_zero)


def observation_data_many(model: Model, preps: Sequence[Prepared]) -> list[ObservationData | CnidoseError]:
    """:func:`observation_data` of many individuals, each its data or the error it raises (in order).

    The records of all are bound at once (a cohort's Python overhead per individual was most of the binding's
    cost: 4,000 individuals of the shared model 001, 0.5 s). An individual any check refuses, and individuals whose
    columns differ from the others' or whose error model reads [pk] values, are bound alone by
    :func:`observation_data`, which raises the error naming the record and the field: the numbers and the messages
    are that function's."""
    out: list[ObservationData | CnidoseError | None] = [None] * len(preps)

    def alone(k: int) -> None:
        try:
            out[k] = observation_data(model, preps[k])
        except CnidoseError as exc:
            out[k] = exc

    keys = {k: (tuple(p.individual.covariates), tuple(p.covariates)) for k, p in enumerate(preps)}
    common = keys[0] if preps else None
    batch = [k for k in range(len(preps)) if keys[k] == common]
    for k in range(len(preps)):
        if keys[k] != common:
            alone(k)
    if batch and not _batch_observations(model, [preps[k] for k in batch], batch, out):
        for k in batch:
            alone(k)
    for k in range(len(preps)):
        if out[k] is None:
            alone(k)
    return [o for o in out if o is not None]


def _batch_observations(model: Model, preps: list[Prepared], where: list[int],
                        out: list[ObservationData | CnidoseError | None]) -> bool:
    """Bind ``preps`` (sharing their columns) at once into ``out[where[k]]``, leaving None where an individual
    fails a check (it is then bound alone, for its message); False where the batch does not apply."""
    first = preps[0]
    covs0 = first.individual.covariates
    needed: set[str] = set()
    for ob in model.observations:
        if ob.error is None:
            return False  # a type without an error model: the message names the individual's record
        for expr in (ob.error.proportional, ob.error.additive, ob.error.exponential):
            if expr is not None:
                needed |= expr.names
    known = set(model.parameters) | set(first.covariates)
    if needed - known or "DV" not in covs0:
        return False  # [pk] values in the error model, or no DV: each alone
    sels = [(p.individual.evid == 0) & (p.individual.mdv == 0) for p in preps]
    recs = [np.flatnonzero(sl) for sl in sels]
    counts = np.array([r.size for r in recs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(starts[-1])
    owner = np.repeat(np.arange(len(preps)), counts)

    def col(values: list[Any]) -> Any:
        return np.concatenate(values) if values else np.zeros(0)

    def rows_of(name: str) -> FloatArray:
        return np.asarray(col([p.individual.covariates[name][r] for p, r in zip(preps, recs, strict=True)]),
                          dtype=np.float64)

    y = rows_of("DV")
    bad = np.zeros(n, bool)  # rows that fail a check: their individuals are bound alone
    blq = np.zeros(n, bool)
    if "BLQ" in covs0:
        raw = rows_of("BLQ")
        blq = np.nan_to_num(raw) == 1
        bad |= ~np.isin(np.nan_to_num(raw, nan=0.0), (0.0, 1.0))
    limit = np.full(n, np.nan)
    if blq.any():
        limit[blq] = (rows_of("LLOQ") if "LLOQ" in covs0 else y)[blq]
        bad |= blq & ~np.isfinite(limit)
    bad |= ~blq & ~np.isfinite(y)
    types = np.asarray(col([p.obs_type[r] for p, r in zip(preps, recs, strict=True)]), dtype=np.int64)
    bad |= types < 0
    env: dict[str, Any] = {nm: p.value for nm, p in model.parameters.items()}
    for name in first.covariates:
        env[name] = np.asarray(col([p.covariates[name][r] for p, r in zip(preps, recs, strict=True)]),
                               dtype=np.float64)
    prop, add, sd_log, if_zero = (np.zeros(n) for _ in range(4))
    if_zero[:] = np.nan
    log = np.zeros(n, bool)
    for k, ob in enumerate(model.observations):
        m = types == k
        if not m.any():
            continue
        e = ob.error
        assert e is not None

        def value(expr: Any, _m: BoolArray = m) -> FloatArray:
            return np.zeros(int(_m.sum())) if expr is None else np.broadcast_to(
                np.asarray(expr(env), dtype=np.float64), (n,))[_m]

        prop[m], add[m], sd_log[m] = value(e.proportional), value(e.additive), value(e.exponential)
        if e.prediction_if_zero is not None:
            if_zero[m] = e.prediction_if_zero
        log[m] = e.log_scale
    for arr in (prop, add, sd_log):
        bad |= ~np.isfinite(arr) | (arr < 0)
    level = np.where(blq, limit, y)
    bad |= (level < 0) | (log & (level <= 0))
    fitting = model.fitting
    if fitting.log_scale:  # as observation_data
        natural = ~log
        bad |= natural & (level <= 0)
        with np.errstate(divide="ignore"):
            sd_nat = np.sqrt(prop**2 + (add / np.where(natural, level, 1.0)) ** 2)
        sd_log = np.where(natural, sd_nat, sd_log)
        prop, add = np.where(natural, 0.0, prop), np.where(natural, 0.0, add)
        if_zero = np.where(natural, np.nan, if_zero)
        log = np.ones(n, bool)
    if fitting.half_life is not None:  # as observation_data, each individual's weights with its own arithmetic
        inflate = np.ones(n)
        for k, (p, r) in enumerate(zip(preps, recs, strict=True)):
            if r.size:
                t = p.individual.time[r]
                v = np.exp2(np.minimum(np.maximum(t.max() - t, 0.0) / fitting.half_life, 100.0))
                inflate[starts[k]:starts[k + 1]] = np.sqrt(v * np.mean(1.0 / v))
        prop, add, sd_log = prop * inflate, add * inflate, sd_log * inflate
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(log & ~blq, np.log(np.where(log & ~blq, y, 1.0)), y)
        limit = np.where(log & blq, np.log(np.where(log & blq, limit, 1.0)), limit)
    refused = np.zeros(len(preps), bool)
    refused[owner[bad]] = True
    for k, p in enumerate(preps):
        if refused[k]:
            continue
        lo, hi = int(starts[k]), int(starts[k + 1])
        rec = recs[k]
        if hi == lo:
            empty = np.zeros(0)
            out[where[k]] = ObservationData(rec, p.individual.rows[rec], empty, np.zeros(0, bool), empty,
                                            np.zeros(0, bool), empty, empty, empty, empty)
            continue
        out[where[k]] = ObservationData(rec, p.individual.rows[rec], y[lo:hi], blq[lo:hi], limit[lo:hi], log[lo:hi],
                                        prop[lo:hi], add[lo:hi], sd_log[lo:hi], if_zero[lo:hi])
    return True


def _error_env(model: Model, prep: Prepared, rec: IntArray) -> dict[str, Any]:
    """Names the error expressions may use, at the observation records (typical individual)."""
    needed: set[str] = set()
    for ob in model.observations:
        if ob.error is not None:
            for e in (ob.error.proportional, ob.error.additive, ob.error.exponential):
                if e is not None:
                    needed |= e.names
    env: dict[str, Any] = {n: p.value for n, p in model.parameters.items()}
    env.update({n: v[rec] for n, v in prep.covariates.items()})
    if needed - set(env):  # the error depends on [pk] values: evaluate them (typical individual)
        params = model.individual_parameters(prep)
        env.update({n: v[0, rec] for n, v in params.items()})
        for n in model.iiv.names + (model.iov.names if model.iov else ()):
            env[n] = 0.0
    return env


def scaled_prediction_and_variance(f: FloatArray, log: BoolArray, prop: FloatArray, add: FloatArray,
                                   sd_log: FloatArray, if_zero: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``f'`` (the prediction on the scale each observation is fitted on: ln f on the log scale) and the residual
    variance ``V`` there, for predictions ``f`` (O, B) and per-observation error arrays broadcast to it."""
    if not log.any() and not np.isfinite(if_zero).any():  # the usual case, without the masks
        return f, (prop * f) ** 2 + add**2
    with np.errstate(divide="ignore", invalid="ignore"):
        fp = np.where(log, np.log(np.where(f > 0, f, np.nan)), f)
        fp = np.where(log & ~(f > 0), -np.inf, fp)
        f_eff = np.where(np.isfinite(if_zero) & (f == 0), if_zero, f)
        V = np.where(log, sd_log**2, (prop * f_eff) ** 2 + add**2)
    return fp, V


def terms(f: FloatArray, y: FloatArray, blq: BoolArray, limit: FloatArray, log: BoolArray, prop: FloatArray,
          add: FloatArray, sd_log: FloatArray, if_zero: FloatArray, *, derivatives: bool = True
          ) -> tuple[FloatArray, FloatArray | None, FloatArray | None, FloatArray | None]:
    """Objective terms of observations for predictions ``f`` (natural scale), shape (O, B).

    Returns ``t`` (the terms), and with ``derivatives``: ``dt`` (∂t/∂f on the natural scale), ``w``
    (the expected-information weight, ∂²t/∂f² in expectation, natural scale) and ``dfp`` (∂f'/∂f:
    1, or 1/f on the log scale), all (O, B). Non-finite ``t`` marks an impossible observation.
    """
    col = (slice(None), None)
    y, limit = y[col], limit[col]
    blq, log = blq[col], log[col]
    prop, add, sd_log, if_zero = prop[col], add[col], sd_log[col], if_zero[col]
    fp, V = scaled_prediction_and_variance(f, log, prop, add, sd_log, if_zero)
    # the masks cost more than the arithmetic on a patient's few levels: each branch only where it is needed
    any_blq, any_log, any_zero = bool(blq.any()), bool(log.any()), bool(np.isfinite(if_zero).any())
    with np.errstate(divide="ignore", invalid="ignore"):
        if any_log or any_zero:
            dV = np.where(log | (np.isfinite(if_zero) & (f == 0)), 0.0, 2.0 * prop**2 * f)  # dV/df' (f' = f here)
        else:
            dV = 2.0 * prop**2 * f
        r = (np.where(blq, limit, y) if any_blq else y) - fp
        normal = r**2 / V + np.log(V)
        degenerate = V <= 0
        if degenerate.any():
            normal = np.where((V == 0) & (r == 0), -np.inf, normal)  # degenerate exact fit; flagged below
        if any_blq:  # SciPy's special functions only where a level is BLQ (their import is a quarter second)
            from scipy.special import log_ndtr

            z = r / np.sqrt(V)
            lphi = np.where(blq, log_ndtr(z), 0.0)
            t = np.where(blq, -2.0 * lphi, normal)
        else:
            t = normal
        t = np.where(np.isnan(t) | degenerate, np.inf, t)
        if not derivatives:
            return t, None, None, None
        # d t / d f'
        d_normal = -2.0 * r / V + (1.0 / V - r**2 / V**2) * dV
        w_normal = 2.0 / V + (dV / V) ** 2
        if any_blq:
            mills = np.exp(-0.5 * z**2 - 0.5 * np.log(2 * np.pi) - lphi)  # phi(z)/Phi(z)
            dz = -1.0 / np.sqrt(V) - r * dV / (2.0 * V**1.5)
            d_blq = -2.0 * mills * dz
            dtp = np.where(blq, d_blq, d_normal)
            # M3: exact second derivative of -2 ln Phi(z) w.r.t. f' (z linear in f' when V is constant;
            # the V(f) part is neglected in the weight), clipped at 0
            w_blq = np.maximum(2.0 * mills * (z + mills) * dz**2, 0.0)
            wp = np.where(blq, w_blq, w_normal)
        else:
            dtp, wp = d_normal, w_normal
        if not any_log:
            dfp = np.ones_like(f)
            return t, dtp, wp, dfp
        dfp = np.where(log, 1.0 / f, 1.0)
    return t, dtp * dfp, wp * dfp**2, dfp
