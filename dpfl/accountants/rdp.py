"""Renyi DP of the Poisson-subsampled Gaussian over a wider range of orders than Opacus' default.

Epsilon from RDP is ``min over orders alpha`` of the converted bound (Balle et al. 2020,
Theorem 21, Opacus' ``get_privacy_spent``). Every order gives a valid upper bound, so more orders
can only tighten the result. Opacus' default orders stop at 63, which is too small for small
epsilon (the best order is about ``2 log(1/delta) / epsilon``: ~460 at epsilon 0.05, delta 1e-5)
and start at 1.1, too large for epsilon in the hundreds. There Opacus returns a looser bound and
warns ("Optimal order is the largest alpha") with a path into site-packages.

Our choice of orders: :data:`ORDERS` is Opacus' defaults plus 40 integer orders spaced
geometrically from 64 to 10,000, so the optimum is interior for epsilon from about 0.003 up at
delta 1e-5. When the optimum is Opacus' smallest order (1.1, epsilon in the hundreds), the fine low
orders 1.01 .. 1.09 (:data:`LOW_ORDERS`) are added. They are computed only then because Opacus'
fractional-order series costs up to a second per (q, sigma) at large q. Where the optimum lies
among Opacus' defaults the result is bit-identical to Opacus' ``RDPAccountant``.

The one-step curve of each (q, sigma) is cached: ``compute_rdp(q, sigma, steps)`` is ``steps``
times it (that is how Opacus computes it), so a history's RDP is a sum of cached curves.
Opacus computes its default and the low orders; the large integer orders are ours: the same exact
binomial expansion as Opacus' ``_compute_log_a_int`` (Mironov, Talwar, Zhang 2019, Section 3.3),

    A_alpha = sum_k C(alpha, k) q^k (1 - q)^(alpha - k) exp((k^2 - k) / (2 sigma^2)),
    RDP(alpha) = log(A_alpha) / (alpha - 1),

vectorized with numpy (Opacus sums it in a Python loop: 0.3 s per (q, sigma) for these orders).
:func:`integer_rdp_epsilon` uses integer orders only, all computed this way (milliseconds): the
PLD accountant's cheap first estimate of epsilon.

Start-up: importing ``opacus`` imports torch (seconds). Opacus' RDP analysis
(``opacus/accountants/analysis/rdp.py``) needs only numpy and scipy, so unless ``opacus`` is
already imported, that one file is loaded on its own from the installed package
(:func:`_opacus_rdp_analysis`): the same code, without torch. Opacus' default orders are
``RDPAccountant.DEFAULT_ALPHAS`` (a test checks the copy below against it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from scipy.special import gammaln

from dpfl.accountants.phases import Phase

__all__ = [
    "LARGE_ORDERS",
    "LOW_ORDERS",
    "ORDERS",
    "integer_rdp_epsilon",
    "rdp_epsilon",
    "rdp_per_step",
]

_ANALYSIS = "opacus.accountants.analysis.rdp"


def _opacus_rdp_analysis() -> ModuleType:
    """Opacus' RDP analysis module, without importing torch when opacus is not loaded yet."""
    if "opacus" in sys.modules:  # torch is paid for already: the package's own module
        return importlib.import_module(_ANALYSIS)
    module = _load_analysis_file()
    # another layout of the package: the ordinary (slow) import
    return module if module is not None else importlib.import_module(_ANALYSIS)


def _load_analysis_file() -> ModuleType | None:
    """``opacus/accountants/analysis/rdp.py`` loaded on its own (it imports numpy and scipy
    only), or None if the installed package has no such file."""
    spec = importlib.util.find_spec("opacus")  # locates the package, does not import it
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "accountants" / "analysis" / "rdp.py"
        file_spec = importlib.util.spec_from_file_location(
            "dpfl.accountants._opacus_rdp_analysis", path
        )
        if path.is_file() and file_spec is not None and file_spec.loader is not None:
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            return module
    return None


rdp_analysis = _opacus_rdp_analysis()

