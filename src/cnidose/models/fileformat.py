"""The model file format (TOML, ``format = 1``) and its validating parser.

One file per model. Every key is checked: an unknown key, a missing one, a
bad expression, a unit that does not fit, or a covariance matrix that is not
positive definite is refused with a :class:`~cnidose.errors.ModelFileError`
naming the file, the key and its line. The SHA-256 of the file's bytes is the
model's ``content_hash``; with ``id`` and ``version`` it is cited by every
result. The full reference, with an annotated example, is
``docs/model-format.md``; in short::

    format = 1
    id, version, title                      identity
    drug, formulations, release, route,     what the model is for (``cnidose models list`` filters on these)
    population, organ, age_group,
    matrix, assay, confirmed, confirmation, notes
    [citation]   authors, title, journal, year, doi, url, pmcid, secondary, ...
    [units]      dose, time, concentration
    [domain]     description, subjects, ...  (covariate ranges sit with each covariate)
    [structure]  compartments, default_dose, default_obs, iv_dose (where intravenous doses enter),
                 flows = [{from, to?, rate, per?}],
                 transit = {from, to, n, rate}   (n transit compartments between from and to)
                 transit_input = {n, mtt}   (doses into default_dose arrive through n transit compartments
                 of mean transit time mtt, n any real >= 0: Savic 2007; n and mtt name parameters)
                 or kind = "ode" with [structure.ode] d<CMT> = "expression"
    [parameters.NAME]  value, unit, description, source, fixed
    [random_effects]   names, one of variance | sd | cv_percent (+ cv_conversion = "sqrt" | "lognormal"),
                       correlations = [[name, name, r], ...], source, note
    [random_effects.iov]  the same keys, plus occasion = "<data column>"
    [covariates.NAME]  unit, description, domain = [low, high], default, default_note,
                       levels = {"0" = "...", ...}, derive = "<function>", derive_note, source,
                       medications = ["name", ...], medication_after_days (a 0/1 covariate that is 1 while one
                       of the medications is taken and for that many days after it stops, as the paper coded it)
    [pk]         NAME = "expression" or NAME = {expr, unit, description}; evaluated in order
    [observations.NAME]  compartment, scale, scale_unit, unit, transform, description,
                         error = {model, proportional, additive, sd, source, note}
    [[checks]]   name, statement, source, kind (value | ratio | steady_state), expr, covariates,
                 versus, expected, rtol, dose, tau, metric, observation
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cnidose.errors import ExpressionError, ModelFileError
from cnidose.models.covariates import DERIVATIONS, STANDARD_COVARIATES
from cnidose.models.expr import Expression, compile_expression, scalar_source
from cnidose.models.model import (
    Check,
    Covariate,
    ErrorModel,
    Model,
    Observation,
    Parameter,
    RandomEffects,
)
from cnidose.models.units import Unit, UnitError, parse_unit
from cnidose.pk.structure import Flow, GammaInput, LinearStructure, OdeStructure

__all__ = ["load_model", "parse_model", "rewrite_model"]

_TOP = {
    "format", "id", "version", "title", "drug", "formulations", "release", "route", "population", "organ",
    "age_group", "matrix", "assay", "confirmed", "confirmation", "notes", "citation", "units", "domain",
    "structure", "parameters", "random_effects", "covariates", "pk", "observations", "checks", "adaptation",
}
_ADAPTATION = {"parent", "parent_sha256", "data", "data_sha256", "method", "date", "software", "subjects",
               "observations", "prior_sd", "omega_df", "omega_adapted", "residual_adapted", "iterations",
               "converged", "objective", "objective_parent", "estimates", "not_adapted", "excluded", "warnings",
               "validation", "note"}
_CITATION = {"authors", "title", "journal", "year", "doi", "url", "pmcid", "text", "note", "secondary", "tables"}
_DOMAIN = {"description", "subjects", "observations", "age", "time_after_transplant", "note"}
_STRUCTURE = {"kind", "compartments", "default_dose", "default_obs", "iv_dose", "flows", "transit",
              "transit_input", "ode", "absorption"}
_PARAM = {"value", "unit", "description", "source", "fixed", "note"}
_RE = {"names", "variance", "sd", "cv_percent", "cv_conversion", "correlations", "source", "note", "occasion"}
_COV = {"unit", "description", "domain", "default", "default_note", "levels", "derive", "derive_note", "source",
        "note", "domain_only", "medications", "medication_after_days"}
_OBS = {"compartment", "scale", "scale_unit", "unit", "transform", "description", "error"}
_ERR = {"model", "proportional", "additive", "sd", "source", "note", "prediction_if_zero"}
_CHECK = {"name", "statement", "source", "kind", "expr", "covariates", "versus", "expected", "rtol", "dose", "tau",
          "metric", "observation", "note"}
_DOSE_PARAM = re.compile(r"^(F|ALAG|R|D|S)(\d+)$")


def load_model(path: str | Path) -> Model:
    """Load and validate a model file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model file: {exc.strerror}", source=str(p)) from None
    return parse_model(raw, source=str(p))


