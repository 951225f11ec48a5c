"""A model compiled for estimation: predictions at the observations and their exact derivatives with respect to
the random effects, in one call for many individuals and points.

The model's ``[pk]`` assignments, observation scales and transforms are turned into Numba source on scalars
(:func:`cnidose.models.expr.scalar_source`), each with its partial derivatives (:func:`cnidose.models.expr.derivative`)
chained through the assignments in order (forward-mode differentiation: d p_i / d eta_k is the sum over the names
u that p_i reads of dp_i/du du/d eta_k). With the record loop of :mod:`cnidose.pk.tangent` they make one module
per model, compiled once and cached on disk (:func:`cnidose.pk.compiled.load`).

It applies to linear models and ODE models (``kind = "ode"``) without a gamma (Savic transit) input, and to
individuals whose records are observations, EVID 2, 3 and 4, bolus doses with ADDL and lags, zero-order inputs at a
given RATE or over a modelled duration (RATE = -2), and regimens at steady state: bolus, infusion and constant
infusion (linear models, their lag, F and duration fixed). Lags, durations and the F of inputs may depend on the
random effects: such an individual's events are ordered for each point apart (a "timed" plan) and the derivatives
of the entry times enter the sensitivities. The rest -- modelled rates (RATE = -1, which NONMEM re-reads at every
record), a steady state whose lag, F or input duration moves with the effects, nonlinear steady states -- is
predicted by the event engine (:func:`cnidose.pk.simulate`), its derivatives by central differences
(:mod:`cnidose.estimation.map`); so is everything when compiled code is off
(``CNIDOSE_COMPILED=0``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import CnidoseError
from cnidose.models.expr import Expression, compile_expression, derivative, scalar_source
from cnidose.models.model import EXPOSED_PARAMETER, EXPOSURE, Model, Prepared
from cnidose.pk.compiled import compiled_enabled, load
from cnidose.pk.eigen import flow_blocks
from cnidose.pk.events import Individual
from cnidose.pk.structure import LinearStructure, OdeStructure
from cnidose.pk.tangent import ode_loop, schedule, tangent_kernel

__all__ = ["ModelKernel", "Plan", "Stack", "effect_dependencies", "model_kernel", "warm"]

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def effect_dependencies(model: Model) -> dict[str, set[str]]:
    """The random effects (between-subject and between-occasion) each ``[pk]`` assignment depends on, through
    earlier assignments."""
    effects = set(model.iiv.names) | (set(model.iov.names) if model.iov is not None else set())
    deps: dict[str, set[str]] = {}
    for name, expr in model.pk:
        d: set[str] = set()
        for n in expr.names:
            d |= deps.get(n, {n} if n in effects else set())
        deps[name] = d
    return deps


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """One individual's records for the kernel: operations, amounts, step lengths and auxiliary values
    (:func:`cnidose.pk.tangent.schedule`), covariates (R, n_cov) and occasion per record, the observed records and
    their types. ``timed``: its events' times depend on the random effects (a lag, an input's duration), so each
    point's schedule is made when it is predicted (from ``individual``); the operations here are the typical
    individual's."""

    ops: IntArray
    amts: FloatArray
    dts: FloatArray
    aux: FloatArray
    cov: FloatArray
    occ: IntArray
    obs_rec: IntArray  # the observed records
    obs_type: IntArray  # and their observation types (-1: none)
    natural: bool = False  # carried in natural coordinates (it has zero-order inputs or steady states)
    timed: bool = False
    individual: Individual | None = None  # the prepared records (for a timed plan's schedules)
    nonmem: bool = True


