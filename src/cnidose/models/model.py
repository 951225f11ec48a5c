"""Model files (TOML) and the :class:`Model` value they load into.

This is the first version of the format (``format = 1``), enough for the
engine's validation suites; the library issue extends it. A file has:

``id``, ``version``, ``title``
    identity; the SHA-256 of the file's bytes is the model's ``content_hash``.
``[citation]``
    where the numbers come from.
``[structure]``
    ``compartments`` (names, CMT 1..n in order), ``default_dose``,
    ``default_obs`` and ``[[structure.flows]]`` (``from``, optional ``to``,
    ``rate``, optional ``per``: rate constant = rate/per), or ``kind =
    "ode"`` with ``[structure.ode]`` equations ``d<CMT> = "expression"``.
``[parameters.NAME]``
    ``value``, ``unit``, ``description`` (fixed effects).
``[random_effects]``
    ``names`` (ordered: ETA1, ETA2, ... in data sets) and ``omega`` (the
    diagonal variances).
``[covariates.NAME]``
    ``unit``, ``description``, optional ``range = [low, high]``, optional
    ``default`` (used where the data lack a value; otherwise a missing value
    is an error).
``[pk]``
    ordered assignments ``NAME = "expression"`` evaluated at every record;
    they must define every rate parameter of the structure and may define
    ``F<n>``, ``ALAG<n>``, ``R<n>``, ``D<n>``, ``S<n>``.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cnidose.errors import DataError, ModelFileError
from cnidose.models.expr import Expression, compile_expression
from cnidose.pk.engine import Method, Simulation, simulate
from cnidose.pk.events import Individual
from cnidose.pk.structure import Flow, LinearStructure, OdeStructure

__all__ = ["Covariate", "Model", "load_model", "parse_model"]

FloatArray = NDArray[np.float64]
_DOSE_PARAM_PREFIXES = ("F", "ALAG", "R", "D", "S")


@dataclass(frozen=True, slots=True)
class Covariate:
    """A covariate the model reads from the data."""

    name: str
    unit: str
    description: str = ""
    low: float | None = None
    high: float | None = None
    default: float | None = None


@dataclass(frozen=True, slots=True)
class Model:
    """A loaded, validated model. Immutable; results cite ``id``, ``version`` and ``content_hash``."""

    id: str
    version: str
    title: str
    content_hash: str
    structure: LinearStructure | OdeStructure
    parameters: Mapping[str, float]
    eta_names: tuple[str, ...]
    omega: FloatArray
    covariates: Mapping[str, Covariate]
    pk: tuple[tuple[str, Expression], ...]
    citation: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def individual_parameters(self, individual: Individual, etas: ArrayLike | None = None) -> dict[str, FloatArray]:
        """Evaluate ``[pk]`` at every record.

        Parameters
        ----------
        individual : Individual
        etas : array-like, shape (B, n_eta) or (B, R, n_eta), optional
            Random effects; None means the typical individual (all zero).

        Returns
        -------
        dict of str to ndarray of shape (B, R)
        """
        R = len(individual)
        n_eta = len(self.eta_names)
        if etas is None:
            eta = np.zeros((1, 1, n_eta))
        else:
            eta = np.asarray(etas, dtype=np.float64)
            if eta.ndim == 2:
                eta = eta[:, None, :]
            if eta.ndim != 3 or eta.shape[-1] != n_eta:
                raise ValueError(f"etas must have {n_eta} columns ({', '.join(self.eta_names)})")
        B = eta.shape[0]
        env: dict[str, Any] = dict(self.parameters)
        for k, name in enumerate(self.eta_names):
            env[name] = eta[:, :, k]
        for name, cov in self.covariates.items():
            env[name] = self._covariate(individual, cov)[None, :]
        out: dict[str, FloatArray] = {}
        for name, expr in self.pk:
            v = np.broadcast_to(np.asarray(expr(env), dtype=np.float64), (B, R))
            env[name] = v
            out[name] = v
        return out

    def _covariate(self, ind: Individual, cov: Covariate) -> FloatArray:
        values = ind.covariates.get(cov.name)
        if values is None:
            if cov.default is None:
                raise DataError(f"covariate {cov.name} ({cov.unit}) is required by model {self.id} and missing",
                                column=cov.name)
            return np.full(len(ind), cov.default)
        values = values.copy()
        missing = np.isnan(values)
        if missing.any():
            if cov.default is None:
                j = int(np.flatnonzero(missing)[0])
                raise DataError(f"covariate {cov.name} is missing and model {self.id} has no default",
                                row=int(ind.rows[j]), column=cov.name)
            values[missing] = cov.default
        for bound, bad in ((cov.low, values < (cov.low if cov.low is not None else -np.inf)),
                           (cov.high, values > (cov.high if cov.high is not None else np.inf))):
            if bound is not None and bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise DataError(f"{cov.name}={values[j]:g} {cov.unit} is outside the model's range "
                                f"[{cov.low:g}, {cov.high:g}]", row=int(ind.rows[j]), column=cov.name)
        return values

    def simulate(self, individual: Individual, etas: ArrayLike | None = None, *,
                 method: Method = "auto", return_amounts: bool = False) -> Simulation:
        """Predict every record of ``individual`` (see :func:`cnidose.pk.simulate`)."""
        return simulate(self.structure, individual, self.individual_parameters(individual, etas),
                        method=method, return_amounts=return_amounts)


def load_model(path: str | Path) -> Model:
    """Load and validate a model file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model file: {exc.strerror}", source=str(p)) from None
    return parse_model(raw, source=str(p))


