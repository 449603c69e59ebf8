"""Epsilon of a history of phases: Opacus' RDP, PRV and GDP accountants, and a PLD accountant.

The math is Opacus' own (``opacus.accountants``) and, for ``pld``, Google's ``dp_accounting``;
this module only feeds them a history, turns their failures into
:class:`~dpfl.errors.AccountantError`, and handles the edge cases they do not:

* an empty history (or only empty phases) has spent nothing: epsilon 0;
* a phase with noise multiplier 0 releases unprotected sums: epsilon is ``inf``;
* RDP's conversion can return a negative epsilon for large delta (opacus#585); epsilon >= 0
  always holds, so the result is clamped at 0.

Accountants (Opacus' defaults are kept, except RDP's orders):

* ``rdp`` (default): Renyi DP of the subsampled Gaussian (Mironov et al. 2019) with the
  conversion of Balle et al. 2020, minimized over a wider range of orders than Opacus'
  (:mod:`dpfl.accountants.rdp`). An upper bound; the usual choice for training loops (fast).
* ``prv``: numerical composition of privacy loss random variables (Gopi et al. 2021); returns the
  upper end of its error interval (``eps_error = 0.01``), so it is an upper bound too, and
  tighter than RDP. About 10x slower than RDP; measured up to 5 % above ``pld``. Its grid is
  sized first and refused above 2e7 points, and widened to a fast FFT length when large
  (:mod:`dpfl.accountants.prv`).
* ``pld``: numerical composition of privacy loss distributions with Google's ``dp_accounting``,
  pessimistic discretization (:mod:`dpfl.accountants.pld`). An upper bound, within ~0.25 % of a
  fine-discretization reference; under a second at 1e5 steps.
* ``gdp``: the Gaussian-DP central limit approximation (Dong et al. 2019). It can *under*
  estimate epsilon (Opacus warns so); report it, never enforce a budget with it. It supports a
  single (noise multiplier, sample rate) phase only.

Library warnings (Opacus' "Optimal order is the largest alpha", numerical RuntimeWarnings) are
never shown: their content is handled here (orders wide enough, NaN turned into an error).

Importing this package does not import Opacus (nor torch): rdp loads Opacus' RDP analysis file on
its own (:mod:`dpfl.accountants.rdp`), pld imports ``dp_accounting`` and prv / gdp import Opacus
when first used, and :data:`ACCOUNTANTS` builds Opacus accountants only when asked for one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dpfl.accountants.phases import Phase, merge_phases
from dpfl.accountants.pld import pld_accountant, pld_epsilon
from dpfl.accountants.prv import PRVGridTooLarge, prv_accountant, prv_epsilon
from dpfl.accountants.rdp import rdp_epsilon
from dpfl.accountants.rdp import rdp_per_step as _rdp_per_step  # noqa: F401 (benchmarks clear it)
from dpfl.errors import AccountantError
from dpfl.registry import Registry
from dpfl.validation import check_delta

if TYPE_CHECKING:  # opacus imports torch: only where an Opacus accountant is really built
    from opacus.accountants.accountant import IAccountant

__all__ = [
    "ACCOUNTANTS",
    "BOUNDING_ACCOUNTANTS",
    "GDP_MAX_EPSILON",
    "EpsilonAboveRange",
    "compute_epsilon",
    "create_opacus_accountant",
]


def _rdp_accountant() -> IAccountant:
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def _gaussian_accountant() -> IAccountant:
    from opacus.accountants import GaussianAccountant

    # Opacus warns on every construction; the caveat is in this module's docs and the CLI output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        return GaussianAccountant()


#: Factories of fresh Opacus-style accountants (``step`` / ``get_epsilon``); each imports Opacus
#: (and torch) only when called.
ACCOUNTANTS: Registry[IAccountant] = Registry("accountant")
ACCOUNTANTS.register("rdp", _rdp_accountant)
ACCOUNTANTS.register("prv", prv_accountant)
ACCOUNTANTS.register("gdp", _gaussian_accountant)
ACCOUNTANTS.register("pld", pld_accountant)

#: Accountants whose epsilon is an upper bound, so a budget may be enforced with them.
BOUNDING_ACCOUNTANTS = ("rdp", "prv", "pld")


def create_opacus_accountant(name: str, phases: Sequence[Phase] = ()) -> IAccountant:
    """A fresh Opacus accountant of kind ``name`` whose history is ``phases``."""
    accountant = ACCOUNTANTS.create(name)
    accountant.history = [p.as_tuple() for p in merge_phases(phases)]
    return accountant


def compute_epsilon(phases: Sequence[Phase], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after all ``phases``, composed in order.

    Args:
        phases: the privacy history.
        delta: target delta, in (0, 1).
        accountant: ``rdp``, ``prv``, ``pld`` or ``gdp``.

    Returns:
        epsilon >= 0; ``inf`` if any non-empty phase has noise multiplier 0.

    Raises:
        AccountantError: the accountant cannot handle this history (e.g. ``gdp`` with several
            phases) or returned a non-number.
        ConfigError: ``delta`` or ``accountant`` is invalid.
    """
    check_delta("delta", delta)
    ACCOUNTANTS.get(accountant)  # validates the name before any early return
    history = merge_phases(phases)
    if not history:
        return 0.0
    if any(p.noise_multiplier == 0 for p in history):
        return math.inf
    if accountant == "gdp" and len(history) > 1:
        raise AccountantError(
            "the gdp accountant supports a single (noise multiplier, sample rate) phase; "
            "use rdp, prv or pld for heterogeneous histories"
        )
    try:
        with warnings.catch_warnings():
            # library warnings are handled here (module docstring), never shown to the user
            warnings.simplefilter("ignore")
            if accountant == "rdp":
                eps = rdp_epsilon(history, delta)
            elif accountant == "pld":
                eps = pld_epsilon(history, delta)
            elif accountant == "prv":
                eps = prv_epsilon(history, delta)
            else:
                eps = _gdp_epsilon(history[0], delta)
    except PRVGridTooLarge as e:
        context = f"{_describe(history)} at delta={delta:g}"
        raise PRVGridTooLarge(e.points, e.per_phase, e.phases, context) from None
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as e:
        raise AccountantError(
            f"{accountant} accountant failed for {_describe(history)} at delta={delta:g}: {e}"
        ) from None
    if math.isnan(eps):
        raise AccountantError(
            f"{accountant} accountant returned NaN for {_describe(history)} at delta={delta:g}"
        )
    return max(eps, 0.0)


