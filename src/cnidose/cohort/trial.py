"""Virtual trials: a dosing protocol applied to a simulated population, target attainment over time.

A protocol file (TOML, ``format = 1``)::

    model = "andrews2019_tac_adult_kidney"     library id or model file
    n = 10000                                   virtual patients (the command line may override)
    seed = 1
    days = 28
    [regimen]
    product = "Prograf"                         strengths and default interval from the product data
    interval = 12                               h (default: the product's)
    start_mg_per_kg_day = 0.1                   or dose_mg = 5.0
    cpic_factor = 1.5                           x for CYP3A5 expressers (CPIC; capped at 0.3 mg/kg/day)
    round_to_strengths = true
    [adjust]                                    optional
    every_days = 7                              at each weekly trough ...
    method = "proportional"                     ... dose x (target middle / trough), in strengths
    [target]
    low = 4.0
    high = 11.0
    [covariates]                                 every covariate the model needs
    AGE = { normal = [55.0, 12.0], range = [18.0, 80.0] }
    CYP3A5 = { categorical = { "0" = 0.8, "1" = 0.2 } }
    ALB = 40.0                                   a constant

Patients are simulated in chunks (each with its own seed derived from the protocol seed and the chunk
number), so the result is the same whichever backend ran the chunks. Between-subject random effects
are drawn from the model's Ω; residual error is not added (true concentrations).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnidose.cohort.batch import _model, model_payload
from cnidose.cohort.executor import Backend, run_chunks
from cnidose.dosing.data import product as find_product
from cnidose.errors import InputError
from cnidose.models.library import resolve_model
from cnidose.pk.engine import simulate
from cnidose.pk.events import split_individuals

__all__ = ["TrialResult", "load_protocol", "run_trial", "simulate_troughs"]

FloatArray = NDArray[np.float64]
_TOP = {"format", "model", "n", "seed", "days", "regimen", "adjust", "target", "covariates"}
_REGIMEN = {"product", "interval", "start_mg_per_kg_day", "dose_mg", "cpic_factor", "round_to_strengths"}
_ADJUST = {"every_days", "method"}


@dataclass(frozen=True, slots=True)
class TrialResult:
    n: int
    days: int
    attainment: FloatArray  # (days,) fraction of patients with the day's trough in the target
    percentiles: FloatArray  # (3, days): 5th, 50th, 95th percentile of the trough
    mean_daily_dose: FloatArray  # (days,) mg/day
    model: str
    protocol: dict[str, Any]


def load_protocol(path: str | Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read the protocol: {exc}") from None
    return validate_protocol(doc, str(path))


def validate_protocol(doc: dict[str, Any], where: str = "protocol") -> dict[str, Any]:
    def bad(msg: str, key: str) -> InputError:
        return InputError(f"{where} [{key}]: {msg}")

    for k in doc:
        if k not in _TOP:
            raise bad(f"unknown key (allowed: {', '.join(sorted(_TOP))})", k)
    if doc.get("format") != 1:
        raise bad("expected format = 1", "format")
    for k in ("model", "regimen", "target", "covariates"):
        if k not in doc:
            raise bad("missing", k)
    for k in doc["regimen"]:
        if k not in _REGIMEN:
            raise bad(f"unknown rule (allowed: {', '.join(sorted(_REGIMEN))})", f"regimen.{k}")
    for k in doc.get("adjust", {}):
        if k not in _ADJUST:
            raise bad(f"unknown rule (allowed: {', '.join(sorted(_ADJUST))})", f"adjust.{k}")
    if doc.get("adjust", {}).get("method", "proportional") != "proportional":
        raise bad("the only adjustment method is proportional", "adjust.method")
    if ("start_mg_per_kg_day" in doc["regimen"]) == ("dose_mg" in doc["regimen"]):
        raise bad("give exactly one of start_mg_per_kg_day and dose_mg", "regimen")
    t = doc["target"]
    if not (isinstance(t.get("low"), (int, float)) and isinstance(t.get("high"), (int, float))
            and 0 <= t["low"] < t["high"]):
        raise bad("target needs low < high", "target")
    return doc


def _sample_covariates(spec: dict[str, Any], n: int, rng: np.random.Generator) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    for name, s in spec.items():
        if isinstance(s, (int, float)):
            out[name.upper()] = np.full(n, float(s))
        elif "normal" in s:
            mu, sd = s["normal"]
            v = rng.normal(mu, sd, n)
            if "range" in s:
                v = np.clip(v, *s["range"])
            out[name.upper()] = v
        elif "categorical" in s:
            codes = np.array([float(c) for c in s["categorical"]])
            p = np.array(list(s["categorical"].values()), dtype=float)
            out[name.upper()] = rng.choice(codes, size=n, p=p / p.sum())
        else:
            raise InputError(f"covariate {name}: give a number, normal = [mean, sd] or categorical = {{code = p}}")
    return out


def simulate_troughs(payload: tuple[bytes, str], protocol: dict[str, Any], n: int, seed: int
                     ) -> tuple[FloatArray, FloatArray]:
    """Daily troughs (n, days) and daily doses (n, days) of ``n`` virtual patients under the protocol."""
    model = _model(payload)
    reg = protocol["regimen"]
    prod = find_product(reg["product"], model.meta.get("drug"))
    tau = float(reg.get("interval", prod.interval))
    days = int(protocol.get("days", 28))
    rng = np.random.default_rng(seed)
    covs = _sample_covariates(protocol["covariates"], n, rng)
    missing = [c for c, cv in model.covariates.items() if not cv.domain_only and c not in covs and cv.default is None
               and cv.derive is None]
    if missing:
        raise InputError(f"the protocol gives no values for covariate(s) {', '.join(missing)} of model {model.id}")
    for c, cv in model.covariates.items():
        if c not in covs and cv.default is not None and not cv.domain_only:
            covs[c] = np.full(n, cv.default / cv.factor)
    eta = rng.multivariate_normal(np.zeros(len(model.eta_names)), model.omega, size=n)
    per_day = 24.0 / tau
    if "dose_mg" in reg:
        dose = np.full(n, float(reg["dose_mg"]))
    else:
        wt = covs.get("WT")
        if wt is None:
            raise InputError("start_mg_per_kg_day needs the covariate WT in the protocol")
        per_kg = np.full(n, float(reg["start_mg_per_kg_day"]))
        if "cpic_factor" in reg and "CYP3A5" in covs:
            per_kg = np.where(covs["CYP3A5"] == 1, np.minimum(per_kg * float(reg["cpic_factor"]), 0.3), per_kg)
        dose = per_kg * wt / per_day
    strengths = np.array(sorted(prod.strengths))

    def to_strengths(d: FloatArray) -> FloatArray:
        if not reg.get("round_to_strengths", True):
            return d
        step = strengths[0]
        return np.maximum(step, np.round(d / step) * step)

    dose = to_strengths(dose)
    # one schedule for everyone: unit doses every tau, a trough just before each morning dose
    n_doses = int(days * per_day)
    t_dose = np.arange(n_doses) * tau
    t_obs = np.arange(1, days + 1) * 24.0
    times, evid = [], []
    for k in range(n_doses):
        times.append(t_dose[k])
        evid.append(1)
    for d in t_obs:
        times.append(d)
        evid.append(0)
    order = np.lexsort((np.array(evid), np.array(times)))  # observation before a dose at the same time
    times_a, evid_a = np.array(times)[order], np.array(evid)[order]
    cols = {"ID": np.ones(times_a.size), "TIME": times_a, "EVID": evid_a, "AMT": (evid_a == 1).astype(float),
            "CMT": np.where(evid_a == 1, model.structure.default_dose, model.structure.default_obs).astype(float)}
    ind = split_individuals(cols)[0]
    shape = (n, 1)
    params = model.evaluate_pk({k: v[:, None] for k, v in covs.items()}, eta[:, None, :],
                               None if model.iov is None else np.zeros((n, 1, len(model.iov))), shape)
    fkey = f"F{model.structure.default_dose}"
    base_f = np.broadcast_to(params.get(fkey, np.ones(shape)), shape)
    dose_rec = np.flatnonzero(evid_a == 1)
    obs_rec = np.flatnonzero(evid_a == 0)
    dose_time = times_a[dose_rec]
    amount = np.repeat(dose[:, None], dose_rec.size, axis=1)  # (n, n_doses)
    every = int(protocol.get("adjust", {}).get("every_days", 0))
    target = protocol["target"]
    mid = 0.5 * (target["low"] + target["high"])
    checkpoints = list(range(every, days, every)) if every else []
    for stage in [*checkpoints, days]:
        F = np.ones((n, times_a.size))
        F[:, dose_rec] = base_f * amount
        p = {k: np.broadcast_to(v, (n, 1)) for k, v in params.items() if k != fkey}
        p[fkey] = F
        pred = simulate(model.structure, ind, p).prediction[:, obs_rec]
        if model.observations and model.observations[0].transform is not None:
            raise InputError(f"model {model.id} transforms its observations; virtual trials do not support that yet")
        if stage < days:  # adjust from the trough of this day onwards
            trough = pred[:, stage - 1]
            new = to_strengths(amount[:, np.searchsorted(dose_time, stage * 24.0)] * mid / np.maximum(trough, 1e-9))
            later = dose_time >= stage * 24.0
            amount[:, later] = new[:, None]
    daily = np.stack([amount[:, (dose_time >= 24.0 * d) & (dose_time < 24.0 * (d + 1))].sum(axis=1)
                      for d in range(days)], axis=1)
    return pred, daily


def _trial_chunk(chunk: tuple[int, int], payload: tuple[bytes, str], protocol: dict[str, Any]
                 ) -> tuple[FloatArray, FloatArray]:
    n, seed = chunk
    return simulate_troughs(payload, protocol, n, seed)


def run_trial(protocol: dict[str, Any], *, n: int | None = None, seed: int | None = None,
              backend: Backend = "serial", scheduler: str | None = None, workers: int | None = None,
              chunk_size: int = 100_000) -> TrialResult:
    """Simulate the protocol over ``n`` patients (chunks of ``chunk_size``); attainment and percentiles."""
    protocol = validate_protocol(dict(protocol))
    n_total = int(n if n is not None else protocol.get("n", 1000))
    if n_total <= 0:
        raise InputError(f"the number of virtual patients must be positive, got {n_total}")
    s0 = int(seed if seed is not None else protocol.get("seed", 0))
    model = resolve_model(str(protocol["model"]))
    find_product(protocol["regimen"]["product"], model.meta.get("drug"))  # a product of the model's drug
    payload = model_payload(model)
    sizes = [min(chunk_size, n_total - k) for k in range(0, n_total, chunk_size)]
    chunks = [(size, int(np.random.SeedSequence([s0, k]).generate_state(1)[0])) for k, size in enumerate(sizes)]
    parts = run_chunks(_trial_chunk, chunks, backend=backend, scheduler=scheduler, workers=workers,
                       extra=(payload, protocol))
    troughs = np.concatenate([p[0] for p in parts])
    daily = np.concatenate([p[1] for p in parts])
    t = protocol["target"]
    attain = np.mean((troughs >= t["low"]) & (troughs <= t["high"]), axis=0)
    pct = np.percentile(troughs, [5, 50, 95], axis=0)
    return TrialResult(n_total, troughs.shape[1], attain, pct, daily.mean(axis=0), model.ref, protocol)
