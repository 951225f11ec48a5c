"""Binding individuals to a model for estimation: observations, random-effect layout, prediction.

Individuals whose parameters are constant over their records (linear model, covariates constant, no
between-occasion effects) are predicted together by superposition (:mod:`cnidose.pk.superposition`);
the others one at a time by the event engine. Both give the same numbers (tests compare them); the
first costs far less per individual.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import CnidoseError
from cnidose.estimation.observations import ObservationData, observation_data_many
from cnidose.models.expr import Expression, derivative
from cnidose.models.kernel import ModelKernel, Plan, Stack, effect_dependencies, model_kernel
from cnidose.models.model import Model, Prepared
from cnidose.pk.events import Individual
from cnidose.pk.structure import LinearStructure, OdeStructure
from cnidose.pk.superposition import (
    Design,
    compile_design,
    design_differentiable,
    design_supports,
    predict_design,
    predict_design_jacobian,
)


def _inv(a: NDArray[np.floating]) -> NDArray[np.float64]:  # type: ignore[type-arg]
    return np.asarray(np.linalg.inv(a), dtype=np.float64)


__all__ = ["Group", "Member", "ObsSlice", "build_groups", "compiled_pays", "effect_layout", "occasion_prior",
           "occasion_times", "ranges"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(slots=True)
class Member:
    """One individual in an estimation problem."""

    index: int  # position in the input sequence
    individual: Individual
    prep: Prepared | None = None
    obs: ObservationData | None = None
    error: str = ""  # why it cannot be fitted (a DataError message naming the record)
    n_occasions: int = 1
    notices: tuple[Any, ...] = ()


# selections of at most this many members keep their observations' slices (Group.observations)
_KEEP_SLICES_UP_TO = 64


@dataclass(frozen=True, slots=True)
class ObsSlice:
    """Observations of some members of a group, concatenated in order (:meth:`Group.observations`)."""

    idx: IntArray  # positions in the group's arrays
    starts: IntArray  # (members + 1,) each member's first row here
    y: FloatArray
    blq: NDArray[np.bool_]
    limit: FloatArray
    log: NDArray[np.bool_]
    prop: FloatArray
    add: FloatArray
    sd_log: FloatArray
    if_zero: FloatArray

    @property
    def terms_args(self) -> tuple[FloatArray, NDArray[np.bool_], FloatArray, NDArray[np.bool_], FloatArray,
                                  FloatArray, FloatArray, FloatArray]:
        """The arguments of :func:`cnidose.estimation.observations.terms` after the predictions."""
        return self.y, self.blq, self.limit, self.log, self.prop, self.add, self.sd_log, self.if_zero


@dataclass(slots=True)
class Group:
    """Members that share one random-effect layout and one prediction function."""

    model: Model
    members: list[Member]
    dim: int  # length of the random-effect vector
    names: tuple[str, ...]
    precision: FloatArray  # (dim, dim) prior precision Omega^-1 (estimated effects only)
    estimated: IntArray  # positions of the estimated effects in the model's full vector
    full_dim: int
    fast: bool
    bases: tuple[str, ...] = ()  # the model's effect behind each estimated one (KAPPA_CL for KAPPA_CL_OCC2)
    occasions: tuple[int, ...] = ()  # the occasion of each estimated effect; 0: between-subject
    design: Design | None = None
    #: the model's compiled predictor and every member's plan (:mod:`cnidose.models.kernel`), or None: predictions
    #: by the engine or superposition, derivatives by differences
    kernel: ModelKernel | None = None
    stack: Stack | None = None
    #: the superposition design takes exact derivatives (:func:`cnidose.pk.superposition.predict_design_jacobian`:
    #: every input but a gamma-density one at steady state); False: differences
    design_exact: bool = False
    obs_start: IntArray = field(default_factory=lambda: np.zeros(1, np.int64))
    # concatenated observations of the members
    y: FloatArray = field(default_factory=lambda: np.zeros(0))
    blq: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))
    limit: FloatArray = field(default_factory=lambda: np.zeros(0))
    log: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))
    prop: FloatArray = field(default_factory=lambda: np.zeros(0))
    add: FloatArray = field(default_factory=lambda: np.zeros(0))
    sd_log: FloatArray = field(default_factory=lambda: np.zeros(0))
    if_zero: FloatArray = field(default_factory=lambda: np.zeros(0))
    _covs: dict[str, FloatArray] = field(default_factory=dict)
    #: the observations of small selections of members, kept (:meth:`observations`)
    _slices: dict[bytes, ObsSlice] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)

    def observations(self, which: IntArray) -> ObsSlice:
        """The observations of members ``which`` (in order, repeats allowed), concatenated, with each member's
        segment start. A selection of a few members is made once and kept (an optimisation asks for the same few
        selections at every iteration, and on one patient's levels the slicing costs as much as the arithmetic); a
        large one is made at each call (its slicing is small beside the work on it, and keeping it would hold
        copies of a cohort's observations)."""
        if which.size > _KEEP_SLICES_UP_TO:
            return self._slice(which)
        key = np.ascontiguousarray(which, dtype=np.int64).tobytes()
        hit = self._slices.get(key)
        if hit is None:
            if len(self._slices) >= 16:  # the selections change as members converge
                self._slices.clear()
            hit = self._slices[key] = self._slice(which)
        return hit

    def _slice(self, which: IntArray) -> ObsSlice:
        counts = np.diff(self.obs_start)[which]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        idx = ranges(self.obs_start[which], counts)
        return ObsSlice(idx, starts, self.y[idx], self.blq[idx], self.limit[idx], self.log[idx], self.prop[idx],
                        self.add[idx], self.sd_log[idx], self.if_zero[idx])

    def expand(self, theta: FloatArray) -> FloatArray:
        """Estimated effects (..., dim) -> the model's full vector (..., full_dim), zeros elsewhere."""
        out = np.zeros((*theta.shape[:-1], self.full_dim))
        out[..., self.estimated] = theta
        return out

    @property
    def exact(self) -> bool:
        """Whether :meth:`jacobian` gives exact derivatives (the compiled kernel holds every member, or the
        superposition design takes them)."""
        return (self.stack is not None or self.design_exact) and self.dim > 0

    def jacobian(self, theta: FloatArray, which: IntArray | None = None
                 ) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]] | None:
        """Predictions (O',) at the observations of members ``which`` for ``theta`` (G', dim) and their exact
        derivatives (O', dim) by the estimated effects (forward sensitivities, :mod:`cnidose.pk.tangent`, or through
        the closed form, :func:`cnidose.pk.superposition.predict_design_jacobian`), and the members held (G',): the
        rows of the others (a rate matrix that decomposes badly) are not set. None where neither applies."""
        which = np.arange(self.size) if which is None else which
        if self.design_exact and self.stack is None:
            return self._jacobian_fast(self.expand(theta[:, None, :]), which)
        if self.kernel is None or self.stack is None:
            return None
        out, jac, held = self.kernel.run(self.model, self.stack, which, self.expand(theta[:, None, :]),
                                         self._est_cols(), self.dim)
        return out[:, 0], jac[:, 0, :], held[:, 0]

    def _est_cols(self) -> IntArray:
        cols = np.full(self.full_dim, -1, dtype=np.int64)
        cols[self.estimated] = np.arange(self.dim)
        return cols

    def predict(self, theta: FloatArray, which: IntArray | None = None) -> FloatArray:
        """Predictions at the observations of members ``which`` (default all) for ``theta`` (G', B, dim).

        Returns (O', B), the observations of the selected members concatenated in order.
        """
        which = np.arange(self.size) if which is None else which
        if which.size == 0:
            return np.zeros((0, theta.shape[1]))
        full = self.expand(theta)
        if self.kernel is not None and self.stack is not None:
            # the compiled kernel wherever the group has it: faster than superposition at every size measured
            # (one patient, 16 points: 0.2-0.5 ms against 1.3-2.3; 4,000 individuals of model 001, 7 points each:
            # 25 ms against 74), and the source of the derivatives the descent takes; such a group has no design
            return self._predict_kernel(full, which)
        if self.fast:
            return self._predict_fast(full, which)
        # one engine run per distinct member, over all its rows' points at once (several starts of one
        # member: the engine's cost is mostly per run, not per point)
        B = theta.shape[1]
        uniq, inverse = np.unique(which, return_inverse=True)
        runs = {int(u): self._predict_engine(self.members[int(u)], full[inverse == j].reshape(-1, self.full_dim), B)
                for j, u in enumerate(uniq)}
        seen = dict.fromkeys(runs, 0)
        parts = []
        for g in which.tolist():
            k = seen[g]
            parts.append(runs[g][:, k * B:(k + 1) * B])
            seen[g] = k + 1
        return np.concatenate(parts, axis=0)

    # -- the paths -------------------------------------------------------------------------------------------------
    def _predict_kernel(self, full: FloatArray, which: IntArray) -> FloatArray:
        """The compiled kernel; a member it leaves (a rate matrix that decomposes badly) goes to the engine."""
        assert self.kernel is not None and self.stack is not None
        out, _, held = self.kernel.run(self.model, self.stack, which, full, self._est_cols(), 0)
        if not held.all():
            starts = np.concatenate([[0], np.cumsum(self.stack.n_obs[which])])
            for g in np.flatnonzero(~held.all(axis=1)):
                miss = ~held[g]
                rows = self._predict_engine(self.members[int(which[g])], full[g][miss], int(miss.sum()))
                out[starts[g]:starts[g + 1], miss] = rows
        return out

    def _predict_engine(self, m: Member, theta: FloatArray, block: int | None = None) -> FloatArray:
        """theta (B, full_dim) for one member -> (O_m, B). Where the parameters of some row are unusable and
        ``theta`` stacks blocks of ``block`` rows, each block is run alone, so that only its rows are lost."""
        if block is not None and theta.shape[0] > block:
            try:
                return self._run_engine(m, theta)
            except (CnidoseError, FloatingPointError, np.linalg.LinAlgError):
                return np.concatenate([self._predict_engine(m, theta[k:k + block])
                                       for k in range(0, theta.shape[0], block)], axis=1)
        try:
            return self._run_engine(m, theta)
        except (CnidoseError, FloatingPointError, np.linalg.LinAlgError):
            assert m.obs is not None
            return np.full((m.obs.rec.size, theta.shape[0]), np.nan)  # parameters the model cannot use

    def _run_engine(self, m: Member, theta: FloatArray) -> FloatArray:
        model = self.model
        assert m.prep is not None and m.obs is not None
        n_eta = len(model.iiv)
        etas = theta[:, :n_eta]
        kappas = None
        if model.iov is not None:
            kappas = theta[:, n_eta:].reshape(theta.shape[0], m.n_occasions, len(model.iov))
        sim = model.simulate(m.prep, etas, kappas=kappas)
        return sim.prediction[:, m.obs.rec].T

    def _jacobian_fast(self, full: FloatArray, which: IntArray) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
        model = self.model
        assert self.design is not None and isinstance(model.structure, LinearStructure)
        design = self._design_of(which)
        covs = {k: v[which][:, None] for k, v in self._covs.items()}
        G = full.shape[0]
        n_eta = len(model.iiv)
        # each estimated effect is a direction: its seed is that row of the identity
        names = [*model.iiv.names, *(model.iov.names if model.iov is not None else ())]
        seeds = {}
        for j, pos in enumerate(self.estimated.tolist()):
            seed = np.zeros((G, 1, self.dim))
            seed[..., j] = 1.0
            seeds[names[pos]] = seed
        params, tangents = model.evaluate_pk_tangents(
            covs, full[..., :n_eta], full[..., n_eta:] if model.iov is not None else None, (G, 1), seeds)
        conc, jac, bad = predict_design_jacobian(design, model.structure, params, tangents)
        out, jac = _transform_jacobian(model, design, params, tangents, covs, conc, jac)
        return out[:, 0], jac[:, 0, :], ~bad[:, 0]

    def _design_of(self, which: IntArray) -> Design:
        assert self.design is not None
        return self.design if which.size == self.size and np.all(which == np.arange(self.size)) \
            else _subset(self.design, which)

    def _predict_fast(self, full: FloatArray, which: IntArray) -> FloatArray:
        model = self.model
        assert self.design is not None and isinstance(model.structure, LinearStructure)
        design = self._design_of(which)
        covs = {k: v[which][:, None] for k, v in self._covs.items()}
        G, B = full.shape[0], full.shape[1]
        n_eta = len(model.iiv)
        params = model.evaluate_pk(covs, full[..., :n_eta], full[..., n_eta:] if model.iov is not None else None,
                                   (G, B))
        conc, bad = predict_design(design, model.structure, params)
        # members whose rate matrix does not decompose well (repeated eigenvalues): the engine (a group with the
        # compiled kernel is predicted by it instead, :meth:`predict`)
        if bad.any():
            for g in np.flatnonzero(bad.any(axis=1)):
                m = self.members[int(which[g])]
                assert m.prep is not None and m.obs is not None
                lo, hi = design.obs_start[g], design.obs_start[g + 1]
                try:
                    kap = None if model.iov is None else full[g][:, n_eta:].reshape(B, 1, len(model.iov))
                    raw = model.simulate(m.prep, full[g][:, :n_eta], kappas=kap).simulation.prediction
                    conc[lo:hi] = raw[:, m.obs.rec].T
                except (CnidoseError, FloatingPointError, np.linalg.LinAlgError):
                    conc[lo:hi] = np.nan
        return _transform(model, design, params, covs, conc)


