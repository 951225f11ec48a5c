"""Model files (TOML) and the library of published models."""

from cnidose.models.fileformat import load_model, parse_model
from cnidose.models.library import library_ids, library_models, resolve_model
from cnidose.models.model import Covariate, Model, ModelSimulation, Notice, Prepared

__all__ = [
    "Covariate",
    "Model",
    "ModelSimulation",
    "Notice",
    "Prepared",
    "library_ids",
    "library_models",
    "load_model",
    "parse_model",
    "resolve_model",
]