@dataclass(frozen=True, slots=True, eq=False)
class Stack:
    """Plans of several individuals concatenated, as the kernel reads them."""

    ops: IntArray
    op_start: IntArray
    amts: FloatArray
    aux: FloatArray
    dts: FloatArray
    dt_start: IntArray
    cov: FloatArray
    occ: IntArray
    rec_start: IntArray
    obs_rec: IntArray
    obs_type: IntArray
    obs_start: IntArray
    n_obs: IntArray
    n_rec: IntArray
    natural: IntArray
    plans: tuple[Plan, ...]
    timed: NDArray[np.bool_]  # per plan: Plan.timed (read at every prediction)

    @staticmethod
    def of(plans: Sequence[Plan]) -> Stack:
        def starts(sizes: list[int]) -> IntArray:
            return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        def cat(arrays: list[Any], empty: Any) -> Any:
            return np.ascontiguousarray(np.concatenate(arrays) if arrays else empty)

        n_cov = plans[0].cov.shape[1] if plans else 0
        return Stack(
            ops=cat([p.ops for p in plans], np.zeros((0, 6), np.int64)),
            op_start=starts([p.ops.shape[0] for p in plans]),
            amts=cat([p.amts for p in plans], np.zeros(0)),
            aux=cat([p.aux for p in plans], np.zeros(0)),
            dts=cat([p.dts for p in plans], np.zeros(0)),
            dt_start=starts([p.dts.size for p in plans]),
            cov=cat([p.cov for p in plans], np.zeros((0, n_cov))),
            occ=cat([p.occ for p in plans], np.zeros(0, np.int64)),
            rec_start=starts([p.occ.size for p in plans]),
            obs_rec=cat([p.obs_rec for p in plans], np.zeros(0, np.int64)),
            obs_type=cat([p.obs_type for p in plans], np.zeros(0, np.int64)),
            obs_start=starts([p.obs_rec.size for p in plans]),
            n_obs=np.array([p.obs_rec.size for p in plans], dtype=np.int64),
            n_rec=np.array([p.occ.size for p in plans], dtype=np.int64),
            natural=np.array([int(p.natural) for p in plans], dtype=np.int64),
            plans=tuple(plans), timed=np.array([p.timed for p in plans], dtype=bool))


