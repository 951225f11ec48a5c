"""The :class:`Model` value: a validated model file, ready to evaluate.

A model is loaded from TOML by :func:`cnidose.models.fileformat.parse_model`
(the format is described there). Evaluating it for an individual goes in two
steps:

1. :meth:`Model.prepare` binds the individual's records to the model once:
   covariates are taken from the data (standard names and data units, see
   :mod:`cnidose.models.covariates`), derived or defaulted where the model
   allows it, checked for plausibility (an error) and against the model's
   validity domain (a :class:`Notice` that travels with every result), and
   converted to the units the model was written in.
2. :meth:`Model.individual_parameters`, :meth:`Model.simulate` and
   :meth:`Model.residual_variance` evaluate the ``[pk]`` block for any batch
   of random effects.

Every result names the model (``id``, ``version``, ``content_hash``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cnidose.errors import DataError
from cnidose.models.covariates import DERIVATIONS, STANDARD_COVARIATES
from cnidose.models.expr import Expression, derivative
from cnidose.pk.engine import DoseValues, Method, Simulation, no_modelled_input, simulate
from cnidose.pk.events import Individual, split_individuals
from cnidose.pk.structure import LinearStructure, OdeStructure

__all__ = [
    "EXPOSURE",
    "IV",
    "Check",
    "Covariate",
    "ErrorModel",
    "Fitting",
    "Model",
    "ModelSimulation",
    "Notice",
    "Observation",
    "Parameter",
    "Prepared",
    "RandomEffects",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Reserved data column: a multiplier on the agent's exposure from an interaction (e.g. 3 while voriconazole
#: is given with tacrolimus; see ``cnidose.clinical``). It enters every model as a divisor of its clearance
#: parameter ``CL`` (CL / EXPOSURE, so AUC and steady-state levels are multiplied by it) over the interval
#: each record covers -- the time-varying covariate semantics of the engine: a record's value applies to the
#: interval ending at it. Absent or 1: no change. ``cnidose.models.exposure.with_exposure`` writes it.
EXPOSURE = "EXPOSURE"
EXPOSED_PARAMETER = "CL"

#: Reserved data column: 1 on a dose record given intravenously, 0 (or missing) for the model's default route.
#: A dose with IV = 1 and no CMT enters the model's ``iv_dose`` compartment (``[structure] iv_dose``); a model
#: without one refuses it (an intravenous dose read as oral would be absorbed, with oral bioavailability).
IV = "IV"
ErrorKind = Literal["proportional", "additive", "combined", "exponential"]


@dataclass(frozen=True, slots=True)
class Parameter:
    """A fixed effect as published."""

    name: str
    value: float
    unit: str
    description: str = ""
    source: str = ""
    fixed: bool = False


@dataclass(frozen=True, slots=True)
class Covariate:
    """A covariate the model reads.

    ``unit`` is the unit the model's equations use; data values (in the
    standard data unit where the name is standard) are converted to it by
    ``factor``. ``domain`` is the model's validity domain (outside: a notice);
    ``default`` is used where the data lack a value (a notice says so);
    ``derive`` names a function of :data:`~cnidose.models.covariates.DERIVATIONS`.
    """

    name: str
    unit: str
    description: str = ""
    domain: tuple[float, float] | None = None
    default: float | None = None
    default_note: str = ""
    levels: Mapping[int, str] = field(default_factory=dict)
    derive: str | None = None
    derive_note: str = ""
    factor: float = 1.0  # data unit -> model unit
    data_unit: str = ""
    domain_only: bool = False  # not in the equations: only checked against the domain when present
    #: a 0/1 covariate read from a patient's medication list: 1 while one of these (lower case) is taken and for
    #: ``after_days`` days after it stops (the paper's coding); the rule base's exposure multiplier for these
    #: drugs is then not applied as well (the model has their effect)
    medications: tuple[str, ...] = ()
    after_days: float = 0.0


@dataclass(frozen=True, slots=True)
class RandomEffects:
    """Named random effects and their covariance, with how it was obtained from the paper."""

    names: tuple[str, ...]
    omega: FloatArray
    published: str = ""  # e.g. "CV% 38.6, 49.2; omega2 = (CV/100)^2"
    occasion: str | None = None  # data column that numbers occasions (IOV only)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True, slots=True)
class ErrorModel:
    """Residual error of one observation type. Magnitudes are standard deviations.

    ``proportional`` (fraction of the prediction), ``additive`` (observation
    unit), ``exponential`` (SD on the log scale): each an expression of the
    model's names, evaluated per record. Variance: proportional ``(p·f)²``,
    additive ``a²``, combined ``(p·f)² + a²`` (NONMEM ``Y = F + F·ε₁ + ε₂``),
    exponential ``s²`` on the log scale (``log Y = log F + ε``).
    """

    kind: ErrorKind
    proportional: Expression | None = None
    additive: Expression | None = None
    exponential: Expression | None = None
    prediction_if_zero: float | None = None  # NONMEM idiom W = F + DEL: f used in p·f where f == 0

    @property
    def log_scale(self) -> bool:
        return self.kind == "exponential"


@dataclass(frozen=True, slots=True)
class Observation:
    """An observation type: compartment, concentration scaling, optional transform, error."""

    name: str
    compartment: int  # 1-based CMT
    scale: Expression  # volume expression, in ``scale_unit``
    scale_unit: str
    unit: str
    factor: float  # (dose unit / scale unit) -> ``unit``
    error: ErrorModel | None
    transform: Expression | None = None  # of C (the scaled concentration) and model names
    description: str = ""


@dataclass(frozen=True, slots=True)
class Check:
    """A reference check: a published (or independently computed) statement the model reproduces."""

    name: str
    kind: Literal["value", "ratio", "steady_state"]
    statement: str
    source: str
    expr: Expression | None
    covariates: Mapping[str, float]
    expected: float
    rtol: float
    versus: Mapping[str, float] = field(default_factory=dict)
    dose: float = 0.0
    tau: float = 0.0
    metric: Literal["trough", "cavg", "cmax"] = "trough"
    observation: str = ""


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a result must show: a covariate outside the model's domain, a default or derived value."""

    kind: Literal["domain", "default", "derived"]
    covariate: str
    message: str
    row: int | None = None

    def __str__(self) -> str:
        return f"{self.message} (row {self.row})" if self.row is not None else self.message