def parse_model(raw: bytes, *, source: str = "<string>") -> Model:
    """Parse model-file bytes (TOML) into a :class:`Model`."""
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"not valid TOML: {exc}", source=source) from None

    def need(table: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if key not in table:
            raise ModelFileError("missing", source=source, field=f"{where}{key}")
        v = table[key]
        if not isinstance(v, typ):
            raise ModelFileError(f"expected {getattr(typ, '__name__', typ)}", source=source, field=f"{where}{key}")
        return v

    if doc.get("format") != 1:
        raise ModelFileError("unsupported or missing format (expected format = 1)", source=source, field="format")
    mid = need(doc, "id", str, "")
    version = need(doc, "version", str, "")
    title = doc.get("title", mid)

    params: dict[str, float] = {}
    for name, spec in need(doc, "parameters", dict, "").items():
        if not isinstance(spec, dict) or not isinstance(spec.get("value"), (int, float)):
            raise ModelFileError("expected a table with a numeric value", source=source, field=f"parameters.{name}")
        need(spec, "unit", str, f"parameters.{name}.")
        params[name] = float(spec["value"])

    re = doc.get("random_effects", {})
    eta_names = tuple(re.get("names", []))
    omega = np.asarray(re.get("omega", [0.0] * len(eta_names)), dtype=np.float64)
    if omega.shape != (len(eta_names),) or np.any(omega < 0):
        raise ModelFileError("omega must list one non-negative variance per name", source=source,
                             field="random_effects.omega")

    covs: dict[str, Covariate] = {}
    for name, spec in doc.get("covariates", {}).items():
        where = f"covariates.{name}."
        unit = need(spec, "unit", str, where)
        rng = spec.get("range")
        low = high = None
        if rng is not None:
            if not (isinstance(rng, list) and len(rng) == 2 and rng[0] <= rng[1]):
                raise ModelFileError("range must be [low, high]", source=source, field=where + "range")
            low, high = float(rng[0]), float(rng[1])
        default = spec.get("default")
        covs[name.upper()] = Covariate(name.upper(), unit, spec.get("description", ""), low, high,
                                       None if default is None else float(default))

    structure = _structure(need(doc, "structure", dict, ""), source)
    known = set(params) | set(eta_names) | set(covs)
    pk: list[tuple[str, Expression]] = []
    for name, text in need(doc, "pk", dict, "").items():
        expr = compile_expression(text, field=f"pk.{name}") if isinstance(text, str) else None
        if expr is None:
            raise ModelFileError("expected an expression string", source=source, field=f"pk.{name}")
        unknown = sorted(expr.names - known)
        if unknown:
            raise ModelFileError(f"unknown name(s) {', '.join(unknown)} (declare covariates in [covariates])",
                                 source=source, field=f"pk.{name}")
        pk.append((name, expr))
        known.add(name)
    defined = {n for n, _ in pk}
    missing = [p for p in structure.rate_parameters if p not in defined and p not in params]
    if missing:
        raise ModelFileError(f"structure needs {', '.join(missing)}, not defined in [pk]", source=source, field="pk")
    # Fixed effects used directly by the structure are passed through as constants.
    for p in structure.rate_parameters:
        if p not in defined:
            pk.append((p, compile_expression(p)))
    return Model(
        id=mid, version=version, title=title, content_hash=hashlib.sha256(raw).hexdigest(),
        structure=structure, parameters=params, eta_names=eta_names, omega=omega, covariates=covs,
        pk=tuple(pk), citation={k: str(v) for k, v in doc.get("citation", {}).items()}, source=source,
    )


def _structure(spec: Mapping[str, Any], source: str) -> LinearStructure | OdeStructure:
    comps = spec.get("compartments")
    if not (isinstance(comps, list) and comps and all(isinstance(c, str) for c in comps)):
        raise ModelFileError("expected a list of compartment names", source=source, field="structure.compartments")
    names = tuple(comps)

    def cmt(value: Any, where: str) -> int:
        if value not in names:
            raise ModelFileError(f"{value!r} is not one of {', '.join(names)}", source=source, field=where)
        return names.index(value) + 1

    dose = cmt(spec.get("default_dose"), "structure.default_dose")
    obs = cmt(spec.get("default_obs"), "structure.default_obs")
    kind = spec.get("kind", "linear")
    if kind == "linear":
        flows = []
        for k, f in enumerate(spec.get("flows", [])):
            where = f"structure.flows[{k}]"
            if not isinstance(f.get("rate"), str):
                raise ModelFileError("rate must name a parameter", source=source, field=where + ".rate")
            flows.append(Flow(cmt(f.get("from"), where + ".from"),
                              cmt(f["to"], where + ".to") if "to" in f else None, f["rate"], f.get("per")))
        return LinearStructure(names, dose, obs, tuple(flows))
    if kind == "ode":
        eqs = spec.get("ode", {})
        exprs = []
        for c in names:
            text = eqs.get(f"d{c}")
            if not isinstance(text, str):
                raise ModelFileError(f"missing equation d{c}", source=source, field=f"structure.ode.d{c}")
            exprs.append(compile_expression(text, field=f"structure.ode.d{c}"))
        needed = sorted(set().union(*(e.names for e in exprs)) - set(names))

        def rhs(x: FloatArray, p: Mapping[str, FloatArray]) -> FloatArray:
            env: dict[str, Any] = {k: np.asarray(v)[:, None] if np.ndim(v) else v for k, v in p.items()}
            for j, c in enumerate(names):
                env[c] = x[:, j:j + 1]
            return np.concatenate([np.broadcast_to(np.asarray(e(env), dtype=np.float64), (x.shape[0], 1))
                                   for e in exprs], axis=1)

        return OdeStructure(names, dose, obs, rhs, tuple(needed))
    raise ModelFileError(f"unknown kind {kind!r} (linear or ode)", source=source, field="structure.kind")
