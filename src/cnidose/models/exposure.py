"""Exposure multipliers from interactions, as the reserved data column ``EXPOSURE``.

An interaction with a published effect size (voriconazole: tacrolimus exposure about three-fold; rifampicin:
about a third; see ``cnidose.clinical``'s interaction data for the numbers and their sources) is an interval
``[start, end)`` in hours on the individual's time axis with a multiplier. :func:`with_exposure` writes the
product of the multipliers in force into the ``EXPOSURE`` column of every record, adding a record without an
event (EVID 2) at each boundary inside the record's span so that the change happens at that time and not at
the next dose or level. Every model then divides its clearance ``CL`` by it (:data:`cnidose.models.model.EXPOSURE`):
the prior, the MAP fit, the posterior and the forecasts all see the interaction, and the patient's own
random effects are not bent to absorb it.

The engine's time-varying semantics apply: a record's value holds over the interval ending at that record.
After the last record, simulations carry the last record's value (an interaction still in force at the last
record is assumed to go on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cnidose.errors import InputError
from cnidose.models.model import EXPOSURE
from cnidose.pk.events import Individual

__all__ = ["with_exposure"]


def with_exposure(individual: Individual, intervals: Sequence[tuple[float, float | None, float]]) -> Individual:
    """``individual`` with the ``EXPOSURE`` column for ``intervals`` = [(start_h, end_h or None, factor), ...].

    A record at time t takes the product of the factors whose interval holds the time just before t
    (start < t <= end). Boundaries inside the records' span get an EVID-2 record of their own.

    >>> from cnidose.pk.events import split_individuals
    >>> ind, = split_individuals({"ID": [1, 1, 1], "TIME": [0, 24, 48], "AMT": [5, 0, 0], "DV": [0, 8, 9],
    ...                           "EVID": [1, 0, 0]})
    >>> out = with_exposure(ind, [(10.0, None, 3.0)])
    >>> out.time.tolist(), out.covariates["EXPOSURE"].tolist()
    ([0.0, 10.0, 24.0, 48.0], [1.0, 1.0, 3.0, 3.0])
    """
    checked = []
    for k, (start, end, factor) in enumerate(intervals):
        if not (math.isfinite(start) and math.isfinite(factor) and factor > 0):
            raise InputError(f"exposure interval {k + 1}: start {start!r} and factor {factor!r} must be finite, "
                             "the factor positive")
        if end is not None and not end > start:
            raise InputError(f"exposure interval {k + 1}: it ends ({end:g} h) before it starts ({start:g} h)")
        checked.append((float(start), math.inf if end is None else float(end), float(factor)))
    if EXPOSURE in individual.covariates:
        raise InputError(f"individual {individual.id:g} already has an {EXPOSURE} column")
    lo, hi = float(individual.time[0]), float(individual.time[-1])
    bounds = sorted({t for s, e, _ in checked for t in (s, e) if lo < t < hi and math.isfinite(t)}
                    - set(individual.time.tolist()))
    n_new = len(bounds)
    new_t = np.asarray(bounds, dtype=np.float64)
    time = np.concatenate([new_t, individual.time])
    order = np.lexsort((np.r_[np.zeros(n_new), np.arange(1, len(individual) + 1)], time))

    def cat(old: np.ndarray, fill: float) -> np.ndarray:  # type: ignore[type-arg]
        return np.concatenate([np.full(n_new, fill, dtype=old.dtype), old])[order]

    follow = np.searchsorted(individual.time, new_t, side="right")  # the record after each new one (for messages)
    rows = np.concatenate([individual.rows[np.minimum(follow, len(individual) - 1)], individual.rows])[order]
    time = time[order]
    multiplier = np.ones(time.size)
    for s, e, f in checked:
        multiplier[(time > s) & (time <= e)] *= f
    covariates: dict[str, np.ndarray] = {}  # type: ignore[type-arg]
    for name, v in individual.covariates.items():
        # a new record carries the covariates of the record before it (nothing is observed there)
        prev = np.maximum(follow - 1, 0)
        extra = np.full(n_new, np.nan) if name in ("DV", "BLQ", "LLOQ") else v[prev]
        covariates[name] = np.concatenate([extra, v])[order]
    covariates[EXPOSURE] = multiplier
    return Individual(id=individual.id, rows=rows, time=time, evid=cat(individual.evid, 2),
                      amt=cat(individual.amt, 0.0), rate=cat(individual.rate, 0.0), ii=cat(individual.ii, 0.0),
                      addl=cat(individual.addl, 0), ss=cat(individual.ss, 0), cmt=cat(individual.cmt, 0),
                      mdv=cat(individual.mdv, 1), covariates=covariates)