@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """An individual bound to a model: covariates in model units, occasions, observation types."""

    individual: Individual
    covariates: Mapping[str, FloatArray]
    occasion: IntArray  # per record, 0..n_occasions-1
    n_occasions: int
    obs_type: IntArray  # per record: index into Model.observations, -1 if none
    notices: tuple[Notice, ...]


@dataclass(frozen=True, slots=True)
class ModelSimulation:
    """Predictions of a model for one individual, with the notices that apply and the model's identity."""

    prediction: FloatArray  # (B, R), observation scale (transform applied)
    simulation: Simulation
    parameters: Mapping[str, FloatArray]
    notices: tuple[Notice, ...]
    model: str  # "id version sha256:abcd..."

    @property
    def method(self) -> str:
        return self.simulation.method

    @property
    def amounts(self) -> FloatArray | None:
        return self.simulation.amounts


@dataclass(frozen=True, slots=True)
class Fitting:
    """How the levels enter a fit: options of the estimation, not of the published model.

    ``log_scale``: a proportional, additive or combined residual error is fitted on the log scale
    (transform both sides), with SD ``sqrt(p² + (a/level)²)`` at each measured level -- the variance no longer
    depends on the prediction, so the ``ln V(f)`` term that pulls a proportional-error MAP estimate towards
    higher predictions by about ``p²`` is gone. ``half_life`` (hours): exponential forgetting -- a level's
    weight (the inverse of its variance's multiplier) is ``2**(-age / half_life)``, its age counted back from the
    newest level of the fit, and the weights are scaled to a mean of 1, so that older levels weigh less against
    the newer ones and the levels together weigh as much against the prior as without forgetting (weights that
    only fall also move weight to the population prior, which is where a drifting patient is leaving: on the
    simulated drift cohort, 60 patients, that forgetting lost to plain MAP; see benchmarks/strategies.py).
    ``drift`` (log units per square root
    of a week): each between-occasion effect is the sum of the model's occasion-to-occasion variability and a
    random walk (a Wiener process from the patient's first occasion) with that SD after one week -- the effects of
    occasions close in time are alike, and an occasion without a level (the next one) is estimated from the
    recent ones (:func:`cnidose.estimation.cohort.occasion_prior`).
    """

    log_scale: bool = False
    half_life: float | None = None
    drift: float | None = None

    @property
    def plain(self) -> bool:
        return not self.log_scale and self.half_life is None and self.drift is None