def _transforms(model: Model, design: Design, params: dict[str, FloatArray], covs: dict[str, FloatArray],
                conc: FloatArray) -> Iterator[tuple[Expression, NDArray[np.bool_], IntArray, dict[str, Any]]]:
    """Each observation type with a transform that the design observes: the transform, its observations (mask), their
    individuals, and the environment it reads (the model's parameters, the covariates, the PK parameters, C)."""
    for ob in model.observations:
        if ob.transform is None:
            continue
        mask = design.obs_cmt == ob.compartment - 1
        if not mask.any():
            continue
        oi = design.obs_ind[mask]
        env: dict[str, Any] = {n: p.value for n, p in model.parameters.items()}
        env.update({n: v[oi] for n, v in covs.items()})  # (O', 1)
        env.update({n: v[oi] for n, v in params.items()})  # (O', B)
        env["C"] = conc[mask]
        yield ob.transform, mask, oi, env


def _transform(model: Model, design: Design, params: dict[str, FloatArray], covs: dict[str, FloatArray],
               conc: FloatArray) -> FloatArray:
    out = conc
    for transform, mask, _, env in _transforms(model, design, params, covs, conc):
        if out is conc:
            out = conc.copy()
        out[mask] = np.broadcast_to(np.asarray(transform(env), dtype=np.float64), conc[mask].shape)
    return out


