"""Dose individualisation: targets and products as data, start doses (label, CPIC, model-based) and
regimen recommendations from a fit."""

from cnidose.dosing.cpic import Phenotype, cpic_start_dose, cyp3a5_phenotype
from cnidose.dosing.data import Product, Target, find_target, load_products, load_targets, product
from cnidose.dosing.regimen import Candidate, Recommendation, recommend
from cnidose.dosing.start import apriori_dose, convert_daily_dose, label_start_dose

__all__ = [
    "Candidate",
    "Phenotype",
    "Product",
    "Recommendation",
    "Target",
    "apriori_dose",
    "convert_daily_dose",
    "cpic_start_dose",
    "cyp3a5_phenotype",
    "find_target",
    "label_start_dose",
    "load_products",
    "load_targets",
    "product",
    "recommend",
]