@dataclass(frozen=True, slots=True)
class Model:
    """A loaded, validated model. Immutable; results cite ``id``, ``version`` and ``content_hash``."""

    id: str
    version: str
    title: str
    content_hash: str
    structure: LinearStructure | OdeStructure
    parameters: Mapping[str, Parameter]
    iiv: RandomEffects
    iov: RandomEffects | None
    covariates: Mapping[str, Covariate]
    pk: tuple[tuple[str, Expression], ...]
    pk_units: Mapping[str, str]
    observations: tuple[Observation, ...]
    units: Mapping[str, str]
    checks: tuple[Check, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    citation: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    #: Which record's F, R and D a dose takes (:func:`cnidose.pk.simulate`): "nonmem" (those in force when it
    #: enters, PREDPP's rule) or "dose-record" (mrgsolve's); ``dataclasses.replace(model, dose_values=...)``.
    dose_values: DoseValues = "nonmem"
    #: 1-based compartment that intravenous doses enter (``[structure] iv_dose``); None: the model has no
    #: intravenous route.
    iv_dose: int | None = None
    #: Estimation options (:class:`Fitting`); ``dataclasses.replace(model, fitting=Fitting(...))``.
    fitting: Fitting = Fitting()

    # -- identity ---------------------------------------------------------------------------------------------------
    @property
    def ref(self) -> str:
        """``id version sha256:<first 12 hex>``: how results cite the model."""
        return f"{self.id} {self.version} sha256:{self.content_hash[:12]}"

    @property
    def eta_names(self) -> tuple[str, ...]:
        return self.iiv.names

    @property
    def omega(self) -> FloatArray:
        return self.iiv.omega

    # -- binding an individual ------------------------------------------------------------------------------------
    def prepare(self, individual: Individual | Prepared) -> Prepared:
        """Resolve covariates, occasions and observation types for ``individual`` (once)."""
        if isinstance(individual, Prepared):
            return individual
        ind = self._route_doses(individual)
        self._check_modelled_inputs(ind)
        notices: list[Notice] = []
        covs = {}
        for name, cov in self.covariates.items():
            if cov.domain_only:
                if name in ind.covariates:
                    self._domain_only(ind, cov, notices)
                continue
            covs[name] = self._covariate(ind, cov, notices)
        R = len(ind)
        occasion = np.zeros(R, dtype=np.int64)
        n_occ = 1
        if self.iov is not None and self.iov.occasion is not None:
            col = ind.covariates.get(self.iov.occasion)
            if col is not None:
                if np.isnan(col).any():
                    j = int(np.flatnonzero(np.isnan(col))[0])
                    raise DataError("occasion number is missing", row=int(ind.rows[j]), column=self.iov.occasion)
                _, first, inverse = np.unique(col, return_index=True, return_inverse=True)
                # number occasions in order of first appearance
                order = np.argsort(np.argsort(first))
                occasion = order[inverse].astype(np.int64)
                n_occ = int(occasion.max()) + 1 if R else 1
        exposure = self._exposure(ind)
        if exposure is not None:
            covs[EXPOSURE] = exposure
        obs_cmt = np.where((ind.evid == 0) & (ind.cmt > 0), ind.cmt, self.structure.default_obs)
        obs_type = np.full(R, -1, dtype=np.int64)
        for k, ob in enumerate(self.observations):
            obs_type[obs_cmt == ob.compartment] = k
        return Prepared(ind, covs, occasion, n_occ, obs_type, tuple(notices))

    def _check_modelled_inputs(self, ind: Individual) -> None:
        """A dose at RATE -1 (-2) needs the model's R<n> (D<n>) of its compartment: refused here, naming the row and
        the column, before any fit (the engine would refuse it only when it predicts, and a fit would then report
        an impossible objective instead of the data's fault)."""
        if not (ind.rate < 0).any():  # the common case, at a cohort's every individual: no modelled input
            return
        dose = (ind.evid == 1) | (ind.evid == 4)
        names = {name for name, _ in self.pk}
        for j in np.flatnonzero(dose & ((ind.rate == -1) | (ind.rate == -2))).tolist():
            key = f"{'R' if ind.rate[j] == -1 else 'D'}{int(ind.cmt[j]) or self.structure.default_dose}"
            if key not in names:
                raise no_modelled_input(key, int(ind.rows[j]))

    def _route_doses(self, ind: Individual) -> Individual:
        """Send intravenous doses (``IV`` = 1, no CMT) to the model's intravenous compartment, or refuse them."""
        col = ind.covariates.get(IV)
        if col is None:
            return ind
        dose = (ind.evid == 1) | (ind.evid == 4)
        odd = dose & ~np.isnan(col) & (col != 0) & (col != 1)
        if odd.any():
            j = int(np.flatnonzero(odd)[0])
            raise DataError(f"IV is 1 (an intravenous dose) or 0, got {col[j]:g}", row=int(ind.rows[j]), column=IV)
        iv = dose & (col == 1) & (ind.cmt == 0)
        if not iv.any():
            return ind
        if self.iv_dose is None:
            j = int(np.flatnonzero(iv)[0])
            routes = ", ".join(self.meta.get("route", ())) or "its default"
            raise DataError(f"an intravenous dose, and {self.id} describes {routes} doses only: it would be read "
                            "as absorbed, with oral bioavailability (use a model whose route includes intravenous, "
                            "see cnidose models list, or leave the dose out)", row=int(ind.rows[j]), column=IV)
        cmt = ind.cmt.copy()
        cmt[iv] = self.iv_dose
        return dataclasses.replace(ind, cmt=cmt)

    def _exposure(self, ind: Individual) -> FloatArray | None:
        """The EXPOSURE column, checked (None when absent or 1 throughout)."""
        raw = ind.covariates.get(EXPOSURE)
        if raw is None:
            return None
        values = np.asarray(raw, dtype=np.float64)
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DataError(f"the exposure multiplier must be a positive number, not {values[j]:g}",
                            row=int(ind.rows[j]), column=EXPOSURE)
        if np.all(values == 1.0):
            return None
        if EXPOSED_PARAMETER not in {name for name, _ in self.pk}:
            j = int(np.flatnonzero(values != 1.0)[0])
            raise DataError(f"model {self.id} has no clearance parameter {EXPOSED_PARAMETER} for the exposure "
                            "multiplier to divide", row=int(ind.rows[j]), column=EXPOSURE)
        return values

    def _covariate(self, ind: Individual, cov: Covariate, notices: list[Notice]) -> FloatArray:
        R = len(ind)
        raw = ind.covariates.get(cov.name)
        values = np.full(R, np.nan) if raw is None else np.array(raw, dtype=np.float64)
        missing = np.isnan(values)
        if missing.any() and cov.derive is not None:
            d = DERIVATIONS[cov.derive]
            absent = [n for n in d.inputs if n not in ind.covariates]
            if not absent:
                inputs = [self._standard_input(ind, n) for n in d.inputs]
                derived = d(*inputs)
                fill = missing & np.isfinite(derived)
                if fill.any():
                    values[fill] = derived[fill]
                    j = int(np.flatnonzero(fill)[0])
                    notices.append(Notice("derived", cov.name,
                                          f"{cov.name} derived from {', '.join(d.inputs)} by {d.name} ({d.citation})"
                                          + (f"; {cov.derive_note}" if cov.derive_note else ""),
                                          int(ind.rows[j])))
                missing = np.isnan(values)
        if missing.any():
            j = int(np.flatnonzero(missing)[0])
            if cov.default is None:
                how = f" (or {', '.join(DERIVATIONS[cov.derive].inputs)} to derive it)" if cov.derive else ""
                what = "missing" if raw is not None else "absent from the data"
                raise DataError(f"covariate {cov.name} ({cov.data_unit or cov.unit}) is required by model {self.id} "
                                f"and is {what}{how}", row=int(ind.rows[j]) if raw is not None else None,
                                column=cov.name)
            default_data = cov.default / cov.factor
            values[missing] = default_data
            notices.append(Notice("default", cov.name,
                                  f"{cov.name} not in the data: model default "
                                  f"{cov.default:g}{_unit_suffix(cov.unit)} used"
                                  + (f" ({cov.default_note})" if cov.default_note else ""),
                                  int(ind.rows[j]) if raw is not None else None))
        _check_plausible(ind, cov.name, values, np.ones(values.size, dtype=bool))
        if cov.levels:
            bad = ~np.isin(values, list(cov.levels))
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                codes = ", ".join(f"{k} = {v}" for k, v in cov.levels.items())
                raise DataError(f"{cov.name} = {values[j]:g} is not a valid code ({codes})",
                                row=int(ind.rows[j]), column=cov.name)
        out = values * cov.factor
        self._check_domain(ind, cov, out, np.ones(out.size, dtype=bool), notices)
        return out

    def _check_domain(self, ind: Individual, cov: Covariate, values: FloatArray, present: NDArray[np.bool_],
                      notices: list[Notice]) -> None:
        """A notice (not an error) where values in model units fall outside the model's validity domain."""
        if cov.domain is None:
            return
        lo, hi = cov.domain
        bad = present & ((values < lo) | (values > hi))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            u = _unit_suffix(cov.unit)
            notices.append(Notice("domain", cov.name,
                                  f"{cov.name} = {values[j]:g}{u} is outside the domain of model {self.id} "
                                  f"({lo:g}-{hi:g}{u}) in {int(bad.sum())} record(s)", int(ind.rows[j])))

    def _domain_only(self, ind: Individual, cov: Covariate, notices: list[Notice]) -> None:
        values = np.array(ind.covariates[cov.name], dtype=np.float64)
        present = ~np.isnan(values)
        _check_plausible(ind, cov.name, values, present)
        self._check_domain(ind, cov, values * cov.factor, present, notices)

    @staticmethod
    def _standard_input(ind: Individual, name: str) -> FloatArray:
        v = np.array(ind.covariates[name], dtype=np.float64)
        std = STANDARD_COVARIATES[name]
        if std.levels:
            bad = ~np.isnan(v) & ~np.isin(v, list(std.levels))
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                codes = ", ".join(f"{k} = {lab}" for k, lab in std.levels.items())
                raise DataError(f"{name} = {v[j]:g} is not a valid code ({codes})", row=int(ind.rows[j]), column=name)
            return v
        lo, hi = std.plausible
        bad = (v < lo) | (v > hi)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DataError(f"{name} = {v[j]:g} is not a plausible {std.description} in {std.unit} "
                            f"(expected {lo:g}-{hi:g}; check the unit)", row=int(ind.rows[j]), column=name)
        return v

    # -- evaluation -------------------------------------------------------------------------------------------------
    def _env(self, covariates: Mapping[str, FloatArray], eta: FloatArray, kappa: FloatArray | None) -> dict[str, Any]:
        env: dict[str, Any] = {n: p.value for n, p in self.parameters.items()}
        for k, name in enumerate(self.iiv.names):
            env[name] = eta[..., k]
        if self.iov is not None:
            for k, name in enumerate(self.iov.names):
                env[name] = 0.0 if kappa is None else kappa[..., k]
        env.update(covariates)
        return env

    def individual_parameters(self, individual: Individual | Prepared, etas: ArrayLike | None = None,
                              kappas: ArrayLike | None = None) -> dict[str, FloatArray]:
        """Evaluate ``[pk]`` (and the observation scales ``S<n>``) at every record.

        Parameters
        ----------
        individual : Individual or Prepared
        etas : array-like, shape (B, n_eta) or (B, R, n_eta), optional
            Between-subject random effects; None means all zero (the typical individual).
        kappas : array-like, shape (B, n_occasions, n_kappa), optional
            Between-occasion random effects; None means all zero.

        Returns
        -------
        dict of str to ndarray of shape (B, R)
        """
        prep = self.prepare(individual)
        R = len(prep.individual)
        n_eta = len(self.iiv)
        if etas is None:
            eta = np.zeros((1, 1, n_eta))
        else:
            eta = np.asarray(etas, dtype=np.float64)
            if eta.ndim == 2:
                eta = eta[:, None, :]
            if eta.ndim != 3 or eta.shape[-1] != n_eta:
                raise ValueError(f"etas must have {n_eta} columns ({', '.join(self.iiv.names)})")
        kappa_r = None
        if kappas is not None:
            if self.iov is None:
                raise ValueError(f"model {self.id} has no between-occasion random effects")
            kap = np.asarray(kappas, dtype=np.float64)
            if kap.ndim != 3 or kap.shape[1:] != (prep.n_occasions, len(self.iov)):
                raise ValueError(f"kappas must have shape (B, {prep.n_occasions}, {len(self.iov)})")
            kappa_r = kap[:, prep.occasion, :]
        B = max(eta.shape[0], 1 if kappa_r is None else kappa_r.shape[0])
        return self.evaluate_pk({k: v[None, :] for k, v in prep.covariates.items()}, eta, kappa_r, (B, R))

    def evaluate_pk(self, covariates: Mapping[str, FloatArray], eta: FloatArray, kappa: FloatArray | None,
                    shape: tuple[int, ...]) -> dict[str, FloatArray]:
        """``[pk]`` and observation scales ``S<n>`` for arrays that broadcast to ``shape``.

        ``covariates`` are in model units; ``eta[..., k]`` and ``kappa[..., k]`` broadcast to ``shape``.
        Used per record (shape (B, R)) and for a whole cohort with constant covariates (shape (N, B)).
        """
        env = self._env(covariates, eta, kappa)
        out: dict[str, FloatArray] = {}
        exposure = covariates.get(EXPOSURE)
        for name, expr in self.pk:
            v = np.broadcast_to(np.asarray(expr(env), dtype=np.float64), shape)
            if exposure is not None and name == EXPOSED_PARAMETER:
                v = np.broadcast_to(v / exposure, shape)  # an interaction's multiplier on exposure
            env[name] = v
            out[name] = v
        for ob in self.observations:
            scale = np.broadcast_to(np.asarray(ob.scale(env), dtype=np.float64), shape)
            out[f"S{ob.compartment}"] = scale / ob.factor
        return out

    def evaluate_pk_tangents(self, covariates: Mapping[str, FloatArray], eta: FloatArray, kappa: FloatArray | None,
                             shape: tuple[int, ...], seeds: Mapping[str, FloatArray]
                             ) -> tuple[dict[str, FloatArray], dict[str, FloatArray]]:
        """:meth:`evaluate_pk` and each parameter's derivatives along d directions (forward mode, by the symbolic
        derivatives of the expressions, :func:`cnidose.models.expr.derivative`).

        ``seeds[name]`` (``shape`` + (d,)): the derivative of random effect ``name`` along each direction (a row of
        the identity for an estimated effect; absent: not estimated). Returns the parameters and, for each one that
        depends on a seeded effect, its derivatives (``shape`` + (d,)).
        """
        env = self._env(covariates, eta, kappa)
        out: dict[str, FloatArray] = {}
        tangents: dict[str, FloatArray] = dict(seeds)
        exposure = covariates.get(EXPOSURE)

        def tangent(expr: Expression, divisor: Any = None) -> FloatArray | None:
            total: FloatArray | None = None
            for u in expr.names:
                t_u = tangents.get(u)
                if t_u is None:
                    continue
                d = derivative(expr, u)
                if d is None:
                    continue
                part = np.asarray(d(env), dtype=np.float64)[..., None] * t_u
                total = part if total is None else total + part
            if total is not None and divisor is not None:
                total = total / np.asarray(divisor)[..., None]
            return total

        for name, expr in self.pk:
            v = np.broadcast_to(np.asarray(expr(env), dtype=np.float64), shape)
            divisor = exposure if exposure is not None and name == EXPOSED_PARAMETER else None
            t = tangent(expr, divisor)
            if divisor is not None:
                v = np.broadcast_to(v / divisor, shape)
            env[name] = v
            out[name] = v
            if t is not None:
                tangents[name] = t
        for ob in self.observations:
            scale = np.broadcast_to(np.asarray(ob.scale(env), dtype=np.float64), shape)
            key = f"S{ob.compartment}"
            out[key] = scale / ob.factor
            t = tangent(ob.scale, ob.factor)
            if t is not None:
                tangents[key] = t
        return out, {k: np.broadcast_to(v, (*shape, v.shape[-1])) for k, v in tangents.items()
                     if k in out}

    def simulate(self, individual: Individual | Prepared, etas: ArrayLike | None = None, *,
                 kappas: ArrayLike | None = None, method: Method = "auto",
                 return_amounts: bool = False) -> ModelSimulation:
        """Predict every record of ``individual`` on the observation scale.

        The engine (:func:`cnidose.pk.simulate`) gives amount / scale; each
        observation type's ``transform`` is then applied to its records.
        """
        prep = self.prepare(individual)
        params = self.individual_parameters(prep, etas, kappas)
        sim = simulate(self.structure, prep.individual, params, method=method, return_amounts=return_amounts,
                       dose_values=self.dose_values)
        pred = self._transform(prep, params, sim.prediction)
        return ModelSimulation(pred, sim, params, prep.notices, self.ref)

    def _transform(self, prep: Prepared, params: Mapping[str, FloatArray], conc: FloatArray) -> FloatArray:
        out = conc
        for k, ob in enumerate(self.observations):
            if ob.transform is None:
                continue
            mask = prep.obs_type == k
            if not mask.any():
                continue
            env: dict[str, Any] = {n: p.value for n, p in self.parameters.items()}
            env.update({n: v[None, mask] for n, v in prep.covariates.items()})
            env.update({n: v[:, mask] for n, v in params.items()})
            env["C"] = conc[:, mask]
            if out is conc:
                out = conc.copy()
            out[:, mask] = np.broadcast_to(np.asarray(ob.transform(env), dtype=np.float64), conc[:, mask].shape)
        return out

    def residual_variance(self, individual: Individual | Prepared, params: Mapping[str, FloatArray],
                          prediction: FloatArray) -> tuple[FloatArray, NDArray[np.bool_]]:
        """Residual variance at every record, and whether it is on the log scale.

        Records of no observation type get NaN.
        """
        prep = self.prepare(individual)
        B, R = prediction.shape
        var = np.full((B, R), np.nan)
        log_scale = np.zeros(R, dtype=bool)
        for k, ob in enumerate(self.observations):
            mask = prep.obs_type == k
            if ob.error is None or not mask.any():
                continue
            env: dict[str, Any] = {n: p.value for n, p in self.parameters.items()}
            env.update({n: v[None, mask] for n, v in prep.covariates.items()})
            env.update({n: v[:, mask] for n, v in params.items()})
            f = prediction[:, mask]
            e = ob.error

            def sd(x: Expression | None, _env: dict[str, Any] = env, _f: FloatArray = f) -> FloatArray:
                if x is None:
                    return np.zeros_like(_f)
                return np.broadcast_to(np.asarray(x(_env), dtype=np.float64), _f.shape)

            if e.kind == "exponential":
                v = sd(e.exponential) ** 2
                log_scale[mask] = True
            else:
                fp = f if e.prediction_if_zero is None else np.where(f == 0, e.prediction_if_zero, f)
                v = (sd(e.proportional) * fp) ** 2 + sd(e.additive) ** 2
            var[:, mask] = v
        return var, log_scale

    # -- typical-subject helpers (checks, tables) -------------------------------------------------------------------
    def individual_from_covariates(self, covariates: Mapping[str, float], times: ArrayLike, *,
                                   dose: float = 0.0, tau: float = 0.0, steady_state: bool = False,
                                   observation: str | None = None) -> Individual:
        """A synthetic individual: one dose at time 0 (optionally at steady state) and observations at ``times``.

        Covariate values are in data units (standard names) and constant.
        """
        t = np.asarray(times, dtype=np.float64)
        obs_cmt = self.structure.default_obs
        if observation is not None:
            matches = [o.compartment for o in self.observations if o.name == observation]
            if not matches:
                raise ValueError(f"model {self.id} has no observation {observation!r}")
            obs_cmt = matches[0]
        n = 1 + len(t)
        cols: dict[str, Any] = {
            "ID": np.ones(n), "TIME": np.concatenate([[0.0], t]),
            "EVID": np.array([1 if dose > 0 else 2] + [0] * len(t), dtype=float),
            "AMT": np.array([dose] + [0.0] * len(t)),
            "CMT": np.array([self.structure.default_dose] + [obs_cmt] * len(t), dtype=float),
            "II": np.array([tau if steady_state else 0.0] + [0.0] * len(t)),
            "SS": np.array([1.0 if steady_state else 0.0] + [0.0] * len(t)),
        }
        for k, v in covariates.items():
            cols[k.upper()] = np.full(n, float(v))
        return split_individuals(cols)[0]

    def pk_at(self, covariates: Mapping[str, float], etas: ArrayLike | None = None) -> dict[str, float]:
        """``[pk]`` values for constant covariates (data units); a dict of floats."""
        ind = self.individual_from_covariates(covariates, [1.0])
        params = self.individual_parameters(ind, etas)
        return {k: float(v[0, 0]) for k, v in params.items()}


def _check_plausible(ind: Individual, name: str, values: FloatArray, present: NDArray[np.bool_]) -> None:
    """DataError naming row and column where a standard covariate is outside physiological limits."""
    std = STANDARD_COVARIATES.get(name)
    if std is None or std.levels:
        return
    lo, hi = std.plausible
    bad = present & ((values < lo) | (values > hi))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name} = {values[j]:g} is not a plausible {std.description} in {std.unit} "
                        f"(expected {lo:g}-{hi:g} {std.unit}; check the unit)", row=int(ind.rows[j]), column=name)


def _unit_suffix(unit: str) -> str:
    return "" if unit in ("", "1") else f" {unit}"
