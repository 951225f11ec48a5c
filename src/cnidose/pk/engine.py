"""The one ``simulate`` entry point: records in, predictions out.

The engine walks an individual's records in data order (PREDPP's order). For
record i it

1. advances the system from the previous record's time to TIME(i) with the
   parameters of record i (the interval that ends at a record uses that
   record's covariates), applying on the way every pending dose "atom"
   (a bolus, or the start/stop of a zero-order input) whose time falls in
   (TIME(i-1), TIME(i)] -- so an additional or lagged dose that lands on a
   record's time is given before that record;
2. applies the record: EVID 3/4 and SS=1 zero the system and cancel pending
   doses; SS=1/2 add the steady state of the regimen; a dose becomes atoms
   (with ALAG, F, modelled rate/duration, and its ADDL copies), those due now
   applied at once;
3. reports A(cmt)/S(cmt): the observation compartment for EVID 0 (CMT, or
   the default), the default observation compartment otherwise.

Everything is vectorised over a batch of B parameter sets (individuals
sharing a schedule, or draws for one individual): parameters are arrays of
shape (B, R). Lag and duration may differ across the batch; the atoms then
carry one time per batch member.

Steady state (SS=1/2) for linear systems is exact: the last K0 doses of the
regimen are replayed explicitly (so inputs still running or still lagged at
the record time continue afterwards) and all earlier doses are summed as a
geometric series, (I - exp(K II))^-1. For nonlinear systems the regimen is
replayed until the state stops changing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import ceil
from typing import Literal, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cnidose.errors import DataError, NumericalError
from cnidose.pk.events import Individual
from cnidose.pk.solvers import EigenSolver, ExpmSolver, OdeSolver, Solver
from cnidose.pk.structure import LinearStructure, OdeStructure

__all__ = ["Method", "Simulation", "simulate", "simulate_many"]

FloatArray = NDArray[np.float64]
Method = Literal["auto", "closed", "expm", "ode"]

_BOLUS = 0
_RATE = 1


@dataclass(frozen=True, slots=True)
class Simulation:
    """Result of :func:`simulate`.

    Attributes
    ----------
    prediction : ndarray, shape (B, R)
        A(cmt)/S(cmt) at every record (concentration when S is a volume).
    amounts : ndarray, shape (B, R, n), or None
        Every compartment's amount after each record, when requested.
    method : str
        ``"eigen"``, ``"expm"`` or ``"ode"``: the solution actually used
        ("eigen"/"expm" are closed forms; a batch needing both reports "expm").
    """

    prediction: FloatArray
    amounts: FloatArray | None
    method: str


@dataclass(slots=True)
class _Atom:
    time: FloatArray  # (B,), inf where the atom does not exist for that batch member
    cmt: int  # 0-based
    kind: int  # _BOLUS (amount) or _RATE (rate change)
    value: FloatArray  # (B,)
    lo: float = np.inf  # earliest and latest finite time (scalar checks avoid touching arrays)
    hi: float = -np.inf
    uniform: bool = False  # every batch member has the same, finite time

    def __post_init__(self) -> None:
        finite = self.time[np.isfinite(self.time)]
        if finite.size:
            self.lo, self.hi = float(finite.min()), float(finite.max())
            self.uniform = finite.size == self.time.size and self.lo == self.hi


class _State:
    """Mutable state of one simulation run (internal to the engine)."""

    def __init__(self, solver: Solver, batch: int, n: int):
        self.solver = solver
        self.y = np.zeros((batch, n))
        self.r = np.zeros((batch, n))  # natural-coordinate input rates
        self.ry: FloatArray | None = None  # internal-coordinate input rates
        self.pending: list[_Atom] = []
        self.batch = batch

    def reset(self) -> None:
        self.y = np.zeros_like(self.y)
        self.r = np.zeros_like(self.r)
        self.ry = None
        self.pending = []

    def switch(self, solver: Solver) -> None:
        x = self.solver.to_natural(self.y)
        self.solver = solver
        self.y = solver.to_internal(x)
        self.ry = solver.to_internal(self.r) if self.ry is not None else None

    def apply(self, atom: _Atom, mask: NDArray[np.bool_] | None) -> None:
        val = atom.value if mask is None else np.where(mask, atom.value, 0.0)
        u = self.solver.unit(atom.cmt)
        if atom.kind == _BOLUS:
            self.y = self.y + val[:, None] * u
        else:
            self.r[:, atom.cmt] += val
            inc = val[:, None] * u
            self.ry = inc.copy() if self.ry is None else self.ry + inc

    def step(self, dt: float | FloatArray) -> None:
        if np.ndim(dt) == 0:
            if dt > 0:
                self.y = self.solver.propagate(self.y, self.ry, float(dt))
        elif np.any(dt > 0):
            self.y = self.solver.propagate(self.y, self.ry, dt)

    def advance(self, t0: float, t1: float) -> None:
        """Advance from t0 to t1, applying pending atoms in (t0, t1]."""
        due = [a for a in self.pending if a.hi > t0 and a.lo <= t1]
        if not due:
            self.step(t1 - t0)
        elif all(a.uniform for a in due):  # every batch member has the same atom times
            cur = t0
            for a in sorted(due, key=lambda a: a.lo):
                self.step(a.lo - cur)
                cur = max(cur, a.lo)
                self.apply(a, None)
            self.step(t1 - cur)
        else:
            T = np.stack([np.where((a.time > t0) & (a.time <= t1), a.time, np.inf) for a in due], axis=1)
            order = np.argsort(T, axis=1, kind="stable")
            rows = np.arange(self.batch)
            cur_v = np.full(self.batch, t0)
            for j in range(T.shape[1]):
                idx = order[:, j]
                tj = T[rows, idx]
                act = np.isfinite(tj)
                if not act.any():
                    break
                self.step(np.where(act, tj - cur_v, 0.0))
                cur_v = np.where(act, tj, cur_v)
                for m in np.unique(idx[act]):
                    self.apply(due[int(m)], act & (idx == m))
            self.step(t1 - cur_v)
        self.pending = [a for a in self.pending if a.hi > t1]


def _as_batch(params: Mapping[str, ArrayLike], n_records: int) -> tuple[dict[str, FloatArray], int]:
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    batch = 1
    for k, a in arrays.items():
        if a.ndim == 2:
            if a.shape[1] not in (1, n_records):
                raise ValueError(f"parameter {k} has {a.shape[1]} records, expected 1 or {n_records}")
            if batch not in (1, a.shape[0]):
                raise ValueError(f"parameter {k} has batch {a.shape[0]}, others {batch}")
            batch = a.shape[0]
        elif a.ndim == 1 and a.shape[0] != n_records:
            raise ValueError(f"parameter {k} has {a.shape[0]} values, expected {n_records} (one per record)")
        elif a.ndim > 2:
            raise ValueError(f"parameter {k} must be scalar, (R,) or (B, R)")
    out = {k: np.broadcast_to(a if a.ndim != 1 else a[None, :], (batch, n_records)) for k, a in arrays.items()}
    return out, batch


def simulate(
    structure: LinearStructure | OdeStructure,
    individual: Individual,
    params: Mapping[str, ArrayLike],
    *,
    method: Method = "auto",
    return_amounts: bool = False,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> Simulation:
    """Predict every record of ``individual`` for a batch of parameter sets.

    Parameters
    ----------
    structure : LinearStructure or OdeStructure
        The compartmental system.
    individual : Individual
        Validated records (:func:`cnidose.pk.events.split_individuals`).
    params : mapping of str to array-like
        Each value a scalar, an array of shape (R,) (one per record), (B, 1)
        (one per batch member) or (B, R) (per batch member and record): the structure's rate
        parameters, and optionally ``F<n>``, ``ALAG<n>`` (h), ``R<n>``,
        ``D<n>`` (h), ``S<n>`` per compartment n.
    method : {"auto", "closed", "expm", "ode"}
        "auto" and "closed" pick the closed form for linear structures
        (eigen-decomposition, or the matrix exponential where eigenvalues
        repeat) and the ODE solver otherwise; "expm" and "ode" force one.
    return_amounts : bool
        Also return every compartment's amount at every record.
    rtol, atol : float
        ODE tolerances.

    Returns
    -------
    Simulation

    Raises
    ------
    DataError
        A record refers to a compartment the model lacks, or a dosing
        parameter (F, ALAG, R, D, S) is invalid at a dose record.

    Examples
    --------
    >>> from cnidose.pk.events import split_individuals
    >>> from cnidose.pk.structure import one_compartment
    >>> ind, = split_individuals({"ID": [1, 1], "TIME": [0, 24], "AMT": [100, 0], "CMT": [1, 2]})
    >>> sim = simulate(one_compartment(), ind, {"CL": 1.1, "V": 20, "KA": 1.5, "S2": 20})
    >>> round(float(sim.prediction[0, 1]), 4)  # mg/L at 24 h after 100 mg
    1.3865
    """
    R = len(individual)
    P, B = _as_batch(params, R)
    n = structure.n
    _check_compartments(structure, individual)
    missing = [p for p in structure.rate_parameters if p not in P]
    if missing:
        raise DataError(f"model parameter(s) {', '.join(missing)} not supplied", column=missing[0])

    rate_names = structure.rate_parameters
    _check_parameters(structure, individual, P)
    used_method = "ode"

    def make_solver(i: int) -> Solver:
        nonlocal used_method
        pi = {k: P[k][:, i] for k in rate_names}
        if isinstance(structure, OdeStructure) or method == "ode":
            s: Solver = OdeSolver(structure, B, rtol=rtol, atol=atol)
            used_method = "ode"
        else:
            if method in ("auto", "closed"):
                es = EigenSolver(structure, B)
                es.set_params(pi)
                if es.usable:
                    if used_method != "expm":
                        used_method = "eigen"
                    return es
            s = ExpmSolver(structure, B)
            used_method = "expm"
        s.set_params(pi)
        return s

    if R == 0:
        return Simulation(np.zeros((B, 0)), np.zeros((B, 0, n)) if return_amounts else None, "none")
    changed = np.zeros(R, dtype=bool)
    for name in rate_names:
        a = P[name]
        if a.strides[1] == 0:  # one value for every record (a broadcast view): nothing changes
            continue
        changed[1:] |= np.any(a[:, 1:] != a[:, :-1], axis=0)
    st = _State(make_solver(0), B, n)
    out = np.empty((B, R))
    amounts = np.empty((B, R, n)) if return_amounts else None
    t_prev = float(individual.time[0])
    ones = np.ones(B)
    zeros = np.zeros(B)
    for i in range(R):
        if changed[i]:
            st.switch(make_solver(i))
        t = float(individual.time[i])
        st.advance(t_prev, t)
        evid = int(individual.evid[i])
        ss = int(individual.ss[i])
        row = int(individual.rows[i])
        if evid in (3, 4) or (evid in (1, 4) and ss == 1):
            st.reset()
        if evid in (1, 4):
            c = (int(individual.cmt[i]) or structure.default_dose) - 1
            cn = c + 1

            def dose_param(name: str, default: FloatArray, *, _cn: int = cn, _i: int = i,
                           _row: int = row) -> FloatArray:
                key = f"{name}{_cn}"
                v = P[key][:, _i] if key in P else default
                if not np.all(np.isfinite(v)):
                    raise DataError(f"{key} is not finite at this dose record", row=_row, column=key)
                return v

            F = dose_param("F", ones)
            L = dose_param("ALAG", zeros)
            if np.any(F < 0):
                raise DataError(f"bioavailability F{cn} must be >= 0, got {F.min():g}", row=row, column=f"F{cn}")
            if np.any(L < 0):
                raise DataError(f"lag time ALAG{cn} must be >= 0, got {L.min():g}", row=row, column=f"ALAG{cn}")
            amt = float(individual.amt[i])
            rate = float(individual.rate[i])
            ii = float(individual.ii[i])
            amount = F * amt
            rho: FloatArray | None
            dur: FloatArray | None
            if rate == 0:
                rho, dur = None, None
            elif rate > 0:
                rho = np.full(B, rate)
                dur = amount / rate
            elif rate == -1:
                rho = dose_param("R", zeros)
                if np.any(rho <= 0):
                    raise DataError(f"RATE=-1 needs a modelled rate R{cn} > 0, got {rho.min():g}",
                                    row=row, column=f"R{cn}")
                dur = amount / rho
            else:
                dur = dose_param("D", zeros)
                if np.any(dur <= 0):
                    raise DataError(f"RATE=-2 needs a modelled duration D{cn} > 0, got {dur.min():g}",
                                    row=row, column=f"D{cn}")
                rho = amount / dur
            const_inf = ss == 1 and amt == 0 and rate > 0 and ii == 0
            if const_inf:
                # Constant infusion at steady state; it stops at the record time
                # (NONMEM help, "SS dose event record").
                st.y = st.y + st.solver.constant_infusion(rate * np.asarray(st.solver.unit(c)))
            else:
                if ss in (1, 2):
                    _add_steady_state(st, structure, t, c, amount, L, ii, rho, dur)
                for k in range(int(individual.addl[i]) + 1):
                    _schedule(st, t + k * ii + L, c, amount, rho, dur, now=t)
        obs_c = (int(individual.cmt[i]) if evid == 0 and individual.cmt[i] > 0 else structure.default_obs) - 1
        key = f"S{obs_c + 1}"
        scale = P[key][:, i] if key in P else ones
        out[:, i] = st.solver.observe(st.y, obs_c) / scale
        if amounts is not None:
            amounts[:, i, :] = st.solver.to_natural(st.y)
        t_prev = t
    return Simulation(out, amounts, used_method)


def _schedule(st: _State, start: FloatArray, c: int, amount: FloatArray,
              rho: FloatArray | None, dur: FloatArray | None, *, now: float) -> None:
    """Queue one dose starting at ``start`` (B,); apply the part due at ``now``."""
    atoms: list[_Atom]
    if rho is None or dur is None:
        atoms = [_Atom(start, c, _BOLUS, amount)]
    else:
        live = dur > 0
        t_on = np.where(live, start, np.inf)
        atoms = [_Atom(t_on, c, _RATE, rho.copy()), _Atom(t_on + dur, c, _RATE, -rho)]
    for a in atoms:
        due = a.time == now
        if due.any():
            st.apply(a, due)
        if a.hi > now:
            st.pending.append(a)


def _add_steady_state(st: _State, structure: LinearStructure | OdeStructure, t: float, c: int,
                      amount: FloatArray, L: FloatArray, ii: float,
                      rho: FloatArray | None, dur: FloatArray | None) -> None:
    """Add the pre-dose steady state of the regimen (dose every ``ii``) at time ``t``."""
    solver = st.solver
    span = L if dur is None else L + dur
    k0 = max(1, ceil(float(np.max(span)) / ii))

    def replay(n_doses: int) -> _State:
        sub = _State(solver, st.batch, structure.n)
        start = t - n_doses * ii - 1.0
        for k in range(1, n_doses + 1):
            _schedule(sub, t + L - k * ii, c, amount, rho, dur, now=start)
        sub.advance(start, t)
        return sub

    if solver.linear:
        sub = replay(k0)
        # Doses k > k0 are complete by t: w is dose k0's trace at t; the rest
        # is the geometric series sum_{j>=1} exp(K j II) w.
        u = np.asarray(solver.unit(c))
        if rho is None or dur is None:
            w = solver.propagate(amount[:, None] * u, None, k0 * ii - L)
        else:
            w = solver.propagate(solver.propagate(np.zeros_like(u), rho[:, None] * u, dur), None, k0 * ii - L - dur)
        tail = solver.geometric(w, ii) - w
        y_ss = sub.y + tail
    else:
        n_doses = max(16, k0)
        prev = replay(n_doses)
        while True:
            n_doses *= 2
            sub = replay(n_doses)
            a, b = solver.to_natural(sub.y), solver.to_natural(prev.y)
            # converged when the two replays agree to 1e-9 of each amount or of the member's largest amount: the
            # integrator's own error over thousands of doses is of that order relative to the largest amount, so
            # a tiny amount (a depot just before a dose) cannot be asked to agree to 1e-9 of itself
            scale = np.max(np.abs(a), axis=-1, keepdims=True)
            if np.all(np.abs(a - b) <= 1e-9 * (np.abs(a) + scale) + 1e-12):
                break
            if n_doses > 4096:
                raise NumericalError("steady state not reached after 4096 doses; check elimination parameters")
            prev = sub
        y_ss = sub.y
    st.y = st.y + y_ss
    if np.any(sub.r != 0):
        st.r += sub.r
        st.ry = sub.ry if st.ry is None else (st.ry + sub.ry if sub.ry is not None else st.ry)
    st.pending.extend(sub.pending)


def _check_parameters(structure: LinearStructure | OdeStructure, ind: Individual,
                      P: Mapping[str, FloatArray]) -> None:
    """Refuse parameters no solution can use, naming the first record that has one.

    Rate parameters of a linear structure (clearances, volumes, rate
    constants) must be finite and >= 0; those of an ODE structure finite;
    every scale ``S<n>`` finite and > 0.
    """
    linear = isinstance(structure, LinearStructure)
    checks = [(k, "finite and >= 0" if linear else "finite") for k in structure.rate_parameters]
    checks += [(k, "finite and > 0") for k in P if k[:1] == "S" and k[1:].isdigit()]
    for name, rule in checks:
        a = P[name]
        # Broadcast views (a value shared by records or batch members) are checked once.
        a = a[:1] if a.strides[0] == 0 else a
        a = a[:, :1] if a.strides[1] == 0 else a
        bad = ~np.isfinite(a)
        if rule == "finite and >= 0":
            bad |= a < 0
        elif rule == "finite and > 0":
            bad |= a <= 0
        if bad.any():
            b, i = np.argwhere(bad)[0]
            raise DataError(f"model parameter {name} must be {rule}, got {a[b, i]:g}"
                            + (f" (batch member {b + 1})" if a.shape[0] > 1 else ""),
                            row=int(ind.rows[i]), column=name)


def _check_compartments(structure: LinearStructure | OdeStructure, ind: Individual) -> None:
    bad = np.flatnonzero(ind.cmt > structure.n)
    if bad.size:
        j = int(bad[0])
        raise DataError(
            f"compartment {int(ind.cmt[j])} does not exist; the model has "
            + ", ".join(f"{k + 1}={nm}" for k, nm in enumerate(structure.compartments)),
            row=int(ind.rows[j]), column="CMT")


def simulate_many(
    structure: LinearStructure | OdeStructure,
    individuals: Sequence[Individual],
    params: Sequence[Mapping[str, ArrayLike]],
    *,
    method: Method = "auto",
) -> list[Simulation]:
    """Simulate many individuals, batching those that share an event schedule.

    Individuals whose records (times, doses, compartments) are identical are
    stacked into one batch -- the common case of a population simulation, and
    of draws for one patient -- so the cost per individual falls with batch
    size. Parameters are per individual, as in :func:`simulate` (covariates
    already applied). Results come back in input order, without amounts.
    """
    if len(individuals) != len(params):
        raise ValueError("one parameter mapping per individual is needed")
    groups: dict[bytes, list[int]] = {}
    for k, ind in enumerate(individuals):
        groups.setdefault(ind.schedule_key(), []).append(k)
    results: list[Simulation | None] = [None] * len(individuals)
    for members in groups.values():
        first = individuals[members[0]]
        R = len(first)
        batches = [_as_batch(params[k], R) for k in members]
        names = set(batches[0][0])
        if len(members) == 1 or any(set(b[0]) != names for b in batches):
            for k in members:
                results[k] = simulate(structure, individuals[k], params[k], method=method)
            continue
        stacked = {nm: np.concatenate([b[0][nm] for b in batches], axis=0) for nm in names}
        try:
            sim = simulate(structure, first, stacked, method=method)
        except DataError:
            # The batch carries the first member's rows: re-run one by one so the
            # message names the individual (and row) at fault.
            for k in members:
                simulate(structure, individuals[k], params[k], method=method)
            raise
        start = 0
        for k, (_, b) in zip(members, batches, strict=True):
            results[k] = Simulation(sim.prediction[start:start + b], None, sim.method)
            start += b
    assert all(r is not None for r in results)
    return cast(list[Simulation], results)
