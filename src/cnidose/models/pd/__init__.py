"""Concentration-effect models of calcineurin inhibition, as data with their sources (``effects.toml``).

How the drugs act (:data:`MECHANISM`, with its source) and, per published study, how a whole-blood concentration
maps to the fraction of the drug's maximal effect on that pathway by a sigmoid Emax model,
E/Emax = C^h / (EC50^h + C^h).

The models are separate from the pharmacokinetic models on purpose: each was estimated in its own study, on
whole-blood concentrations, so it applies to the whole-blood curve of any pharmacokinetic model of the drug (the
analysis applies it only where the model's matrix is whole blood). They explain the mechanism; none was
validated for dosing.

>>> m = effect_model("clinnephrol2017_tac_nfat")
>>> round(float(m.fraction(6.7)), 6), round(m.concentration_at(0.95), 1)
(0.5, 47.7)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cnidose.errors import InputError, ModelFileError

__all__ = ["MECHANISM", "EffectCheck", "EffectModel", "effect_model", "effect_models", "effects_for"]

#: drug -> (how it acts, in plain words; its source). Tacrolimus: the US Prograf label, section 12.1, read as
#: quoted in secondary pages [S]; ciclosporin: stated without its binding protein, which no source read here names.
MECHANISM = {
    "tacrolimus": ("Inside T cells tacrolimus binds the protein FKBP-12; with calcium and calmodulin the pair blocks "
                   "calcineurin, whose phosphatase activity would let NF-AT switch on the genes of interleukin-2 and "
                   "interferon-gamma that drive rejection.",
                   "US Prograf label, 12.1 Mechanism of Action [S]"),
    "cyclosporine": ("Inside T cells ciclosporin, bound to its carrier protein, blocks calcineurin, whose phosphatase "
                     "activity would let NF-AT switch on the genes of interleukin-2 and interferon-gamma that drive "
                     "rejection.",
                     "Fukudo 2005 (calcineurin phosphatase activity inhibited by ciclosporin); NF-AT pathway as for "
                     "tacrolimus"),
}

EDUCATIONAL = ("Educational: this shows how the concentration relates to the drug's mechanism in the cited study's "
               "patients. It was not validated for choosing a dose; dose by the levels and the target.")


@dataclass(frozen=True, slots=True)
class EffectCheck:
    statement: str  # quoted from the paper (with how it is read, where it needs reading)
    concentration: float
    expected: float  # fraction of the maximal effect
    tolerance: float


@dataclass(frozen=True, slots=True)
class EffectModel:
    id: str
    drug: str
    measure: str
    effect: str
    population: str
    ec50: float
    unit: str
    hill: float
    model: str
    maximal: str
    source: str
    confirmed: bool
    confirmation: str
    ec50_ci: tuple[float, float] | None = None
    checks: tuple[EffectCheck, ...] = ()

    def fraction(self, concentration: ArrayLike) -> NDArray[np.float64]:
        """The fraction of the maximal effect at each concentration (``unit``); 0 at or below zero."""
        c = np.clip(np.asarray(concentration, dtype=np.float64), 0.0, None)
        ch = c ** self.hill
        return np.asarray(ch / (self.ec50 ** self.hill + ch))

    def concentration_at(self, fraction: float) -> float:
        """The concentration that gives ``fraction`` (0 < fraction < 1) of the maximal effect."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"a fraction of the maximal effect lies strictly between 0 and 1, got {fraction!r}")
        return float(self.ec50 * (fraction / (1.0 - fraction)) ** (1.0 / self.hill))

    def check_results(self) -> list[tuple[EffectCheck, float, bool]]:
        """Each check of the file with the fraction this model gives and whether it is within the tolerance."""
        out = []
        for ch in self.checks:
            got = float(self.fraction(ch.concentration))
            out.append((ch, got, abs(got - ch.expected) <= ch.tolerance))
        return out

    def failed_checks(self) -> list[str]:
        """Each check of the file that this model does not reproduce (empty: all pass)."""
        return [f"{self.id}: {ch.statement}: E/Emax({ch.concentration:g} {self.unit}) = {got:.4f}, expected "
                f"{ch.expected:g} +/- {ch.tolerance:g}" for ch, got, ok in self.check_results() if not ok]

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "drug": self.drug, "measure": self.measure, "effect": self.effect,
                "population": self.population, "ec50": self.ec50, "ec50_ci": self.ec50_ci, "unit": self.unit,
                "hill": self.hill, "model": self.model, "maximal": self.maximal, "source": self.source,
                "confirmed": self.confirmed}


def _positive(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not x > 0:
        raise ModelFileError(f"expected a positive number, got {x!r}", source="effects.toml", field=where)
    return float(x)


@cache
def effect_models() -> tuple[EffectModel, ...]:
    """Every concentration-effect model of the library (validated when read)."""
    doc = tomllib.loads((resources.files("cnidose.models.pd") / "effects.toml").read_text("utf-8"))
    if doc.get("format") != 1:
        raise ModelFileError("format = 1 expected", source="effects.toml", field="format")
    out = []
    for k, e in enumerate(doc.get("effect", [])):
        where = f"effect[{k}]"
        missing = [f for f in ("id", "drug", "measure", "effect", "population", "ec50", "unit", "hill", "model",
                               "maximal", "source", "confirmed", "confirmation") if f not in e]
        if missing:
            raise ModelFileError(f"missing {', '.join(missing)}", source="effects.toml", field=where)
        checks = tuple(EffectCheck(str(c["statement"]), float(c["concentration"]), float(c["expected"]),
                                   float(c["tolerance"])) for c in e.get("checks", []))
        ci = e.get("ec50_ci")
        out.append(EffectModel(str(e["id"]), str(e["drug"]), str(e["measure"]), str(e["effect"]),
                               str(e["population"]), _positive(e["ec50"], f"{where}.ec50"), str(e["unit"]),
                               _positive(e["hill"], f"{where}.hill"), str(e["model"]), str(e["maximal"]),
                               str(e["source"]), bool(e["confirmed"]), str(e["confirmation"]),
                               None if ci is None else (float(ci[0]), float(ci[1])), checks))
    ids = [m.id for m in out]
    if len(set(ids)) != len(ids):
        raise ModelFileError("duplicate ids", source="effects.toml", field="effect.id")
    return tuple(out)


def effect_model(model_id: str) -> EffectModel:
    for m in effect_models():
        if m.id == model_id:
            return m
    raise InputError(f"no concentration-effect model {model_id!r} (known: {', '.join(m.id for m in effect_models())})")


def effects_for(drug: str) -> list[EffectModel]:
    """The concentration-effect models of ``drug`` (tacrolimus, cyclosporine), in file order."""
    return [m for m in effect_models() if m.drug == drug]
