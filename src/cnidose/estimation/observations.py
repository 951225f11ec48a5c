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

from collections.abc import Callable, Sequence
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
    out = _bind(model, [prep])[0]
    if isinstance(out, CnidoseError):
        raise out
    return out


def observation_data_many(model: Model, preps: Sequence[Prepared]) -> list[ObservationData | CnidoseError]:
    """:func:`observation_data` of many individuals, each its data or the error it raises (in order).

    Individuals that share their columns are bound in one pass over their concatenated records (a cohort's Python
    overhead per individual was most of the binding's cost: 4,000 individuals of the shared model 001, 0.5 s)."""
    out: list[ObservationData | CnidoseError | None] = [None] * len(preps)
    alike: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for k, p in enumerate(preps):
        alike.setdefault((tuple(p.individual.covariates), tuple(p.covariates)), []).append(k)
    for ks in alike.values():
        for k, res in zip(ks, _bind(model, [preps[k] for k in ks]), strict=True):
            out[k] = res
    return [o for o in out if o is not None]


def _bind(model: Model, preps: Sequence[Prepared]) -> list[ObservationData | CnidoseError]:
    """The observations of ``preps`` (individuals with the same columns), checked: each its data, or the error of
    the first check it fails, at its first failing record (the checks in the order below)."""
    covs0 = preps[0].individual.covariates
    recs = [np.flatnonzero((p.individual.evid == 0) & (p.individual.mdv == 0)) for p in preps]
    counts = np.array([r.size for r in recs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(starts[-1])
    owner = np.repeat(np.arange(len(preps)), counts)
    if "DV" not in covs0:
        empty, none = np.zeros(0), np.zeros(0, bool)
        return [DataError("observation records need a DV column", column="DV") if r.size else
                ObservationData(r, p.individual.rows[r], empty, none, empty, none, empty, empty, empty, empty)
                for p, r in zip(preps, recs, strict=True)]

    def rows_of(values: Callable[[Prepared], NDArray[Any]], dtype: Any = np.float64) -> NDArray[Any]:
        return np.concatenate([values(p)[r] for p, r in zip(preps, recs, strict=True)]).astype(dtype)

    rows = rows_of(lambda p: p.individual.rows, np.int64)
    checks: list[tuple[BoolArray, Callable[[int], CnidoseError]]] = []  # rows failing, and the error at row j

    def check(mask: BoolArray, message: str | Callable[[int], str], column: str | None) -> None:
        checks.append((mask, lambda j: DataError(message if isinstance(message, str) else message(j),
                                                 row=int(rows[j]), column=column)))

    y = rows_of(lambda p: p.individual.covariates["DV"])
    blq = np.zeros(n, bool)
    if "BLQ" in covs0:
        raw = rows_of(lambda p: p.individual.covariates["BLQ"])
        blq = np.nan_to_num(raw) == 1
        check(~np.isin(np.nan_to_num(raw, nan=0.0), (0.0, 1.0)), "BLQ must be 0 or 1", "BLQ")
    limit = np.full(n, np.nan)
    if blq.any():
        limit[blq] = (rows_of(lambda p: p.individual.covariates["LLOQ"]) if "LLOQ" in covs0 else y)[blq]
        check(blq & ~np.isfinite(limit), "a BLQ record needs its limit (LLOQ column, or DV)", "LLOQ")
    check(~blq & ~np.isfinite(y), "observation record without a level (DV is missing or NaN); set MDV=1 to keep it "
          "as a prediction-only record", "DV")
    types = rows_of(lambda p: p.obs_type, np.int64)
    cmt = rows_of(lambda p: p.individual.cmt, np.int64)
    check(types < 0, lambda j: f"model {model.id} has no observation type for compartment "
          f"{int(cmt[j]) or model.structure.default_obs}", "CMT")
    env, env_error = _error_env(model, preps, recs)
    if env_error:  # the [pk] values the error model reads could not be evaluated for these individuals
        checks.append((np.isin(owner, list(env_error)), lambda j: env_error[int(owner[j])]))
    prop, add, sd_log, if_zero = (np.zeros(n) for _ in range(4))
    if_zero[:] = np.nan
    log = np.zeros(n, bool)
    for k, ob in enumerate(model.observations):
        m = types == k
        e = ob.error
        if e is None:
            check(m, f"observation type {ob.name} of model {model.id} has no error model; it cannot be fitted", "DV")
            continue
        if not m.any():
            continue

        def value(expr: Any, _m: BoolArray = m) -> FloatArray:
            return np.zeros(int(_m.sum())) if expr is None else np.broadcast_to(
                np.asarray(expr(env), dtype=np.float64), (n,))[_m]

        prop[m], add[m], sd_log[m] = value(e.proportional), value(e.additive), value(e.exponential)
        if e.prediction_if_zero is not None:
            if_zero[m] = e.prediction_if_zero
        log[m] = e.log_scale
    for name, arr in (("proportional SD", prop), ("additive SD", add), ("log-scale SD", sd_log)):
        check(~np.isfinite(arr) | (arr < 0), f"the model's {name} is not a finite non-negative number here", None)
    level = np.where(blq, limit, y)
    check(level < 0, lambda j: f"impossible level {level[j]:g} (negative)", "DV")
    check(log & (level <= 0), "a level of 0 cannot be fitted on the log scale (exponential error): mark it BLQ", "DV")
    fitting = model.fitting
    if fitting.log_scale:  # transform both sides: SD on the log scale at the measured level (Fitting)
        natural = ~log
        check(natural & (level <= 0), "a level of 0 cannot be fitted on the log scale (the log strategy): mark it "
              "BLQ", "DV")
        with np.errstate(divide="ignore"):
            sd_nat = np.sqrt(prop**2 + (add / np.where(natural, level, 1.0)) ** 2)
        sd_log = np.where(natural, sd_nat, sd_log)
        prop, add = np.where(natural, 0.0, prop), np.where(natural, 0.0, add)
        if_zero = np.where(natural, np.nan, if_zero)
        log = np.ones(n, bool)
    if fitting.half_life is not None:  # exponential forgetting, the levels' total weight kept (Fitting)
        inflate = np.ones(n)
        for k, (p, r) in enumerate(zip(preps, recs, strict=True)):  # each individual's own newest level and mean
            if r.size:
                t = p.individual.time[r]
                v = np.exp2(np.minimum(np.maximum(t.max() - t, 0.0) / fitting.half_life, 100.0))
                inflate[starts[k]:starts[k + 1]] = np.sqrt(v * np.mean(1.0 / v))
        prop, add, sd_log = prop * inflate, add * inflate, sd_log * inflate
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(log & ~blq, np.log(np.where(log & ~blq, y, 1.0)), y)
        limit = np.where(log & blq, np.log(np.where(log & blq, limit, 1.0)), limit)
    failed: dict[int, CnidoseError] = {}
    for mask, error in checks:  # in order: an individual keeps the first check it fails, at its first such record
        bad = np.flatnonzero(mask)
        who, first = np.unique(owner[bad], return_index=True)
        for i, j in zip(who.tolist(), bad[first].tolist(), strict=True):
            if i not in failed:
                failed[i] = error(j)
    out: list[ObservationData | CnidoseError] = []
    for k, r in enumerate(recs):
        lo, hi = int(starts[k]), int(starts[k + 1])
        out.append(failed[k] if k in failed else
                   ObservationData(r, rows[lo:hi], y[lo:hi], blq[lo:hi], limit[lo:hi], log[lo:hi], prop[lo:hi],
                                   add[lo:hi], sd_log[lo:hi], if_zero[lo:hi]))
    return out


def _error_env(model: Model, preps: Sequence[Prepared], recs: Sequence[IntArray]
               ) -> tuple[dict[str, Any], dict[int, CnidoseError]]:
    """Names the error expressions may use, at the observation records of ``preps`` concatenated (typical
    individual), and the individuals whose [pk] values (where the error reads them) could not be evaluated."""
    needed: set[str] = set()
    for ob in model.observations:
        if ob.error is not None:
            for e in (ob.error.proportional, ob.error.additive, ob.error.exponential):
                if e is not None:
                    needed |= e.names
    env: dict[str, Any] = {n: p.value for n, p in model.parameters.items()}
    for name in preps[0].covariates:
        env[name] = np.concatenate([p.covariates[name][r] for p, r in zip(preps, recs, strict=True)])
    failed: dict[int, CnidoseError] = {}
    if needed - set(env):  # the error depends on [pk] values: evaluate them (typical individual)
        each: list[dict[str, FloatArray] | None] = []
        for k, p in enumerate(preps):
            try:
                each.append(model.individual_parameters(p))
            except CnidoseError as exc:
                failed[k] = exc
                each.append(None)
        names = next((tuple(d) for d in each if d is not None), ())
        env.update({nm: np.concatenate([d[nm][0, r] if d is not None else np.full(r.size, np.nan)
                                        for d, r in zip(each, recs, strict=True)]) for nm in names})
        for nm in model.iiv.names + (model.iov.names if model.iov else ()):
            env[nm] = 0.0
    return env, failed


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
        degenerate = V <= 0  # no variance: an impossible observation (below)
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
