"""The event engine's fast path: linear systems whose records hold bolus doses, observations and covariate
changes only -- the shape of therapeutic drug monitoring data (a dose every 12 or 24 h, daily covariates, a
trough now and then).

Every distinct parameter set of the individual's records (one per record where a covariate changes) is
decomposed in one batched call, K = V diag(lambda) V^-1 (:class:`cnidose.pk.solvers.EigenSolver`); the state is
then carried record by record in eigen-coordinates: a step is y * exp(lambda dt), a change of parameters
y -> W' V y, a bolus y += F AMT W e_cmt, a prediction V[cmt] . y / S. The semantics are the engine's (NONMEM's):
an interval takes the parameters of the record that ends it; a lagged dose enters with the F of the record
ending the interval it enters in ("nonmem") or of its own record ("dose-record"); a dose at a record enters
before that record's prediction; additional doses (ADDL) enter every II after it. Anything else -- infusions,
steady state, resets, lags that differ between batch members, a decomposition that is ill-conditioned for some
member, a dose parameter the engine would refuse -- is left to the general engine
(:func:`cnidose.pk.engine.simulate`), with its checks and messages. The tests compare the two paths on every
record kind they share.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from math import ceil

import numpy as np
from numpy.typing import NDArray

from cnidose.pk.events import Individual
from cnidose.pk.kernels import linear_kernels
from cnidose.pk.solvers import EigenSolver
from cnidose.pk.structure import LinearStructure, OdeStructure

__all__ = ["decompose_segments", "predict_records"]

FloatArray = NDArray[np.float64]


def predict_records(structure: LinearStructure | OdeStructure, ind: Individual, P: Mapping[str, FloatArray],
                    B: int, changed: NDArray[np.bool_], *, nonmem: bool
                    ) -> tuple[FloatArray, NDArray[np.bool_]] | None:
    """Predictions (B, R) of every record and the batch members they hold (a member whose decomposition is
    ill-conditioned is left to the general engine: NaN, False), or None where the fast path does not apply
    (module docstring)."""
    if not isinstance(structure, LinearStructure) or structure.gamma is not None:
        return None
    ev = ind.evid
    dose = ev == 1
    if np.any((ev != 0) & (ev != 1) & (ev != 2)):
        return None
    if np.any(ind.ss[dose] != 0) or np.any(ind.rate[dose] != 0):
        return None
    R, n = len(ind), structure.n
    dose_c = np.where(ind.cmt > 0, ind.cmt, structure.default_dose) - 1
    obs_c = np.where((ev == 0) & (ind.cmt > 0), ind.cmt, structure.default_obs) - 1
    # dose parameters, checked once: anything the engine would refuse goes to the engine
    F: dict[int, FloatArray] = {}
    lag_of: dict[int, float] = {}  # dose record -> its lag (one for every batch member)
    for c in {int(x) for x in dose_c[dose]}:
        f = P.get(f"F{c + 1}")
        F[c] = np.broadcast_to(1.0, (B, R)) if f is None else f
        if f is not None and not (np.all(np.isfinite(f)) and np.all(f >= 0)):
            return None
        a = P.get(f"ALAG{c + 1}")
        if a is not None:
            rows = np.flatnonzero(dose & (dose_c == c))
            v = a[:, rows]
            if not (np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v == v[:1])):
                return None
            lag_of.update(zip(rows.tolist(), v[0].tolist(), strict=True))
    starts, es, good = decompose_segments(structure, P, B, changed)
    U = starts.size
    segment = np.cumsum(np.isin(np.arange(R), starts)) - 1
    if not good.any():
        return None
    lam = es.lam.reshape(U, B, n)
    V = np.where(good[None, :, None, None], es.V.reshape(U, B, n, n), 0.0)
    W = np.where(good[None, :, None, None], es.W.reshape(U, B, n, n), 0.0)
    lam = np.where(good[None, :, None], lam, 0.0)
    comps = tuple(sorted(F))
    s_comps = tuple(sorted(oc for oc in {int(x) for x in obs_c} if f"S{oc + 1}" in P))
    ops, amts, dts = _cached_schedule(ind, dose, dose_c, obs_c, lag_of, segment, comps, s_comps, nonmem=nonmem)
    Fs = F[comps[0]][None] if len(comps) == 1 else np.stack([F[c] for c in comps])
    if not s_comps:
        Ss = np.ones((1, 1, 1))
    else:
        Ss = P[f"S{s_comps[0] + 1}"][None] if len(s_comps) == 1 else np.stack([P[f"S{c + 1}"] for c in s_comps])
    out = np.empty((B, R))
    module = linear_kernels()
    if module is not None:
        module.run(ops, amts, dts, lam, V, W, Fs, Ss, good, out)
    else:
        _run_numpy(ops, amts, dts, lam, V, W, Fs, Ss, out)
    out[~good] = np.nan
    return out, good


def decompose_segments(structure: LinearStructure, P: Mapping[str, FloatArray], B: int,
                       changed: NDArray[np.bool_]) -> tuple[NDArray[np.int64], EigenSolver, NDArray[np.bool_]]:
    """The records where a parameter segment starts, one decomposition of every segment's parameters for every
    member (segment-major, U * B), and the members that decompose well in every segment."""
    starts = np.flatnonzero(np.concatenate([[True], changed[1:]]))
    es = EigenSolver(structure, starts.size * B)
    es.set_params({k: np.ascontiguousarray(P[k][:, starts].T).reshape(-1) for k in structure.rate_parameters})
    good: NDArray[np.bool_] = es.good.reshape(starts.size, B).all(axis=0)
    return starts, es, good


# operations of the schedule, one row each: (kind, a, b, c)
_STEP = 0  # y *= exp(lambda dts[a])
_DOSE = 1  # y += Fs[a][:, b] * amts[row] * W[:, :, c]   (a: the dose compartment's slot, b: the record of its F)
_SWITCH = 2  # to segment a: y -> W[a] V[previous] y
_OBS = 3  # out[:, a] = V[:, b, :] . y / Ss[c][:, a]   (c = -1: no scale)
# the model kernels' records only (cnidose.pk.tangent): the input rate of compartment a changes by amts[row]; a reset
_RATE = 4
_RESET = 5
_SS = 6  # a bolus regimen's steady state: (SS, compartment, its record, index of II, tau, compartment in dts)
# an infusion regimen's steady state (SS 1 or 2 with RATE > 0 or -2): the state so far set aside (SSB), one dosing
# interval of the periodic input replayed from an empty system (rate changes and steps), then (SSE, amount II) the
# periodic state (I - exp(K II))^-1 y of what the interval left, y, added back; a constant infusion at steady
# state (SS 1, AMT 0, RATE > 0, II 0): (CINF, compartment, amount RATE) adds -K^-1 RATE e_c
_SSB = 7
_SSE = 8
_CINF = 9


_SCHEDULES: OrderedDict[tuple[object, ...], tuple[Individual, NDArray[np.int64], FloatArray, FloatArray]] = \
    OrderedDict()
_SCHEDULES_KEPT = 256
_SCHEDULES_LOCK = threading.Lock()


def _cached_schedule(ind: Individual, dose: NDArray[np.bool_], dose_c: NDArray[np.int64],
                     obs_c: NDArray[np.int64], lag_of: dict[int, float], segment: NDArray[np.int64],
                     comps: tuple[int, ...], s_comps: tuple[int, ...], *, nonmem: bool
                     ) -> tuple[NDArray[np.int64], FloatArray, FloatArray]:
    """:func:`_schedule` with each dose's compartment slot in ``comps`` and each observation's scale slot in
    ``s_comps`` (-1: none), kept for the last few individuals: a fit predicts the same records many times. The
    entry holds the individual itself, so a key's ``id`` cannot be reused while it is kept."""
    key = (id(ind), nonmem, tuple(sorted(lag_of.items())), segment.tobytes(), comps, s_comps)
    with _SCHEDULES_LOCK:
        hit = _SCHEDULES.get(key)
        if hit is not None and hit[0] is ind:
            _SCHEDULES.move_to_end(key)
            return hit[1], hit[2], hit[3]
    ops6, amts, dts, _ = _schedule(ind, dose, dose_c, obs_c, lag_of, segment, nonmem=nonmem)
    ops = np.ascontiguousarray(ops6[:, :4])
    is_dose, is_obs = ops[:, 0] == _DOSE, ops[:, 0] == _OBS
    ops[is_dose, 1] = [comps.index(int(c)) for c in ops[is_dose, 3]]
    ops[is_obs, 3] = [s_comps.index(int(c)) if int(c) in s_comps else -1 for c in ops[is_obs, 2]]
    for a in (ops, amts, dts):
        a.setflags(write=False)
    with _SCHEDULES_LOCK:
        _SCHEDULES[key] = (ind, ops, amts, dts)
        while len(_SCHEDULES) > _SCHEDULES_KEPT:
            _SCHEDULES.popitem(last=False)
    return ops, amts, dts


