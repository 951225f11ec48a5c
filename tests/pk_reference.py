"""An independent reference for the event engine, written for the tests only.

It shares no code with :mod:`cnidose.pk`: one individual, one parameter set, a plain event loop over
explicit dose events, and its own propagators -- a matrix exponential by scaling and squaring of a Taylor
series (of the augmented matrix [[K, r], [0, 0]], which carries a constant input exactly), or SciPy's LSODA
at tight tolerances for a nonlinear right-hand side. Steady states are replayed dose by dose from zero until
the state stops changing, never summed as a series. Slow and simple on purpose.

NONMEM semantics it encodes (see the engine's docstring for the sources):

* record i's parameters apply to the interval (t[i-1], t[i]] that ends at it;
* a dose enters at its time plus the ALAG of its dose record (the dose and every additional dose);
* with ``dose_values="nonmem"`` F, D and R are those of the record ending the interval in which the dose
  (or additional dose) enters, and a running RATE=-1 input takes every later record's R until its amount is
  in; with ``"dose-record"`` they are the dose record's, fixed;
* implied doses of a steady state take the steady-state record's values;
* EVID 3/4 and SS=1 zero the system and cancel every pending or running input;
* a record reports the state after its own unlagged dose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.integrate import solve_ivp

Rhs = Callable[[np.ndarray, Mapping[str, float]], np.ndarray]


def expm_taylor(A: np.ndarray) -> np.ndarray:
    """exp(A) by scaling and squaring a degree-30 Taylor series (accurate to rounding for ||A/2^s|| <= 1/4)."""
    n = A.shape[0]
    norm = float(np.abs(A).sum(axis=0).max())
    s = int(np.ceil(np.log2(norm / 0.25))) if norm > 0.25 else 0
    X = A / 2.0**s
    E = np.eye(n)
    term = np.eye(n)
    for k in range(1, 31):
        term = term @ X / k
        E = E + term
    for _ in range(s):
        E = E @ E
    return E


@dataclass
class _Input:
    """A zero-order input: ``rate`` into ``cmt`` until ``end``."""

    cmt: int
    rate: float
    end: float
    modelled: bool  # RATE=-1 under the NONMEM rule: its rate follows the records


@dataclass
class _Pending:
    time: float
    cmt: int
    amt: float
    rate: float  # RATE data item: 0 bolus, > 0 given, -1 modelled rate, -2 modelled duration
    rec: int  # record whose F/R/D apply, or -1: the record ending the interval of entry


class Reference:
    """Simulate one individual's records with per-record parameters.

    Parameters
    ----------
    n : int
        Number of compartments.
    flows : sequence of (source, target or None, rate name, per name or None), 1-based, or None
        A linear system; ``rhs`` otherwise.
    rhs : callable(amounts (n,), params) -> (n,), optional
        A nonlinear system.
    params : mapping of name to (R,) array
        Rate parameters and F<n>, ALAG<n>, R<n>, D<n>.
    """

    def __init__(self, n: int, params: Mapping[str, np.ndarray], *, default_dose: int, default_obs: int,
                 flows: Sequence[tuple[int, int | None, str, str | None]] | None = None, rhs: Rhs | None = None,
                 dose_values: str = "nonmem"):
        self.n = n
        self.flows = flows
        self.rhs = rhs
        self.P = {k: np.asarray(v, dtype=float) for k, v in params.items()}
        self.default_dose = default_dose
        self.default_obs = default_obs
        self.nonmem = dose_values == "nonmem"

    # -- parameters ------------------------------------------------------------------------------------------------
    def at(self, rec: int) -> dict[str, float]:
        return {k: float(v[rec]) for k, v in self.P.items()}

    def dose_param(self, prefix: str, cmt: int, rec: int, default: float) -> float:
        key = f"{prefix}{cmt + 1}"
        return float(self.P[key][rec]) if key in self.P else default

    def K(self, p: Mapping[str, float]) -> np.ndarray:
        assert self.flows is not None
        K = np.zeros((self.n, self.n))
        for src, tgt, rate, per in self.flows:
            k = p[rate] / p[per] if per is not None else p[rate]
            K[src - 1, src - 1] -= k
            if tgt is not None:
                K[tgt - 1, src - 1] += k
        return K

    # -- propagation -----------------------------------------------------------------------------------------------
    def propagate(self, x: np.ndarray, r: np.ndarray, dt: float, p: Mapping[str, float]) -> np.ndarray:
        if dt <= 0:
            return x
        if self.flows is not None:
            M = np.zeros((self.n + 1, self.n + 1))
            M[: self.n, : self.n] = self.K(p)
            M[: self.n, self.n] = r
            E = expm_taylor(M * dt)
            return E[: self.n, : self.n] @ x + E[: self.n, self.n]
        assert self.rhs is not None
        f = self.rhs
        sol = solve_ivp(lambda _t, z: f(z, p) + r, (0.0, dt), x, method="LSODA", rtol=1e-12, atol=1e-14)
        assert sol.success, sol.message
        return np.asarray(sol.y[:, -1])

    # -- the event loop ----------------------------------------------------------------------------------------------
    def run(self, records: Mapping[str, Sequence[float]]) -> np.ndarray:
        """Amounts after every record, shape (R, n)."""
        t_all = np.asarray(records["TIME"], dtype=float)
        R = len(t_all)

        def col(name: str) -> np.ndarray:
            return np.asarray(records.get(name, np.zeros(R)), dtype=float)

        evid, amt, rate, ii, addl, ss, cmt = (col(c) for c in ("EVID", "AMT", "RATE", "II", "ADDL", "SS", "CMT"))
        x = np.zeros(self.n)
        pending: list[_Pending] = []
        inputs: list[_Input] = []
        out = np.zeros((R, self.n))
        t_prev = t_all[0]
        for i in range(R):
            p = self.at(i)
            if self.nonmem:
                self._retime(inputs, t_prev, i)
            x = self._advance(x, pending, inputs, t_prev, t_all[i], i, p)
            e = int(evid[i])
            if e in (3, 4) or (e in (1, 4) and ss[i] == 1):
                x = np.zeros(self.n)
                pending.clear()
                inputs.clear()
            if e in (1, 4):
                c = (int(cmt[i]) or self.default_dose) - 1
                lag = self.dose_param("ALAG", c, i, 0.0)
                if ss[i] == 1 and amt[i] == 0 and rate[i] > 0 and ii[i] == 0:
                    x = x + self._constant_infusion(c, rate[i], p)
                else:
                    if ss[i] in (1, 2):
                        x_ss, pend_ss, inp_ss = self._steady_state(t_all[i], c, amt[i], rate[i], ii[i], lag, i, p)
                        x = x + x_ss
                        pending.extend(pend_ss)
                        inputs.extend(inp_ss)
                    rec = -1 if self.nonmem else i
                    for k in range(int(addl[i]) + 1):
                        pending.append(_Pending(t_all[i] + k * ii[i] + lag, c, amt[i], rate[i], rec))
                    x = self._advance(x, pending, inputs, t_all[i], t_all[i], i, p)
            out[i] = x
            t_prev = t_all[i]
        return out

    def _retime(self, inputs: list[_Input], t: float, rec: int) -> None:
        for inp in inputs:
            if inp.modelled and inp.end > t:
                new = self.dose_param("R", inp.cmt, rec, float("nan"))
                if new != inp.rate:
                    remaining = inp.rate * (inp.end - t)
                    inp.end = t + remaining / new
                    inp.rate = new

    def _advance(self, x: np.ndarray, pending: list[_Pending], inputs: list[_Input], t0: float, t1: float,
                 rec: int, p: Mapping[str, float]) -> np.ndarray:
        cur = t0
        while True:
            times = [d.time for d in pending if d.time <= t1] + [inp.end for inp in inputs if inp.end <= t1]
            if not times:
                break
            tn = min(times)
            x = self.propagate(x, self._rates(inputs), tn - cur, p)
            cur = max(cur, tn)
            for inp in [inp for inp in inputs if inp.end == tn]:
                inputs.remove(inp)
            for d in [d for d in pending if d.time == tn]:
                pending.remove(d)
                x = self._enter(x, d, inputs, rec if d.rec < 0 else d.rec, tn)
        return self.propagate(x, self._rates(inputs), t1 - cur, p)

    def _rates(self, inputs: list[_Input]) -> np.ndarray:
        r = np.zeros(self.n)
        for inp in inputs:
            r[inp.cmt] += inp.rate
        return r

    def _enter(self, x: np.ndarray, d: _Pending, inputs: list[_Input], rec: int, now: float) -> np.ndarray:
        amount = self.dose_param("F", d.cmt, rec, 1.0) * d.amt
        if d.rate == 0:
            x = x.copy()
            x[d.cmt] += amount
            return x
        if d.rate > 0:
            rho, dur = d.rate, amount / d.rate
        elif d.rate == -1:
            rho = self.dose_param("R", d.cmt, rec, float("nan"))
            dur = amount / rho
        else:
            dur = self.dose_param("D", d.cmt, rec, float("nan"))
            rho = amount / dur
        if dur > 0:
            inputs.append(_Input(d.cmt, rho, now + dur, modelled=d.rate == -1 and self.nonmem))
        return x

    def _steady_state(self, t: float, c: int, amt: float, rate: float, ii: float, lag: float, rec: int,
                      p: Mapping[str, float]) -> tuple[np.ndarray, list[_Pending], list[_Input]]:
        """Replay the implied doses from zero, doubling their number until the state at ``t`` stops changing."""
        n_doses = 32
        prev = None
        while True:
            x = np.zeros(self.n)
            pending = [_Pending(t + lag - k * ii, c, amt, rate, rec) for k in range(n_doses, 0, -1)]
            inputs: list[_Input] = []
            start = t - n_doses * ii - 1.0
            x = self._advance(x, pending, inputs, start, t, rec, p)
            if prev is not None and np.all(np.abs(x - prev) <= 1e-12 * np.max(np.abs(x)) + 1e-300):
                return x, pending, inputs
            if n_doses > 200_000:
                raise AssertionError("reference steady state did not converge")
            prev = x
            n_doses *= 2

    def _constant_infusion(self, c: int, rate: float, p: Mapping[str, float]) -> np.ndarray:
        r = np.zeros(self.n)
        r[c] = rate
        if self.flows is not None:
            return np.asarray(np.linalg.solve(self.K(p), -r))
        x = np.zeros(self.n)
        span = 100.0
        while True:
            nxt = self.propagate(x, r, span, p)
            if np.all(np.abs(nxt - x) <= 1e-12 * np.max(np.abs(nxt))):
                return nxt
            x, span = nxt, span * 2