#: Orders below Opacus' smallest (1.1), used when the optimum is at 1.1.
LOW_ORDERS = tuple(1 + x / 100 for x in range(1, 10))
#: Integer orders above Opacus' largest (63), geometric up to 1e4.
LARGE_ORDERS = tuple(sorted({round(64 * (10_000 / 64) ** (i / 39)) for i in range(40)}))
#: Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (copied: that class's module imports torch).
_DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
#: The orders dpfl's RDP epsilon minimizes over (ascending; plus LOW_ORDERS when needed).
ORDERS = _DEFAULT_ORDERS + LARGE_ORDERS
_INTEGER_ORDERS = tuple(range(2, 64)) + LARGE_ORDERS


def _log_a_integer_orders(q: float, sigma: float, orders: Sequence[int]) -> np.ndarray:
    """log A_alpha for integer orders, all orders in one vectorized log-sum-exp."""
    alphas = np.asarray(orders, dtype=np.int64)
    if q == 1.0:  # plain Gaussian: (alpha - 1) * alpha / (2 sigma^2)
        return (alphas - 1) * alphas / (2 * sigma**2)
    sizes = alphas + 1
    alpha = np.repeat(alphas, sizes).astype(float)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    k = np.arange(sizes.sum()) - np.repeat(starts, sizes)
    terms = (
        gammaln(alpha + 1)
        - gammaln(k + 1)
        - gammaln(alpha - k + 1)
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2 * sigma**2)
    )
    peak = np.maximum.reduceat(terms, starts)
    return peak + np.log(np.add.reduceat(np.exp(terms - np.repeat(peak, sizes)), starts))


def _silently(fn, *args, **kwargs):
    with warnings.catch_warnings():
        # overflow inside a series shows up as NaN/inf, checked by the caller; an optimum at the
        # edge of the orders only means a looser (still valid) bound
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)


def _read_only(vec) -> np.ndarray:
    vec = np.asarray(vec, dtype=float)
    vec.setflags(write=False)
    return vec


@functools.lru_cache(maxsize=4096)
def rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one release at every order of :data:`ORDERS` (read-only, cached)."""
    head = _silently(
        rdp_analysis.compute_rdp,
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=_DEFAULT_ORDERS,
    )
    log_a = _silently(_log_a_integer_orders, sample_rate, noise_multiplier, LARGE_ORDERS)
    return _read_only(np.concatenate((head, log_a / (np.asarray(LARGE_ORDERS) - 1.0))))


@functools.lru_cache(maxsize=1024)
def _low_orders_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return _read_only(
        _silently(
            rdp_analysis.compute_rdp,
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=LOW_ORDERS,
        )
    )


@functools.lru_cache(maxsize=4096)
def _integer_orders_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    log_a = _silently(_log_a_integer_orders, sample_rate, noise_multiplier, _INTEGER_ORDERS)
    return _read_only(log_a / (np.asarray(_INTEGER_ORDERS) - 1.0))


def _convert(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    eps, best = _silently(
        rdp_analysis.get_privacy_spent, orders=np.asarray(orders, dtype=float), rdp=rdp, delta=delta
    )
    return float(eps), float(best)


def rdp_epsilon(history: Sequence[Phase], delta: float) -> float:
    """Epsilon at ``delta`` of ``history`` (no empty or zero-noise phases) minimized over
    :data:`ORDERS` (and :data:`LOW_ORDERS` when the optimum is at 1.1); may be NaN or negative
    (the caller checks and clamps)."""
    rdp = sum(rdp_per_step(p.sample_rate, p.noise_multiplier) * p.steps for p in history)
    eps, best = _convert(ORDERS, rdp, delta)
    if best == ORDERS[0]:
        low = sum(
            _low_orders_per_step(p.sample_rate, p.noise_multiplier) * p.steps for p in history
        )
        eps = min(eps, _convert(LOW_ORDERS, low, delta)[0])
    return eps


def integer_rdp_epsilon(history: Sequence[Phase], delta: float) -> float:
    """Like :func:`rdp_epsilon` over integer orders 2 .. 10,000 only: a slightly looser upper bound
    at large epsilon, in milliseconds for any (q, sigma)."""
    rdp = sum(
        _integer_orders_per_step(p.sample_rate, p.noise_multiplier) * p.steps for p in history
    )
    return _convert(_INTEGER_ORDERS, rdp, delta)[0]
