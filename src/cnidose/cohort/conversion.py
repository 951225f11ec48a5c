"""Virtual conversion trials: stable patients switched from one formulation to another by a published rule.

A protocol file (TOML, ``format = 1``)::

    n = 5000                                    virtual patients (the command line may override)
    seed = 1
    link = "clearance"                          how a patient's two models are tied together (below)
    [before]
    model = "andrews2019_tac_adult_kidney"      the patients' pharmacokinetics on the current product
    product = "Prograf"
    interval = 12                               h (default: the product's)
    covariates = { ... }                        optional: values for this side only (e.g. a formulation flag)
    [after]
    model = "martial2021_tac_envarsus_liver"
    product = "Envarsus XR"
    factors = [0.8, 0.7]                        total daily dose ratios to compare (default: every published
                                                conversion of the product data: the US label's 0.8, the EU
                                                SmPC's 0.7); a factor that is published carries its source
    [target]
    low = 4.0                                   the trough range: "stable" patients are in it before
    high = 11.0
    [covariates]                                as in a virtual trial (cnidose.cohort.trial): every covariate
    WT = { normal = [78.0, 15.0], range = [40.0, 150.0] }     either model needs and cannot derive

Each virtual patient gets, on the current product, the dose in marketed strengths whose steady-state trough is
nearest (in ratio) the middle of the target; a patient is *stable* when that trough is in the target,
and only stable patients are converted (the label's population: a stable regimen, a trough in range). The total
daily dose times each factor, once per the new product's interval, is rounded to the nearest dose its strengths
make, and the steady-state trough on the new product is reported: the fraction in, below and above the target
(with Wilson 95 % intervals) and the ratio of the new trough to the old.

Linking. ``link = "same"``: one model describes both products (e.g. Woillard 2011, Prograf and Advagraf, with a
formulation covariate set per side), so the patient keeps every random effect. ``link = "clearance"``: two models;
the patient keeps the quantile of the between-subject effect on clearance (``ETA_CL`` in both), the other effects of
the new model drawn from their distribution given it -- a patient who clears fast on one product clears fast on
the other, everything else about the new product is the new model's. ``link = "independent"``: the new model's
effects drawn afresh (the widest, least informative answer). Between-occasion effects and residual error are not
simulated: the troughs are true steady-state values; the days of the switch itself are not simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import sqrt
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.cohort.trial import (
    _cohort_prepared,
    _sample_covariates,
    check_top_level,
    read_covariate_table,
    read_protocol_file,
    validate_protocol,
)
from cnidose.dosing.data import load_products, max_dose_mg
from cnidose.dosing.data import product as find_product
from cnidose.dosing.regimen import candidate_doses, dose_linear
from cnidose.errors import InputError
from cnidose.models.library import formulation_key, resolve_model
from cnidose.models.model import Model
from cnidose.pk.engine import simulate
from cnidose.pk.events import split_individuals

__all__ = ["ConversionArm", "ConversionResult", "load_conversion", "run_conversion"]

FloatArray = NDArray[np.float64]
_TOP = {"format", "n", "seed", "link", "before", "after", "target", "covariates", "covariate_table"}
_SIDE = {"model", "product", "interval", "covariates"}
_LINKS = ("same", "clearance", "independent")


@dataclass(frozen=True, slots=True)
class ConversionArm:
    factor: float
    factor_source: str
    in_range: float
    below: float
    above: float
    ci: dict[str, tuple[float, float]]  # Wilson 95 % interval of each fraction
    ratio: tuple[float, float, float]  # new trough / old trough: 5th, 50th, 95th percentile
    trough: tuple[float, float, float]  # new trough, ng/mL: 5th, 50th, 95th percentile
    median_daily_dose: float  # mg/day on the new product


@dataclass(frozen=True, slots=True)
class ConversionResult:
    n: int  # virtual patients drawn
    stable: int  # of them, in the target on the current product (the converted)
    before: str  # model refs
    after: str
    link: str
    trough_before: tuple[float, float, float]
    median_daily_dose_before: float
    arms: list[ConversionArm]
    protocol: dict[str, Any]
    notices: list[str] = field(default_factory=list)

    def table(self) -> str:
        t = self.protocol["target"]
        p = self.protocol
        lines = [f"{self.n} virtual patients; {self.stable} stable on {p['before']['product']} (steady-state trough "
                 f"in {t['low']:g}-{t['high']:g} ng/mL; median {self.trough_before[1]:.2f}, 5-95 % "
                 f"{self.trough_before[0]:.2f}-{self.trough_before[2]:.2f}; median "
                 f"{self.median_daily_dose_before:g} mg/day), converted to {p['after']['product']}",
                 f"models: before {self.before}; after {self.after}; link: {self.link}",
                 "factor  in range (95 % CI)      below          above          trough ratio new/old "
                 "(5-50-95 %)  new trough  median mg/day  source"]
        for a in self.arms:
            lines.append(f"{a.factor:<6g}  {a.in_range:6.1%} ({a.ci['in'][0]:.1%}-{a.ci['in'][1]:.1%})  "
                         f"{a.below:6.1%}         {a.above:6.1%}         {a.ratio[0]:.2f}-{a.ratio[1]:.2f}-"
                         f"{a.ratio[2]:.2f}              {a.trough[1]:.2f}        {a.median_daily_dose:g}"
                         f"           {a.factor_source}")
        return "\n".join(lines)


def load_conversion(path: str | Path) -> dict[str, Any]:
    """Read and check a conversion protocol file."""
    return validate_conversion(read_protocol_file(path), str(path))


def validate_conversion(doc: dict[str, Any], where: str = "protocol") -> dict[str, Any]:
    def bad(msg: str, key: str) -> InputError:
        return InputError(f"{where} [{key}]: {msg}")

    check_top_level(doc, _TOP, where)
    for side in ("before", "after"):
        s = doc.get(side)
        if not isinstance(s, dict):
            raise bad("missing: a table with model and product", side)
        for k in s:
            if k not in _SIDE | ({"factors"} if side == "after" else set()):
                raise bad("unknown key", f"{side}.{k}")
        for k in ("model", "product"):
            if not isinstance(s.get(k), str):
                raise bad("missing", f"{side}.{k}")
        if "interval" in s and not (isinstance(s["interval"], (int, float)) and 0 < s["interval"] <= 168):
            raise bad("hours in (0, 168]", f"{side}.interval")
        if "covariates" in s and not isinstance(s["covariates"], dict):
            raise bad("a table of covariates", f"{side}.covariates")
        for name, v in s.get("covariates", {}).items():  # one value for this side, for every patient
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise bad(f"a number (the value for every patient on this side), got {v!r}",
                          f"{side}.covariates.{name}")
    f = doc["after"].get("factors")
    if f is not None and not (isinstance(f, list) and f and all(isinstance(x, (int, float)) and 0 < x <= 5
                                                                   for x in f)):
        raise bad("a list of total daily dose ratios in (0, 5]", "after.factors")
    link = doc.get("link", "clearance")
    if link not in _LINKS:
        raise bad(f"one of {', '.join(_LINKS)}", "link")
    if link == "same" and doc["before"]["model"] != doc["after"]["model"]:
        raise bad("link = \"same\" needs one model for both products", "link")
    # target, covariates and counts: the virtual trial's own rules
    validate_protocol({"format": 1, "model": doc["before"]["model"], "regimen": {"product": doc["before"]["product"],
                                                                              "dose_mg": 1.0},
                       "target": doc.get("target", {}), **{k: doc[k] for k in ("n", "seed", "covariates",
                                                                               "covariate_table") if k in doc}},
                      where)
    return doc


def _unit_troughs(model: Model, covs: dict[str, FloatArray], eta: FloatArray, tau: float) -> FloatArray:
    """Steady-state trough of 1 mg every ``tau`` h for each patient (n,), the typical occasion."""
    n = eta.shape[0]
    ind = split_individuals({"ID": [1.0, 1.0], "TIME": [0.0, tau], "EVID": [1.0, 0.0], "AMT": [1.0, 0.0],
                             "SS": [1.0, 0.0], "II": [tau, 0.0], "MDV": [1.0, 0.0],
                             "CMT": [float(model.structure.default_dose), float(model.structure.default_obs)]})[0]
    params = model.evaluate_pk({k: v[:, None] for k, v in covs.items()}, eta[:, None, :],
                               None if model.iov is None else np.zeros((n, 1, len(model.iov))), (n, 1))
    return np.asarray(simulate(model.structure, ind, params).prediction[:, 1], dtype=np.float64)


def _nearest(doses: FloatArray, wanted: FloatArray, *, log: bool = False) -> FloatArray:
    """The dose of ``doses`` (sorted) nearest each wanted dose (in ratio when ``log``); ties to the smaller."""
    j = np.clip(np.searchsorted(doses, wanted), 1, doses.size - 1)
    lo, hi = doses[j - 1], doses[j]
    if log:
        return np.where(np.log(wanted / lo) <= np.log(hi / wanted), lo, hi)
    return np.where(np.abs(wanted - lo) <= np.abs(hi - wanted), lo, hi)


def _wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def _linked_eta(before: Model, after: Model, eta_b: FloatArray, link: str, rng: np.random.Generator) -> FloatArray:
    n = eta_b.shape[0]
    omega = after.omega
    if link == "independent":
        return rng.multivariate_normal(np.zeros(len(after.eta_names)), omega, size=n)
    for m in (before, after):
        if "ETA_CL" not in m.eta_names:
            raise InputError(f"link = \"clearance\" needs a between-subject effect ETA_CL; {m.id} has "
                             f"{', '.join(m.eta_names)}")
    ib, ia = before.eta_names.index("ETA_CL"), after.eta_names.index("ETA_CL")
    z = eta_b[:, ib] / sqrt(before.omega[ib, ib])
    cl = z * sqrt(omega[ia, ia])
    rest = [k for k in range(len(after.eta_names)) if k != ia]
    out = np.empty((n, len(after.eta_names)))
    out[:, ia] = cl
    if rest:  # the other effects given ETA_CL (conditional normal)
        s_rc = omega[np.ix_(rest, [ia])][:, 0]
        mean = np.outer(cl, s_rc / omega[ia, ia])
        cov = omega[np.ix_(rest, rest)] - np.outer(s_rc, s_rc) / omega[ia, ia]
        out[:, rest] = mean + rng.multivariate_normal(np.zeros(len(rest)), cov, size=n)
    return out


def run_conversion(protocol: dict[str, Any], *, n: int | None = None, seed: int | None = None) -> ConversionResult:
    """Simulate the conversion protocol (see the module documentation)."""
    protocol = validate_conversion(dict(protocol))
    n_total = int(n if n is not None else protocol.get("n", 1000))
    if n_total <= 0:
        raise InputError(f"the number of virtual patients must be positive, got {n_total}")
    rng = np.random.default_rng(int(seed if seed is not None else protocol.get("seed", 0)))
    b_spec, a_spec, target = protocol["before"], protocol["after"], protocol["target"]
    before, after = resolve_model(b_spec["model"]), resolve_model(a_spec["model"])
    for m in (before, after):
        if not dose_linear(m):
            raise InputError(f"model {m.id} is not dose-linear; conversion trials need troughs proportional to dose")
    if before.meta.get("drug") != after.meta.get("drug"):
        raise InputError(f"{before.id} and {after.id} are models of different drugs")
    drug = str(before.meta.get("drug", ""))
    p_b, p_a = find_product(b_spec["product"], drug), find_product(a_spec["product"], drug)
    tau_b, tau_a = float(b_spec.get("interval", p_b.interval)), float(a_spec.get("interval", p_a.interval))
    # published conversions from the current product to the new one, by any of its names ("Envarsus XR" in the
    # US label, "Envarsus" in the EU SmPC)
    known = [c for c in load_products()[1] if c.source_product.lower() == p_b.name.lower()
             and formulation_key(c.target_product) == formulation_key(p_a.name)]
    factors: list[tuple[float, str]]
    if "factors" in a_spec:
        factors = [(float(f), next((c.source for c in known if abs(c.factor - float(f)) < 1e-12), "protocol"))
                   for f in a_spec["factors"]]
    else:
        if not known:
            raise InputError(f"no published conversion {p_b.name} -> {p_a.name}: give [after] factors")
        factors = [(c.factor, c.source) for c in known]
    table = read_covariate_table(protocol["covariate_table"]) if "covariate_table" in protocol else None
    raw = _sample_covariates(protocol.get("covariates", {}), table, n_total, rng)
    notices: set[str] = set()

    def prepared(m: Model, side: dict[str, Any]) -> dict[str, FloatArray]:
        cov = dict(raw) | {k.upper(): np.full(n_total, float(v)) for k, v in side.get("covariates", {}).items()}
        prep = _cohort_prepared(m, cov, n_total)
        notices.update(f"{m.id}: {x.message}" for x in prep.notices)
        return dict(prep.covariates)

    cov_b, cov_a = prepared(before, b_spec), prepared(after, a_spec)
    eta_b = rng.multivariate_normal(np.zeros(len(before.eta_names)), before.omega, size=n_total)
    link = str(protocol.get("link", "clearance"))
    eta_a = eta_b if link == "same" else _linked_eta(before, after, eta_b, link, rng)
    unit_b = _unit_troughs(before, cov_b, eta_b, tau_b)
    unit_a = _unit_troughs(after, cov_a, eta_a, tau_a)

    lo, hi = float(target["low"]), float(target["high"])
    mid = (lo + hi) / 2  # the recommender's aim (cnidose.dosing.regimen)
    max_b, max_a = max_dose_mg(drug), max_dose_mg(drug)
    doses_b = np.array([d for d, _ in candidate_doses(p_b.strengths, max_dose=max_b)])
    doses_a = np.array([d for d, _ in candidate_doses(p_a.strengths, max_dose=max_a)])
    dose_b = _nearest(doses_b, mid / unit_b, log=True)  # the current dose: its trough nearest the middle
    trough_b = dose_b * unit_b
    stable = (trough_b >= lo) & (trough_b <= hi)
    k = int(stable.sum())
    if k == 0:
        raise InputError("no virtual patient is stable in the target on the current product")
    daily_b = dose_b * 24.0 / tau_b
    arms = []
    for factor, source in factors:
        dose_a = _nearest(doses_a, daily_b * factor * tau_a / 24.0)
        trough_a = dose_a * unit_a
        ta, tb = trough_a[stable], trough_b[stable]
        counts = {"in": int(((ta >= lo) & (ta <= hi)).sum()), "below": int((ta < lo).sum()),
                  "above": int((ta > hi).sum())}
        pct = np.percentile(ta / tb, [5, 50, 95])
        arms.append(ConversionArm(factor, source, counts["in"] / k, counts["below"] / k, counts["above"] / k,
                                  {key: _wilson(c, k) for key, c in counts.items()},
                                  (float(pct[0]), float(pct[1]), float(pct[2])),
                                  tuple(float(x) for x in np.percentile(ta, [5, 50, 95])),  # type: ignore[arg-type]
                                  float(np.median((dose_a * 24.0 / tau_a)[stable]))))
    tb_pct = np.percentile(trough_b[stable], [5, 50, 95])
    return ConversionResult(n_total, k, before.ref, after.ref, link,
                            (float(tb_pct[0]), float(tb_pct[1]), float(tb_pct[2])),
                            float(np.median(daily_b[stable])), arms, protocol, sorted(notices))
