"""The model library: TOML files shipped in ``cnidose/models/library/``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cnidose.errors import ModelFileError
from cnidose.models.fileformat import load_model
from cnidose.models.model import Model

__all__ = ["library_ids", "library_models", "resolve_model"]


def _library_dir() -> Path:
    return Path(str(resources.files("cnidose.models") / "library"))


def library_ids() -> tuple[str, ...]:
    """Ids of the models shipped with cnidose (file stems), sorted."""
    d = _library_dir()
    return tuple(sorted(p.stem for p in d.glob("*.toml"))) if d.is_dir() else ()


def resolve_model(ref: str) -> Model:
    """Load ``ref``: a path to a model file, or the id of a library model."""
    p = Path(ref)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ModelFileError("no such model file", source=ref)
        return load_model(p)
    candidate = _library_dir() / f"{ref}.toml"
    if candidate.is_file():
        return load_model(candidate)
    have = ", ".join(library_ids()) or "none yet"
    raise ModelFileError(f"not a model file and not a library id (library: {have})", source=ref)


def library_models() -> tuple[Model, ...]:
    """Every library model, loaded (a malformed file raises ModelFileError naming it)."""
    d = _library_dir()
    return tuple(load_model(d / f"{i}.toml") for i in library_ids())
