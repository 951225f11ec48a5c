"""Compartmental structures: what the engine integrates.

A structure names its compartments (1-based, as NONMEM's CMT), the default
dose and observation compartments, and either

* a **linear** graph of first-order flows (``LinearStructure``), solved in
  closed form (matrix exponential, by eigen-decomposition when the rate
  matrix is diagonalisable, by Padé otherwise), or
* a general right-hand side (``OdeStructure``), solved numerically.

Parameter values reach the engine as arrays of shape ``(B,)`` per name (B =
the batch of individuals x draws). Per-compartment dosing parameters follow
NONMEM's names: ``F<n>`` bioavailability, ``ALAG<n>`` lag (h), ``R<n>``
modelled rate, ``D<n>`` modelled duration (h), and ``S<n>`` the scale that
turns an amount into the reported concentration (prediction = A(n)/S<n>).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import ModelFileError

__all__ = [
    "Flow",
    "GammaInput",
    "LinearStructure",
    "OdeStructure",
    "Structure",
    "one_compartment",
    "three_compartment",
    "transit_absorption",
    "two_compartment",
]

FloatArray = NDArray[np.float64]
Params = Mapping[str, FloatArray]


@dataclass(frozen=True, slots=True)
class Flow:
    """A first-order flow ``source -> target`` (``target`` None = elimination).

    The rate constant (1/h) is ``params[rate]`` or, when ``per`` is given,
    ``params[rate] / params[per]`` (a clearance over a volume).
    """

    source: int
    target: int | None
    rate: str
    per: str | None = None

    def constant(self, params: Params) -> FloatArray:
        k = np.asarray(params[self.rate], dtype=np.float64)
        if self.per is not None:
            k = k / np.asarray(params[self.per], dtype=np.float64)
        return k


@dataclass(frozen=True, slots=True)
class GammaInput:
    """Bolus doses into compartment ``cmt`` (1-based) arrive there over time, at a rate proportional to a gamma
    density of the time since the dose (after its lag): shape ``n + 1`` and rate ``(n + 1) / mtt``, with ``n``
    and ``mtt`` the values of the parameters so named when the dose enters. This is the transit-compartment
    input of Savic et al. 2007 (J Pharmacokinet Pharmacodyn 34:711): ``n`` transit compartments with mean
    transit time ``mtt``, for any real ``n >= 0`` (a whole ``n`` is the Erlang chain of ``n`` compartments and
    the dose compartment). Every dose is superposed (the NONMEM code of many papers keeps the last dose only;
    the two agree once a dose's input is over)."""

    cmt: int
    n: str
    mtt: str


@dataclass(frozen=True, slots=True)
class _Base:
    compartments: tuple[str, ...]
    default_dose: int
    default_obs: int
    gamma: GammaInput | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        n = len(self.compartments)
        for name in ("default_dose", "default_obs"):
            v = getattr(self, name)
            if not 1 <= v <= n:
                raise ModelFileError(f"{name}={v} is not a compartment 1..{n}", field=name)
        if self.gamma is not None and not 1 <= self.gamma.cmt <= n:
            raise ModelFileError(f"gamma input compartment {self.gamma.cmt} is not a compartment 1..{n}",
                                 field="gamma")

    @property
    def n(self) -> int:
        return len(self.compartments)

    def index(self, name: str) -> int:
        """1-based number of the compartment called ``name``."""
        try:
            return self.compartments.index(name) + 1
        except ValueError:
            raise ModelFileError(f"unknown compartment {name!r}; have {', '.join(self.compartments)}") from None


@dataclass(frozen=True, slots=True)
class LinearStructure(_Base):
    """Linear compartmental system dA/dt = K A + input; closed-form solution."""

    flows: tuple[Flow, ...] = ()

    def __post_init__(self) -> None:
        _Base.__post_init__(self)
        n = self.n
        for f in self.flows:
            if not 1 <= f.source <= n or (f.target is not None and not 1 <= f.target <= n):
                raise ModelFileError(f"flow {f} refers to a compartment outside 1..{n}", field="flows")

    @property
    def rate_parameters(self) -> tuple[str, ...]:
        names: list[str] = []
        for f in self.flows:
            for p in (f.rate, f.per):
                if p is not None and p not in names:
                    names.append(p)
        return tuple(names)

    def rate_matrix(self, params: Params) -> FloatArray:
        """K with shape (B, n, n): dA/dt = K @ A."""
        ks = [f.constant(params) for f in self.flows]
        batch = np.broadcast_shapes(*(k.shape for k in ks)) if ks else (1,)
        K = np.zeros((*batch, self.n, self.n))
        for f, k in zip(self.flows, ks, strict=True):
            s = f.source - 1
            K[..., s, s] -= k
            if f.target is not None:
                K[..., f.target - 1, s] += k
        return K

    def rhs(self, amounts: FloatArray, params: Params) -> FloatArray:
        """dA/dt for amounts of shape (B, n) (used by the ODE path)."""
        return np.einsum("bij,bj->bi", self.rate_matrix(params), amounts)


@dataclass(frozen=True, slots=True)
class OdeStructure(_Base):
    """General system dA/dt = f(A, params) + input, solved numerically.

    ``rhs(amounts (B, n), params) -> (B, n)``; ``parameters`` lists the names
    ``rhs`` reads (the engine uses it to notice a parameter change). ``equations``, when given, are the same
    derivatives as Python source on scalars, one per compartment, reading the amounts as ``x[j]`` (0-based) and
    the parameters as ``p[k]`` in the order of ``parameters``: the engine then compiles them
    (:mod:`cnidose.pk.compiled`) instead of calling ``rhs`` from SciPy's integrator. ``sources``, when given, are
    the derivatives as the model file writes them (compartment and parameter names): what a model kernel
    differentiates for its forward sensitivities (:mod:`cnidose.models.kernel`).
    """

    rhs: Callable[[FloatArray, Params], FloatArray] | None = None
    parameters: tuple[str, ...] = ()
    equations: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def rate_parameters(self) -> tuple[str, ...]:
        return self.parameters


Structure = LinearStructure | OdeStructure


def one_compartment(*, oral: bool = True) -> LinearStructure:
    """1-compartment model (NONMEM ADVAN1/ADVAN2): params CL, V (and KA).

    Examples
    --------
    >>> one_compartment().compartments
    ('DEPOT', 'CENTRAL')
    """
    if oral:
        return LinearStructure(("DEPOT", "CENTRAL"), 1, 2,
                               (Flow(1, 2, "KA"), Flow(2, None, "CL", "V")))
    return LinearStructure(("CENTRAL",), 1, 1, (Flow(1, None, "CL", "V"),))


def two_compartment(*, oral: bool = True) -> LinearStructure:
    """2-compartment model (ADVAN3/ADVAN4): params CL, V1, Q, V2 (and KA)."""
    c = 2 if oral else 1
    flows = [Flow(c, None, "CL", "V1"), Flow(c, c + 1, "Q", "V1"), Flow(c + 1, c, "Q", "V2")]
    if oral:
        return LinearStructure(("DEPOT", "CENTRAL", "PERIPHERAL"), 1, 2, (Flow(1, 2, "KA"), *flows))
    return LinearStructure(("CENTRAL", "PERIPHERAL"), 1, 1, tuple(flows))


def three_compartment(*, oral: bool = True) -> LinearStructure:
    """3-compartment model (ADVAN11/ADVAN12): params CL, V1, Q2, V2, Q3, V3 (and KA)."""
    c = 2 if oral else 1
    flows = [Flow(c, None, "CL", "V1"), Flow(c, c + 1, "Q2", "V1"), Flow(c + 1, c, "Q2", "V2"),
             Flow(c, c + 2, "Q3", "V1"), Flow(c + 2, c, "Q3", "V3")]
    names = ("CENTRAL", "PERIPHERAL1", "PERIPHERAL2")
    if oral:
        return LinearStructure(("DEPOT", *names), 1, 2, (Flow(1, 2, "KA"), *flows))
    return LinearStructure(names, 1, 1, tuple(flows))


def transit_absorption(n_transit: int, *, peripherals: int = 1) -> LinearStructure:
    """Dose -> ``n_transit`` transit compartments (rate KTR) -> depot (KA) -> central.

    The dose compartment is the first transit compartment; with ``n_transit``
    equal rate constants the chain is the Erlang absorption used by several
    tacrolimus models. ``peripherals`` is 0, 1 (Q, V2) or 2 (Q2, V2, Q3, V3);
    central volume V1, clearance CL.
    """
    if n_transit < 1:
        raise ModelFileError("n_transit must be >= 1", field="structure.transit")
    names = [f"TRANSIT{i + 1}" for i in range(n_transit)] + ["DEPOT", "CENTRAL"]
    flows = [Flow(i + 1, i + 2, "KTR") for i in range(n_transit)]
    d, c = n_transit + 1, n_transit + 2
    flows += [Flow(d, c, "KA"), Flow(c, None, "CL", "V1")]
    if peripherals == 1:
        names.append("PERIPHERAL")
        flows += [Flow(c, c + 1, "Q", "V1"), Flow(c + 1, c, "Q", "V2")]
    elif peripherals == 2:
        names += ["PERIPHERAL1", "PERIPHERAL2"]
        flows += [Flow(c, c + 1, "Q2", "V1"), Flow(c + 1, c, "Q2", "V2"),
                  Flow(c, c + 2, "Q3", "V1"), Flow(c + 2, c, "Q3", "V3")]
    elif peripherals != 0:
        raise ModelFileError("peripherals must be 0, 1 or 2", field="structure.peripherals")
    return LinearStructure(tuple(names), 1, c, tuple(flows))