def _transform_jacobian(model: Model, design: Design, params: dict[str, FloatArray], tangents: dict[str, FloatArray],
                        covs: dict[str, FloatArray], conc: FloatArray, jac: FloatArray
                        ) -> tuple[FloatArray, FloatArray]:
    """:func:`_transform` with the derivatives (O, B, d): dT = dT/dC dC + sum over the parameters u it reads of
    dT/du du (symbolic derivatives, :func:`cnidose.models.expr.derivative`)."""
    out, dout = _transform(model, design, params, covs, conc), jac
    for transform, mask, oi, env in _transforms(model, design, params, covs, conc):
        shape = jac[mask].shape
        d_c = derivative(transform, "C")
        total = np.zeros(shape) if d_c is None else np.asarray(d_c(env), dtype=np.float64)[..., None] * jac[mask]
        for u in transform.names:
            d_u = derivative(transform, u) if u in tangents else None
            if d_u is not None:
                total = total + np.asarray(d_u(env), dtype=np.float64)[..., None] * tangents[u][oi]
        if dout is jac:
            dout = jac.copy()
        dout[mask] = np.broadcast_to(total, shape)
    return out, dout


def ranges(starts: IntArray, counts: IntArray) -> IntArray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return (np.repeat(starts, counts) + np.arange(total) - offsets).astype(np.int64)