@dataclass(frozen=True, slots=True, eq=False)
class ModelKernel:
    """A model's compiled predictor (module docstring)."""

    module: Any  # the model's functions (params, fill, transform_all)
    loop: Any  # the linear record loop (cnidose.pk.tangent); None for an ODE model (its module has its loop)
    structure: LinearStructure | OdeStructure
    cov_names: tuple[str, ...]  # covariate columns, EXPOSURE last
    param_names: tuple[str, ...]  # the [pk] assignments, then S<n> of each observation type
    f_index: tuple[int, ...]  # per compartment: the position of F<n> among the parameters, or -1
    lag_index: tuple[int, ...]  # per compartment: the position of ALAG<n>, or -1
    d_index: tuple[int, ...]  # per compartment: the position of D<n>, or -1
    n_eta: int
    n_kappa: int
    constants: dict[str, Any]
    varies: dict[str, tuple[bool, ...]]  # F, ALAG, D: per compartment, whether it depends on a random effect

    def plan(self, model: Model, prep: Prepared, observed: IntArray) -> Plan | None:
        """The individual's plan, or None where its records are not for this kernel (module docstring)."""
        ind = prep.individual
        ev = ind.evid
        dose = (ev == 1) | (ev == 4)
        n = self.structure.n
        if np.any(ind.cmt > n):
            return None
        dose_c = np.where(ind.cmt > 0, ind.cmt, self.structure.default_dose) - 1
        steady = dose & (ind.ss != 0)
        modelled = dose & (ind.rate == -2)
        constant = steady & (ind.ss == 1) & (ind.amt == 0) & (ind.rate > 0) & (ind.ii == 0)
        if (np.any(dose & (ind.rate < 0) & (ind.rate != -2)) or np.any(ind.ii[steady & ~constant] <= 0)
                or any(self.d_index[int(c)] < 0 for c in dose_c[modelled])):
            return None  # modelled rates (NONMEM re-reads them at each record): the engine
        if steady.any() and not isinstance(self.structure, LinearStructure):
            return None  # a nonlinear steady state is found by cycling doses: the engine
        infused = dose & (ind.rate != 0)
        f_var, lag_var, d_var = self.varies["F"], self.varies["ALAG"], self.varies["D"]
        timed = (any(lag_var[int(c)] for c in dose_c[dose])
                 or any(f_var[int(c)] for c in dose_c[infused]) or any(d_var[int(c)] for c in dose_c[modelled]))
        if timed and steady.any():
            return None  # a steady state whose lag or input moves with the effects: the engine
        R = len(ind)
        cov = np.empty((R, len(self.cov_names)))
        for k, name in enumerate(self.cov_names):
            v = prep.covariates.get(name)
            cov[:, k] = 1.0 if v is None else v
        typical: dict[str, FloatArray] = {}
        if any(self.lag_index[int(c)] >= 0 for c in dose_c[dose]) or infused.any():
            try:  # lags, F and D at the typical individual (each point's own where they vary: timed)
                typical = model.individual_parameters(prep)
            except CnidoseError:
                return None
        P = (np.stack([typical[nm][0] for nm in self.param_names], axis=1) if typical
             else np.zeros((R, len(self.param_names))))
        sched = self._schedule(ind, P, observed, model.dose_values == "nonmem")
        if sched is None:
            return None  # the engine refuses a lag, F or D here, naming the record
        ops, amts, dts, aux = sched
        return Plan(ops, amts, dts, aux, np.ascontiguousarray(cov), np.ascontiguousarray(prep.occasion, dtype=np.int64),
                    np.ascontiguousarray(observed, dtype=np.int64),
                    np.ascontiguousarray(prep.obs_type[observed], dtype=np.int64),
                    natural=bool(infused.any() or steady.any() or not self.constants.get("closed", True)),
                    timed=timed, individual=ind if timed else None, nonmem=model.dose_values == "nonmem")

    def _schedule(self, ind: Individual, P: FloatArray, observed: IntArray, nonmem: bool
                  ) -> tuple[IntArray, FloatArray, FloatArray, FloatArray] | None:
        """The schedule of ``ind`` for the parameters ``P`` (records, parameters): lags, F and D read there; None
        where one is not finite and non-negative (D positive), as the engine refuses."""
        n = self.structure.n
        ev = ind.evid
        dose = (ev == 1) | (ev == 4)
        dose_c = np.where(ind.cmt > 0, ind.cmt, self.structure.default_dose) - 1
        lag_of: dict[int, float] = {}
        for r in np.flatnonzero(dose).tolist():
            k = self.lag_index[int(dose_c[r])]
            if k >= 0:
                lag = float(P[r, k])
                if not (np.isfinite(lag) and lag >= 0):
                    return None
                lag_of[r] = lag
        f_of = d_of = None
        if np.any(ind.rate[dose] != 0):
            f_of = np.ones((len(ind), n))
            d_of = np.full((len(ind), n), np.nan)
            for c in range(n):
                if self.f_index[c] >= 0:
                    f_of[:, c] = P[:, self.f_index[c]]
                if self.d_index[c] >= 0:
                    d_of[:, c] = P[:, self.d_index[c]]
            if not np.all(np.isfinite(f_of) & (f_of >= 0)):
                return None
            modelled = dose & (ind.rate == -2)
            if modelled.any() and not np.all(d_of[:, np.unique(dose_c[modelled])] > 0):
                return None
        ops, amts, dts, aux = schedule(ind, self.structure.default_dose, self.structure.default_obs, lag_of,
                                       self.f_index, observed, nonmem=nonmem, f_of=f_of, d_of=d_of)
        return (np.ascontiguousarray(ops), np.ascontiguousarray(amts), np.ascontiguousarray(dts),
                np.ascontiguousarray(aux))

    def run(self, model: Model, stack: Stack, which: IntArray, theta: FloatArray, est: IntArray, nd: int
            ) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
        """Predictions (O', B) at the observations of individuals ``which`` (rows of ``stack``; repeats allowed)
        for their effects ``theta`` (G', B, full effects), and with ``nd`` > 0 their derivatives (O', B, nd) by the
        estimated effects (``est``: each full position's column, -1 where not estimated); ``held`` (G', B) False
        where the kernel left a member to the engine (its rows are not set)."""
        which = np.ascontiguousarray(which, dtype=np.int64)
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        G, B = theta.shape[0], theta.shape[1]
        per_row = B * int(stack.n_rec[which].max() if G else 1) * len(self.param_names) * max(nd, 1)
        chunk = max(1, _CHUNK // max(per_row, 1))
        if chunk < which.size:  # the parameter arrays of a chunk of rows at a time (bounded memory)
            parts = [self.run(model, stack, which[k:k + chunk], theta[k:k + chunk], est, nd)
                     for k in range(0, which.size, chunk)]
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    np.concatenate([p[2] for p in parts]))
        out_start = np.concatenate([[0], np.cumsum(stack.n_obs[which])]).astype(np.int64)
        n_out = int(out_start[-1])
        R = int(stack.n_rec[which].max()) if G else 1
        n_p = len(self.param_names)
        P = np.empty((G, B, R, n_p))
        dP = np.empty((G, B, R, n_p, nd)) if nd else np.empty((G, B, 1, 1, 1))
        th = np.array([p.value for p in model.parameters.values()], dtype=np.float64)
        est = np.ascontiguousarray(est, np.int64)
        self.module.fill(which, theta, est, int(nd), th, stack.cov, stack.occ, stack.rec_start, P, dP)
        out = np.empty((n_out, B))
        jac = np.empty((n_out, B, max(nd, 1)))
        held = np.empty((G, B), dtype=np.bool_)
        timed = stack.timed[which]
        if not timed.any():
            self._loop(stack, which, P, dP, nd, out_start, out, jac, held)
        else:
            rows = np.flatnonzero(~timed)
            if rows.size:  # the shared schedules in one call
                sub_start = np.concatenate([[0], np.cumsum(stack.n_obs[which[rows]])]).astype(np.int64)
                o2, j2 = np.empty((int(sub_start[-1]), B)), np.empty((int(sub_start[-1]), B, max(nd, 1)))
                h2 = np.empty((rows.size, B), dtype=np.bool_)
                self._loop(stack, which[rows], P[rows], dP[rows], nd, sub_start, o2, j2, h2)
                for k, g in enumerate(rows.tolist()):
                    out[out_start[g]:out_start[g + 1]] = o2[sub_start[k]:sub_start[k + 1]]
                    jac[out_start[g]:out_start[g + 1]] = j2[sub_start[k]:sub_start[k + 1]]
                    held[g] = h2[k]
            for g in np.flatnonzero(timed).tolist():
                self._timed(stack.plans[int(which[g])], P[g], dP[g], nd, out[out_start[g]:out_start[g + 1]],
                            jac[out_start[g]:out_start[g + 1]], held[g])
        if self.constants["transforms"]:
            self.module.transform_all(which, out_start, stack.obs_rec, stack.obs_type, stack.obs_start,
                                      stack.rec_start, th, stack.cov, P, dP, int(nd), out, jac, held)
        return out, jac[..., :nd], held

    def _loop(self, stack: Stack, which: IntArray, P: FloatArray, dP: FloatArray, nd: int, out_start: IntArray,
              out: FloatArray, jac: FloatArray, held: NDArray[np.bool_]) -> None:
        c = self.constants
        args = (which, np.ascontiguousarray(P), np.ascontiguousarray(dP), int(nd), stack.ops, stack.op_start,
                stack.amts, stack.aux, stack.dts, stack.dt_start, stack.rec_start, out_start, stack.natural)
        if self.loop is None:
            self.module.run(*args, c["s_index"], c["rate_idx"], c["lag_idx"], c["f_idx"], c["d_idx"], _RTOL, _ATOL,
                            out, jac, held)
        else:
            self.loop.run(*args, c["blk"], c["src"], c["tgt"], c["rate"], c["per"], c["rate_idx"], c["s_index"],
                          c["lag_idx"], c["f_idx"], c["d_idx"], out, jac, held)

    def _timed(self, plan: Plan, P: FloatArray, dP: FloatArray, nd: int, out: FloatArray, jac: FloatArray,
               held: NDArray[np.bool_]) -> None:
        """One individual whose events move with the effects: the points that share their events' times share a
        schedule (made here, from each point's lags, F and D), each group predicted in one call."""
        assert plan.individual is not None
        R = plan.occ.size
        keys: dict[bytes, list[int]] = {}
        cols = [k for k in (*self.lag_index, *self.f_index, *self.d_index) if k >= 0]
        for b in range(P.shape[0]):
            keys.setdefault(np.ascontiguousarray(P[b, :R][:, cols]).tobytes(), []).append(b)
        for members in keys.values():
            sched = self._schedule(plan.individual, P[members[0], :R], plan.obs_rec, plan.nonmem)
            idx = np.asarray(members)
            if sched is None:  # the engine refuses these parameters: an impossible point
                out[:, idx] = np.nan
                jac[:, idx] = np.nan
                held[idx] = True
                continue
            ops, amts, dts, aux = sched
            one = Stack.of([Plan(ops, amts, dts, aux, plan.cov, plan.occ, plan.obs_rec, plan.obs_type,
                                 plan.natural)])
            o, j, h = (np.empty((plan.obs_rec.size, idx.size)), np.empty((plan.obs_rec.size, idx.size, jac.shape[2])),
                       np.empty((1, idx.size), dtype=np.bool_))
            self._loop(one, np.zeros(1, np.int64), P[None, idx], dP[None, idx], nd,
                       np.array([0, plan.obs_rec.size], dtype=np.int64), o, j, h)
            out[:, idx] = o
            jac[:, idx] = j
            held[idx] = h[0]


