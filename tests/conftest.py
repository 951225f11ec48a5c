"""Shared fixtures: where the reference suites live."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

REPO = Path(__file__).resolve().parents[1]

# compiled ODE kernels (cnidose.pk.compiled) go to a private folder of this run, not the user's cache; the
# CLI's subprocesses inherit it
os.environ.setdefault("CNIDOSE_CACHE_DIR", tempfile.mkdtemp(prefix="cnidose-kernels-"))

# hypothesis is imported here, up front: otherwise its pytest plugin first imports it in the terminal
# summary, where, after the durability test's killed subprocesses, CPython 3.11.7's assertion-rewriting
# compile fails with "AST constructor recursion depth mismatch" (an interpreter bug; every test had passed).


def shared_dir() -> Path:
    """``$CNIDOSE_SHARED`` or ``../shared`` beside the repository."""
    return Path(os.environ.get("CNIDOSE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    if not (d / "validation").is_dir():
        pytest.fail(f"reference suites not found at {d}/validation (set CNIDOSE_SHARED)")
    return d
