"""Model files (TOML) and the library of published models."""

from cnidose.models.library import library_ids, resolve_model
from cnidose.models.model import Covariate, Model, load_model, parse_model

__all__ = ["Covariate", "Model", "library_ids", "load_model", "parse_model", "resolve_model"]
