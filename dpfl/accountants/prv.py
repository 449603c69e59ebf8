"""The ``prv`` accountant: Opacus' ``PRVAccountant``, with its grid sized before any work and, when
large, widened to a length the FFT handles fast.

Opacus (Gopi et al. 2021) discretizes each phase's privacy loss random variable on one grid
``[-L, L]`` of mesh ``eps_error / sqrt(T log(12 / delta_error) / 2)`` (T releases in all,
``delta_error = delta / 1000``, L from an RDP bound: ``compute_safe_domain_size``) and composes
the phases by FFT. The number of points grows roughly like ``T * epsilon``: 7.5e6 at 1e5 steps
(sigma 1, q 0.01), 1e8 at 1e6 steps. What is ours:

* **Sizing first.** :func:`prv_grid_points` computes the grid with Opacus' own ``_get_domain``
  (milliseconds). A history whose grids hold more than :data:`MAX_PRV_POINTS` points in all
  (points x distinct phases: each phase keeps its own discretized copy) is refused with
  :class:`PRVGridTooLarge` before anything is allocated: Opacus would hold several float64
  arrays of that size (gigabytes) and take minutes. pld gives a tighter bound in about a second.
* **A fast FFT length.** Opacus' grid has whatever even length the mesh gives; an FFT of a length
  with a large prime factor is several times slower than of a nearby 5-smooth length (measured:
  7,528,004 points 5.4 s, 7,558,272 points 1.2 s). From :data:`FAST_FFT_FROM` points on, the grid
  is widened symmetrically, with the same mesh, to the next even 5-smooth length. A wider
  truncation domain only shrinks the truncated mass and the wrap-around of the circular
  convolution, so Opacus' error bound still holds; results differ from Opacus' by ~1e-8 relative
  (both are upper bounds, eps_error included). Below FAST_FFT_FROM the grid is Opacus' own and
  results are bit-identical to ``PRVAccountant``.

Opacus' grid always has ``t_min = -(size / 2 - 1) * dt`` and ``t_max = (size / 2) * dt``; its
FFT self-composition rolls the result by an amount that assumes exactly this layout, so the
widened grid keeps it (``size`` even, the same number of points added on each side).

Opacus is imported only when this accountant is used (it imports torch).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

from dpfl.accountants.phases import Phase
from dpfl.errors import AccountantError

__all__ = [
    "FAST_FFT_FROM",
    "MAX_PRV_POINTS",
    "PRVGridTooLarge",
    "fast_length",
    "prv_accountant",
    "prv_epsilon",
    "prv_grid_points",
]

#: Largest number of grid points (size x distinct phases) the prv accountant may allocate.
MAX_PRV_POINTS = 20_000_000
#: Grids of at least this many points are widened to a fast FFT length.
FAST_FFT_FROM = 2**20
#: Opacus' defaults in ``PRVAccountant.get_epsilon``.
EPS_ERROR = 0.01
DELTA_ERROR_FRACTION = 1e-3


class PRVGridTooLarge(AccountantError):
    """The prv accountant's grid would hold more than :data:`MAX_PRV_POINTS` points."""

    def __init__(self, points: int, per_phase: int, phases: int, context: str = "") -> None:
        self.points, self.per_phase, self.phases = points, per_phase, phases
        detail = f"{per_phase:.2g} per phase x {phases} phases, " if phases > 1 else ""
        where = f" for {context}" if context else ""
        super().__init__(
            f"prv accountant would need a grid of {points:.2g} points ({detail}at most "
            f"{MAX_PRV_POINTS:.2g}){where}; use pld (tighter) or rdp"
        )


def fast_length(n: int) -> int:
    """The smallest even integer >= n with no prime factor above 5."""
    best = None
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = 2 * p35  # even
            while m < n:
                m *= 2
            if best is None or m < best:
                best = m
            p35 *= 3
        p5 *= 5
    assert best is not None
    return best


def _widened(domain: Any) -> Any:
    """``domain`` (Opacus' layout) widened symmetrically, same mesh, to :func:`fast_length`."""
    size = fast_length(domain.size)
    if size == domain.size:
        return domain
    extra = (size - domain.size) // 2
    dt = domain.dt
    return type(domain)(
        t_min=domain.t_min - extra * dt,
        t_max=domain.t_max + extra * dt,
        size=size,
        shifts=domain.shifts,
    )


def _points(size: int, phases: int) -> int:
    return size * phases


@functools.cache
def _accountant_class() -> type:
    from opacus.accountants import PRVAccountant

    class FastPRVAccountant(PRVAccountant):
        """Opacus' PRVAccountant whose grid is refused above MAX_PRV_POINTS and widened to a
        fast FFT length from FAST_FFT_FROM points on (module docstring)."""

        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            domain = super()._get_domain(prvs, num_self_compositions, eps_error, delta_error)
            points = _points(domain.size, len(prvs))
            if points > MAX_PRV_POINTS:
                raise PRVGridTooLarge(points, domain.size, len(prvs))
            return _widened(domain) if domain.size >= FAST_FFT_FROM else domain

    FastPRVAccountant.__name__ = FastPRVAccountant.__qualname__ = "FastPRVAccountant"
    return FastPRVAccountant


def prv_accountant() -> Any:
    """A fresh accountant of this module's kind (an Opacus ``PRVAccountant``)."""
    return _accountant_class()()


def prv_grid_points(history: Sequence[Phase], delta: float) -> int:
    """Grid points (size x distinct phases) the prv accountant allocates for ``history``
    (merged, non-empty phases with noise > 0) at ``delta``; milliseconds, nothing composed."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(p.sample_rate, p.noise_multiplier) for p in history]
    with warnings.catch_warnings():  # Opacus' RDP warns about its orders: L is a bound anyway
        warnings.simplefilter("ignore")
        domain = PRVAccountant._get_domain(  # Opacus' grid, before the cap and widening
            PRVAccountant(),
            prvs=prvs,
            num_self_compositions=[p.steps for p in history],
            eps_error=EPS_ERROR,
            delta_error=delta * DELTA_ERROR_FRACTION,
        )
    size = domain.size if domain.size < FAST_FFT_FROM else fast_length(domain.size)
    return _points(size, len(history))


def prv_epsilon(history: Sequence[Phase], delta: float) -> float:
    """Epsilon (upper end of PRV's error interval) of ``history`` (merged, non-empty phases with
    noise > 0) at ``delta``. Raises :class:`PRVGridTooLarge` before allocating a grid that is."""
    acc = prv_accountant()
    acc.history = [p.as_tuple() for p in history]
    return float(acc.get_epsilon(delta=delta, eps_error=EPS_ERROR))