def model_kernel(model: Model) -> ModelKernel | None:
    """The model's kernel, or None where it does not apply (module docstring) or compiled code is off.

    The first use on a machine compiles it (half a minute for the shared record loop, a few seconds per model;
    then it loads from the disk cache in milliseconds). While :func:`warm` compiles kernels in the background, a
    kernel not yet ready is not waited for: None, and the caller predicts by the engine and differences."""
    if not compiled_enabled():
        return None
    key = _key(model)
    if key is None:
        return None
    with _LOCK:
        if key in _READY:
            return _CACHE[key]
    if _WARMING.is_set():
        return None
    return _build(key, model)


def warm(models: Sequence[Model]) -> threading.Thread:
    """Compile (or load from the disk cache) the kernels of ``models`` in a background thread; until each is
    ready, :func:`model_kernel` answers None for it rather than make a request wait for the compiler."""
    _WARMING.set()

    def work() -> None:
        try:
            for m in models:
                key = _key(m)
                if key is not None:
                    try:
                        _build(key, m)
                    except Exception:
                        log.exception("model kernel for %s not compiled", m.id)
                        with _LOCK:
                            _CACHE[key] = None
                            _READY.add(key)
        finally:
            _WARMING.clear()

    thread = threading.Thread(target=work, name="cnidose-kernels", daemon=True)
    thread.start()
    return thread