class EpsilonAboveRange(AccountantError):
    """The accountant can only say that epsilon exceeds ``bound`` (its conversion's range)."""

    def __init__(self, message: str, bound: float) -> None:
        super().__init__(message)
        self.bound = bound


#: Opacus' GDP conversion finds epsilon by root finding in [0, GDP_MAX_EPSILON] (``eps_from_mu``).
GDP_MAX_EPSILON = 500.0


def _gdp_epsilon(phase: Phase, delta: float) -> float:
    """Opacus' GDP epsilon (Poisson sampling), with the two ends of its root bracket handled:
    epsilon 0 where mu-GDP already gives (0, delta)-DP (Opacus' bracket has no sign change), and
    :class:`EpsilonAboveRange` where epsilon exceeds GDP_MAX_EPSILON (likewise)."""
    from opacus.accountants.analysis import gdp as analysis

    mu = float(
        analysis.compute_mu_poisson(
            steps=phase.steps,
            noise_multiplier=phase.noise_multiplier,
            sample_rate=phase.sample_rate,
        )
    )
    if mu == 0.0:  # noise so large that exp(sigma**-2) - 1 rounds to 0: nothing is revealed
        return 0.0
    if not math.isfinite(mu) or not analysis.delta_eps_mu(eps=GDP_MAX_EPSILON, mu=mu) <= delta:
        raise EpsilonAboveRange(
            f"gdp accountant: epsilon is above {GDP_MAX_EPSILON:g} for {_describe([phase])} at "
            f"delta={delta:g}, beyond the range of Opacus' GDP conversion; use rdp, prv or pld",
            GDP_MAX_EPSILON,
        )
    if analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:  # delta(eps) falls with eps
        return 0.0
    return float(create_opacus_accountant("gdp", [phase]).get_epsilon(delta=delta))


def _describe(history: Sequence[Phase]) -> str:
    parts = [
        f"(sigma={p.noise_multiplier:g}, q={p.sample_rate:g}, steps={p.steps})" for p in history
    ]
    if len(parts) > 3:
        parts = parts[:2] + [f"... {len(parts) - 2} more"]
    return "history " + ", ".join(parts)
