"""Propagators: advance a batch of states over a time step.

Each solver keeps the state in its own *internal* coordinates (the engine
never looks inside):

``EigenSolver``
    closed form for a diagonalisable linear system, K = V diag(lambda) V^-1.
    In eigen-coordinates y = V^-1 A a step is element-wise:
    y(t+dt) = exp(lambda dt) y + (exp(lambda dt) - 1)/lambda * (V^-1 r),
    so a step costs n exp() per individual (cached when dt is shared).
``ExpmSolver``
    closed form for any linear system (repeated eigenvalues: transit chains,
    KA == K) through the matrix exponential of [[K, I], [0, 0]] dt, which
    yields both exp(K dt) and its integral (Van Loan 1978, IEEE TAC 23:395).
``OdeSolver``
    numerical integration (SciPy DOP853, rtol 1e-10) of any right-hand side;
    all individuals of the batch are integrated together on a normalised
    time axis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import NumericalError
from cnidose.pk.eigen import eigen_blocks, flow_blocks
from cnidose.pk.kernels import linear_kernels
from cnidose.pk.structure import LinearStructure, OdeStructure

if TYPE_CHECKING:
    from cnidose.pk.compiled import Kernel

__all__ = ["EigenSolver", "ExpmSolver", "GammaDose", "OdeSolver", "Solver", "gamma_density", "gamma_modes",
           "gamma_response", "gamma_so_far", "gamma_support"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Params = Mapping[str, FloatArray]
DT = float | FloatArray


class Solver(ABC):
    """Interface the engine uses; states have shape (B, n)."""

    #: True when inputs superpose (linear systems): enables closed-form steady state.
    linear: bool = True

    def __init__(self, n: int, batch: int):
        self.n = n
        self.batch = batch
        self._eye = np.eye(n)

    @abstractmethod
    def set_params(self, params: Params) -> None:
        """Use these parameters (arrays of shape (B,)) from now on."""

    def to_internal(self, x: FloatArray) -> FloatArray:
        return x

    def to_natural(self, y: FloatArray) -> FloatArray:
        return y

    def unit(self, cmt: int | IntArray) -> FloatArray:
        """Internal coordinates of a unit amount in compartment ``cmt`` (0-based), (B, n)."""
        if isinstance(cmt, (int, np.integer)):
            return np.broadcast_to(self._eye[int(cmt)], (self.batch, self.n))
        return self._eye[cmt]

    def observe(self, y: FloatArray, cmt: int) -> FloatArray:
        """Natural amount in compartment ``cmt`` (0-based), shape (B,)."""
        return y[:, cmt]

    @abstractmethod
    def propagate(self, y: FloatArray, ry: FloatArray | None, dt: DT) -> FloatArray:
        """State after ``dt`` hours (scalar or (B,)) with constant input rate ``ry``."""

    def geometric(self, v: FloatArray, period: float) -> FloatArray:
        """(I - exp(K period))^-1 v: the sum of v propagated 0, 1, 2, ... periods."""
        raise NotImplementedError

    @abstractmethod
    def constant_infusion(self, ry: FloatArray) -> FloatArray:
        """Steady state under a constant input rate."""

    def gamma_input(self, u0: FloatArray, u1: FloatArray, g: GammaDose) -> FloatArray:
        """Internal coordinates, at the end of the step, of what a unit amount of dose ``g`` (entering its
        compartment at a gamma-density rate; :class:`cnidose.pk.structure.GammaInput`) brings in over its times
        ``u0``..``u1`` since the dose (arrays (B,)), with the parameters now in force."""
        raise NotImplementedError

    def propagate_gamma(self, y: FloatArray, ry: FloatArray | None, dt: DT, t_from: DT,
                        inputs: Sequence[GammaDose]) -> FloatArray:
        """:meth:`propagate` with gamma-density inputs running: linear systems superpose their closed forms."""
        out = self.propagate(y, ry, dt)
        dts = np.broadcast_to(np.asarray(dt, dtype=np.float64), (self.batch,))
        for g in inputs:
            u0 = np.asarray(t_from, dtype=np.float64) - g.start
            live = (g.amount != 0) & (u0 < g.end) & (dts > 0)
            if not live.any():
                continue
            u0 = np.where(live, u0, 0.0)
            inc = self.gamma_input(u0, u0 + np.where(live, dts, 0.0), g)
            out = out + np.where(live, g.amount, 0.0)[:, None] * inc
        return out


@dataclass(slots=True)
class GammaDose:
    """A dose entering compartment ``cmt`` (0-based) at a gamma-density rate: from ``start`` (absolute time, (B,)),
    ``amount`` (B,; 0 where the dose is not given), shape ``a`` and rate ``b`` (B,), its input over (to 1e-16 of
    the amount) ``end`` hours after its start."""

    start: FloatArray
    amount: FloatArray
    a: FloatArray
    b: FloatArray
    end: FloatArray
    cmt: int
    #: the input so far at the end of the last step (:meth:`EigenSolver.gamma_input`): the rate constants' modes
    #: it was made with, the times since the dose, and the values per mode -- the next step starts there
    last: tuple[FloatArray, FloatArray, FloatArray] | None = None


#: the input of a gamma dose is taken as over when less than this fraction of the dose is still to come
GAMMA_TAIL = 1e-16


def gamma_support(a: FloatArray, b: FloatArray) -> FloatArray:
    """Hours after which less than :data:`GAMMA_TAIL` of a gamma-density input (shape a, rate b) remains."""
    from scipy.special import gammainccinv

    a = np.asarray(a, dtype=np.float64)
    shapes, inverse = np.unique(a, return_inverse=True)  # the shape is mostly one value (n without a random effect)
    return np.asarray(gammainccinv(shapes, GAMMA_TAIL)[inverse].reshape(a.shape) / b, dtype=np.float64)


def gamma_density(u: FloatArray, a: FloatArray, b: FloatArray) -> FloatArray:
    """The gamma density b^a u^(a-1) e^(-b u) / Gamma(a) (0 for u <= 0)."""
    from scipy.special import gammaln

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = np.exp(np.log(b) + (a - 1) * np.log(b * u) - b * u - gammaln(a))
    return np.where(u > 0, v, np.where((u == 0) & (a == 1), b, 0.0))


def gamma_response(lam: FloatArray, x: FloatArray, a: FloatArray, b: FloatArray) -> FloatArray:
    """int_0^x e^(lam (x - u)) g(u) du for the gamma density g (shape a, rate b), per mode: (..., n) for ``x``,
    ``a`` and ``b`` of shape (...) and ``lam`` (..., n).

    = (b x)^a e^(-b x) / Gamma(a + 1) * M(1, a + 1, (b + lam) x), M Kummer's function: substitute u = x s and
    use Kummer's transformation M(a, a + 1, -z) e^z = M(1, a + 1, z). For lam = 0 this is the regularised
    incomplete gamma function P(a, b x). SciPy's hyp1f1 (Boost) is accurate to 1e-15 on the arguments met here
    (checked against adaptive quadrature in the tests); x never exceeds the input's support, so (b + lam) x
    stays below about 50 and nothing overflows.
    """
    from scipy.special import gammaln, hyp1f1

    xc, ac, bc = x[..., None], a[..., None], b[..., None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lead = np.where(xc > 0, np.exp(ac * np.log(bc * xc) - bc * xc - gammaln(ac + 1)), 0.0)
        m = hyp1f1(1.0, ac + 1, (bc + lam) * xc)
    return np.asarray(lead * m, dtype=np.float64)


def gamma_so_far(lam: FloatArray, x: FloatArray, a: FloatArray, b: FloatArray, end: FloatArray,
                 at_end: FloatArray | None = None) -> FloatArray:
    """int_0^x e^(lam (x - u)) g(u) du per mode (..., n) for ``x``, ``a``, ``b``, ``end`` of shape (...): nothing
    for x <= 0; the input so far while it runs; after ``end`` (:func:`gamma_support`) all of it decayed since then
    (the input taken as over). Kummer's function only for the inputs still running, and at ``end`` for the others
    unless ``at_end`` (:func:`gamma_response` at ``end``, (..., n)) is given."""
    out = np.zeros(lam.shape)
    running = (x > 0) & (x < end)
    if running.any():
        idx = np.nonzero(running)
        out[idx] = gamma_response(lam[idx], x[idx], a[idx], b[idx])
    over = (x > 0) & ~running
    if over.any():
        idx = np.nonzero(over)
        full = gamma_response(lam[idx], end[idx], a[idx], b[idx]) if at_end is None else at_end[idx]
        out[idx] = np.exp(lam[idx] * (x[idx] - end[idx])[..., None]) * full
    return out


def gamma_so_far_slopes(lam: FloatArray, x: FloatArray, a: FloatArray, b: FloatArray, end: FloatArray
                        ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """:func:`gamma_so_far` R (..., n) and its derivatives by each mode's eigenvalue and by x (the time since the
    dose entered), for exact derivatives through the closed form (the input's shape and rate held fixed).

    While the input runs, R = lead M(1, a + 1, z), z = (b + lam) x (:func:`gamma_response`), so dR/dlam =
    lead x M(2, a + 2, z) / (a + 1) (dM(1, c, z)/dz = M(2, c + 1, z) / c) and dR/dx = g(x) + lam R (the input
    arriving now, plus the mode's own change). After the input's end, R = e^(lam (x - end)) R(end): dR/dlam =
    (x - end) R + e^(lam (x - end)) dR(end)/dlam and dR/dx = lam R."""
    from scipy.special import gammaln, hyp1f1

    R, R_lam, R_x = np.zeros(lam.shape), np.zeros(lam.shape), np.zeros(lam.shape)

    def at(lam_: FloatArray, x_: FloatArray, a_: FloatArray, b_: FloatArray) -> tuple[FloatArray, FloatArray]:
        xc, ac, bc = x_[..., None], a_[..., None], b_[..., None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lead = np.where(xc > 0, np.exp(ac * np.log(bc * xc) - bc * xc - gammaln(ac + 1)), 0.0)
            z = (bc + lam_) * xc
            return lead * hyp1f1(1.0, ac + 1, z), lead * xc * hyp1f1(2.0, ac + 2, z) / (ac + 1)

    running = (x > 0) & (x < end)
    if running.any():
        idx = np.nonzero(running)
        r, r_lam = at(lam[idx], x[idx], a[idx], b[idx])
        R[idx], R_lam[idx] = r, r_lam
        R_x[idx] = gamma_density(x[idx], a[idx], b[idx])[..., None] + lam[idx] * r
    over = (x > 0) & ~running
    if over.any():
        idx = np.nonzero(over)
        r_end, r_lam_end = at(lam[idx], end[idx], a[idx], b[idx])
        since = (x[idx] - end[idx])[..., None]
        decay = np.exp(lam[idx] * since)
        R[idx] = decay * r_end
        R_lam[idx] = since * R[idx] + decay * r_lam_end
        R_x[idx] = lam[idx] * R[idx]
    return R, R_lam, R_x


def gamma_modes(lam: FloatArray, u0: FloatArray, u1: FloatArray, a: FloatArray, b: FloatArray,
                end: FloatArray) -> FloatArray:
    """int_u0^u1 e^(lam (u1 - u)) g(u) du per mode (B, n): what the input over u0..u1 leaves at u1; ``end`` is
    the input's support (:func:`gamma_support`)."""
    return gamma_so_far(lam, u1, a, b, end) - np.exp(lam * (u1 - u0)[:, None]) * gamma_so_far(lam, u0, a, b, end)


class _LinearSolver(Solver, ABC):
    """Common part of the closed-form solvers: a rate matrix and a per-dt cache."""

    def __init__(self, structure: LinearStructure, batch: int):
        super().__init__(structure.n, batch)
        self.structure = structure
        self._cache: dict[float, tuple[FloatArray, FloatArray]] = {}

    def set_params(self, params: Params) -> None:
        self._cache = {}
        self._setup(np.broadcast_to(self.structure.rate_matrix(params), (self.batch, self.n, self.n)))

    @abstractmethod
    def _setup(self, K: FloatArray) -> None:
        """Prepare for the rate matrices K of shape (B, n, n)."""


def _inv_or_nan(a: FloatArray) -> FloatArray:
    try:
        return np.asarray(np.linalg.inv(a), dtype=np.float64)
    except np.linalg.LinAlgError:
        return np.full_like(a, np.nan)


class EigenSolver(_LinearSolver):
    """Closed form by eigen-decomposition (diagonalisable rate matrix)."""

    def _setup(self, K: FloatArray) -> None:
        blocks = flow_blocks(self.structure)
        small = all(len(b) <= 2 for b in blocks)  # closed form (every library model): ~10x LAPACK's batched eig
        if small and self._setup_compiled(K, blocks):
            return
        if small:
            lam_r, V_r, imag = eigen_blocks(K, blocks)
            self.lam, self.V = np.ascontiguousarray(lam_r), np.ascontiguousarray(V_r)
        else:
            lam, V = np.linalg.eig(K)
            imag = np.any(lam.imag != 0, axis=-1) if np.iscomplexobj(lam) else np.zeros(lam.shape[0], bool)
            self.lam = np.ascontiguousarray(lam.real)
            self.V = np.ascontiguousarray(V.real)
        with np.errstate(all="ignore"):
            finite: NDArray[np.bool_] = np.all(np.isfinite(self.V), axis=(1, 2))
            V_safe = np.where(finite[:, None, None], self.V, self._eye)
            try:
                self.W = np.linalg.inv(V_safe)
            except np.linalg.LinAlgError:  # some member's V is exactly singular: invert one by one
                self.W = np.stack([_inv_or_nan(v) for v in V_safe])
            # Infinity-norm condition number of V: large when eigenvalues (nearly) repeat,
            # where the decomposition loses digits and the matrix exponential must be used.
            cond = np.abs(self.V).sum(axis=2).max(axis=1) * np.abs(self.W).sum(axis=2).max(axis=1)
        #: members whose decomposition can be used (real, finite, well conditioned)
        self.good = ~np.asarray(imag, bool) & np.all(np.isfinite(self.lam), axis=1) & np.isfinite(cond) & (cond < 1e6)
        self.usable = bool(np.all(self.good))

    def _setup_compiled(self, K: FloatArray, blocks: Sequence[Sequence[int]]) -> bool:
        """The same decomposition, inverse and test compiled (:mod:`cnidose.pk.kernels`); False where compiled
        code is off."""
        module = linear_kernels()
        if module is None:
            return False
        B, n = K.shape[0], self.n
        blk = np.array([[b[0], b[1] if len(b) == 2 else -1] for b in blocks], dtype=np.int64)
        self.lam, self.V, self.W = np.empty((B, n)), np.empty((B, n, n)), np.empty((B, n, n))
        self.good = np.empty(B, dtype=np.bool_)
        module.decompose(np.ascontiguousarray(K, dtype=np.float64), blk, self.lam, self.V, self.W, self.good, 1e6)
        self.usable = bool(np.all(self.good))
        return True

    def to_internal(self, x: FloatArray) -> FloatArray:
        return np.einsum("bij,bj->bi", self.W, x)

    def to_natural(self, y: FloatArray) -> FloatArray:
        return np.einsum("bij,bj->bi", self.V, y)

    def unit(self, cmt: int | IntArray) -> FloatArray:
        if isinstance(cmt, (int, np.integer)):
            return self.W[:, :, int(cmt)]
        return self.W[np.arange(self.batch), :, cmt]

    def observe(self, y: FloatArray, cmt: int) -> FloatArray:
        return np.einsum("bj,bj->b", self.V[:, cmt, :], y)

    def _factors(self, dt: DT) -> tuple[FloatArray, FloatArray]:
        if np.ndim(dt) == 0:
            key = float(dt)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            x = self.lam * key
        else:
            x = self.lam * np.asarray(dt)[:, None]
        e = np.exp(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(self.lam == 0.0, np.asarray(dt)[..., None] if np.ndim(dt) else dt,
                         np.expm1(x) / self.lam)
        if np.ndim(dt) == 0:
            self._cache[float(dt)] = (e, g)
        return e, g

    def propagate(self, y: FloatArray, ry: FloatArray | None, dt: DT) -> FloatArray:
        e, g = self._factors(dt)
        out = y * e
        if ry is not None:
            out += ry * g
        return out

    def geometric(self, v: FloatArray, period: float) -> FloatArray:
        e, _ = self._factors(period)
        if np.any(e >= 1.0):
            raise NumericalError("no steady state: the model has a compartment without elimination")
        return v / (1.0 - e)

    def constant_infusion(self, ry: FloatArray) -> FloatArray:
        if np.any(self.lam >= 0.0):
            raise NumericalError("no steady state: the model has a compartment without elimination")
        return -ry / self.lam

    def gamma_input(self, u0: FloatArray, u1: FloatArray, g: GammaDose) -> FloatArray:
        """:func:`gamma_modes`, taking the input so far at ``u0`` from the dose's last step where it ended there
        (to rounding: the clock sums the steps' lengths) with the same rate constants: half the evaluations of
        Kummer's function, the engine's cost with a transit input. Each member's value depends on its own times
        only."""
        lam = self.lam
        so_far = None
        if g.last is not None and g.last[0] is lam:
            _, u_prev, v_prev = g.last
            same = np.abs(u0 - u_prev) <= 1e-12 * np.maximum(1.0, np.abs(u0))
            if same.all():
                so_far = v_prev
            elif same.any():
                so_far = v_prev.copy()
                miss = ~same
                so_far[miss] = gamma_so_far(lam[miss], u0[miss], g.a[miss], g.b[miss], g.end[miss])
        if so_far is None:
            so_far = gamma_so_far(lam, u0, g.a, g.b, g.end)
        at_u1 = gamma_so_far(lam, u1, g.a, g.b, g.end)
        g.last = (lam, u1, at_u1)
        return (at_u1 - np.exp(lam * (u1 - u0)[:, None]) * so_far) * self.unit(g.cmt)


class ExpmSolver(_LinearSolver):
    """Closed form by matrix exponential (any linear system)."""

    _eig: EigenSolver | None = None

    def use_decomposition(self, eig: EigenSolver) -> None:
        """Take the exponentials of the members that ``eig`` decomposes well from it (call after
        :meth:`set_params` with the same parameters); only the others need the matrix exponential."""
        self._eig = eig

    def _setup(self, K: FloatArray) -> None:
        self.K = np.ascontiguousarray(K)
        self._eig = None

    def _phi_gamma(self, dt: DT) -> tuple[FloatArray, FloatArray]:
        scalar = np.ndim(dt) == 0
        if scalar and float(dt) in self._cache:
            return self._cache[float(dt)]
        n = self.n
        eig = self._eig
        bad = np.ones(self.batch, bool) if eig is None else ~eig.good
        if eig is not None and not bad.all():
            # V diag(e) W for every member (batched; a three-operand einsum is ~30x slower), the others' replaced
            e, g = eig._factors(dt)  # (B, n) each
            with np.errstate(all="ignore"):
                phi = (eig.V * e[:, None, :]) @ eig.W
                gam = (eig.V * g[:, None, :]) @ eig.W
        else:
            phi = np.empty((self.batch, n, n))
            gam = np.empty((self.batch, n, n))
        if bad.any():
            M = np.zeros((int(bad.sum()), 2 * n, 2 * n))
            M[:, :n, :n] = self.K[bad]
            M[:, :n, n:] = self._eye
            M *= (float(dt) if scalar else np.asarray(dt)[bad][:, None, None])
            import scipy.linalg  # imported where used: keeps the command line quick to start

            E = scipy.linalg.expm(M)
            phi[bad], gam[bad] = E[:, :n, :n], E[:, :n, n:]
        out = (phi, gam)
        if scalar:
            self._cache[float(dt)] = out
        return out

    def propagate(self, y: FloatArray, ry: FloatArray | None, dt: DT) -> FloatArray:
        phi, gam = self._phi_gamma(dt)
        out = np.einsum("bij,bj->bi", phi, y)
        if ry is not None:
            out += np.einsum("bij,bj->bi", gam, ry)
        return out

    def geometric(self, v: FloatArray, period: float) -> FloatArray:
        phi, _ = self._phi_gamma(period)
        try:
            return np.asarray(np.linalg.solve(self._eye - phi, v[..., None])[..., 0], dtype=np.float64)
        except np.linalg.LinAlgError:
            raise NumericalError("no steady state: the model has a compartment without elimination") from None

    def constant_infusion(self, ry: FloatArray) -> FloatArray:
        try:
            return -np.asarray(np.linalg.solve(self.K, ry[..., None])[..., 0], dtype=np.float64)
        except np.linalg.LinAlgError:
            raise NumericalError("no steady state: the model has a compartment without elimination") from None

    def gamma_input(self, u0: FloatArray, u1: FloatArray, g: GammaDose) -> FloatArray:
        """Members that decompose well: the closed form; the others: dz/du = K z + e_cmt g(u) integrated
        (DOP853, rtol 1e-11) -- a repeated eigenvalue has no simple closed form with a gamma input."""
        out = np.zeros((self.batch, self.n))
        eig = self._eig
        bad = np.ones(self.batch, bool) if eig is None else ~eig.good
        if eig is not None and not bad.all():
            ok = ~bad
            modes = gamma_modes(eig.lam[ok], u0[ok], u1[ok], g.a[ok], g.b[ok], g.end[ok]) * eig.W[ok][:, :, g.cmt]
            out[ok] = np.einsum("bij,bj->bi", eig.V[ok], modes)
        if bad.any():
            out[bad] = _integrate_gamma(self.K[bad], u0[bad], u1[bad], g.a[bad], g.b[bad], g.cmt)
        return out


class OdeSolver(Solver):
    """Numerical integration of any structure (reference and nonlinear path).

    Parameters
    ----------
    rtol, atol : float
        Tolerances of SciPy's DOP853 (an explicit Runge-Kutta method of order 8).
    """

    linear = False

    def __init__(self, structure: LinearStructure | OdeStructure, batch: int, *,
                 rtol: float = 1e-10, atol: float = 1e-12):
        super().__init__(structure.n, batch)
        self.structure = structure
        self.rtol = rtol
        self.atol = atol
        self._rhs: Callable[[FloatArray], FloatArray] | None = None
        self._kernel: Kernel | None = None
        self._P: FloatArray | None = None
        if isinstance(structure, OdeStructure) and structure.equations:
            from cnidose.pk.compiled import kernel

            self._kernel = kernel(structure.equations)

    def set_params(self, params: Params) -> None:
        s = self.structure
        p = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (self.batch,)) for k, v in params.items()}
        if isinstance(s, LinearStructure):
            K = np.broadcast_to(s.rate_matrix(p), (self.batch, self.n, self.n))
            self._rhs = lambda x: np.einsum("bij,bj->bi", K, x)
        else:
            assert s.rhs is not None
            f = s.rhs
            self._rhs = lambda x: f(x, p)
            if self._kernel is not None:
                self._P = np.ascontiguousarray(np.stack([p[k] for k in s.parameters], axis=1)
                                               if s.parameters else np.zeros((self.batch, 0)))

    def propagate(self, y: FloatArray, ry: FloatArray | None, dt: DT) -> FloatArray:
        return self.propagate_gamma(y, ry, dt, 0.0, ())

    def propagate_gamma(self, y: FloatArray, ry: FloatArray | None, dt: DT, t_from: DT,
                        inputs: Sequence[GammaDose]) -> FloatArray:
        """Integrate with the gamma-density inputs in the right-hand side (the system may be nonlinear)."""
        dts = np.broadcast_to(np.asarray(dt, dtype=np.float64), (self.batch,))
        if not np.any(dts > 0):
            return y.copy()
        rhs = self._rhs
        assert rhs is not None
        B, n = y.shape
        r = np.zeros((B, n)) if ry is None else ry
        scale = dts[:, None]
        t0 = np.broadcast_to(np.asarray(t_from, dtype=np.float64), (B,))
        live = [g for g in inputs if np.any((g.amount != 0) & (t0 - g.start < g.end))]
        if self._kernel is not None and not live:
            assert self._P is not None
            out, status = self._kernel(np.ascontiguousarray(y, dtype=np.float64), self._P,
                                       np.ascontiguousarray(r, dtype=np.float64), np.ascontiguousarray(dts),
                                       self.rtol, self.atol)
            if np.any(status):
                why = {1: "the step size underflowed", 2: "too many steps", 3: "a derivative is not finite"}
                k = int(np.flatnonzero(status)[0])
                raise NumericalError(f"ODE solver failed for batch member {k} ({why.get(int(status[k]), '?')}); "
                                     "check the parameters, or loosen rtol/atol")
            return np.asarray(out)

        def fun(_s: float, z: FloatArray) -> FloatArray:
            x = z.reshape(B, n)
            d = rhs(x) + r
            for g in live:
                u = t0 + _s * dts - g.start
                d[:, g.cmt] += g.amount * gamma_density(u, g.a, g.b)
            return (d * scale).ravel()

        from scipy.integrate import solve_ivp

        sol = solve_ivp(fun, (0.0, 1.0), y.ravel(), method="DOP853", rtol=self.rtol, atol=self.atol)
        if not sol.success:
            raise NumericalError(f"ODE solver failed ({sol.message}); check the parameters, "
                                 "or loosen rtol/atol")
        return np.asarray(sol.y[:, -1].reshape(B, n))

    def constant_infusion(self, ry: FloatArray) -> FloatArray:
        """Integrate under the constant input until the state stops changing (nonlinear systems have no
        formula). Successive spans approach the steady state geometrically (ratio r), so the distance left
        after a change d is about d r / (1 - r): integration stops when that is below 1e-9 of the member's
        largest amount, or the change is at the integrator's own noise."""
        x = np.zeros_like(ry)
        span = 24.0
        prev_d: FloatArray | None = None
        for _ in range(400):
            nxt = self.propagate(x, ry, span)
            d = np.max(np.abs(nxt - x), axis=-1)
            scale = np.max(np.abs(nxt), axis=-1)
            if prev_d is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    r = np.where(prev_d > 0, d / prev_d, 0.0)
                left = np.where(r < 1, d * r / np.where(r < 1, 1 - r, 1.0), np.inf)
                if np.all((left <= 1e-9 * scale + self.atol) | (d <= 1e-10 * scale + self.atol)):
                    return nxt
            x, prev_d = nxt, d
            span = min(span * 1.5, 2000.0)  # long spans cost an explicit method many steps: grow, with a cap
        raise NumericalError("constant-infusion steady state not reached; check that the model eliminates the drug")


def _integrate_gamma(K: FloatArray, u0: FloatArray, u1: FloatArray, a: FloatArray, b: FloatArray,
                     cmt: int) -> FloatArray:
    """dz/du = K z + e_cmt g(u), z(u0) = 0, integrated to u1 for each member (B, n) (natural coordinates)."""
    from scipy.integrate import solve_ivp

    B, n = K.shape[0], K.shape[1]
    span = u1 - u0
    if not np.any(span > 0):
        return np.zeros((B, n))

    def fun(s: float, z: FloatArray) -> FloatArray:
        x = z.reshape(B, n)
        d = np.einsum("bij,bj->bi", K, x)
        d[:, cmt] += gamma_density(u0 + s * span, a, b)
        return (d * span[:, None]).ravel()

    sol = solve_ivp(fun, (0.0, 1.0), np.zeros(B * n), method="DOP853", rtol=1e-11, atol=1e-14)
    if not sol.success:
        raise NumericalError(f"gamma-input integration failed ({sol.message})")
    return np.asarray(sol.y[:, -1].reshape(B, n))
