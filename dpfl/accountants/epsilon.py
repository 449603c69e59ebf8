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
  tighter than RDP. About 10x slower than RDP; measured up to 5 % above ``pld``.
* ``pld``: numerical composition of privacy loss distributions with Google's ``dp_accounting``,
  pessimistic discretization (:mod:`dpfl.accountants.pld`). An upper bound, within ~0.25 % of a
  fine-discretization reference; under a second at 1e5 steps.
* ``gdp``: the Gaussian-DP central limit approximation (Dong et al. 2019). It can *under*
  estimate epsilon (Opacus warns so); report it, never enforce a budget with it. It supports a
  single (noise multiplier, sample rate) phase only.

Library warnings (Opacus' "Optimal order is the largest alpha", numerical RuntimeWarnings) are
never shown: their content is handled here (orders wide enough, NaN turned into an error).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from dpfl.accountants.phases import Phase, merge_phases
from dpfl.accountants.pld import PLDAccountant, pld_epsilon
from dpfl.accountants.rdp import integer_rdp_epsilon, rdp_epsilon
from dpfl.accountants.rdp import rdp_per_step as _rdp_per_step  # noqa: F401 (benchmarks clear it)
from dpfl.errors import AccountantError
from dpfl.registry import Registry
from dpfl.validation import check_delta

__all__ = ["ACCOUNTANTS", "BOUNDING_ACCOUNTANTS", "compute_epsilon", "create_opacus_accountant"]


def _gaussian_accountant() -> IAccountant:
    # Opacus warns on every construction; the caveat is in this module's docs and the CLI output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        return GaussianAccountant()


ACCOUNTANTS: Registry[IAccountant] = Registry("accountant")
ACCOUNTANTS.register("rdp", RDPAccountant)
ACCOUNTANTS.register("prv", PRVAccountant)
ACCOUNTANTS.register("gdp", _gaussian_accountant)
ACCOUNTANTS.register("pld", PLDAccountant)

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
    if accountant == "prv":
        _check_prv_grid(history, delta)
    try:
        with warnings.catch_warnings():
            # library warnings are handled here (module docstring), never shown to the user
            warnings.simplefilter("ignore")
            if accountant == "rdp":
                eps = rdp_epsilon(history, delta)
            elif accountant == "pld":
                eps = pld_epsilon(history, delta)
            else:
                acc = create_opacus_accountant(accountant, history)
                eps = float(acc.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as e:
        raise AccountantError(
            f"{accountant} accountant failed for {_describe(history)} at delta={delta:g}: {e}"
        ) from None
    if math.isnan(eps):
        raise AccountantError(
            f"{accountant} accountant returned NaN for {_describe(history)} at delta={delta:g}"
        )
    return max(eps, 0.0)


#: Largest PRV grid we let Opacus allocate (it holds several float64 arrays of this size).
MAX_PRV_GRID = 20_000_000


def _check_prv_grid(history: Sequence[Phase], delta: float) -> None:
    """Refuses histories whose PRV grid would not fit in memory (Opacus would try, and be killed).

    Opacus' grid spans at least [-eps, eps] with mesh ``0.01 / sqrt(T log(12 / delta_err) / 2)``,
    delta_err = delta / 1000; eps is estimated by integer-order RDP (an upper bound, milliseconds).
    """
    steps = sum(p.steps for p in history)
    mesh = 0.01 / math.sqrt(steps * math.log(12 / (delta / 1000)) / 2)
    points = 2 * integer_rdp_epsilon(history, delta) / mesh
    if not points <= MAX_PRV_GRID:
        raise AccountantError(
            f"prv accountant would need a grid of {points:.2g} points (too large) for "
            f"{_describe(history)} at delta={delta:g}; use pld or rdp"
        )


def _describe(history: Sequence[Phase]) -> str:
    parts = [
        f"(sigma={p.noise_multiplier:g}, q={p.sample_rate:g}, steps={p.steps})" for p in history
    ]
    if len(parts) > 3:
        parts = parts[:2] + [f"... {len(parts) - 2} more"]
    return "history " + ", ".join(parts)
