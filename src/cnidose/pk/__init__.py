"""Numerical core: NONMEM event records and their solution, vectorised.

No I/O and no imports from the rest of cnidose (enforced by import-linter).
"""

from cnidose.pk.engine import Simulation, simulate, simulate_many
from cnidose.pk.events import Individual, split_individuals
from cnidose.pk.structure import (
    Flow,
    LinearStructure,
    OdeStructure,
    one_compartment,
    three_compartment,
    transit_absorption,
    two_compartment,
)

__all__ = [
    "Flow",
    "Individual",
    "LinearStructure",
    "OdeStructure",
    "Simulation",
    "one_compartment",
    "simulate",
    "simulate_many",
    "split_individuals",
    "three_compartment",
    "transit_absorption",
    "two_compartment",
]
