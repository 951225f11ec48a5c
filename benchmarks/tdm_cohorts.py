"""Simulated TDM cohorts with the misspecifications real data show (issue 15, item 4): the generator.

    python benchmarks/tdm_cohorts.py NAME [N_PATIENTS] [SEED] > cohort.csv    # one cohort as NONMEM CSV

Every cohort: adult kidney-transplant recipients on twice-daily tacrolimus (5 mg every 12 h, 8 mg for CYP3A5
expressers), simulated from Andrews 2019 (the library's kidney model, its covariate effects and between-patient
and between-occasion variability), eight morning troughs 30 min before the dose on days 3, 4, 5, 7, 10, 14, 21 and
28; each trough is its own occasion (OCC), as a centre would code it. Covariates are constant per patient.

The *truth* is simulated on a record of what happened (every dose its own record, the levels at the times they
were drawn, occasion effects changing daily); the *data* the methods see are what a chart holds (the regimen as
prescribed with ADDL, nominal sampling times, one occasion per trough). The misspecifications (keyword arguments
of :func:`cohort`):

``drift``
    clearance drifting over the first weeks: CL multiplied by ``exp(a (1 - exp(-t / 10 d)))``, ``a`` drawn per
    patient from N(log(drift), 0.15²) -- e.g. 0.7: about 30 % lower by week 4 (tacrolimus dose requirements fall
    over the first weeks after transplantation as corticosteroids are tapered and haematocrit and albumin rise).
``omega_scale``
    between-patient variance multiplied (a centre more heterogeneous than the published population).
``iov_scale``
    between-occasion SD multiplied (e.g. variable bioavailability from occasion to occasion).
``iov_rho``
    occasion effects that persist: each trough's occasion effect is the previous one's times ``iov_rho`` plus a
    fresh part (a first-order autoregression with the model's between-occasion SD; 0: independent, as the
    model assumes). A patient's deviation from his own typical level then carries over from one trough to the
    next (a diet, a co-medication, adherence, a slowly changing haematocrit).
``cyp3a5_factor``
    a wrong covariate effect: the expressers' true CL multiplied by this beyond the model's 1.63.
``time_sd``
    sampling-time error: each trough drawn at the nominal time + N(0, time_sd²) h, recorded as nominal.
``missed``
    the probability that a dose was not taken (the chart says it was).
``cl_scale``
    a centre whose typical clearance differs from the published one: every patient's CL multiplied by this
    (for ``cnidose adapt``).
``residual``
    ``"assay"``: a 10 % log-normal assay error (the default); ``"model"``: the model's own residual error
    (proportional, Andrews' 0.245, normal: ``Y = F (1 + e)``); ``"lognormal"``: an error of the same size on the
    log scale (``Y = F exp(e)``, e ~ N(0, 0.245²)): skewed, never negative, as an exponential error model assumes
    (the log-scale fit, ``log``, is then the right likelihood and the natural-scale proportional one is not).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from cnidose.models.library import resolve_model
from cnidose.models.model import Model
from cnidose.pk.events import Individual, split_individuals

DAYS = (3, 4, 5, 7, 10, 14, 21, 28)
COVARIATES = ("CYP3A5", "AGE", "ALB", "BSA", "SCR", "HCT", "LBW", "WT", "HT", "SEX")

COHORTS: dict[str, dict[str, Any]] = {
    "as-published": {},
    "omega-x4": {"omega_scale": 4.0},
    "drift": {"drift": 0.7},
    "model-residual": {"residual": "model"},
    "lognormal-residual": {"residual": "lognormal"},
    "persistent-iov": {"iov_rho": 0.8},
    "centre-cl-0.7": {"cl_scale": 0.7},
    "realistic": {"drift": 0.7, "omega_scale": 2.0, "iov_scale": 1.5, "cyp3a5_factor": 1.3, "time_sd": 0.75,
                  "missed": 0.05},
}


def _patient(rng: np.random.Generator) -> dict[str, float]:
    wt = round(float(rng.uniform(55, 100)), 1)
    ht = float(round(rng.uniform(155, 190)))
    sex = float(rng.random() < 0.4)
    bsa = round(0.007184 * wt**0.425 * ht**0.725, 2)  # Du Bois
    lbw = round((9270 * wt) / ((6680 if sex == 0 else 8780) + (216 if sex == 0 else 244) * wt / (ht / 100) ** 2), 1)
    return {"CYP3A5": float(rng.random() < 0.2), "AGE": round(float(rng.uniform(25, 70)), 1),
            "ALB": round(float(rng.uniform(32, 45)), 1), "BSA": bsa, "SCR": float(round(rng.uniform(90, 200))),
            "HCT": round(float(rng.uniform(0.28, 0.40)), 3), "LBW": lbw, "WT": wt, "HT": ht, "SEX": sex}


def _columns(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    keys = rows[0].keys()
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}


def cohort(model: Model, n: int, seed: int, *, drift: float | None = None, omega_scale: float = 1.0,
           iov_scale: float = 1.0, cyp3a5_factor: float = 1.0, time_sd: float = 0.0, missed: float = 0.0,
           residual: str = "assay", cl_scale: float = 1.0, iov_rho: float = 0.0,
           truth_out: list[dict[str, np.ndarray]] | None = None) -> list[Individual]:
    """``n`` patients' data as a chart holds it, with levels simulated from the truth (module docstring).

    ``truth_out``, when given, receives per patient the levels without residual error: ``"exact"`` (the truth's
    own prediction at each trough) and ``"no_occasion"`` (the same with the occasion effects at zero, the drift
    kept): what a forecast could reach if it knew the patient exactly, and if it knew all but the trough's own
    occasion effect."""
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(model.iiv.omega * omega_scale)
    iov_sd = np.sqrt(np.diag(model.iov.omega)) * iov_scale if model.iov is not None else np.zeros(0)
    cl = model.iiv.names.index("ETA_CL")
    nominal = np.array([24.0 * d - 0.5 for d in DAYS])
    out: list[Individual] = []
    for i in range(1, n + 1):
        cov = _patient(rng)
        dose = 8.0 if cov["CYP3A5"] == 1 else 5.0
        eta = chol @ rng.standard_normal(chol.shape[0])
        eta[cl] += np.log(cl_scale)
        if cov["CYP3A5"] == 1:
            eta[cl] += np.log(cyp3a5_factor)
        a = rng.normal(np.log(drift), 0.15) if drift is not None else 0.0
        noise = rng.standard_normal((DAYS.__len__(), iov_sd.size)) * iov_sd  # one effect per trough's occasion
        for j in range(1, len(DAYS)) if iov_rho else ():  # persisting: AR(1) with the same marginal SD
            noise[j] = iov_rho * noise[j - 1] + np.sqrt(1.0 - iov_rho**2) * noise[j]
        drawn = nominal + (rng.normal(0.0, time_sd, nominal.size) if time_sd > 0 else 0.0)
        # the truth: every dose its own record (missed ones left out), occasions by day
        truth: list[dict[str, float]] = []
        n_days = DAYS[-1] + 1
        taken = rng.random(2 * n_days) >= missed
        for k in range(2 * n_days):
            t = 12.0 * k
            if taken[k]:
                truth.append({"ID": i, "TIME": t, "EVID": 1, "AMT": dose, "MDV": 1, "OCC": k // 2 + 1, **cov})
        for t in drawn:
            truth.append({"ID": i, "TIME": float(t), "EVID": 0, "AMT": 0.0, "MDV": 0, "OCC": int(t // 24) + 1, **cov})
        truth.sort(key=lambda r: (r["TIME"], r["EVID"]))  # a level drawn with a dose at the same time: before it
        ind = split_individuals(_columns(truth))[0]
        n_occ = model.prepare(ind).n_occasions
        day_mid = (np.arange(n_occ) + 0.5) * 24.0
        kappa = np.zeros((n_occ, iov_sd.size))
        if iov_sd.size:
            trough_of_day = np.searchsorted(nominal, day_mid)  # the fit's occasion each day falls in
            kappa += noise[np.minimum(trough_of_day, len(DAYS) - 1)]
            kappa[:, 0] += a * (1.0 - np.exp(-day_mid / 240.0))  # KAPPA_CL: the drift
        pred = model.simulate(ind, eta[None], kappas=kappa[None]).prediction[0][ind.evid == 0]
        if truth_out is not None:
            kappa0 = np.zeros_like(kappa)
            if iov_sd.size:
                kappa0[:, 0] = a * (1.0 - np.exp(-day_mid / 240.0))
            pred0 = model.simulate(ind, eta[None], kappas=kappa0[None]).prediction[0][ind.evid == 0]
            truth_out.append({"exact": pred, "no_occasion": pred0})
        if residual == "model":
            dv = pred * (1.0 + 0.245 * rng.standard_normal(pred.size))
            dv = np.maximum(dv, 0.05 * pred)  # a measured level is positive
        elif residual == "lognormal":
            dv = pred * np.exp(0.245 * rng.standard_normal(pred.size))
        elif residual == "assay":
            dv = pred * np.exp(0.10 * rng.standard_normal(pred.size))
        else:
            raise ValueError(f"residual is 'assay', 'model' or 'lognormal', got {residual!r}")
        # the chart: the regimen with ADDL, nominal times, one occasion per trough
        chart = [{"ID": i, "TIME": 0.0, "EVID": 1, "AMT": dose, "II": 12.0, "ADDL": 2 * n_days - 1, "MDV": 1,
                  "DV": np.nan, "OCC": 1, **cov}]
        chart += [{"ID": i, "TIME": float(t), "EVID": 0, "AMT": 0.0, "II": 0.0, "ADDL": 0, "MDV": 0,
                   "DV": float(round(v, 2)), "OCC": j + 1, **cov}
                  for j, (t, v) in enumerate(zip(nominal, dv, strict=True))]
        out += split_individuals(_columns(chart))
    return out


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "realistic"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    inds = cohort(resolve_model("andrews2019_tac_adult_kidney"), n, seed, **COHORTS[name])
    cols = ["ID", "TIME", "EVID", "AMT", "II", "ADDL", "MDV", "DV", "OCC", *COVARIATES]
    print(",".join(cols))
    for ind in inds:
        for r in range(len(ind)):
            vals = {"ID": ind.id, "TIME": ind.time[r], "EVID": ind.evid[r], "AMT": ind.amt[r], "II": ind.ii[r],
                    "ADDL": ind.addl[r], "MDV": ind.mdv[r], **{k: v[r] for k, v in ind.covariates.items()}}
            print(",".join("." if not np.isfinite(float(vals[c])) else f"{float(vals[c]):g}" for c in cols))


if __name__ == "__main__":
    main()