def _key(model: Model) -> tuple[Any, ...] | None:
    """What a model's kernel depends on: its structure, equations and names (not its values), or None where it
    does not apply."""
    s = model.structure
    if s.gamma is not None or (isinstance(s, OdeStructure) and not s.sources):
        return None
    pk_names = {name for name, _ in model.pk}
    if any(p not in pk_names for p in s.rate_parameters):
        return None  # a rate parameter that is not a [pk] assignment (the engine reports it)
    shape = s if isinstance(s, LinearStructure) else (s.compartments, s.default_dose, s.default_obs, s.parameters,
                                                       s.sources)
    return (shape, tuple((n, e.source) for n, e in model.pk), tuple(model.parameters),
            tuple((n, c.domain_only) for n, c in model.covariates.items()), model.iiv.names,
            model.iov.names if model.iov is not None else (),
            tuple((ob.compartment, ob.scale.source, ob.factor, ob.transform.source if ob.transform else None)
                  for ob in model.observations))


_CACHE: dict[tuple[Any, ...], ModelKernel | None] = {}
_READY: set[tuple[Any, ...]] = set()  # keys whose kernel is compiled (or known not to compile)
_LOCK = threading.Lock()
_BUILD = threading.Lock()  # one compilation at a time
_WARMING = threading.Event()  # a background warm-up is running
_RTOL, _ATOL = 1e-10, 1e-12  # the engine's ODE tolerances (cnidose.pk.simulate)
_CHUNK = 4_000_000  # parameter values (and derivatives) of one call: 32 MB