def _subset(design: Design, which: IntArray) -> Design:
    """The design for individuals ``which`` (in that order, repeats allowed), renumbered 0..len(which)-1."""
    obs_counts = np.diff(design.obs_start)[which]
    obs_idx = ranges(design.obs_start[which], obs_counts)
    new_obs_start = np.concatenate([[0], np.cumsum(obs_counts)]).astype(np.int64)
    pair_start = np.searchsorted(design.pair_obs, design.obs_start)
    pair_counts = (pair_start[which + 1] - pair_start[which]).astype(np.int64)
    pidx = ranges(pair_start[which], pair_counts)
    g_of_pair = np.repeat(np.arange(which.size), pair_counts)
    shift = (new_obs_start[:-1] - design.obs_start[which])[g_of_pair]
    return Design(
        n_individuals=which.size, n_cmt=design.n_cmt, obs_ind=np.repeat(np.arange(which.size), obs_counts),
        obs_cmt=design.obs_cmt[obs_idx], obs_rec=design.obs_rec[obs_idx], obs_time=design.obs_time[obs_idx],
        obs_start=new_obs_start, pair_obs=design.pair_obs[pidx] + shift, pair_ind=g_of_pair,
        pair_cmt=design.pair_cmt[pidx], pair_tobs=design.pair_tobs[pidx], pair_tdose=design.pair_tdose[pidx],
        pair_kind=design.pair_kind[pidx], pair_amt=design.pair_amt[pidx], pair_rate=design.pair_rate[pidx],
        pair_ss=design.pair_ss[pidx], pair_ii=design.pair_ii[pidx], pair_addl=design.pair_addl[pidx],
        dose_cmts=design.dose_cmts,
    )


