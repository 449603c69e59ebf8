"""Independent references for the audit's posterior, written apart from dpfl.audit.posterior.

* ``attack_eps_reference``: the epsilon an attack with error rates (FNR, FPR) demonstrates,
  vectorized, from the DP hypothesis-testing inequalities (Kairouz et al.).
* ``mc_eps``: Monte-Carlo draws of it under the rates' Jeffreys posteriors.
* ``ref_cdf`` / ``ref_quantile``: its posterior CDF integrated over FPR (dpfl integrates over FNR,
  with a fixed Gauss-Legendre rule in the FNR posterior's quantile) by scipy's adaptive quad, split
  at the FPR posterior's quantiles, and brentq; accurate to ~1e-10 but too slow for the CLI.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, optimize
from scipy.stats import beta


def attack_eps_reference(fnr, fpr, delta: float) -> np.ndarray:
    """0 unless TPR - FPR > delta; otherwise the tightest epsilon with
    FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta."""
    fnr, fpr = np.asarray(fnr, float), np.asarray(fpr, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log((1 - delta - fpr) / fnr)
        b = np.log((1 - delta - fnr) / fpr)
    eps = np.maximum(a, b)
    return np.where(fnr + fpr < 1 - delta, np.maximum(eps, 0.0), 0.0)


def mc_eps(counts, delta: float, n: int = 400_000, seed: int = 0) -> np.ndarray:
    tp, tn, fp, fn = counts
    rng = np.random.default_rng(seed)
    fnr = rng.beta(fn + 0.5, tp + 0.5, n)
    fpr = rng.beta(fp + 0.5, tn + 0.5, n)
    return attack_eps_reference(fnr, fpr, delta)


_SPLITS = [1e-12, 1e-9, 1e-6, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999]
_SPLITS += [1 - 1e-4, 1 - 1e-6, 1 - 1e-9]


def ref_cdf(counts, e: float, delta: float) -> float:
    """Pr[epsilon <= e] = int f_FPR(y) Pr[FNR >= b_e(y)] dy, where b_e(y) is the smallest FNR with
    epsilon(FNR, y) <= e (the region below the diagonal is symmetric in the two rates)."""
    tp, tn, fp, fn = counts
    fnr, fpr = beta(fn + 0.5, tp + 0.5), beta(fp + 0.5, tn + 0.5)

    def b(y: float) -> float:
        return max(0.0, 1 - delta - y * math.exp(e), (1 - delta - y) * math.exp(-e))

    cuts = sorted({0.0, 1.0, *map(float, fpr.ppf(_SPLITS))})
    return sum(
        integrate.quad(lambda y: fpr.pdf(y) * fnr.sf(b(y)), a, c, epsabs=1e-13, limit=200)[0]
        for a, c in zip(cuts[:-1], cuts[1:], strict=True)
        if c > a
    )


def ref_quantile(counts, q: float, delta: float) -> float:
    if ref_cdf(counts, 0.0, delta) >= q:
        return 0.0
    return optimize.brentq(lambda e: ref_cdf(counts, e, delta) - q, 0.0, 30.0, xtol=1e-9)
