"""The model library: TOML files shipped in ``cnidose/models/library/``, and a centre's own models.

A centre's models (e.g. written by ``cnidose adapt``) live in the directory named by the environment variable
``CNIDOSE_MODELS`` (``*.toml``, the file stem is the id used to resolve it; unset: none). They are listed, checked
and resolved by id like the shipped ones; an id that a shipped model already has is refused, naming both files,
so that a centre's file can never silently stand in for a published model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cnidose.errors import ModelFileError
from cnidose.models.fileformat import load_model
from cnidose.models.model import Model

__all__ = ["CENTRE_MODELS", "ModelChoice", "centre_dir", "choose_model", "formulation_key", "library_ids",
           "library_models", "resolve_model"]

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
        return _load(files[ref])
    have = ", ".join(sorted(files)) or "none yet"
    raise ModelFileError(f"not a model file and not a library id (library: {have})", source=ref)


def library_models() -> tuple[Model, ...]:
    """Every library model, shipped and the centre's, loaded (a malformed file raises ModelFileError naming it)."""
    return tuple(_load(p) for _, p in sorted(_files().items()))


def _load(path: Path) -> Model:
    """A library file, loaded once per version of the file (models are immutable): the model choice reads every
    model's metadata for each patient page and analysis."""
    st = path.stat()
    return _load_version(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=256)
def _load_version(path: str, mtime_ns: int, size: int) -> Model:
    del mtime_ns, size  # the cache key: a rewritten file is loaded again
    return load_model(Path(path))


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The library model chosen for a patient, why, and what else was considered."""

    id: str | None  # None: no library model is for this patient
    reasons: tuple[str, ...]  # the rules that decided, in order, in words
    alternatives: tuple[str, ...] = ()  # other models that matched the patient, each with why it lost

    def explanation(self) -> str:
        """One paragraph for a page or a report."""
        text = "; ".join(self.reasons)
        if self.alternatives:
            text += ". Also considered: " + "; ".join(self.alternatives)
        return text


def formulation_key(name: str) -> str:
    """A formulation's name for matching: case and the release suffix aside ("Envarsus XR" ~ "Envarsus")."""
    words = name.lower().replace("-", " ").split()
    return " ".join(w for w in words if w not in ("xr", "xl", "er", "pr", "mr"))


def choose_model(drug: str, organ: str | None, age_group: str, formulation: str | None = None, *,
                 intravenous: bool = False,
                 prefer: Mapping[tuple[str, str, str], str | tuple[str, ...]] | None = None,
                 models: tuple[Model, ...] | None = None) -> ModelChoice:
    """The library model for a patient given drug, organ (transplanted organ or population, e.g. ``kidney``,
    ``hsct``), age group (``adult`` or ``paediatric``) and formulation (the product taken, e.g. ``Advagraf``).

    A model qualifies when its ``drug``, ``organ`` and ``age_group`` are the patient's and, where the patient's
    formulation is known, the model lists it: a model fitted to another formulation describes another
    absorption (an immediate-release model does not forecast a once-daily prolonged-release product), so it is
    never taken silently. Among those that qualify, in order: a centre's model adapted from one of them
    (``cnidose adapt``: fitted to this centre's own patients); the curated default ``prefer`` for (drug, organ,
    age group); a model checked against its primary publication (``confirmed``); then the id, so that the
    choice never depends on file order. Each step that decides is said in the reasons. ``intravenous``: the
    patient's doses include intravenous ones, so only a model whose ``route`` includes intravenous describes them
    (any other refuses them: :data:`cnidose.models.model.IV`).
    """
    pool = library_models() if models is None else models
    want_organ = (organ or "").strip().lower()
    want_form = formulation_key(formulation) if formulation else None
    same_drug = [m for m in pool if str(m.meta.get("drug", "")).lower() == drug.lower()]
    population = f"{drug}, {want_organ or 'organ not recorded'}, {age_group}"
    if not same_drug:
        return ModelChoice(None, (f"the library has no model for {drug}",))
    fits_population = [m for m in same_drug if str(m.meta.get("organ", "")).lower() == want_organ
                       and str(m.meta.get("age_group", "")).lower() == age_group.lower()]
    if not fits_population:
        have = sorted({f"{m.meta.get('organ', '?')} {m.meta.get('age_group', '?')}" for m in same_drug})
        return ModelChoice(None, (f"no library model is for {population} (the {drug} models are for: "
                                  f"{', '.join(have)}); a model of another population is not used silently",))

    def forms(m: Model) -> list[str]:
        return [str(f) for f in m.meta.get("formulations", ())]

    if want_form is not None:
        cands = [m for m in fits_population if want_form in {formulation_key(f) for f in forms(m)}]
        if not cands:
            other = "; ".join(f"{m.id} ({', '.join(forms(m)) or 'no formulation named'})" for m in fits_population)
            return ModelChoice(None, (f"no library model for {population} describes {formulation}: models for "
                                      f"other formulations are not used for it ({other})",))
        reasons = [f"{population}, {formulation}"]
    else:
        cands = list(fits_population)
        reasons = [f"{population}; the formulation is not recorded, so it was not matched"]
    if intravenous:
        oral_only = [m for m in cands if "intravenous" not in m.meta.get("route", ())]
        cands = [m for m in cands if m not in oral_only]
        if not cands:
            return ModelChoice(None, (f"the record has intravenous doses and no library model for {population} "
                                      "describes intravenous doses: "
                                      f"{', '.join(m.id for m in oral_only)} describe oral doses only",))
        reasons.append("the record has intravenous doses: only a model with an intravenous route describes them"
                       + (f" (not {', '.join(m.id for m in oral_only)})" if oral_only else ""))
    ids = {m.id for m in cands}

    def parent(m: Model) -> str:
        a = m.meta.get("adaptation")
        return str(a.get("parent", "")).split(" ")[0] if isinstance(a, Mapping) else ""

    wanted = (prefer or {}).get((drug.lower(), want_organ, age_group.lower()))
    defaults = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())  # in order of preference

    def rank(m: Model) -> tuple[int, int, int, str]:
        return (0 if parent(m) in ids else 1, defaults.index(m.id) if m.id in defaults else len(defaults),
                0 if m.meta.get("confirmed", False) else 1, m.id)

    ordered = sorted(cands, key=rank)
    best = ordered[0]
    if parent(best) in ids:
        reasons.append(f"{best.id} is this centre's adaptation of {parent(best)} to its own patients "
                       "(cnidose adapt)")
    elif best.id in defaults:
        reasons.append(f"{best.id} is the default for {population}"
                       + (f", {formulation}" if formulation and best.id != defaults[0] else ""))
    elif best.meta.get("confirmed", False):
        reasons.append(f"{best.id} is checked against its primary publication")
    elif len(ordered) == 1:
        reasons.append(f"{best.id} is the only one (not yet checked against its primary publication: see its notes)")
    else:
        reasons.append(f"{best.id} (first by id among models equal on every rule; not yet checked against its "
                       "primary publication)")
    why_not = []
    for m in ordered[1:]:
        r = rank(m)
        b = rank(best)
        why = ("not this centre's adaptation" if r[0] > b[0] else "not the default" if r[1] > b[1]
               else "not checked against its primary publication" if r[2] > b[2] else "later by id")
        why_not.append(f"{m.id} ({why})")
    return ModelChoice(best.id, tuple(reasons), tuple(why_not))