def _constant_covariates(prep: Prepared) -> bool:
    return all(v.size == 0 or bool(np.all(v == v[0])) for v in prep.covariates.values())


def _superposed(model: Model, prep: Prepared) -> bool:
    """Whether the individual is predicted by superposition (module docstring): a linear model, parameters
    constant over its records (one occasion, constant covariates) and records superposition takes."""
    return (isinstance(model.structure, LinearStructure) and (model.iov is None or prep.n_occasions == 1)
            and _constant_covariates(prep) and design_supports(model.structure, prep.individual))


# Compiled code pays for itself in one process after about this many fits that it speeds up. Measured
# 2026-12-07 on the 2-core machine: loading the compiled modules from the disk cache costs a fresh process
# 0.9 s (`cnidose fit` of the two example patients with Andrews 2019: 1.80 s, 0.94 s without; `recommend`
# of the example kidney patient 3.58 s and 2.71 s, the same recommendation), and a fit on the engine path
# gains about 25 ms with exact derivatives (Størset 2014, 6 troughs: 26 ms against 49-55 ms). Individuals
# fitted by superposition gain nothing (model 001 of the MAP suite, 4,000 individuals: the kernel's plans
# cost more than its derivatives save; `cnidose fit` 4.4 s with, 2.9-3.3 s without).
_KERNEL_PAYS_AFTER = 40


def compiled_pays(models: Sequence[Model], individuals: Sequence[Individual], *, per_level: bool = False,
                  repeats: int = 1) -> bool:
    """Whether a one-off job (a command-line run) should load the compiled kernels: always for ODE models (the
    compiled integrator is far faster than SciPy's), else when the fits the kernels speed up (on the engine
    path: time-varying covariates, several occasions) number at least ``_KERNEL_PAYS_AFTER``. ``per_level``:
    each individual is fitted once per level (forecasting evaluation); ``repeats``: each fit made that many
    times (strategies). A long-running process (the web app, the API) keeps them: the cost is paid once."""
    if any(isinstance(model.structure, OdeStructure) for model in models):
        return True
    # a large data set: an even sample of it, the count scaled (binding every individual only to decide cost a
    # tenth of a second for 4,000; a wrong guess costs time, never a different estimate)
    sample: Sequence[Individual] = individuals
    if len(individuals) > _PAYS_SAMPLE:
        sample = [individuals[int(k)] for k in np.linspace(0, len(individuals) - 1, _PAYS_SAMPLE)]
    scale = len(individuals) / max(len(sample), 1)
    fits = 0.0
    for model in models:
        for ind in sample:
            try:
                prep = model.prepare(ind)
            except CnidoseError:
                continue
            if _superposed(model, prep):
                continue
            levels = int(np.sum((ind.evid == 0) & (ind.mdv == 0))) if per_level else 1
            fits += levels * repeats * scale
            if fits >= _KERNEL_PAYS_AFTER:
                return True
    return False


_PAYS_SAMPLE = 256


