"""CYP3A5 genotype -> phenotype -> tacrolimus starting dose (CPIC guideline).

Birdwell KA, et al. Clinical Pharmacogenetics Implementation Consortium (CPIC) guidelines for CYP3A5
genotype and tacrolimus dosing. Clin Pharmacol Ther 2015;98:19-24 (PMID 25801146); no dosing updates
since (cpicpgx.org). Allele function: *1 functional; *3 (rs776746), *6 (rs10264272), *7 (rs41303343)
non-functional [V]. The phenotype follows from the number of functional alleles, as CPIC assigns it:
two -> normal metabolizer (2015: extensive), one -> intermediate, none -> poor.

Recommendation: normal and intermediate metabolizers start at 1.5-2 times the standard starting dose,
never above 0.3 mg/kg/day, then therapeutic drug monitoring; poor metabolizers and unknown genotype
start at the standard dose. Scope: kidney, heart, lung, HSCT; liver only when donor and recipient
genotypes are identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cnidose.errors import InputError

__all__ = ["ALLELE_FUNCTION", "Phenotype", "StartDose", "cpic_start_dose", "cyp3a5_phenotype"]

Phenotype = Literal["normal", "intermediate", "poor", "indeterminate"]

#: CPIC allele function (CYP3A5)
ALLELE_FUNCTION: dict[str, bool] = {"*1": True, "*3": False, "*6": False, "*7": False}
CPIC_SOURCE = "CPIC CYP3A5-tacrolimus guideline, Birdwell et al. Clin Pharmacol Ther 2015;98:19-24"
MAX_MG_PER_KG_DAY = 0.3


def cyp3a5_phenotype(diplotype: str | None) -> Phenotype:
    """Phenotype of a CYP3A5 diplotype such as ``*1/*3``; None, "", "unknown" give "indeterminate".

    >>> cyp3a5_phenotype("*1/*1"), cyp3a5_phenotype("*1/*6"), cyp3a5_phenotype("*3/*7")
    ('normal', 'intermediate', 'poor')
    """
    if diplotype is None or diplotype.strip().lower() in ("", "unknown", "indeterminate", "na", "n/a"):
        return "indeterminate"
    parts = re.split(r"\s*/\s*", diplotype.strip())
    if len(parts) != 2 or any(p not in ALLELE_FUNCTION for p in parts):
        raise InputError(f"CYP3A5 diplotype {diplotype!r} is not understood (alleles known: "
                         f"{', '.join(ALLELE_FUNCTION)}; write e.g. *1/*3)")
    n = sum(ALLELE_FUNCTION[p] for p in parts)
    return ("poor", "intermediate", "normal")[n]


@dataclass(frozen=True, slots=True)
class StartDose:
    """A starting dose with its reasoning."""

    mg_per_day: float
    mg_per_kg_day: float
    phenotype: Phenotype
    factor: float
    capped: bool
    source: str
    note: str


def cpic_start_dose(standard_mg_per_kg_day: float, weight_kg: float, diplotype: str | None, *,
                    factor: float = 1.5, organ: str = "kidney", donor_identical: bool | None = None) -> StartDose:
    """Tacrolimus starting dose by the CPIC rule.

    ``factor`` (1.5-2.0) is the increase for expressers, chosen by the clinician or the centre.
    """
    if not 1.5 <= factor <= 2.0:
        raise InputError(f"the CPIC increase for expressers is 1.5-2 times, got {factor:g}")
    if standard_mg_per_kg_day <= 0 or weight_kg <= 0:
        raise InputError("standard dose and weight must be positive")
    ph = cyp3a5_phenotype(diplotype)
    note = ""
    if organ == "liver" and not donor_identical:
        note = "CPIC applies to liver recipients only when donor and recipient genotypes are identical"
        ph_eff: Phenotype = "indeterminate"
    else:
        ph_eff = ph
    k = factor if ph_eff in ("normal", "intermediate") else 1.0
    per_kg = standard_mg_per_kg_day * k
    capped = per_kg > MAX_MG_PER_KG_DAY
    if capped:
        per_kg = MAX_MG_PER_KG_DAY
    if ph_eff == "indeterminate" and not note:
        note = "genotype unknown or indeterminate: standard dosing"
    return StartDose(per_kg * weight_kg, per_kg, ph, k, capped, CPIC_SOURCE, note)