def _build(key: tuple[Any, ...], model: Model) -> ModelKernel | None:
    """Generate, load and compile the kernel for ``key`` (an empty call makes Numba compile every function)."""
    with _BUILD:
        with _LOCK:
            if key in _READY:
                return _CACHE[key]
        try:
            text, meta = _generate(model)
        except CnidoseError:
            kernel = None
        else:
            kernel = _kernel(text, meta)
        if kernel is not None:
            full = len(model.iiv) + (len(model.iov) if model.iov is not None else 0)
            kernel.run(model, Stack.of([]), np.zeros(0, np.int64), np.zeros((0, 1, full)),
                       np.zeros(full, np.int64), 1)
        with _LOCK:
            _CACHE[key] = kernel
            _READY.add(key)
        return kernel


@lru_cache(maxsize=64)
def _kernel(text: str, meta: tuple[Any, ...]) -> ModelKernel | None:
    ode = not isinstance(meta[0], LinearStructure)
    loop = None if ode else tangent_kernel()
    module = load("cnidose_model_", text) if ode or loop is not None else None
    if module is None:
        return None
    structure, cov_names, param_names, f_index, lag_index, d_index, n_eta, n_kappa, constants, varies = meta
    return ModelKernel(module, loop, structure, cov_names, param_names, f_index, lag_index, d_index, n_eta, n_kappa,
                       dict(constants), dict(varies))


