"""Targets and products as data (TOML files with sources), with per-centre overrides."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cnidose.errors import InputError, ModelFileError

__all__ = ["Conversion", "Product", "Target", "find_target", "load_products", "load_targets", "product"]


@dataclass(frozen=True, slots=True)
class Target:
    """A target range of an exposure metric."""

    drug: str
    low: float
    high: float
    metric: str = "trough"
    unit: str = "ng/mL"
    organ: str = ""
    age_group: str = ""
    concomitant: str = "any"
    from_month: float = 0.0
    to_month: float = float("inf")
    source: str = "user"

    def __post_init__(self) -> None:
        if not (self.low >= 0 and self.high > self.low):
            raise InputError(f"target range {self.low:g}-{self.high:g}: the low end must be below the high end")
        if self.metric not in ("trough", "c2", "auc", "average"):
            raise InputError(f"unknown metric {self.metric!r} (trough, c2, auc, average)")

    def __str__(self) -> str:
        return f"{self.metric} {self.low:g}-{self.high:g} {self.unit} ({self.source})"


@dataclass(frozen=True, slots=True)
class Product:
    """A marketed formulation."""

    name: str
    drug: str
    release: str
    route: str
    form: str
    strengths: tuple[float, ...]
    interval: float
    source: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Conversion:
    """A published conversion between formulations (total daily dose ratio)."""

    source_product: str
    target_product: str
    factor: float
    source: str


#: largest single administration (mg) that dose searches consider unless told otherwise: an engineering
#: bound well above labelled doses, not a clinical limit
MAX_DOSE_MG = {"tacrolimus": 25.0, "cyclosporine": 500.0}


def max_dose_mg(drug: str) -> float:
    return MAX_DOSE_MG.get(drug, MAX_DOSE_MG["cyclosporine"])


def load_start_doses(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The label starting doses (``[[start_doses]]`` of products.toml)."""
    return list(_read(Path(path) if path else None, "products.toml").get("start_doses", []))


def _read(path: Path | None, name: str) -> dict[str, Any]:
    try:
        if path is None:
            text = (resources.files("cnidose.dosing") / "data" / name).read_text(encoding="utf-8")
            where = f"cnidose/dosing/data/{name}"
        else:
            text = Path(path).read_text(encoding="utf-8")
            where = str(path)
        doc = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelFileError(f"cannot read: {exc}", source=str(path or name)) from None
    if doc.get("format") != 1:
        raise ModelFileError("unsupported or missing format (expected format = 1)", source=where, field="format")
    return doc


def load_targets(path: str | Path | None = None) -> list[Target]:
    """The packaged targets, or a centre's file (same format) when ``path`` is given."""
    doc = _read(Path(path) if path else None, "targets.toml")
    out = []
    for k, t in enumerate(doc.get("targets", [])):
        try:
            out.append(Target(drug=t["drug"], low=float(t["low"]), high=float(t["high"]),
                              metric=t.get("metric", "trough"), unit=t.get("unit", "ng/mL"),
                              organ=t.get("organ", ""), age_group=t.get("age_group", ""),
                              concomitant=t.get("concomitant", "any"), from_month=float(t.get("from_month", 0)),
                              to_month=float(t.get("to_month", float("inf"))), source=t["source"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"target {k + 1}: {exc}", source=str(path or "targets.toml"),
                                 field=f"targets[{k}]") from None
    return out


def find_target(drug: str, organ: str, age_group: str, months_since_transplant: float, *,
                concomitant: str = "any", metric: str = "trough", targets: list[Target] | None = None) -> Target:
    """The target for a patient; InputError listing what exists when none matches."""
    pool = load_targets() if targets is None else targets
    hits = [t for t in pool if t.drug == drug and t.organ == organ and t.age_group == age_group
            and t.metric == metric and t.from_month <= months_since_transplant < t.to_month
            and (t.concomitant == concomitant or t.concomitant == "any" or concomitant == "any")]
    exact = [t for t in hits if t.concomitant == concomitant]
    if exact:
        return exact[0]
    if hits:
        return hits[0]
    have = sorted({f"{t.organ}/{t.age_group}/{t.concomitant}" for t in pool if t.drug == drug})
    raise InputError(f"no {metric} target for {drug}, {organ}, {age_group}, month {months_since_transplant:g} "
                     f"(concomitant {concomitant}); targets exist for: {', '.join(have) or 'none'} -- give the "
                     "target range explicitly or a centre targets file")


def load_products(path: str | Path | None = None) -> tuple[list[Product], list[Conversion]]:
    doc = _read(Path(path) if path else None, "products.toml")
    prods = [Product(p["name"], p["drug"], p["release"], p["route"], p["form"],
                     tuple(float(x) for x in p["strengths"]), float(p["interval"]), p["source"], p.get("note", ""))
             for p in doc.get("products", [])]
    convs = [Conversion(c["from"], c["to"], float(c["factor"]), c["source"]) for c in doc.get("conversions", [])]
    return prods, convs


def product(name: str, drug: str | None = None, path: str | Path | None = None) -> Product:
    """A product by name (case-insensitive); InputError if unknown or of another drug."""
    prods, _ = load_products(path)
    for p in prods:
        if p.name.lower() == name.lower():
            if drug is not None and p.drug != drug:
                raise InputError(f"{p.name} is {p.drug}, not {drug}")
            return p
    names = ", ".join(p.name for p in prods if drug is None or p.drug == drug)
    raise InputError(f"unknown formulation {name!r}" + (f" for {drug}" if drug else "") + f" (known: {names})")