def build_groups(model: Model, individuals: Sequence[Individual], *, fast: bool = True, compiled: bool = True
                 ) -> tuple[list[Group], list[Member]]:
    """Prepare every individual; returns the fittable groups and every member (errors recorded, not raised).

    ``compiled``: give each group the model's compiled kernel where it holds every member (exact derivatives,
    :meth:`Group.jacobian`); False: predictions by the engine or superposition alone.
    """
    members = [Member(k, ind) for k, ind in enumerate(individuals)]
    est = np.flatnonzero(np.diag(model.omega) > 0).astype(np.int64)
    n_eta = len(model.iiv)
    prec_eta: FloatArray = _inv(model.omega[np.ix_(est, est)]) if est.size else np.zeros((0, 0))
    fast_members: list[Member] = []
    slow_members: list[Member] = []
    prepared: list[Member] = []
    for m in members:
        try:
            m.prep = model.prepare(m.individual)
        except CnidoseError as exc:
            m.error = str(exc)
            continue
        m.notices = m.prep.notices
        prepared.append(m)
    bound = observation_data_many(model, [m.prep for m in prepared])  # type: ignore[misc]
    for m, obs in zip(prepared, bound, strict=True):
        if isinstance(obs, CnidoseError):
            m.error = str(obs)
            continue
        assert m.prep is not None
        m.obs = obs
        m.n_occasions = m.prep.n_occasions
        eligible = fast and _superposed(model, m.prep)
        (fast_members if eligible else slow_members).append(m)
    groups: list[Group] = []
    def layout(n_occ: int) -> tuple[IntArray, FloatArray, int]:
        if model.iov is None:
            return est, prec_eta, n_eta
        kest = np.flatnonzero(np.diag(model.iov.omega) > 0)
        est_full = np.concatenate([est, n_eta + (np.arange(n_occ)[:, None] * len(model.iov)
                                                 + kest[None, :]).ravel()]).astype(np.int64)
        prec_k: FloatArray = _inv(model.iov.omega[np.ix_(kest, kest)]) if kest.size else np.zeros((0, 0))
        return est_full, _block_diag([prec_eta] + [prec_k] * n_occ), n_eta + n_occ * len(model.iov)

    if fast_members:
        groups.append(_group(model, fast_members, *layout(1), fast=True))
    kernel = model_kernel(model) if compiled and members else None
    plans: dict[int, Plan] = {}
    if kernel is not None:
        for m in (*fast_members, *slow_members):
            assert m.obs is not None and m.prep is not None
            plan = kernel.plan(model, m.prep, m.obs.rec)
            if plan is not None:
                plans[m.index] = plan
        if groups and all(m.index in plans for m in groups[0].members):  # the superposition group's kernel
            groups[0].kernel, groups[0].stack = kernel, Stack.of([plans[m.index] for m in groups[0].members])
    if fast_members and groups[0].stack is None:  # superposition predicts the group (a kernel would: Group.predict)
        g = groups[0]
        assert isinstance(model.structure, LinearStructure)
        # the prepared records (intravenous doses routed to the model's IV compartment), as the engine reads them
        g.design = compile_design(model.structure, [m.prep.individual for m in fast_members],  # type: ignore[union-attr]
                                  observe=[_mask(m) for m in fast_members])
        g._covs = {k: np.array([m.prep.covariates[k][0] if m.prep.covariates[k].size else np.nan  # type: ignore[union-attr]
                                for m in fast_members]) for k in (fast_members[0].prep.covariates if
                                                                  fast_members[0].prep else {})}
        # exact derivatives through the closed form where it has them (design_differentiable), with a gamma input's
        # n and mtt free of random effects (no derivative of Kummer's function by them); an observation transform
        # (whole blood from plasma) is differentiated symbolically (_transform_jacobian)
        gamma = model.structure.gamma
        moved = effect_dependencies(model)
        g.design_exact = compiled and design_differentiable(g.design) and (
            gamma is None or not (moved.get(gamma.n) or moved.get(gamma.mtt)))
    # the kernel predicts many individuals in one call: those it holds share a group per layout (number of
    # occasions), so that the optimiser works on all of them at once; the others are predicted by the engine,
    # one group each
    # with a drifting occasion prior (Fitting.drift) each individual's prior depends on its occasions' times: a group
    # of its own
    drifting = model.iov is not None and model.fitting.drift is not None
    held: dict[int, list[Member]] = {}
    for m in slow_members:
        if m.index in plans:
            held.setdefault(m.index if drifting else -m.n_occasions, []).append(m)
        else:
            groups.append(_group(model, [m], *layout(m.n_occasions), fast=False))
    for ms in held.values():
        g = _group(model, ms, *layout(ms[0].n_occasions), fast=False)
        g.kernel, g.stack = kernel, Stack.of([plans[m.index] for m in ms])
        groups.append(g)
    if drifting:
        for g in groups:
            if not g.fast and g.members[0].prep is not None:
                g.precision = _drift_precision(model, g, g.members[0].prep)
    return groups, members