class _Ctx:
    """Error reporting with file, key and line."""

    def __init__(self, source: str, text: str):
        self.source = source
        self.lines = text.splitlines()
        self._index: list[tuple[str, int]] | None = None

    def fail(self, message: str, field: str | None = None) -> NoReturn:
        raise ModelFileError(message, source=self.source, field=field, line=self.line_of(field))

    def line_of(self, field: str | None) -> int | None:
        """Best-effort line of a dotted field (the line that defines it, or its nearest parent)."""
        if not field:
            return None
        if self._index is None:
            self._index = self._build_index()
        target = re.sub(r"\[\d+\]", "", field)
        best: tuple[int, int] | None = None
        for path, line in self._index:
            if target == path or target.startswith(path + "."):
                score = len(path)
                if best is None or score > best[0]:
                    best = (score, line)
        return best[1] if best else None

    def _build_index(self) -> list[tuple[str, int]]:
        index: list[tuple[str, int]] = []
        table = ""
        for k, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if m:
                table = _unquote_path(m.group(1))
                index.append((table, k))
                continue
            m = re.match(r'^("[^"]*"|[A-Za-z0-9_.\-" ]+?)\s*=', line)
            if m:
                key = _unquote_path(m.group(1))
                path = f"{table}.{key}" if table else key
                index.append((path, k))
                # inline table: record its keys too
                for sub in re.finditer(r"[{,]\s*([A-Za-z0-9_]+)\s*=", line):
                    index.append((f"{path}.{sub.group(1)}", k))
        return index

    def keys(self, table: Any, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(table, dict):
            self.fail("expected a table", where or None)
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                self.fail("unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                           f"; allowed: {', '.join(sorted(allowed))}"), _join(where, key))
        for key in required:
            if key not in table:
                self.fail("missing", _join(where, key))
        return table

    def get(self, table: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str,
            default: Any = ..., what: str | None = None) -> Any:
        if key not in table:
            if default is ...:
                self.fail("missing", _join(where, key))
            return default
        v = table[key]
        ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, float, (int, float)))
        if not ok:
            self.fail(f"expected {what or _typename(typ)}, got {v!r}", _join(where, key))
        return v

    def number(self, table: Mapping[str, Any], key: str, where: str, default: Any = ...) -> Any:
        v = self.get(table, key, (int, float), where, default, "a number")
        if v is None:
            return None
        if not math.isfinite(v):
            self.fail("must be finite", _join(where, key))
        return float(v)

    def unit(self, text: Any, field: str) -> Unit:
        if not isinstance(text, str):
            self.fail("expected unit text", field)
        try:
            return parse_unit(text)
        except UnitError as exc:
            self.fail(str(exc), field)

    def expr(self, text: Any, field: str) -> Expression:
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = repr(float(text))
        if not isinstance(text, str):
            self.fail("expected an expression string", field)
        try:
            return compile_expression(text, field=field)
        except ExpressionError as exc:
            self.fail(exc.detail, field)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unquote_path(s: str) -> str:
    return ".".join(p.strip().strip('"') for p in s.split("."))