def _generate(model: Model) -> tuple[str, tuple[Any, ...]]:
    """The model module's source, and what the Python side needs to know of it."""
    s = model.structure
    eta_names = model.iiv.names
    kap_names = model.iov.names if model.iov is not None else ()
    cov_names = (*(n for n, c in model.covariates.items() if not c.domain_only), EXPOSURE)
    pk_names = [n for n, _ in model.pk]
    scale_names = [f"S{ob.compartment}" for ob in model.observations]
    param_names = tuple(pk_names + scale_names)
    index = {n: k for k, n in enumerate(param_names)}
    theta_names = tuple(model.parameters)
    names: dict[str, str] = {n: f"th[{k}]" for k, n in enumerate(theta_names)}
    names |= {n: f"c[{k}]" for k, n in enumerate(cov_names)}
    names |= {n: f"eta[{k}]" for k, n in enumerate(eta_names)}
    names |= {n: f"kap[{k}]" for k, n in enumerate(kap_names)}
    effects = {n: ("de", k) for k, n in enumerate(eta_names)} | {n: ("dk", k) for k, n in enumerate(kap_names)}
    deps: dict[str, set[str]] = {}  # the effects behind each parameter

    values: list[str] = []
    tangents: list[str] = []


    def assign(i: int, name: str, expr: Expression, divisor: str | None) -> None:
        div = f" / {divisor}" if divisor else ""
        values.append(f"    p[{i}] = ({scalar_source(expr, names)}){div}")
        mine: set[str] = set()
        terms: dict[str, list[str]] = {}
        for u in sorted(expr.names):
            behind = {u} if u in effects else deps.get(u, set())
            if not behind:
                continue
            d = derivative(expr, u)
            if d is None:
                continue
            var = f"t{i}_{len(mine)}_{u.lower()}"
            tangents.append(f"        {var} = {scalar_source(d, names)}")
            mine |= behind
            for e in sorted(behind):
                arr, k = effects[e]
                terms.setdefault(e, []).append(var if u == e else f"{var} * {arr}[{index[u]}, {k}]")
        for e, parts in terms.items():
            arr, k = effects[e]
            tangents.append(f"        {arr}[{i}, {k}] = ({' + '.join(parts)}){div}")
        deps[name] = mine
        names[name] = f"p[{i}]"

    for i, (name, expr) in enumerate(model.pk):
        assign(i, name, expr, f"c[{len(cov_names) - 1}]" if name == EXPOSED_PARAMETER else None)
    for k, ob in enumerate(model.observations):
        assign(len(pk_names) + k, scale_names[k], ob.scale, repr(float(ob.factor)) if ob.factor != 1.0 else None)
    lines = ["@njit(cache=True, error_model=\"numpy\")", "def params(c, th, eta, kap, p, de, dk, want):",
             "    # every parameter at one record (th: the model's parameter values), and where wanted its derivatives",
             "    # by the between-subject effects (de) and the effects of the record's occasion (dk)",
             *values, "    if want:", "        for q in range(NP):", "            for e in range(NETA):",
             "                de[q, e] = 0.0", "            for e in range(NKAP):", "                dk[q, e] = 0.0",
             *tangents]
    # observation transforms: the value, its derivative by C, and dp its derivatives by the parameters
    lines += ["", "", "@njit(cache=True, error_model=\"numpy\")", "def transform(t, C, th, p, c, dp):",
              "    for q in range(NP):", "        dp[q] = 0.0"]
    tnames = dict(names) | {"C": "C"}
    transforms = False
    for k, ob in enumerate(model.observations):
        if ob.transform is None:
            continue
        transforms = True
        e = ob.transform
        dC = derivative(e, "C")
        lines += [f"    if t == {k}:", f"        v = {scalar_source(e, tnames)}",
                  f"        dv = {scalar_source(dC, tnames) if dC is not None else '0.0'}"]
        for u in sorted(e.names):
            if u in index:
                d = derivative(e, u)
                if d is not None:
                    lines.append(f"        dp[{index[u]}] = {scalar_source(d, tnames)}")
        lines.append("        return v, dv")
    lines.append("    return C, 1.0")

    n = s.n
    s_index = np.full(n, -1, dtype=np.int64)
    for k, ob in enumerate(model.observations):
        s_index[ob.compartment - 1] = index[scale_names[k]]
    has_transform = [ob.transform is not None for ob in model.observations] or [False]
    constants: tuple[tuple[str, Any], ...] = (
        ("rate_idx", np.array([index[p] for p in s.rate_parameters], dtype=np.int64)),
        ("s_index", s_index),
        ("transforms", transforms),
    )
    if isinstance(s, LinearStructure):
        blocks = flow_blocks(s)
        # the closed-form decomposition takes blocks of one or two compartments; with a larger one (a central
        # compartment and two peripherals) every individual is carried with matrix exponentials
        closed = all(len(b) <= 2 for b in blocks)
        constants += (
            ("closed", closed),
            ("blk", np.array([[b[0], b[1] if len(b) == 2 else -1] for b in blocks] if closed else [[0, -1]],
                             dtype=np.int64)),
            ("src", np.array([f.source - 1 for f in s.flows], dtype=np.int64)),
            ("tgt", np.array([-1 if f.target is None else f.target - 1 for f in s.flows], dtype=np.int64)),
            ("rate", np.array([index[f.rate] for f in s.flows], dtype=np.int64)),
            ("per", np.array([-1 if f.per is None else index[f.per] for f in s.flows], dtype=np.int64)),
        )
    else:
        lines += ["", "", *_ode_functions(s, index)]
    text = _MODULE.format(n_params=len(param_names), n_eta=len(eta_names), n_kappa=len(kap_names),
                          has_transform=has_transform, functions="\n".join(lines))
    if not isinstance(s, LinearStructure):
        text += ode_loop()
    f_index = tuple(index.get(f"F{c + 1}", -1) for c in range(n))
    lag_index = tuple(index.get(f"ALAG{c + 1}", -1) for c in range(n))
    d_index = tuple(index.get(f"D{c + 1}", -1) for c in range(n))
    constants += (("lag_idx", np.array(lag_index, dtype=np.int64)), ("f_idx", np.array(f_index, dtype=np.int64)),
                  ("d_idx", np.array(d_index, dtype=np.int64)))
    varies = tuple((name, tuple(bool(deps.get(f"{name}{c + 1}")) for c in range(n))) for name in ("F", "ALAG", "D"))
    meta = (s, cov_names, param_names, f_index, lag_index, d_index, len(eta_names), len(kap_names),
            _Frozen(constants), varies)
    return text, meta


