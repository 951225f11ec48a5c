"""Interoperability codes (``clinical/data/codes.toml``: verified LOINC codes and RxNorm concepts only)."""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from typing import Any

__all__ = ["loinc", "loinc_names"]


@functools.cache
def _codes() -> dict[str, Any]:
    return tomllib.loads((resources.files("cnidose.clinical") / "data" / "codes.toml").read_text(encoding="utf-8"))


def loinc(name: str) -> str | None:
    """The verified LOINC code of ``name`` (e.g. "tacrolimus", "creatinine"), or None where none is verified.

    >>> loinc("tacrolimus"), loinc("magnesium")
    ('11253-2', None)
    """
    entry = _codes()["loinc"].get(name)
    return None if entry is None else str(entry["code"])


def loinc_names() -> dict[str, str]:
    """Verified LOINC code -> the name it is listed under."""
    return {str(v["code"]): k for k, v in _codes()["loinc"].items()}