def _typename(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return {"str": "text", "dict": "a table", "list": "a list", "bool": "true or false"}.get(typ.__name__,
                                                                                            typ.__name__)


def parse_model(raw: bytes, *, source: str = "<string>") -> Model:
    """Parse and validate model-file bytes (TOML) into a :class:`Model`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFileError("not UTF-8 text", source=source) from None
    ctx = _Ctx(source, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ModelFileError(f"not valid TOML: {exc}", source=source,
                             line=int(m.group(1)) if m else None) from None

    ctx.keys(doc, _TOP, "", required=("format", "id", "version", "units", "structure", "parameters", "pk"))
    if doc["format"] != 1:
        ctx.fail("unsupported format (this cnidose reads format = 1)", "format")
    mid = ctx.get(doc, "id", str, "")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.\-]*", mid):
        ctx.fail("id must be lower-case letters, digits, '_', '-', '.'", "id")
    version = ctx.get(doc, "version", str, "")
    title = ctx.get(doc, "title", str, "", mid)
    meta = _meta(ctx, doc)
    citation = dict(ctx.keys(doc.get("citation", {}), _CITATION, "citation"))
    domain = dict(ctx.keys(doc.get("domain", {}), _DOMAIN, "domain"))
    meta["domain"] = domain
    if "adaptation" in doc:
        meta["adaptation"] = dict(ctx.keys(doc["adaptation"], _ADAPTATION, "adaptation", required=("parent",)))

    units = ctx.keys(doc["units"], {"dose", "time", "concentration"}, "units",
                     required=("dose", "time", "concentration"))
    u_dose = ctx.unit(units["dose"], "units.dose")
    u_time = ctx.unit(units["time"], "units.time")
    u_conc = ctx.unit(units["concentration"], "units.concentration")
    if u_dose.dims not in ((1, 0, 0, 0), (0, 0, 0, 1)):
        ctx.fail("the dose unit must be a mass or an amount of substance", "units.dose")
    if u_time.dims != (0, 0, 1, 0):
        ctx.fail("the time unit must be a time", "units.time")
    if u_conc.dims not in ((1, -3, 0, 0), (0, -3, 0, 1)):
        ctx.fail("the concentration unit must be mass or amount per volume", "units.concentration")
    if u_time != parse_unit("h"):
        ctx.fail("data times are in hours: units.time must be \"h\"", "units.time")

    params = _parameters(ctx, doc["parameters"])
    iiv = _random_effects(ctx, doc.get("random_effects", {}), "random_effects")
    iov_doc = doc.get("random_effects", {}).get("iov") if isinstance(doc.get("random_effects"), dict) else None
    iov = _random_effects(ctx, iov_doc, "random_effects.iov") if iov_doc is not None else None
    if iov is not None and not iov.occasion:
        ctx.fail("between-occasion effects need occasion = \"<data column>\"", "random_effects.iov.occasion")
    covs = _covariates(ctx, doc.get("covariates", {}))
    structure = _structure(ctx, doc["structure"])
    iv_dose = None
    if "iv_dose" in doc["structure"]:
        iv = doc["structure"]["iv_dose"]
        if iv not in structure.compartments:
            ctx.fail(f"{iv!r} is not one of {', '.join(structure.compartments)}", "structure.iv_dose")
        if "intravenous" not in meta.get("route", ()):
            ctx.fail("a model with an intravenous dose compartment lists \"intravenous\" in route", "structure.iv_dose")
        iv_dose = structure.compartments.index(iv) + 1

    names: dict[str, str] = {}  # name -> kind, for clash detection
    usable_covs = [n for n, c in covs.items() if not c.domain_only]
    for kind, group in (("parameter", params), ("covariate", usable_covs), ("random effect", iiv.names),
                        ("random effect", iov.names if iov else ())):
        for n in group:
            if n in names:
                ctx.fail(f"{n} is declared both as a {names[n]} and as a {kind}", None)
            names[n] = kind
    reserved = set(structure.compartments) | {"C"}
    for n in names:
        if n in reserved:
            ctx.fail(f"{n} is reserved (a compartment name, or C in transforms)", None)

    pk, pk_units = _pk(ctx, doc["pk"], set(names), params)
    defined = {n for n, _ in pk}
    needs = list(structure.rate_parameters)
    if structure.gamma is not None:
        needs += [p for p in (structure.gamma.n, structure.gamma.mtt) if p not in needs]
    missing = [p for p in needs if p not in defined and p not in params]
    if missing:
        ctx.fail(f"the structure needs {', '.join(missing)}, not defined in [pk] or [parameters]", "pk")
    for p in needs:
        if p not in defined:
            pk.append((p, compile_expression(p)))
            pk_units[p] = params[p].unit
    known = set(names) | defined
    observations = _observations(ctx, doc.get("observations"), structure, known, pk_units, u_dose, u_conc)
    for ob in observations:
        if f"S{ob.compartment}" in defined:
            ctx.fail(f"S{ob.compartment} is set in [pk] and by observation {ob.name}'s scale; keep one",
                     f"pk.S{ob.compartment}")
    _check_units(ctx, structure, pk, pk_units, params, u_dose, u_time)
    checks = _checks(ctx, doc.get("checks", []), known, observations)
    return Model(
        id=mid, version=version, title=title, content_hash=hashlib.sha256(raw).hexdigest(), structure=structure,
        parameters=params, iiv=iiv, iov=iov, covariates=covs, pk=tuple(pk), pk_units=pk_units,
        observations=observations, units={"dose": units["dose"], "time": units["time"],
                                          "concentration": units["concentration"]},
        checks=checks, meta=meta, citation=citation, source=source, iv_dose=iv_dose,
    )


def _meta(ctx: _Ctx, doc: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in ("drug", "release", "population", "organ", "age_group", "matrix", "assay", "confirmation"):
        if key in doc:
            meta[key] = ctx.get(doc, key, str, "")
    for key in ("formulations", "route", "notes"):
        if key in doc:
            v = ctx.get(doc, key, list, "")
            if not all(isinstance(x, str) for x in v):
                ctx.fail("expected a list of text", key)
            meta[key] = tuple(v)
    if "confirmed" in doc:
        meta["confirmed"] = ctx.get(doc, "confirmed", bool, "")
    allowed = {"age_group": ("adult", "paediatric", "all"), "matrix": ("whole blood", "plasma", "serum"),
               "release": ("immediate", "extended", "not applicable")}
    for key, values in allowed.items():
        if key in meta and meta[key] not in values:
            ctx.fail(f"must be one of {', '.join(values)}", key)
    return meta


def _parameters(ctx: _Ctx, table: Any) -> dict[str, Parameter]:
    ctx.keys(table, set(table) if isinstance(table, dict) else set(), "parameters")
    out: dict[str, Parameter] = {}
    for name, spec in table.items():
        where = f"parameters.{name}"
        _check_name(ctx, name, where)
        ctx.keys(spec, _PARAM, where, required=("value", "unit"))
        value = ctx.number(spec, "value", where)
        unit = ctx.get(spec, "unit", str, where)
        ctx.unit(unit, where + ".unit")
        out[name] = Parameter(name, value, unit, ctx.get(spec, "description", str, where, ""),
                              ctx.get(spec, "source", str, where, ""), ctx.get(spec, "fixed", bool, where, False))
    return out


def _check_name(ctx: _Ctx, name: str, where: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        ctx.fail("names are letters, digits and '_' and start with a letter", where)


def _random_effects(ctx: _Ctx, table: Any, where: str) -> RandomEffects:
    allowed = set(_RE) | ({"iov"} if where == "random_effects" else set())
    if where != "random_effects.iov":
        allowed.discard("occasion")
    ctx.keys(table, allowed, where)
    names = tuple(ctx.get(table, "names", list, where, []))
    for n in names:
        if not isinstance(n, str):
            ctx.fail("expected a list of names", where + ".names")
        _check_name(ctx, n, where + ".names")
    if len(set(names)) != len(names):
        ctx.fail("names repeat", where + ".names")
    given = [k for k in ("variance", "sd", "cv_percent") if k in table]
    if names and len(given) != 1:
        ctx.fail("give exactly one of variance, sd, cv_percent", where)
    n = len(names)
    if not names:
        return RandomEffects((), np.zeros((0, 0)), "", None)
    key = given[0]
    vals = ctx.get(table, key, list, where)
    if len(vals) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        ctx.fail(f"expected {n} numbers, one per name", f"{where}.{key}")
    v = np.asarray(vals, dtype=np.float64)
    if np.any(~np.isfinite(v)) or np.any(v < 0):
        ctx.fail("values must be finite and non-negative", f"{where}.{key}")
    published = f"{key} {', '.join(f'{x:g}' for x in vals)}"
    if key == "variance":
        var = v
        if "cv_conversion" in table:
            ctx.fail("cv_conversion applies only to cv_percent", f"{where}.cv_conversion")
    elif key == "sd":
        var = v**2
    else:
        conv = ctx.get(table, "cv_conversion", str, where)
        if conv == "sqrt":
            var = (v / 100.0) ** 2
            published += "; omega2 = (CV/100)^2"
        elif conv == "lognormal":
            var = np.log1p((v / 100.0) ** 2)
            published += "; omega2 = ln(1 + (CV/100)^2)"
        else:
            ctx.fail("must be \"sqrt\" (omega2 = (CV/100)^2) or \"lognormal\" (omega2 = ln(1+CV^2))",
                     f"{where}.cv_conversion")
    omega = np.diag(var)
    for k, item in enumerate(ctx.get(table, "correlations", list, where, [])):
        f = f"{where}.correlations[{k}]"
        if not (isinstance(item, list) and len(item) == 3 and item[0] in names and item[1] in names
                and item[0] != item[1] and isinstance(item[2], (int, float)) and -1 <= item[2] <= 1):
            ctx.fail("expected [name, other name, correlation in -1..1]", f)
        i, j = names.index(item[0]), names.index(item[1])
        cov = float(item[2]) * math.sqrt(var[i] * var[j])
        omega[i, j] = omega[j, i] = cov
    nz = np.flatnonzero(np.diag(omega) > 0)
    zero = np.setdiff1d(np.arange(n), nz)
    if zero.size and np.any(omega[zero][:, nz] != 0):
        ctx.fail("a random effect with zero variance cannot be correlated", where)
    try:
        np.linalg.cholesky(omega[np.ix_(nz, nz)])
    except np.linalg.LinAlgError:
        ctx.fail("the covariance matrix is not positive definite", f"{where}.correlations" if
                 "correlations" in table else where)
    occasion = ctx.get(table, "occasion", str, where, None)
    return RandomEffects(names, omega, published, occasion.upper() if occasion else None)


def _covariates(ctx: _Ctx, table: Any) -> dict[str, Covariate]:
    ctx.keys(table, set(table) if isinstance(table, dict) else set(), "covariates")
    out: dict[str, Covariate] = {}
    for raw_name, spec in table.items():
        where = f"covariates.{raw_name}"
        _check_name(ctx, raw_name, where)
        name = raw_name.upper()
        if isinstance(spec, dict):
            ctx.keys(spec, _COV, where, required=("unit",))
        else:
            ctx.fail("expected a table", where)
        unit_text = ctx.get(spec, "unit", str, where)
        unit = ctx.unit(unit_text, where + ".unit")
        std = STANDARD_COVARIATES.get(name)
        factor = 1.0
        data_unit = unit_text
        if std is not None:
            data_unit = std.unit
            try:
                factor = parse_unit(std.unit).to(unit)
            except UnitError:
                ctx.fail(f"{name} is a standard covariate in {std.unit} ({std.description}); {unit_text!r} is not "
                         "a unit of the same kind", where + ".unit")
        domain = None
        if "domain" in spec:
            d = spec["domain"]
            if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, (int, float)) for x in d)
                    and d[0] <= d[1]):
                ctx.fail("domain must be [low, high]", where + ".domain")
            domain = (float(d[0]), float(d[1]))
        levels: dict[int, str] = {}
        for code, label in ctx.get(spec, "levels", dict, where, {}).items():
            if not re.fullmatch(r"-?\d+", code) or not isinstance(label, str):
                ctx.fail('levels are "integer code" = "label"', f"{where}.levels")
            levels[int(code)] = label
        if std is not None and std.levels and levels and set(levels) != set(std.levels):
            ctx.fail(f"standard codes of {name} are {dict(std.levels)}", f"{where}.levels")
        if std is not None and std.levels and not levels:
            levels = dict(std.levels)
        default = ctx.number(spec, "default", where, None)
        if default is not None and levels and int(default) not in levels:
            ctx.fail("default is not one of the levels", f"{where}.default")
        derive = ctx.get(spec, "derive", str, where, None)
        if derive is not None:
            if derive not in DERIVATIONS:
                ctx.fail(f"unknown derivation (known: {', '.join(DERIVATIONS)})", f"{where}.derive")
            if DERIVATIONS[derive].output != name:
                ctx.fail(f"{derive} computes {DERIVATIONS[derive].output}, not {name}", f"{where}.derive")
        domain_only = ctx.get(spec, "domain_only", bool, where, False)
        if domain_only and (domain is None or default is not None or derive is not None):
            ctx.fail("a domain_only covariate has a domain and no default or derive", f"{where}.domain_only")
        meds = ctx.get(spec, "medications", list, where, [])
        if not all(isinstance(x, str) and x.strip() for x in meds):
            ctx.fail("medications is a list of medication names", f"{where}.medications")
        after = ctx.number(spec, "medication_after_days", where, 0.0)
        if meds and set(levels) != {0, 1}:
            ctx.fail("a covariate read from the medication list has the levels 0 and 1", f"{where}.levels")
        if "medication_after_days" in spec and (not meds or not after >= 0):
            ctx.fail("medication_after_days is a number of days >= 0, with medications",
                     f"{where}.medication_after_days")
        out[name] = Covariate(name, unit_text, ctx.get(spec, "description", str, where, ""), domain, default,
                              ctx.get(spec, "default_note", str, where, ""), levels, derive,
                              ctx.get(spec, "derive_note", str, where, ""), factor, data_unit, domain_only,
                              tuple(x.strip().lower() for x in meds), float(after))
    return out


def _structure(ctx: _Ctx, spec: Any) -> LinearStructure | OdeStructure:
    ctx.keys(spec, _STRUCTURE, "structure", required=("compartments", "default_dose", "default_obs"))
    comps = spec["compartments"]
    if not (isinstance(comps, list) and comps and all(isinstance(c, str) for c in comps)):
        ctx.fail("expected a list of compartment names", "structure.compartments")
    names = list(comps)
    flows_spec: list[tuple[str, str | None, str, str | None, str]] = []
    if "transit" in spec:
        t = ctx.keys(spec["transit"], {"from", "to", "n", "rate"}, "structure.transit",
                     required=("from", "to", "n", "rate"))
        n = ctx.get(t, "n", int, "structure.transit", what="a whole number")
        if n < 0 or t["from"] not in names or t["to"] not in names or not isinstance(t["rate"], str):
            ctx.fail("transit = {from = <compartment>, to = <compartment>, n = <0 or more>, rate = <name>}",
                     "structure.transit")
        chain = [f"TRANSIT{k}" for k in range(1, n + 1)]
        pos = names.index(t["from"]) + 1
        names[pos:pos] = chain
        path = [t["from"], *chain, t["to"]]
        for a, b in itertools.pairwise(path):
            flows_spec.append((a, b, t["rate"], None, "structure.transit"))
    if len(set(names)) != len(names):
        ctx.fail("compartment names repeat", "structure.compartments")
    for c in names:
        _check_name(ctx, c, "structure.compartments")

    def cmt(value: Any, where: str) -> int:
        if value not in names:
            ctx.fail(f"{value!r} is not one of {', '.join(names)}", where)
        return names.index(value) + 1

    dose = cmt(spec["default_dose"], "structure.default_dose")
    obs = cmt(spec["default_obs"], "structure.default_obs")
    gamma = None
    if "transit_input" in spec:
        ti = ctx.keys(spec["transit_input"], {"n", "mtt"}, "structure.transit_input", required=("n", "mtt"))
        if not (isinstance(ti["n"], str) and isinstance(ti["mtt"], str)):
            ctx.fail("transit_input = {n = <parameter>, mtt = <parameter>}", "structure.transit_input")
        gamma = GammaInput(dose, ti["n"], ti["mtt"])
    kind = ctx.get(spec, "kind", str, "structure", "linear")
    if kind == "linear":
        if "ode" in spec:
            ctx.fail("equations are for kind = \"ode\"", "structure.ode")
        for k, f in enumerate(ctx.get(spec, "flows", list, "structure", [])):
            where = f"structure.flows[{k}]"
            ctx.keys(f, {"from", "to", "rate", "per"}, where, required=("from", "rate"))
            if not isinstance(f["rate"], str) or ("per" in f and not isinstance(f["per"], str)):
                ctx.fail("rate and per name parameters", where + ".rate")
            flows_spec.append((f["from"], f.get("to"), f["rate"], f.get("per"), where))
        flows = tuple(Flow(cmt(a, w + ".from"), None if b is None else cmt(b, w + ".to"), r, p)
                      for a, b, r, p, w in flows_spec)
        return LinearStructure(tuple(names), dose, obs, flows, gamma=gamma)
    if kind == "ode":
        if flows_spec or "flows" in spec:
            ctx.fail("flows are for kind = \"linear\"", "structure.flows")
        eqs = ctx.keys(spec.get("ode", {}), {f"d{c}" for c in names}, "structure.ode")
        exprs = []
        for c in names:
            if f"d{c}" not in eqs:
                ctx.fail(f"missing equation d{c}", f"structure.ode.d{c}")
            exprs.append(ctx.expr(eqs[f"d{c}"], f"structure.ode.d{c}"))
        needed = sorted(set().union(*(e.names for e in exprs)) - set(names))
        comp_names = tuple(names)

        def rhs(x: Any, p: Mapping[str, Any]) -> Any:
            env: dict[str, Any] = {k: np.asarray(v)[:, None] if np.ndim(v) else v for k, v in p.items()}
            for j, c in enumerate(comp_names):
                env[c] = x[:, j:j + 1]
            return np.concatenate([np.broadcast_to(np.asarray(e(env), dtype=np.float64), (x.shape[0], 1))
                                   for e in exprs], axis=1)

        names_in_kernel = {c: f"x[{j}]" for j, c in enumerate(comp_names)} | {
            k: f"p[{i}]" for i, k in enumerate(needed)}
        equations = tuple(scalar_source(e, names_in_kernel) for e in exprs)
        return OdeStructure(comp_names, dose, obs, rhs, tuple(needed), equations, tuple(e.source for e in exprs),
                            gamma=gamma)
    ctx.fail(f"unknown kind {kind!r} (linear or ode)", "structure.kind")


def _pk(ctx: _Ctx, table: Any, declared: set[str], params: Mapping[str, Parameter]
        ) -> tuple[list[tuple[str, Expression]], dict[str, str]]:
    ctx.keys(table, set(table) if isinstance(table, dict) else set(), "pk")
    known = set(declared)
    pk: list[tuple[str, Expression]] = []
    units: dict[str, str] = {}
    for name, spec in table.items():
        where = f"pk.{name}"
        _check_name(ctx, name, where)
        if name in declared:
            ctx.fail(f"{name} is already a parameter, covariate or random effect; assign a new name", where)
        if isinstance(spec, dict):
            ctx.keys(spec, {"expr", "unit", "description"}, where, required=("expr",))
            expr = ctx.expr(spec["expr"], where + ".expr")
            if "unit" in spec:
                ctx.unit(spec["unit"], where + ".unit")
                units[name] = spec["unit"]
        else:
            expr = ctx.expr(spec, where)
        unknown = sorted(expr.names - known)
        if unknown:
            ctx.fail(f"unknown name(s) {', '.join(unknown)} (declare covariates in [covariates]; "
                     "[pk] is evaluated in order)", where)
        pk.append((name, expr))
        known.add(name)
        if name in units:
            continue
        if expr.names <= set(params) and len(expr.names) == 1 and expr.source.strip() in params:
            units[name] = params[expr.source.strip()].unit  # a plain alias keeps the parameter's unit
    return pk, units


def _unit_of(name: str, pk_units: Mapping[str, str], params: Mapping[str, Parameter]) -> str | None:
    if name in pk_units:
        return pk_units[name]
    if name in params:
        return params[name].unit
    return None


def _check_units(ctx: _Ctx, structure: LinearStructure | OdeStructure, pk: list[tuple[str, Expression]],
                 pk_units: Mapping[str, str], params: Mapping[str, Parameter], u_dose: Unit, u_time: Unit) -> None:
    per_time = parse_unit("1").per(u_time)
    if isinstance(structure, LinearStructure):
        for f in structure.flows:
            field = f"pk.{f.rate}"
            ur = _unit_of(f.rate, pk_units, params)
            if ur is None:
                ctx.fail(f"{f.rate} drives a flow: give its unit ({{expr = ..., unit = ...}})", field)
            rate = parse_unit(ur)
            if f.per is not None:
                up = _unit_of(f.per, pk_units, params)
                if up is None:
                    ctx.fail(f"{f.per} divides a flow: give its unit", f"pk.{f.per}")
                rate = rate.per(parse_unit(up))
            if rate != per_time:
                what = f"{f.rate}/{f.per}" if f.per else f.rate
                ctx.fail(f"flow rate {what} is in {ur}{'/' + str(_unit_of(f.per, pk_units, params)) if f.per else ''}"
                         ", which is not 1/h", field)
    if structure.gamma is not None:
        for name, want, text in ((structure.gamma.n, parse_unit("1"), "1 (a number of compartments)"),
                                 (structure.gamma.mtt, u_time, "h")):
            u = _unit_of(name, pk_units, params)
            if u is None or parse_unit(u) != want:
                ctx.fail(f"{name} is the transit input's {'n' if want != u_time else 'mtt'}: give it the unit {text}",
                         f"pk.{name}")
    expected: dict[str, Callable[[], Unit]] = {
        "ALAG": lambda: u_time, "D": lambda: u_time, "R": lambda: u_dose.per(u_time), "F": lambda: parse_unit("1"),
    }
    for name, _ in pk:
        m = _DOSE_PARAM.match(name)
        if not m or m.group(1) == "S":
            continue
        u = _unit_of(name, pk_units, params)
        if u is None:
            if m.group(1) in ("ALAG", "D", "R"):
                ctx.fail(f"{name} is a dose parameter: give its unit", f"pk.{name}")
            continue
        if parse_unit(u) != expected[m.group(1)]():
            ctx.fail(f"{name} is in {u}; expected a unit equal to "
                     f"{ {'ALAG': 'h', 'D': 'h', 'R': 'dose unit/h', 'F': '1'}[m.group(1)] }", f"pk.{name}")


def _observations(ctx: _Ctx, table: Any, structure: LinearStructure | OdeStructure, known: set[str],
                  pk_units: Mapping[str, str], u_dose: Unit, u_conc: Unit) -> tuple[Observation, ...]:
    if table is None:
        ctx.fail("missing (at least one observation type: compartment, scale, unit, error)", "observations")
    ctx.keys(table, set(table) if isinstance(table, dict) else set(), "observations")
    out: list[Observation] = []
    seen: set[int] = set()
    for name, spec in table.items():
        where = f"observations.{name}"
        _check_name(ctx, name, where)
        ctx.keys(spec, _OBS, where, required=("compartment", "scale", "scale_unit", "unit"))
        comp = spec["compartment"]
        if comp not in structure.compartments:
            ctx.fail(f"{comp!r} is not one of {', '.join(structure.compartments)}", where + ".compartment")
        c = structure.compartments.index(comp) + 1
        if c in seen:
            ctx.fail("two observation types on one compartment", where + ".compartment")
        seen.add(c)
        scale = ctx.expr(spec["scale"], where + ".scale")
        _known(ctx, scale, known, where + ".scale")
        su_text = ctx.get(spec, "scale_unit", str, where)
        su = ctx.unit(su_text, where + ".scale_unit")
        if scale.source.strip() in pk_units and parse_unit(pk_units[scale.source.strip()]) != su:
            ctx.fail(f"{scale.source.strip()} is in {pk_units[scale.source.strip()]}, not {su_text}",
                     where + ".scale_unit")
        unit_text = ctx.get(spec, "unit", str, where)
        unit = ctx.unit(unit_text, where + ".unit")
        try:
            factor = u_dose.per(su).to(unit)
        except UnitError:
            ctx.fail(f"dose unit / {su_text} is not convertible to {unit_text}", where + ".unit")
        if unit.dims != u_conc.dims:
            ctx.fail(f"{unit_text} is not a concentration like units.concentration", where + ".unit")
        transform = None
        if "transform" in spec:
            transform = ctx.expr(spec["transform"], where + ".transform")
            _known(ctx, transform, known | {"C"}, where + ".transform")
        error = None
        if "error" in spec:
            error = _error(ctx, spec["error"], where + ".error", known)
        out.append(Observation(name, c, scale, su_text, unit_text, factor, error, transform,
                               ctx.get(spec, "description", str, where, "")))
    return tuple(out)


def _known(ctx: _Ctx, expr: Expression, known: set[str], where: str) -> None:
    unknown = sorted(expr.names - known)
    if unknown:
        ctx.fail(f"unknown name(s) {', '.join(unknown)}", where)


def _error(ctx: _Ctx, spec: Any, where: str, known: set[str]) -> ErrorModel:
    ctx.keys(spec, _ERR, where, required=("model",))
    kind = spec["model"]
    needs = {"proportional": ("proportional",), "additive": ("additive",),
             "combined": ("proportional", "additive"), "exponential": ("sd",)}
    if kind not in needs:
        ctx.fail(f"must be one of {', '.join(needs)}", where + ".model")
    for key in ("proportional", "additive", "sd"):
        if key in spec and key not in needs[kind]:
            ctx.fail(f"{key} does not belong to a {kind} error model", f"{where}.{key}")
    exprs: dict[str, Expression] = {}
    for key in needs[kind]:
        if key not in spec:
            ctx.fail("missing", f"{where}.{key}")
        e = ctx.expr(spec[key], f"{where}.{key}")
        _known(ctx, e, known, f"{where}.{key}")
        if not e.names:
            v = float(e({}))  # type: ignore[arg-type]
            if not (math.isfinite(v) and v >= 0):
                ctx.fail("a standard deviation must be finite and non-negative", f"{where}.{key}")
        exprs[key] = e
    pz = ctx.number(spec, "prediction_if_zero", where, None)
    if pz is not None and "proportional" not in needs[kind]:
        ctx.fail("prediction_if_zero applies to proportional terms", f"{where}.prediction_if_zero")
    return ErrorModel(kind, exprs.get("proportional"), exprs.get("additive"), exprs.get("sd"), pz)


def _checks(ctx: _Ctx, items: Any, known: set[str], observations: tuple[Observation, ...]) -> tuple[Check, ...]:
    if not isinstance(items, list):
        ctx.fail("expected [[checks]] tables", "checks")
    out = []
    for k, spec in enumerate(items):
        where = f"checks[{k}]"
        ctx.keys(spec, _CHECK, where, required=("name", "statement", "source", "expected"))
        kind = ctx.get(spec, "kind", str, where, "value")
        if kind not in ("value", "ratio", "steady_state"):
            ctx.fail("kind is value, ratio or steady_state", where + ".kind")
        expr = None
        if kind in ("value", "ratio"):
            expr = ctx.expr(spec.get("expr"), where + ".expr")
            _known(ctx, expr, known, where + ".expr")
        covs = {str(c).upper(): float(v) for c, v in ctx.get(spec, "covariates", dict, where, {}).items()}
        versus = {str(c).upper(): float(v) for c, v in ctx.get(spec, "versus", dict, where, {}).items()}
        if kind == "ratio" and not versus:
            ctx.fail("a ratio check needs versus = {covariates of the denominator}", where + ".versus")
        metric = ctx.get(spec, "metric", str, where, "trough")
        if metric not in ("trough", "cavg", "cmax"):
            ctx.fail("metric is trough, cavg or cmax", where + ".metric")
        observation = ctx.get(spec, "observation", str, where, observations[0].name if observations else "")
        if observations and observation not in {o.name for o in observations}:
            ctx.fail("not an observation type of this model", where + ".observation")
        if kind == "steady_state" and not ("dose" in spec and "tau" in spec):
            ctx.fail("a steady_state check needs dose and tau", where)
        out.append(Check(
            name=ctx.get(spec, "name", str, where), kind=kind,  # type: ignore[arg-type]
            statement=ctx.get(spec, "statement", str, where), source=ctx.get(spec, "source", str, where),
            expr=expr, covariates=covs, expected=ctx.number(spec, "expected", where),
            rtol=ctx.number(spec, "rtol", where, 1e-3), versus=versus, dose=ctx.number(spec, "dose", where, 0.0),
            tau=ctx.number(spec, "tau", where, 0.0), metric=metric,  # type: ignore[arg-type]
            observation=observation,
        ))
    return tuple(out)


# -- writing an adapted model --------------------------------------------------------------------------------------
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _sections(lines: list[str]) -> list[str]:
    """The table header in force at each line ('' before the first)."""
    out, current = [], ""
    for line in lines:
        m = re.match(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
        if m:
            current = m.group(1)
        out.append(current)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v)) if isinstance(v, float) else str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def rewrite_model(text: str, *, id: str, version: str, title: str, values: Mapping[str, float],
                  variances: Sequence[float] | None, adaptation: Mapping[str, Any],
                  value_source: Mapping[str, str] | None = None) -> str:
    """A new model file from ``text`` (the parent's): a new ``id``, ``version`` and ``title``; parameter values
    replaced (``[parameters]``: ``NAME = { value = ... }`` or ``[parameters.NAME]``), each with its new
    ``source``; the between-subject variances replaced (``variance = [...]``, correlations kept); the parent's
    ``[[checks]]`` of values and steady-state levels left out (they check the published numbers, which this
    model no longer holds; its ratio checks, covariate effects, are kept);
    ``confirmed = false``; and an ``[adaptation]`` table naming the parent, the data and the fit. Comments and
    everything else are kept. The result is parsed and its values compared with those asked for: a file whose
    layout this cannot edit is refused, never written wrong."""
    lines = text.splitlines()
    where = _sections(lines)
    # a check of a ratio (one expression at two covariate sets) still holds when typical values, which scale
    # the expression, change; a check of a value or a steady-state level does not
    parent_checks = tomllib.loads(text).get("checks", [])
    keep_check = [isinstance(c, dict) and c.get("kind") == "ratio" for c in parent_checks] + [False]
    n_checks = 0  # [[checks]] headers seen so far
    out: list[str] = []
    done: set[str] = set()
    skip_check = False
    seen_re = False
    for line, sec in zip(lines, where, strict=True):
        header = re.match(r"\s*\[", line) is not None
        if header:
            is_check = re.match(r"\s*\[\[\s*checks\s*\]\]", line) is not None
            skip_check = is_check and not keep_check[n_checks]
            n_checks += is_check
        if skip_check:
            continue
        if sec == "" and not header:
            m = re.match(r"(\s*)(id|version|title|confirmed|confirmation)(\s*=\s*)(.*)$", line)
            if m:
                key = m.group(2)
                new = {"id": id, "version": version, "title": title, "confirmed": False,
                       "confirmation": f"adapted from {adaptation.get('parent', '')} by cnidose adapt (see "
                                       "[adaptation]); the structure and covariate effects are the parent's"}[key]
                out.append(f"{m.group(1)}{key}{m.group(3)}{_toml_value(new)}")
                done.add(key)
                continue
        if not header and (sec == "parameters" or sec.startswith("parameters.")):
            name = sec.split(".", 1)[1].strip() if sec.startswith("parameters.") else None
            m = re.match(r"(\s*)([A-Za-z_][A-Za-z0-9_]*)(\s*=\s*)(.*)$", line)
            if m and name is None and m.group(2) in values:
                name = m.group(2)
                body = m.group(4)
                new_value = repr(float(values[name]))
                body, k = re.subn(r"(\bvalue\s*=\s*)" + _NUMBER, lambda mm, v=new_value: mm.group(1) + v,  # type: ignore[misc]
                                  body, count=1)
                if value_source and name in value_source:
                    new_source = json.dumps(value_source[name])
                    body, _ = re.subn(r'(\bsource\s*=\s*)"(?:[^"\\]|\\.)*"',
                                      lambda mm, v=new_source: mm.group(1) + v, body, count=1)  # type: ignore[misc]
                if k:
                    done.add("param:" + name)
                out.append(f"{m.group(1)}{m.group(2)}{m.group(3)}{body}")
                continue
            if m and name is not None and name in values and m.group(2) in ("value", "source"):
                if m.group(2) == "value":
                    out.append(f"{m.group(1)}value{m.group(3)}{float(values[name])!r}")
                    done.add("param:" + name)
                elif value_source and name in value_source:
                    out.append(f"{m.group(1)}source{m.group(3)}{json.dumps(value_source[name])}")
                else:
                    out.append(line)
                continue
        if variances is not None and sec == "random_effects" and not header:
            m = re.match(r"(\s*)(cv_percent|sd|variance|cv_conversion)(\s*=\s*)", line)
            if m:
                if not seen_re and m.group(2) != "cv_conversion":
                    out.append(f"{m.group(1)}variance{m.group(3)}{_toml_value([float(v) for v in variances])}")
                    seen_re = True
                    done.add("variances")
                continue  # the published form and its conversion go: the file now holds variances
        out.append(line)
    missing = [k for k in ("id", "version", "title") if k not in done]
    missing += [n for n in values if "param:" + n not in done]
    if variances is not None and "variances" not in done:
        missing.append("random_effects variances (one line: variance = [...] or cv_percent = [...])")
    if missing:
        raise ModelFileError("cannot rewrite this model file's " + ", ".join(missing) +
                             " (keep each on one line as the library's files do)")
    body = "\n".join(out).rstrip("\n")
    if "confirmed" not in done:
        body = re.sub(r"^(title\s*=.*)$", r"\1\nconfirmed = false", body, count=1, flags=re.M)
    table = ["", "", "# How this model was obtained from its parent (written by cnidose adapt).", "[adaptation]"]
    table += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in adaptation.items()]
    new = body + "\n".join(table) + "\n"
    try:
        model = parse_model(new.encode("utf-8"), source="<adapted>")
    except ModelFileError as exc:
        raise ModelFileError("cannot rewrite this model file's layout (keep each parameter and the "
                             f"random-effect variances on one line as the library's files do): {exc}") from None
    for n, v in values.items():
        if not math.isclose(model.parameters[n].value, float(v), rel_tol=1e-12):
            raise ModelFileError(f"rewriting {n} failed (the file's layout)")
    if variances is not None and not np.allclose(np.diag(model.iiv.omega), variances, rtol=1e-12, atol=0):
        raise ModelFileError("rewriting the random-effect variances failed (the file's layout)")
    return new
