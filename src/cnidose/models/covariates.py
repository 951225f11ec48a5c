"""The standard covariate vocabulary and the derived-covariate functions.

Data sets carry covariates under these names, **in these units** (the
*data unit*); a model file may state a covariate in another unit of the same
dimension (Woillard 2011 uses haematocrit in %), and cnidose converts. A value
outside the *plausible* range is refused as a data error -- it is almost
always a unit mix-up (haematocrit 35 where a fraction was expected,
creatinine in mg/dL where µmol/L was expected). The model's own validity
domain is narrower and only warns (see :mod:`cnidose.models.model`).

Categorical codes are fixed here so that every model reads them alike; SEX is
0 = male, 1 = female.

Derived covariates are computed by the named functions below when a model
asks for one that the data do not carry; each function cites its source, and
a result that used one says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["DERIVATIONS", "STANDARD_COVARIATES", "Derivation", "StandardCovariate"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class StandardCovariate:
    """A covariate of the standard vocabulary: its data unit and plausible range."""

    name: str
    unit: str
    description: str
    plausible: tuple[float, float]
    levels: Mapping[int, str] = field(default_factory=dict)


def _std(name: str, unit: str, description: str, low: float, high: float,
         levels: Mapping[int, str] | None = None) -> tuple[str, StandardCovariate]:
    return name, StandardCovariate(name, unit, description, (low, high), dict(levels or {}))


_BINARY = {0: "no", 1: "yes"}

#: name -> definition. Plausible ranges are physiological limits, not model domains.
STANDARD_COVARIATES: Mapping[str, StandardCovariate] = dict([
    _std("AGE", "y", "age", 0, 120),
    _std("WT", "kg", "total body weight", 0.3, 400),
    _std("HT", "cm", "height", 30, 250),
    _std("SEX", "1", "sex", 0, 1, {0: "male", 1: "female"}),
    _std("BMI", "kg/m2", "body-mass index", 7, 90),
    _std("BSA", "m2", "body surface area", 0.1, 3.5),
    _std("LBW", "kg", "lean body weight", 0.3, 200),
    _std("FFM", "kg", "fat-free mass", 0.3, 200),
    _std("HCT", "L/L", "haematocrit, as a fraction", 0.05, 0.85),
    _std("SCR", "umol/L", "serum creatinine", 5, 3000),
    _std("ALB", "g/L", "serum albumin", 5, 70),
    _std("TCHOL", "mmol/L", "total plasma cholesterol", 0.5, 40),
    _std("EGFR", "mL/min/1.73m2", "estimated glomerular filtration rate", 0.5, 250),
    _std("POD", "d", "days since transplantation (day of transplantation = 0)", 0, 36525),
    _std("PRED", "mg/d", "prednisolone daily dose", 0, 2000),
    _std("CYP3A5", "1", "CYP3A5 expresser status",
         0, 1, {0: "non-expresser (*3/*3, *3/*6)", 1: "expresser (at least one *1 allele)"}),
    _std("CYP3A4_22", "1", "CYP3A4*22 carrier", 0, 1, {0: "non-carrier (*1/*1)", 1: "carrier (*22)"}),
    _std("LIVING_DONOR", "1", "graft from a living donor", 0, 1, {0: "deceased donor", 1: "living donor"}),
    _std("DONOR_CYP3A5", "1", "CYP3A5 expresser status of the graft's donor (liver: the graft metabolises)",
         0, 1, {0: "non-expresser donor", 1: "expresser donor (at least one *1 allele)"}),
    _std("IMMUNOASSAY", "1", "sample measured by immunoassay (per record)",
         0, 1, {0: "chromatography (LC-MS/MS)", 1: "immunoassay"}),
    _std("CF", "1", "cystic fibrosis", 0, 1, _BINARY),
    _std("AZOLE", "1", "azole antifungal co-medication (which azoles, and for how long after, is the model's)",
         0, 1, {0: "no azole antifungal", 1: "azole antifungal"}),
])


@dataclass(frozen=True, slots=True)
class Derivation:
    """A named, cited formula for a derived covariate, in data units."""

    name: str
    output: str
    inputs: tuple[str, ...]
    citation: str
    fn: Callable[..., FloatArray]

    def __call__(self, *args: FloatArray) -> FloatArray:
        return self.fn(*args)


def _bsa_mosteller(wt: FloatArray, ht: FloatArray) -> FloatArray:
    return np.sqrt(wt * ht / 3600.0)


def _bsa_dubois(wt: FloatArray, ht: FloatArray) -> FloatArray:
    return 0.007184 * wt**0.425 * ht**0.725


def _bmi(wt: FloatArray, ht: FloatArray) -> FloatArray:
    return wt / (ht / 100.0) ** 2


def _ffm_janmahasatian(wt: FloatArray, ht: FloatArray, sex: FloatArray) -> FloatArray:
    bmi = _bmi(wt, ht)
    return np.where(sex == 1, 9270.0 * wt / (8780.0 + 244.0 * bmi), 9270.0 * wt / (6680.0 + 216.0 * bmi))


def _lbw_james(wt: FloatArray, ht: FloatArray, sex: FloatArray) -> FloatArray:
    return np.where(sex == 1, 1.07 * wt - 148.0 * (wt / ht) ** 2, 1.1 * wt - 128.0 * (wt / ht) ** 2)


def _lbw_boer(wt: FloatArray, ht: FloatArray, sex: FloatArray) -> FloatArray:
    return np.where(sex == 1, 0.252 * wt + 0.473 * ht - 48.3, 0.407 * wt + 0.267 * ht - 19.2)


def _egfr_schwartz_bedside(ht: FloatArray, scr: FloatArray) -> FloatArray:
    # 0.413 * height(cm) / SCr(mg/dL); SCr µmol/L = 88.4 * mg/dL, so k = 0.413 * 88.4 = 36.5
    return 36.5 * ht / scr


def _egfr_ckd_epi_2021(scr: FloatArray, age: FloatArray, sex: FloatArray) -> FloatArray:
    s = scr / 88.4  # mg/dL
    female = sex == 1
    kappa = np.where(female, 0.7, 0.9)
    alpha = np.where(female, -0.241, -0.302)
    r = s / kappa
    sex_factor = np.where(female, 1.012, 1.0)
    return 142.0 * np.minimum(r, 1.0) ** alpha * np.maximum(r, 1.0) ** -1.200 * 0.9938**age * sex_factor


#: name -> derivation. Inputs are standard covariates in their data units.
DERIVATIONS: Mapping[str, Derivation] = {d.name: d for d in (
    Derivation("bsa_mosteller", "BSA", ("WT", "HT"),
               "Mosteller RD. Simplified calculation of body-surface area. N Engl J Med 1987;317:1098",
               _bsa_mosteller),
    Derivation("bsa_dubois", "BSA", ("WT", "HT"),
               "Du Bois D, Du Bois EF. A formula to estimate the approximate surface area if height and weight "
               "be known. Arch Intern Med 1916;17:863-871", _bsa_dubois),
    Derivation("bmi", "BMI", ("WT", "HT"), "Quetelet index: weight / height^2", _bmi),
    Derivation("ffm_janmahasatian", "FFM", ("WT", "HT", "SEX"),
               "Janmahasatian S, Duffull SB, Ash S, et al. Quantification of lean bodyweight. "
               "Clin Pharmacokinet 2005;44(10):1051-1065", _ffm_janmahasatian),
    Derivation("lbw_james", "LBW", ("WT", "HT", "SEX"),
               "James WPT. Research on obesity. London: HMSO, 1976", _lbw_james),
    Derivation("lbw_boer", "LBW", ("WT", "HT", "SEX"),
               "Boer P. Estimated lean body mass as an index for normalization of body fluid volumes in humans. "
               "Am J Physiol 1984;247:F632-F636", _lbw_boer),
    Derivation("egfr_schwartz_bedside", "EGFR", ("HT", "SCR"),
               "Schwartz GJ, Munoz A, Schneider MF, et al. New equations to estimate GFR in children with CKD. "
               "J Am Soc Nephrol 2009;20:629-637 (k = 0.413 with SCr in mg/dL, 36.5 with µmol/L)",
               _egfr_schwartz_bedside),
    Derivation("egfr_ckd_epi_2021", "EGFR", ("SCR", "AGE", "SEX"),
               "Inker LA, Eneanya ND, Coresh J, et al. New creatinine- and cystatin C-based equations to estimate "
               "GFR without race. N Engl J Med 2021;385:1737-1749", _egfr_ckd_epi_2021),
)}