def occasion_times(prep: Prepared) -> FloatArray:
    """The time of each occasion: its first level (EVID 0, MDV 0), else its first record."""
    ind = prep.individual
    out = np.full(prep.n_occasions, np.nan)
    level = (ind.evid == 0) & (ind.mdv == 0)
    for o in range(prep.n_occasions):
        here = prep.occasion == o
        t = ind.time[here & level]
        out[o] = float(t.min()) if t.size else float(ind.time[here].min()) if here.any() else np.nan
    return out


def occasion_prior(model: Model, times: FloatArray) -> FloatArray:
    """The prior covariance of every between-occasion effect of occasions at ``times`` (occasion-major: occasion o's
    effects at o * n_kappa + j): the model's occasion-to-occasion covariance within each occasion, plus, with a
    drift W (:class:`cnidose.models.model.Fitting`), a Wiener process per effect from the first occasion,
    cov = W² min(t_o - t_0, t_o' - t_0) / 168 h. A random walk is the simplest prior under which a parameter that
    changes with time since transplantation (tacrolimus clearance over the first weeks) is followed without a
    model of its course: it lets the effects of neighbouring occasions be alike, and gives an occasion without a
    level the conditional mean of the recent ones (kriging), where independent effects give it zero."""
    assert model.iov is not None
    n_k = len(model.iov)
    n_occ = times.size
    base: FloatArray = np.asarray(np.kron(np.eye(n_occ), model.iov.omega), dtype=np.float64)
    drift = model.fitting.drift
    if drift is None or n_occ == 0:
        return base
    tau = np.maximum(times - np.nanmin(times), 0.0)
    walk = drift**2 / 168.0 * np.minimum(tau[:, None], tau[None, :])
    active = (np.diag(model.iov.omega) > 0).astype(float)
    return np.asarray(base + np.kron(walk, np.diag(active)), dtype=np.float64) if n_k else base


def _drift_precision(model: Model, g: Group, prep: Prepared) -> FloatArray:
    """The group's prior precision with the drifting occasion prior (estimated effects, the group's order)."""
    n_eta = len(model.iiv)
    cov_full = np.zeros((g.full_dim, g.full_dim))
    cov_full[:n_eta, :n_eta] = model.iiv.omega
    cov_full[n_eta:, n_eta:] = occasion_prior(model, occasion_times(prep))
    return _inv(cov_full[np.ix_(g.estimated, g.estimated)])


def _mask(m: Member) -> NDArray[np.bool_]:
    assert m.obs is not None
    out = np.zeros(len(m.individual), dtype=bool)
    out[m.obs.rec] = True
    return out


def _block_diag(blocks: list[FloatArray]) -> FloatArray:
    n = sum(b.shape[0] for b in blocks)
    out = np.zeros((n, n))
    k = 0
    for b in blocks:
        out[k:k + b.shape[0], k:k + b.shape[0]] = b
        k += b.shape[0]
    return out


def effect_layout(model: Model, n_occasions: int) -> list[tuple[str, str, int]]:
    """The model's full random-effect vector for ``n_occasions`` occasions: (name, the model's effect, occasion)
    per position -- the between-subject effects (occasion 0), then each occasion's effects as ``NAME_OCCk``."""
    out = [(n, n, 0) for n in model.iiv.names]
    if model.iov is not None:
        out += [(f"{n}_OCC{k + 1}", n, k + 1) for k in range(n_occasions) for n in model.iov.names]
    return out


def _group(model: Model, members: list[Member], est: IntArray, precision: FloatArray, full_dim: int, *,
           fast: bool) -> Group:
    layout = effect_layout(model, (full_dim - len(model.iiv)) // len(model.iov) if model.iov is not None else 0)
    obs = [m.obs for m in members]
    assert all(o is not None for o in obs)

    def cat(attr: str) -> Any:
        return np.concatenate([getattr(o, attr) for o in obs]) if obs else np.zeros(0)

    counts = [len(o) for o in obs if o is not None]
    return Group(model=model, members=members, dim=int(est.size), names=tuple(layout[int(k)][0] for k in est),
                 bases=tuple(layout[int(k)][1] for k in est), occasions=tuple(layout[int(k)][2] for k in est),
                 precision=precision, estimated=est, full_dim=full_dim, fast=fast,
                 obs_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                 y=cat("y"), blq=cat("blq"), limit=cat("limit"), log=cat("log"), prop=cat("prop"), add=cat("add"),
                 sd_log=cat("sd_log"), if_zero=cat("if_zero"))