def _ode_functions(s: OdeStructure, index: dict[str, int]) -> list[str]:
    """``rhs(x, p, d)`` and ``jac(x, p, Jx, Jp)`` of an ODE structure from its equations (compartments: ``x[j]``,
    parameters: ``p[k]``, the kernel's parameter vector)."""
    exprs = [compile_expression(src) for src in s.sources]
    names = {c: f"x[{j}]" for j, c in enumerate(s.compartments)} | {k: f"p[{index[k]}]" for k in s.parameters}
    rhs = ["@njit(cache=True, error_model=\"numpy\")", "def rhs(x, p, d):"]
    rhs += [f"    d[{j}] = {scalar_source(e, names)}" for j, e in enumerate(exprs)]
    jac = ["", "", "@njit(cache=True, error_model=\"numpy\")", "def jac(x, p, Jx, Jp):",
           "    for a in range(Jx.shape[0]):", "        for c in range(Jx.shape[1]):", "            Jx[a, c] = 0.0",
           "        for c in range(Jp.shape[1]):", "            Jp[a, c] = 0.0"]
    for j, e in enumerate(exprs):
        for k, c in enumerate(s.compartments):
            d = derivative(e, c)
            if d is not None:
                jac.append(f"    Jx[{j}, {k}] = {scalar_source(d, names)}")
        for q in s.parameters:
            d = derivative(e, q)
            if d is not None:
                jac.append(f"    Jp[{j}, {index[q]}] = {scalar_source(d, names)}")
    return rhs + jac


class _Frozen(tuple):  # type: ignore[type-arg]
    """Named constants (arrays among them) as a hashable key: equal when their texts are equal."""

    def __hash__(self) -> int:
        return hash(repr([(k, v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and hash(self) == hash(other)


_MODULE = """\
# generated by cnidose.models.kernel; do not edit
import math

import numpy as np
from numba import njit

NP = {n_params}
NETA = {n_eta}
NKAP = {n_kappa}
HAS_TRANSFORM = np.array({has_transform!r})


{functions}


@njit(cache=True, error_model="numpy")
def fill(which, theta, est, nd, th, cov, occ, rec_start, P, dP):
    # P[g, b, r]: the parameters at record r of individual which[g] for effects theta[g, b]; dP[g, b, r, :, col]
    # their derivatives by estimated effect col (est: the column of each effect, -1 where not estimated)
    G = which.shape[0]
    B = theta.shape[1]
    de = np.empty((NP, max(NETA, 1)))
    dk = np.empty((NP, max(NKAP, 1)))
    eta = np.empty(max(NETA, 1))
    kap = np.empty(max(NKAP, 1))
    for g in range(G):
        i = which[g]
        r0 = rec_start[i]
        for b in range(B):
            for q in range(NETA):
                eta[q] = theta[g, b, q]
            for r in range(rec_start[i + 1] - r0):
                o = occ[r0 + r]
                for q in range(NKAP):
                    kap[q] = theta[g, b, NETA + o * NKAP + q]
                params(cov[r0 + r], th, eta, kap, P[g, b, r], de, dk, nd > 0)
                if nd > 0:
                    for q in range(NP):
                        for col in range(nd):
                            dP[g, b, r, q, col] = 0.0
                        for e in range(NETA):
                            col = est[e]
                            if col >= 0:
                                dP[g, b, r, q, col] += de[q, e]
                        for e in range(NKAP):
                            col = est[NETA + o * NKAP + e]
                            if col >= 0:
                                dP[g, b, r, q, col] += dk[q, e]


@njit(cache=True, error_model="numpy")
def transform_all(which, out_start, obs_rec, obs_type, obs_start, rec_start, th, cov, P, dP, nd, out, jac, held):
    # each observation type's transform applied to the scaled amounts out (and by the chain rule to jac)
    B = out.shape[1]
    dp = np.empty(NP)
    for g in range(which.shape[0]):
        i = which[g]
        lo = out_start[g]
        for j in range(obs_start[i + 1] - obs_start[i]):
            t = obs_type[obs_start[i] + j]
            if t < 0 or not HAS_TRANSFORM[t]:
                continue
            r = obs_rec[obs_start[i] + j]
            for b in range(B):
                C = out[lo + j, b]
                if not held[g, b] or not math.isfinite(C):
                    continue
                v, dv = transform(t, C, th, P[g, b, r], cov[rec_start[i] + r], dp)
                out[lo + j, b] = v
                for col in range(nd):
                    acc = dv * jac[lo + j, b, col]
                    for q in range(NP):
                        if dp[q] != 0.0:
                            acc += dp[q] * dP[g, b, r, q, col]
                    jac[lo + j, b, col] = acc
"""
