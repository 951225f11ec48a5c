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
   (the dose and its ADDL copies, each at its time plus the record's ALAG),
   those due now applied at once;
3. reports A(cmt)/S(cmt): the observation compartment for EVID 0 (CMT, or
   the default), the default observation compartment otherwise.

Which record's dose parameters a dose takes (``dose_values``). NONMEM's rule,
the default: F (and a modelled duration D or rate R) are those "in effect at
the time the dose is actually introduced" (NONMEM help, "DOSE EVENT RECORD");
PK is called with each event record and not at the times lagged or additional
doses enter (CALLFL=-1, the default), so a dose entering in (TIME(i-1),
TIME(i)] takes record i's values. ALAG is the dose record's, for the dose and
its additional doses ("even if ALAGn changes value with a subsequent event
record"). A running RATE=-1 input takes the R of every later record and ends
when its amount has entered. ``dose_values="dose-record"`` takes F, R and D
from the dose's own record instead, fixed for the dose and its additional
doses (mrgsolve's reading).

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
from cnidose.pk.eigenpath import decompose_segments, predict_records
from cnidose.pk.events import Individual
from cnidose.pk.solvers import EigenSolver, ExpmSolver, GammaDose, OdeSolver, Solver, gamma_support
from cnidose.pk.structure import GammaInput, LinearStructure, OdeStructure

__all__ = ["DoseValues", "Method", "Simulation", "simulate", "simulate_many"]

FloatArray = NDArray[np.float64]
Method = Literal["auto", "closed", "expm", "ode"]

DoseValues = Literal["nonmem", "dose-record"]

_BOLUS = 0  # an amount AMT, scaled by F when it enters
_START = 1  # the start of a zero-order input of AMT (RATE > 0, -1 or -2): F, R, D resolved when it starts
_RATE = 2  # a change of input rate (the end of an input)


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
    """A dose event waiting to happen: one time per batch member (inf where it does not happen)."""

    time: FloatArray  # (B,), inf where the atom does not (or no longer) exist for that batch member
    cmt: int  # 0-based
    kind: int  # _BOLUS, _START or _RATE
    value: FloatArray  # (B,): AMT (_BOLUS, _START) or the rate change (_RATE)
    rate: float = 0.0  # _START: the RATE data item (> 0 given, -1 modelled rate, -2 modelled duration)
    rec: int = -1  # record whose F/R/D apply; -1: the record ending the interval in which the atom happens
    src: int = 0  # the dose record (for messages)
    lo: float = np.inf  # earliest and latest finite time (scalar checks avoid touching arrays)
    hi: float = -np.inf
    uniform: bool = False  # every batch member has the same, finite time

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        finite = self.time[np.isfinite(self.time)]
        if finite.size:
            self.lo, self.hi = float(finite.min()), float(finite.max())
            self.uniform = finite.size == self.time.size and self.lo == self.hi
        else:
            self.lo, self.hi, self.uniform = np.inf, -np.inf, False

    def consume(self, mask: NDArray[np.bool_] | None) -> None:
        """Mark the atom as happened for the members in ``mask`` (all when None)."""
        if mask is None:
            self.time = np.full_like(self.time, np.inf)
        else:
            self.time = np.where(mask, np.inf, self.time)
        self.refresh()


@dataclass(slots=True)
class _Running:
    """A zero-order input at a modelled rate (RATE=-1) now running: NONMEM re-reads its rate at every record."""

    stop: _Atom  # its end; time and value are updated when the rate changes
    cmt: int
    rho: FloatArray  # (B,) the rate now in force (0 where not running)
    src: int


def no_modelled_input(key: str, row: int) -> DataError:
    """The error for a dose at RATE -1 (-2) into a compartment whose ``R<n>`` (``D<n>``), ``key``, the model does
    not define."""
    need = "RATE=-1 needs a modelled rate" if key.startswith("R") else "RATE=-2 needs a modelled duration"
    return DataError(f"{need} {key}; the model defines none", row=row, column=key)


class _DoseParameters:
    """Per-record dose parameters (F, ALAG, R, D of each compartment), checked where they are used."""

    def __init__(self, P: Mapping[str, FloatArray], rows: NDArray[np.int64], batch: int):
        self.P = P
        self.rows = rows
        self.ones = np.ones(batch)
        self.zeros = np.zeros(batch)

    def get(self, name: str, cmt: int, rec: int, *, src: int, mask: NDArray[np.bool_] | None = None) -> FloatArray:
        """``<name><cmt+1>`` at record ``rec`` (a (B,) array); a DataError names the record and the dose."""
        key = f"{name}{cmt + 1}"
        a = self.P.get(key)
        if a is None:
            if name in ("R", "D"):
                raise no_modelled_input(key, int(self.rows[src]))
            return self.ones if name == "F" else self.zeros
        v = a[:, rec]
        w = v if mask is None else v[mask]
        rule = {"F": (w >= 0, ">= 0"), "ALAG": (w >= 0, ">= 0"), "R": (w > 0, "> 0"), "D": (w > 0, "> 0")}
        ok, text = rule[name]
        if not (np.all(np.isfinite(w)) and np.all(ok)):
            bad = w[~(np.isfinite(w) & ok)]
            what = {"F": "bioavailability", "ALAG": "lag time", "R": "RATE=-1 needs a modelled rate",
                    "D": "RATE=-2 needs a modelled duration"}[name]
            where = "" if rec == src else f" (the value in force when the dose of row {int(self.rows[src])} enters)"
            raise DataError(f"{what} {key} must be finite and {text}, got {float(bad[0]):g}{where}",
                            row=int(self.rows[rec]), column=key)
        return v


class _State:
    """Mutable state of one simulation run (internal to the engine)."""

    def __init__(self, solver: Solver, batch: int, n: int, doses: _DoseParameters, *, retime: bool,
                 gamma: GammaInput | None = None):
        self.solver = solver
        self.gamma = gamma  # bolus doses into gamma.cmt enter at a gamma-density rate (GammaInput)
        self.gammas: list[GammaDose] = []
        self.y = np.zeros((batch, n))
        self.r = np.zeros((batch, n))  # natural-coordinate input rates
        self.ry: FloatArray | None = None  # internal-coordinate input rates
        self.pending: list[_Atom] = []
        self.running: list[_Running] = []
        self.batch = batch
        self.doses = doses
        self.retime = retime  # NONMEM: a running modelled-rate input takes each record's R
        self.rec = 0  # the record whose interval is being advanced
        self.rec_time = 0.0  # a steady-state replay: the time on its own clock that stands for the record's

    def reset(self) -> None:
        self.y = np.zeros_like(self.y)
        self.r = np.zeros_like(self.r)
        self.ry = None
        self.pending = []
        self.running = []
        self.gammas = []

    def switch(self, solver: Solver) -> None:
        x = self.solver.to_natural(self.y)
        self.solver = solver
        # copies: a solver's internal coordinates may be the natural ones (the same array), and the state's
        # arrays must never share memory with one another or with a record's parameters
        self.y = np.array(solver.to_internal(x), dtype=np.float64)
        self.ry = np.array(solver.to_internal(self.r), dtype=np.float64) if self.ry is not None else None

    def add_rate(self, cmt: int, delta: FloatArray) -> None:
        """Change the input rate of compartment ``cmt`` by ``delta`` (B,), without touching shared arrays."""
        r = self.r.copy()
        r[:, cmt] += delta
        self.r = r
        inc = delta[:, None] * self.solver.unit(cmt)
        self.ry = np.array(inc) if self.ry is None else self.ry + inc

    def apply(self, atom: _Atom, mask: NDArray[np.bool_] | None, time: float | FloatArray) -> None:
        """Give a bolus or a rate change, at ``time``, to the members in ``mask`` (all when None)."""
        c = atom.cmt
        if atom.kind == _RATE:
            self.add_rate(c, atom.value if mask is None else np.where(mask, atom.value, 0.0))
            return
        rec = self.rec if atom.rec < 0 else atom.rec
        amount = self.doses.get("F", c, rec, src=atom.src, mask=mask) * atom.value
        val = amount if mask is None else np.where(mask, amount, 0.0)
        if self.gamma is not None and c == self.gamma.cmt - 1:
            self.gammas.append(self._gamma_dose(c, val, rec, atom.src, time, mask))
            return
        self.y = self.y + val[:, None] * self.solver.unit(c)

    def _gamma_dose(self, c: int, amount: FloatArray, rec: int, src: int, time: float | FloatArray,
                    mask: NDArray[np.bool_] | None) -> GammaDose:
        """A bolus into the gamma-input compartment: its shape n + 1 and rate (n + 1) / mtt at record ``rec``."""
        g = self.gamma
        assert g is not None
        vals = []
        for name, low, text in ((g.n, 0.0, ">= 0"), (g.mtt, None, "> 0")):
            a = self.doses.P.get(name)
            if a is None:
                raise DataError(f"the gamma (transit) input needs {name}; the model defines none", column=name)
            v = a[:, rec]
            w = v if mask is None else v[mask]
            good = np.isfinite(w) & ((w >= 0) if low is not None else (w > 0))
            if not np.all(good):
                bad = w[~good]
                where = ("" if rec == src else
                         f" (the value in force when the dose of row {int(self.doses.rows[src])} enters)")
                raise DataError(f"transit input parameter {name} must be finite and {text}, got {float(bad[0]):g}"
                                f"{where}", row=int(self.doses.rows[rec]), column=name)
            vals.append(np.where(np.isfinite(v) & (v > 0 if low is None else v >= 0), v, 1.0))
        shape = vals[0] + 1.0
        rate = shape / vals[1]
        start = np.broadcast_to(np.asarray(time, dtype=np.float64), (self.batch,)).copy()
        return GammaDose(start, np.array(amount, dtype=np.float64), shape, rate, gamma_support(shape, rate), c)

    def start(self, atom: _Atom, mask: NDArray[np.bool_]) -> list[_Atom]:
        """A zero-order input starting for the members in ``mask``: its rate and duration are those of the
        record whose values it takes, so it becomes a rate change at its start and another at its end."""
        rec = self.rec if atom.rec < 0 else atom.rec
        amount = self.doses.get("F", atom.cmt, rec, src=atom.src, mask=mask) * atom.value
        rho, dur = _rate_duration(self.doses, atom, amount, rec, mask)
        live = mask & (dur > 0)
        on = _Atom(np.where(live, atom.time, np.inf), atom.cmt, _RATE, rho, src=atom.src)
        off = _Atom(np.where(live, atom.time + dur, np.inf), atom.cmt, _RATE, -rho, src=atom.src)
        if atom.rate == -1 and self.retime and live.any():
            self.running.append(_Running(off, atom.cmt, np.where(live, rho, 0.0), atom.src))
        return [on, off]

    def retime_running(self, t: float, rec: int) -> None:
        """NONMEM: a modelled rate R applies to the interval ending at each record, so a running RATE=-1
        input changes rate at ``t`` (the start of record ``rec``'s interval) and ends when its amount is in."""
        keep = []
        for run in self.running:
            active = np.isfinite(run.stop.time) & (run.rho > 0)
            if not active.any():
                continue
            keep.append(run)
            R = self.doses.get("R", run.cmt, rec, src=run.src, mask=active)
            changed = active & (run.rho != R)
            if not changed.any():
                continue
            remaining = run.rho * (run.stop.time - t)
            with np.errstate(invalid="ignore", divide="ignore"):
                end = t + remaining / R
            self.add_rate(run.cmt, np.where(changed, R - run.rho, 0.0))
            run.stop.time = np.where(changed, end, run.stop.time)
            run.stop.value = np.where(changed, -R, run.stop.value)
            run.stop.refresh()
            run.rho = np.where(changed, R, run.rho)
        self.running = keep

    def step(self, dt: float | FloatArray, t_from: float | FloatArray) -> None:
        """Advance by ``dt`` (scalar or (B,)) from ``t_from``, the time the step starts (the gamma inputs')."""
        if np.ndim(dt) == 0:
            if not dt > 0:
                return
            dt = float(dt)
        elif not np.any(dt > 0):
            return
        if self.gammas:
            self.y = self.solver.propagate_gamma(self.y, self.ry, dt, t_from, self.gammas)
        else:
            self.y = self.solver.propagate(self.y, self.ry, dt)

    def advance(self, t0: float, t1: float, rec: int) -> None:
        """Advance from t0 to t1 with record ``rec``'s parameters, giving every pending atom due by t1.

        Atoms happen in time order (per batch member). A zero-order input that starts by t1 takes the values
        of record ``rec`` (or its own fixed record), so its start and end are known before stepping.
        """
        self.rec = rec
        if self.gammas:  # forget the inputs that are over
            self.gammas = [g for g in self.gammas if np.any((g.amount != 0) & (t0 - g.start < g.end))]
        due = [a for a in self.pending if a.lo <= t1]
        if not due:
            self.step(t1 - t0, t0)
            return
        if any(a.kind == _START for a in due):
            expanded: list[_Atom] = []
            for a in due:
                if a.kind != _START:
                    expanded.append(a)
                    continue
                m = a.time <= t1
                parts = self.start(a, m)
                a.consume(None if m.all() else m)
                self.pending.extend(parts)
                expanded.extend(parts)
            due = [a for a in expanded if a.lo <= t1]
        if all(a.uniform for a in due):  # one time for every batch member: scalar steps, cached propagators
            cur = t0
            for a in sorted(due, key=lambda a: a.lo):
                self.step(a.lo - cur, cur)
                cur = max(cur, a.lo)
                a.consume(None)
                self.apply(a, None, cur)
            self.step(t1 - cur, cur)
        else:
            T = np.stack([np.where(a.time <= t1, a.time, np.inf) for a in due], axis=1)
            order = np.argsort(T, axis=1, kind="stable")
            rows = np.arange(self.batch)
            cur_v = np.full(self.batch, t0)
            for j in range(T.shape[1]):
                idx = order[:, j]
                tj = T[rows, idx]
                act = np.isfinite(tj)
                if not act.any():
                    break
                self.step(np.where(act, tj - cur_v, 0.0), cur_v)
                cur_v = np.where(act, tj, cur_v)
                for m in np.unique(idx[act]):
                    self.apply(due[int(m)], act & (idx == m), cur_v)
            for a in due:
                a.consume(a.time <= t1)
            self.step(t1 - cur_v, cur_v)
        self.pending = [a for a in self.pending if a.lo < np.inf]


def _rate_duration(doses: _DoseParameters, atom: _Atom, amount: FloatArray, rec: int,
                   mask: NDArray[np.bool_] | None) -> tuple[FloatArray, FloatArray]:
    """Rate and duration of a zero-order input of ``amount``: given RATE, modelled rate R or duration D."""
    if atom.rate > 0:
        rho = np.full_like(amount, atom.rate)
        return rho, amount / atom.rate
    if atom.rate == -1:
        R = doses.get("R", atom.cmt, rec, src=atom.src, mask=mask)
        with np.errstate(invalid="ignore", divide="ignore"):
            return R, np.where(R > 0, amount / np.where(R > 0, R, 1.0), 0.0)
    D = doses.get("D", atom.cmt, rec, src=atom.src, mask=mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(D > 0, amount / np.where(D > 0, D, 1.0), 0.0), D


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


_SPLIT_BATCH = 256  # from this batch size, members that decompose badly are simulated apart


def _subset(P: Mapping[str, FloatArray], mask: NDArray[np.bool_]) -> dict[str, FloatArray]:
    """The parameters of the members ``mask`` selects, (B', R) each, without copying what is broadcast."""
    k = int(np.count_nonzero(mask))
    out = {}
    for name, v in P.items():
        if v.strides[0] == 0:
            base = v[:1]
        elif v.strides[1] == 0:
            base = v[mask, :1]
        else:
            base = v[mask]
        out[name] = np.broadcast_to(base, (k, v.shape[1]))
    return out


def simulate(
    structure: LinearStructure | OdeStructure,
    individual: Individual,
    params: Mapping[str, ArrayLike],
    *,
    method: Method = "auto",
    return_amounts: bool = False,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    dose_values: DoseValues = "nonmem",
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
    dose_values : {"nonmem", "dose-record"}
        Which record's F, R and D a dose takes. "nonmem" (the default, NONMEM's PREDPP): those in force when
        the dose enters -- for a lagged or additional dose, the record that ends the interval it enters in --
        and a running RATE=-1 input takes each later record's R. "dose-record": those of the dose's own record,
        fixed for the dose and its additional doses (mrgsolve's reading). The lag ALAG is always the dose
        record's, and the implied doses of a steady state take the steady-state record's values.

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
            es = None
            if method in ("auto", "closed"):
                es = EigenSolver(structure, B)
                es.set_params(pi)
                if es.usable:
                    if used_method != "expm":
                        used_method = "eigen"
                    return es
            xs = ExpmSolver(structure, B)
            used_method = "expm"
            xs.set_params(pi)
            if es is not None:  # the members that decompose well keep their closed form
                xs.use_decomposition(es)
            return xs
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
    if dose_values not in ("nonmem", "dose-record"):
        raise ValueError(f"dose_values must be 'nonmem' or 'dose-record', not {dose_values!r}")
    nonmem = dose_values == "nonmem"
    if method in ("auto", "closed") and not return_amounts:  # the common case, record by record in eigen-coordinates
        fast = predict_records(structure, individual, P, B, changed, nonmem=nonmem)
        if fast is not None:
            pred, held = fast
            if held.all():
                return Simulation(pred, None, "eigen")
            # the members whose decomposition is ill-conditioned: the general engine (matrix exponential)
            rest = simulate(structure, individual, _subset(P, ~held), method=method, rtol=rtol,
                            atol=atol, dose_values=dose_values)
            pred[~held] = rest.prediction
            return Simulation(pred, None, rest.method)
    if (method in ("auto", "closed") and isinstance(structure, LinearStructure) and structure.gamma is None
            and B >= _SPLIT_BATCH):
        # a large batch where a few members decompose badly: the others on the closed form alone, those few on
        # the matrix exponential (one mixed solver would form V diag(e) W for every member at every step)
        held = decompose_segments(structure, P, B, changed)[2]
        if held.any() and not held.all():
            parts = [simulate(structure, individual, _subset(P, m), method=method, return_amounts=return_amounts,
                              rtol=rtol, atol=atol, dose_values=dose_values) for m in (held, ~held)]
            pred = np.empty((B, R))
            pred[held], pred[~held] = parts[0].prediction, parts[1].prediction
            amounts_all = None
            if return_amounts:
                amounts_all = np.empty((B, R, n))
                amounts_all[held], amounts_all[~held] = parts[0].amounts, parts[1].amounts
            return Simulation(pred, amounts_all, parts[1].method)
    doses = _DoseParameters(P, individual.rows, B)
    st = _State(make_solver(0), B, n, doses, retime=nonmem, gamma=structure.gamma)
    out = np.empty((B, R))
    amounts = np.empty((B, R, n)) if return_amounts else None
    t_prev = float(individual.time[0])
    ones = np.ones(B)
    for i in range(R):
        if changed[i]:
            st.switch(make_solver(i))
        if st.running:
            st.retime_running(t_prev, i)
        t = float(individual.time[i])
        st.advance(t_prev, t, i)
        evid = int(individual.evid[i])
        ss = int(individual.ss[i])
        if evid in (3, 4) or (evid in (1, 4) and ss == 1):
            st.reset()
        if evid in (1, 4):
            c = (int(individual.cmt[i]) or structure.default_dose) - 1
            # NONMEM help, "DOSE EVENT RECORD": the lag in force at the dose record applies to the dose and its
            # additional doses
            L = doses.get("ALAG", c, i, src=i)
            amt = float(individual.amt[i])
            rate = float(individual.rate[i])
            ii = float(individual.ii[i])
            const_inf = ss == 1 and amt == 0 and rate > 0 and ii == 0
            if structure.gamma is not None and c == structure.gamma.cmt - 1 and rate != 0:
                raise DataError("a zero-order input into a compartment whose doses enter through the model's gamma "
                                "(transit) input: give the dose as a bolus (RATE = 0) or into another compartment",
                                row=int(individual.rows[i]), column="RATE")
            if const_inf:
                # Constant infusion at steady state; it stops at the record time
                # (NONMEM help, "SS dose event record").
                st.y = st.y + st.solver.constant_infusion(rate * np.asarray(st.solver.unit(c)))
            else:
                if ss in (1, 2):
                    _add_steady_state(st, structure, t, c, amt, rate, L, ii, i)
                # F, and R or D, of the dose and its additional doses: under "nonmem" those in force when each
                # one enters (the record ending the interval it enters in); under "dose-record" the dose record's
                rec = -1 if nonmem else i
                kind = _BOLUS if rate == 0 else _START
                for k in range(int(individual.addl[i]) + 1):
                    st.pending.append(_Atom(np.array(t + k * ii + L, dtype=np.float64), c, kind,
                                            np.full(B, amt), rate=rate, rec=rec, src=i))
                st.advance(t, t, i)  # what is due now (an unlagged dose) is given before the record is reported
        obs_c = (int(individual.cmt[i]) if evid == 0 and individual.cmt[i] > 0 else structure.default_obs) - 1
        key = f"S{obs_c + 1}"
        scale = P[key][:, i] if key in P else ones
        out[:, i] = st.solver.observe(st.y, obs_c) / scale
        if amounts is not None:
            amounts[:, i, :] = st.solver.to_natural(st.y)
        t_prev = t
    return Simulation(out, amounts, used_method)


def _add_steady_state(st: _State, structure: LinearStructure | OdeStructure, t: float, c: int,
                      amt: float, rate: float, L: FloatArray, ii: float, rec: int) -> None:
    """Add the pre-dose steady state of the regimen (AMT every ``ii``) at time ``t``.

    Every implied dose takes the dose parameters of the steady-state record ``rec`` (NONMEM help,
    "BIOAVAILABILITY FRACTION PARAMETER": F applies to all implied doses leading to the steady state).
    """
    solver = st.solver
    kind = _BOLUS if rate == 0 else _START
    F = st.doses.get("F", c, rec, src=rec)
    amount = F * amt
    rho: FloatArray | None = None
    dur: FloatArray | None = None
    if kind == _START:
        probe = _Atom(np.full(st.batch, t), c, kind, np.full(st.batch, amt), rate=rate, rec=rec, src=rec)
        rho, dur = _rate_duration(st.doses, probe, amount, rec, None)
    gamma = structure.gamma is not None and c == structure.gamma.cmt - 1
    gd = None
    if gamma:  # the implied doses' inputs take the steady-state record's shape and rate
        gd = st._gamma_dose(c, amount, rec, rec, t, None)
        span = L + gd.end
    else:
        span = L if dur is None else L + dur
    k0 = max(1, ceil(float(np.max(span)) / ii))

    def replay(n_doses: int) -> _State:
        sub = _State(solver, st.batch, structure.n, st.doses, retime=st.retime, gamma=st.gamma)
        start = t - n_doses * ii - 1.0
        sub.pending = [_Atom(np.array(t + L - k * ii, dtype=np.float64), c, kind, np.full(st.batch, amt),
                             rate=rate, rec=rec, src=rec) for k in range(1, n_doses + 1)]
        sub.advance(start, t, rec)
        return sub

    if solver.linear:
        sub = replay(k0)
        # Doses k > k0 are complete by t: w is dose k0's trace at t; the rest
        # is the geometric series sum_{j>=1} exp(K j II) w.
        u = np.asarray(solver.unit(c))
        if gd is not None:
            w = amount[:, None] * solver.gamma_input(np.zeros(st.batch), np.broadcast_to(k0 * ii - L, (st.batch,)),
                                                     gd)
        elif rho is None or dur is None:
            w = solver.propagate(amount[:, None] * u, None, k0 * ii - L)
        else:
            w = solver.propagate(solver.propagate(np.zeros_like(u), rho[:, None] * u, dur), None, k0 * ii - L - dur)
        tail = solver.geometric(w, ii) - w
        y_ss = sub.y + tail
    else:
        sub = _cycle_to_steady_state(st, structure, c, amt, rate, L, ii, rec)
        # the replay ran on its own clock (doses at 0, ii, 2 ii, ...): move what is still pending to the record's
        offset = t - sub.rec_time
        for a in sub.pending:
            a.time = a.time + offset
            a.refresh()
        for g in sub.gammas:
            g.start = g.start + offset
        y_ss = sub.y
    st.y = st.y + y_ss
    if np.any(sub.r != 0):
        st.r = st.r + sub.r
        if sub.ry is not None:
            st.ry = np.array(sub.ry) if st.ry is None else st.ry + sub.ry
    st.pending.extend(sub.pending)
    st.running.extend(sub.running)
    st.gammas.extend(sub.gammas)


def _cycle_to_steady_state(st: _State, structure: LinearStructure | OdeStructure, c: int, amt: float, rate: float,
                           L: FloatArray, ii: float, rec: int) -> _State:
    """Give the regimen dose after dose (at 0, ii, 2 ii, ... plus the lag) until the state just before a dose
    stops changing: the steady state of a nonlinear system, or of any system on the ODE path.

    Successive cycles approach the steady state geometrically (ratio r, the contraction of one interval), so
    the distance left after a change d is about d r / (1 - r); the replay stops when that is below 1e-9 of
    the member's largest amount. The returned state's clock ends at ``rec_time``.
    """
    kind = _BOLUS if rate == 0 else _START
    sub = _State(st.solver, st.batch, structure.n, st.doses, retime=st.retime, gamma=st.gamma)
    prev: FloatArray | None = None
    prev_d: FloatArray | None = None
    for j in range(1, 8193):
        sub.pending.append(_Atom(np.array((j - 1) * ii + L, dtype=np.float64), c, kind, np.full(st.batch, amt),
                                 rate=rate, rec=rec, src=rec))
        sub.advance((j - 1) * ii, j * ii, rec)
        x = st.solver.to_natural(sub.y)
        if prev is not None:
            d = np.max(np.abs(x - prev), axis=-1)  # (B,)
            scale = np.max(np.abs(x), axis=-1)
            if prev_d is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    r = np.where(prev_d > 0, d / prev_d, 0.0)
                left = np.where(r < 1, d * r / np.where(r < 1, 1 - r, 1.0), np.inf)
                # (or the change is at the integrator's own noise, ~1e-10 of the largest amount)
                if np.all(((left <= 1e-9 * scale + 1e-12) & (d <= 1e-6 * scale + 1e-12))
                          | (d <= 1e-10 * scale + 1e-12)):
                    sub.rec_time = j * ii
                    return sub
            prev_d = d
        prev = x
    raise NumericalError("steady state not reached after 8192 doses; check elimination parameters")


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
    dose_values: DoseValues = "nonmem",
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
                results[k] = simulate(structure, individuals[k], params[k], method=method, dose_values=dose_values)
            continue
        stacked = {nm: np.concatenate([b[0][nm] for b in batches], axis=0) for nm in names}
        try:
            sim = simulate(structure, first, stacked, method=method, dose_values=dose_values)
        except DataError:
            # The batch carries the first member's rows: re-run one by one so the
            # message names the individual (and row) at fault.
            for k in members:
                simulate(structure, individuals[k], params[k], method=method, dose_values=dose_values)
            raise
        start = 0
        for k, (_, b) in zip(members, batches, strict=True):
            results[k] = Simulation(sim.prediction[start:start + b], None, sim.method)
            start += b
    assert all(r is not None for r in results)
    return cast(list[Simulation], results)
