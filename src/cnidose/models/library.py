"""The model library: TOML files shipped in ``cnidose/models/library/``, and a centre's own models.

A centre's models (e.g. written by ``cnidose adapt``) live in the directory named by the environment variable
``CNIDOSE_MODELS`` (``*.toml``, the file stem is the id used to resolve it; unset: none). They are listed, checked
and resolved by id like the shipped ones; an id that a shipped model already has is refused, naming both files,
so that a centre's file can never silently stand in for a published model.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from cnidose.errors import ModelFileError
from cnidose.models.fileformat import load_model
from cnidose.models.model import Model

__all__ = ["CENTRE_MODELS", "centre_dir", "library_ids", "library_models", "resolve_model"]

#: environment variable naming a directory of the centre's own model files
CENTRE_MODELS = "CNIDOSE_MODELS"


def _library_dir() -> Path:
    return Path(str(resources.files("cnidose.models") / "library"))


def centre_dir() -> Path | None:
    """The centre's model directory (``CNIDOSE_MODELS``), or None when unset; a name that is not a directory is
    an error, not an empty library."""
    raw = os.environ.get(CENTRE_MODELS, "").strip()
    if not raw:
        return None
    d = Path(raw).expanduser()
    if not d.is_dir():
        raise ModelFileError(f"{CENTRE_MODELS} is not a directory", source=str(d))
    return d


def _files() -> dict[str, Path]:
    shipped = _library_dir()
    files = {p.stem: p for p in sorted(shipped.glob("*.toml"))} if shipped.is_dir() else {}
    centre = centre_dir()
    if centre is not None:
        for p in sorted(centre.glob("*.toml")):
            if p.stem in files:
                raise ModelFileError(f"the centre's model {p.stem} has the id of a shipped model ({files[p.stem]}); "
                                     "rename it", source=str(p))
            files[p.stem] = p
    return files


def library_ids() -> tuple[str, ...]:
    """Ids of the models shipped with cnidose and of the centre's (file stems), sorted."""
    return tuple(sorted(_files()))


def resolve_model(ref: str) -> Model:
    """Load ``ref``: a path to a model file, or the id of a library (shipped or centre) model."""
    p = Path(ref)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ModelFileError("no such model file", source=ref)
        return load_model(p)
    files = _files()
    if ref in files:
        return load_model(files[ref])
    have = ", ".join(sorted(files)) or "none yet"
    raise ModelFileError(f"not a model file and not a library id (library: {have})", source=ref)


def library_models() -> tuple[Model, ...]:
    """Every library model, shipped and the centre's, loaded (a malformed file raises ModelFileError naming it)."""
    return tuple(load_model(p) for _, p in sorted(_files().items()))