def _schedule(ind: Individual, dose: NDArray[np.bool_], dose_c: NDArray[np.int64], obs_c: NDArray[np.int64],
              lag_of: dict[int, float], segment: NDArray[np.int64], *, nonmem: bool,
              f_of: FloatArray | None = None, d_of: FloatArray | None = None
              ) -> tuple[NDArray[np.int64], FloatArray, FloatArray, FloatArray]:
    """The records as a list of operations shared by every batch member (the events do not depend on the
    parameters): the operations (n_ops, 6), each operation's amount (a rate change's rate), the distinct step
    lengths, and each operation's auxiliary value (an input's duration).

    Columns: kind, three operands (the fast path reads these four), the dose record an entering dose or input
    comes from (-1: none), and for a rate change the input's kind (0: a given RATE, 1: a modelled duration).

    Beyond what the fast path takes (bolus doses, observations, EVID 2), the model kernels' records
    (:mod:`cnidose.pk.tangent`): EVID 3 and 4 (a reset: the system emptied, pending doses cancelled, before a dose
    on the same record), zero-order inputs at a given RATE > 0 (duration F * AMT / RATE) or over a modelled
    duration D (RATE = -2; rate F * AMT / D), F and D those of the record ending the interval the input starts in
    ("nonmem") or of its own record, read from ``f_of`` and ``d_of`` (records, compartments): an input starting is
    a rate change now, (RATE, compartment, the record of its F and D, +1), and another at its end (..., -1); and
    bolus doses at steady state (SS 1, after a reset, or 2): an SS operation adds the implied doses that have
    entered by the record (the first of them ``tau`` hours before it; its II, tau and compartment are appended to
    the step lengths), and those a lag longer than II still holds back enter later, with the SS record's F;
    infusion regimens at steady state (SS 1 or 2 with RATE > 0 or -2: SSB, one interval of the periodic input
    replayed, SSE; the inputs running at the record end later) and constant infusions at steady state (SS 1, AMT 0,
    RATE > 0, II 0: CINF). The order is the engine's: what is due by a record's time happens before the record,
    in time order (ties in the order the doses were given), a reset after that, then the record's own dose and its
    report."""
    ops: list[tuple[int, int, int, int, int, int]] = []
    amts: list[float] = []
    aux: list[float] = []
    dt_index: dict[float, int] = {}

    def op(kind: int, a: int = 0, b: int = 0, c: int = 0, src: int = -1, mode: int = 0, amount: float = 0.0,
           extra: float = 0.0) -> None:
        ops.append((kind, a, b, c, src, mode))
        amts.append(amount)
        aux.append(extra)

    def step(dt: float) -> None:
        op(_STEP, dt_index.setdefault(dt, len(dt_index)))

    extras: list[float] = []  # II, tau and compartment of each SS operation (after the step lengths)
    ss_ops: list[int] = []  # their rows in ops

    def give(c: int, rec: int, src: int) -> None:
        rate = float(ind.rate[src])
        if rate == 0.0:
            op(_DOSE, 0, rec, c, src, amount=float(ind.amt[src]))
            return
        assert f_of is not None
        amount = float(f_of[rec, c]) * float(ind.amt[src])
        if rate > 0:
            mode, duration = 0, amount / rate
        else:
            assert d_of is not None and rate == -2
            mode, duration = 1, float(d_of[rec, c])
            rate = amount / duration if duration > 0 else 0.0
        if duration > 0 and rate > 0:
            op(_RATE, c, rec, 1, src, mode, rate, duration)
            pending.append((now + duration, c, src, -rate, -1, rec, mode, duration))
            pending.sort(key=lambda p: p[0])

    def steady_input(j: int, c: int, L: float, ii: float, t: float) -> None:
        """The steady state of an infusion regimen at record j (time t): the implied doses k = 1, 2, ... start at
        t + L - k II, each at the SS record's rate for its duration (its F and D: the engine's
        ``_add_steady_state``). One interval [t - II, t] of that periodic input is replayed between SSB and SSE;
        the inputs still running at t end later, and those a lag holds back start later."""
        assert f_of is not None
        amount = float(f_of[j, c]) * float(ind.amt[j])
        rate = float(ind.rate[j])
        if rate > 0:
            mode, rho, duration = 0, rate, amount / rate
        else:
            assert d_of is not None and rate == -2
            mode, duration = 1, float(d_of[j, c])
            rho = amount / duration if duration > 0 else 0.0
        if not (duration > 0 and rho > 0):
            return
        spans = [(L - k * ii, L - k * ii + duration) for k in range(1, ceil((L + duration) / ii) + 2)]
        spans = [(a, e) for a, e in spans if e > -ii]  # those that reach into the interval or start after t
        running = sum(1 for a, e in spans if a <= -ii < e)
        edges = sorted([(a, 1) for a, _ in spans if -ii < a <= 0.0] + [(e, -1) for _, e in spans if -ii < e <= 0.0])
        op(_SSB)
        if running:
            op(_RATE, c, j, 1, j, mode, running * rho, duration)
        cur = -ii
        for v, edge in edges:
            if v > cur:
                step(v - cur)
                cur = v
            op(_RATE, c, j, edge, j, mode, edge * rho, duration)
        if cur < 0.0:
            step(-cur)
        op(_SSE, c, j, amount=ii)
        for a, e in spans:
            if a <= 0.0 < e:  # running at t: it ends later
                pending.append((t + e, c, j, -rho, -1, j, mode, duration))
            elif a > 0.0:  # held back by a lag longer than k II: given later, with the SS record's F (and D)
                pending.append((t + a, c, j, 0.0, j, -1, 0, 0.0))
        pending.sort(key=lambda p: p[0])

    # (time it happens, compartment, dose record, the end's rate change (0: a dose entering), the record whose F
    # an implied steady-state dose takes or -1, and for an input's end: the record of its F and D, its kind and
    # duration)
    pending: list[tuple[float, int, int, float, int, int, int, float]] = []
    t_prev = float(ind.time[0])
    u = -1
    for j in range(len(ind)):
        s = int(segment[j])
        if s != u:
            if u >= 0:
                op(_SWITCH, s)
            u = s
        t = float(ind.time[j])
        cur = t_prev
        while pending and pending[0][0] <= t:
            te, c, src, delta, frec, rec, mode, duration = pending.pop(0)
            if te > cur:
                step(te - cur)
                cur = te
            now = te
            if delta != 0.0:
                op(_RATE, c, rec, -1, src, mode, delta, duration)
            else:
                give(c, frec if frec >= 0 else j if nonmem else src, src)
        if t > cur:
            step(t - cur)
        now = t
        if ind.evid[j] in (3, 4) or (dose[j] and ind.ss[j] == 1):
            op(_RESET)
            pending = []
        constant = bool(dose[j] and ind.ss[j] == 1 and ind.amt[j] == 0 and ind.rate[j] > 0 and ind.ii[j] == 0)
        if constant:  # a constant infusion at steady state: its state only (no F, no lag; it stops at the record,
            op(_CINF, int(dose_c[j]), j, amount=float(ind.rate[j]))  # NONMEM help, "SS dose event record")
        elif dose[j]:  # the dose and its additional doses (ADDL, every II), each after the lag
            c = int(dose_c[j])
            L = lag_of.get(j, 0.0)
            ii = float(ind.ii[j])
            if ind.ss[j] in (1, 2) and float(ind.rate[j]) != 0.0:
                steady_input(j, c, L, ii, t)
            elif ind.ss[j] in (1, 2):
                first = max(1, ceil(L / ii))  # the first implied dose (k II before) that has entered by now
                while first > 1 and (first - 1) * ii >= L:
                    first -= 1
                while first * ii < L:
                    first += 1
                ss_ops.append(len(ops))
                op(_SS, c, j, len(extras), amount=float(ind.amt[j]))
                extras.extend((ii, first * ii - L, float(c)))
                for k in range(1, first):  # held back by a lag longer than II: they enter after the record
                    pending.append((t + L - k * ii, c, j, 0.0, j, -1, 0, 0.0))
                pending.sort(key=lambda p: p[0])
            for k in range(int(ind.addl[j]) + 1):
                te = t + k * ii + L
                if te > t:
                    pending.append((te, c, j, 0.0, -1, -1, 0, 0.0))
                    pending.sort(key=lambda p: p[0])
                else:
                    give(c, j, j)
        op(_OBS, j, int(obs_c[j]))
        t_prev = t
    steps = sorted(dt_index, key=dt_index.__getitem__)
    for row in ss_ops:  # the extras follow the step lengths
        kind, c, j, e, src, mode = ops[row]
        ops[row] = (kind, c, j, len(steps) + e, src, mode)
    dts = np.array(steps + extras, dtype=np.float64)
    return np.array(ops, dtype=np.int64).reshape(-1, 6), np.array(amts), dts, np.array(aux)


