"""Epsilon of a history of phases, computed by Opacus' RDP, PRV and GDP accountants.

The math is Opacus' own (``opacus.accountants``); this module only feeds it a history, turns its
failures into :class:`~dpfl.errors.AccountantError`, and handles the edge cases Opacus does not:

* an empty history (or only empty phases) has spent nothing: epsilon 0;
* a phase with noise multiplier 0 releases unprotected sums: epsilon is ``inf``;
* RDP's conversion can return a negative epsilon for large delta (opacus#585); epsilon >= 0
  always holds, so the result is clamped at 0.

Accountants (Opacus' defaults are kept):

* ``rdp``: Renyi DP of the subsampled Gaussian (Mironov et al. 2019) with the conversion of
  Balle et al. 2020. An upper bound; the usual choice for training loops (fast).
* ``prv``: numerical composition of privacy loss random variables (Gopi et al. 2021); returns the
  upper end of its error interval (``eps_error = 0.01``), so it is an upper bound too, and
  tighter than RDP. About 10x slower than RDP.
* ``gdp``: the Gaussian-DP central limit approximation (Dong et al. 2019). It can *under*
  estimate epsilon (Opacus warns so); report it, never enforce a budget with it. It supports a
  single (noise multiplier, sample rate) phase only.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from dpfl.accountants.phases import Phase, merge_phases
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

#: Accountants whose epsilon is an upper bound, so a budget may be enforced with them.
BOUNDING_ACCOUNTANTS = ("rdp", "prv")


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
        accountant: ``rdp``, ``prv`` or ``gdp``.

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
            "use rdp or prv for heterogeneous histories"
        )
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    acc = create_opacus_accountant(accountant, history)
    try:
        with warnings.catch_warnings():
            # numerical warnings inside the accountants are turned into a checked result below
            warnings.simplefilter("ignore", RuntimeWarning)
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


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    vec = rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    vec = np.asarray(vec, dtype=float)
    vec.setflags(write=False)
    return vec


def _rdp_epsilon(history: Sequence[Phase], delta: float) -> float:
    """Opacus' RDPAccountant.get_epsilon, with the per-step RDP curve of each (q, sigma) cached.

    ``compute_rdp(q, sigma, steps)`` is ``steps`` times the one-step curve (that is how Opacus
    computes it), so summing ``steps * curve`` over phases gives the same numbers as the
    accountant, in about 30 us instead of 14 ms per distinct (q, sigma): cheap enough to account
    every single training step.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # at very small epsilon the best RDP order is the largest one: the bound is still an
            # upper bound (only looser); warning on every accounted step helps nobody
            warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest)")
            rdp = sum(_rdp_per_step(p.sample_rate, p.noise_multiplier) * p.steps for p in history)
            eps, _ = rdp_analysis.get_privacy_spent(
                orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
            )
    except (ValueError, ArithmeticError) as e:
        raise AccountantError(
            f"rdp accountant failed for {_describe(history)} at delta={delta:g}: {e}"
        ) from None
    eps = float(eps)
    if math.isnan(eps):
        raise AccountantError(f"rdp accountant returned NaN for {_describe(history)}")
    return max(eps, 0.0)


def _describe(history: Sequence[Phase]) -> str:
    parts = [
        f"(sigma={p.noise_multiplier:g}, q={p.sample_rate:g}, steps={p.steps})" for p in history
    ]
    if len(parts) > 3:
        parts = parts[:2] + [f"... {len(parts) - 2} more"]
    return "history " + ", ".join(parts)
