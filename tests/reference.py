"""Slow, obviously correct references for privacy tests.

Closed forms for the non-subsampled Gaussian mechanism (q = 1), where the privacy loss is known
exactly: T releases with noise multiplier sigma are one Gaussian mechanism with
mu = sqrt(sum_t 1 / sigma_t**2) (Dong, Roth, Su 2019, Corollary 3.3), whose exact delta(epsilon)
is Balle & Wang 2018, Theorem 8:

    delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)

and whose Renyi divergence of order alpha is alpha * mu**2 / 2 (Mironov 2017, Proposition 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm


def gaussian_mu(phases: Sequence[tuple[float, int]]) -> float:
    """mu of the composition of ``steps`` Gaussian releases per ``(sigma, steps)`` (q = 1)."""
    return math.sqrt(sum(steps / sigma**2 for sigma, steps in phases))


def exact_gaussian_delta(eps: float, mu: float) -> float:
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with delta(epsilon) <= delta, by root finding."""
    if exact_gaussian_delta(0.0, mu) <= delta:
        return 0.0
    return float(brentq(lambda e: exact_gaussian_delta(e, mu) - delta, 0.0, 500.0, xtol=1e-12))


def rdp_gaussian_epsilon(mu: float, delta: float, orders: Sequence[float]) -> float:
    """RDP of the Gaussian, alpha * mu^2 / 2, converted to (eps, delta) with the conversion of
    Balle et al. 2020 (Theorem 21), minimized over ``orders``."""
    a = np.asarray(orders, dtype=float)
    rdp = a * mu**2 / 2
    eps = rdp + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
    return float(max(np.min(eps), 0.0))


# -- per-sample gradients by the microbatch method -----------------------------------------------
def microbatch_grads(model, x, y, loss_fn):
    """Per-sample gradients [B, *p.shape] of each trainable parameter, one backward per sample.

    Slow and obviously correct: the reference every per-sample backend is tested against.
    ``loss_fn(output, target)`` returns per-sample losses.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [[] for _ in params]
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for j, p in enumerate(params):
            grads[j].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return [torch.stack(g) for g in grads]


def per_param_norms(grads):
    """[B, P] norms of each sample's gradient of each parameter tensor."""
    import torch

    return torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads], dim=1)


# -- privacy loss distributions, straight from dp_accounting ---------------------------------------
def dp_accounting_pld_epsilon(
    phases: Sequence[tuple[float, float, int]], delta: float, interval: float
) -> float:
    """Epsilon of ``(sigma, q, steps)`` phases by Google's dp_accounting alone, at value
    discretization ``interval``: its own Poisson-subsampled Gaussian PLD (pessimistic
    connect-the-dots), each phase self-composed, phases composed in order. Slow at fine
    intervals (the library builds each distribution one grid point at a time)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    composed = None
    for sigma, q, steps in phases:
        one = pld.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=interval
        )
        one = one.self_compose(steps) if steps > 1 else one
        composed = one if composed is None else composed.compose(one)
    return float(composed.get_epsilon_for_delta(delta))


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps by Google's dp_accounting RDP
    accountant alone (its own RDP of the mechanism and its own conversion), over dpfl's orders
    (the orders are a grid, not a formula: the same grid makes the minima comparable)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from dpfl.accountants.rdp import ORDERS

    acc = RdpAccountant(list(ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))