def _run_numpy(ops: NDArray[np.int64], amts: FloatArray, dts: FloatArray, lam: FloatArray, V: FloatArray,
               W: FloatArray, Fs: FloatArray, Ss: FloatArray, out: FloatArray) -> None:
    """The schedule vectorised over the batch with NumPy (where compiled code is off)."""
    B, n = lam.shape[1], lam.shape[2]
    y = np.zeros((B, n))
    u = 0
    steps: dict[int, FloatArray] = {}
    units: dict[int, FloatArray] = {}
    observed: dict[int, FloatArray] = {}
    for k in range(ops.shape[0]):
        kind, a, b, c = (int(x) for x in ops[k])
        if kind == _STEP:
            e = steps.get(a)
            if e is None:
                e = steps[a] = np.exp(lam[u] * dts[a])
            y *= e
        elif kind == _DOSE:
            w = units.get(c)
            if w is None:
                w = units[c] = np.ascontiguousarray(W[u][:, :, c])
            y += (Fs[a][:, b] * amts[k])[:, None] * w
        elif kind == _SWITCH:
            y = np.einsum("bij,bj->bi", W[a], np.einsum("bij,bj->bi", V[u], y))
            u = a
            steps, units, observed = {}, {}, {}
        else:
            held = observed.get(b)
            if held is None:
                held = observed[b] = np.ascontiguousarray(V[u][:, b, :])
            pred = np.einsum("bj,bj->b", held, y)
            out[:, a] = pred / Ss[c][:, a] if c >= 0 else pred
