"""Clinical calculators with units: eGFR (CKD-EPI 2021, bedside Schwartz), BSA, lean and fat-free mass,
ideal body weight. Creatinine may be given in µmol/L or mg/dL (1 mg/dL = 88.4 µmol/L); results in
UCUM units (mL/min/{1.73_m2}, m2, kg). The formulas are those of :mod:`cnidose.models.covariates`
(one implementation, cited there); ideal body weight is Devine's.
"""

from __future__ import annotations

import numpy as np

from cnidose.errors import InputError
from cnidose.models.covariates import DERIVATIONS

__all__ = ["bsa", "creatinine_umol_per_l", "egfr_ckd_epi_2021", "egfr_schwartz", "ffm", "ibw_devine", "lbw"]

_CREATININE = {"umol/L": 1.0, "µmol/L": 1.0, "mg/dL": 88.4}


def creatinine_umol_per_l(value: float, unit: str) -> float:
    """Serum creatinine in µmol/L; InputError on an unknown unit or an impossible value."""
    if unit not in _CREATININE:
        raise InputError(f"creatinine unit {unit!r} (use umol/L or mg/dL)")
    v = float(value) * _CREATININE[unit]
    if not 10.0 <= v <= 3000.0:
        raise InputError(f"creatinine {value:g} {unit} is not a possible value")
    return v


def _sex(sex: str) -> float:
    if sex not in ("female", "male"):
        raise InputError(f"sex must be female or male, got {sex!r}")
    return 1.0 if sex == "female" else 0.0


def egfr_ckd_epi_2021(creatinine: float, unit: str, age_years: float, sex: str) -> float:
    """eGFR (mL/min/1.73 m2), CKD-EPI 2021 creatinine equation (race-free), adults."""
    if age_years < 18:
        raise InputError("CKD-EPI 2021 is for adults (18 and older): use egfr_schwartz for children")
    scr = creatinine_umol_per_l(creatinine, unit)
    return float(DERIVATIONS["egfr_ckd_epi_2021"](np.array([scr]), np.array([float(age_years)]),
                                                  np.array([_sex(sex)]))[0])


def egfr_schwartz(creatinine: float, unit: str, height_cm: float) -> float:
    """eGFR (mL/min/1.73 m2), bedside Schwartz 2009, children: 0.413 x height (cm) / creatinine (mg/dL)."""
    scr = creatinine_umol_per_l(creatinine, unit)
    return float(DERIVATIONS["egfr_schwartz_bedside"](np.array([float(height_cm)]), np.array([scr]))[0])


def bsa(weight_kg: float, height_cm: float, formula: str = "mosteller") -> float:
    """Body surface area (m2): Mosteller (default) or DuBois."""
    name = {"mosteller": "bsa_mosteller", "dubois": "bsa_dubois"}.get(formula)
    if name is None:
        raise InputError(f"BSA formula {formula!r} (mosteller or dubois)")
    return float(DERIVATIONS[name](np.array([float(weight_kg)]), np.array([float(height_cm)]))[0])


def lbw(weight_kg: float, height_cm: float, sex: str, formula: str = "james") -> float:
    """Lean body weight (kg): James (default) or Boer."""
    name = {"james": "lbw_james", "boer": "lbw_boer"}.get(formula)
    if name is None:
        raise InputError(f"LBW formula {formula!r} (james or boer)")
    return float(DERIVATIONS[name](np.array([float(weight_kg)]), np.array([float(height_cm)]),
                                   np.array([_sex(sex)]))[0])


def ffm(weight_kg: float, height_cm: float, sex: str) -> float:
    """Fat-free mass (kg), Janmahasatian 2005."""
    return float(DERIVATIONS["ffm_janmahasatian"](np.array([float(weight_kg)]), np.array([float(height_cm)]),
                                                  np.array([_sex(sex)]))[0])


def ibw_devine(height_cm: float, sex: str) -> float:
    """Ideal body weight (kg): 50 (men) or 45.5 (women) + 2.3 kg per inch over 5 feet.

    Devine BJ. Gentamicin therapy. Drug Intell Clin Pharm 1974;8:650-655.
    """
    inches_over = float(height_cm) / 2.54 - 60.0
    return (45.5 if _sex(sex) == 1.0 else 50.0) + 2.3 * inches_over
