"""Bayesian estimation of epsilon from membership-inference counts (Zanella-Beguelin et al.,
ICML 2023; spec ``dp_and_fl.md`` section 5).

A membership-inference game gives counts TP, TN, FP, FN; with P = TP + FN and N = TN + FP the
attack's error rates are FNR = FN / P and FPR = FP / N. A point (FNR, FPR) is achievable by an
(epsilon, delta)-DP mechanism iff ``eps_from_fnr_fpr(fnr, fpr, delta) <= epsilon`` (Kairouz et
al.'s hypothesis-testing region).

What is estimated: the epsilon the attack demonstrates, ``attack_epsilon(fnr, fpr, delta)``: the
smallest epsilon whose region contains the attack's rates when it beats chance by more than delta
(TPR - FPR > delta), and 0 otherwise. The paper's posterior is that of ``eps_from_fnr_fpr``, which
also counts an attack doing worse than chance (its point reflected through the diagonal). That
epsilon is 0 only on the delta-wide band around the diagonal FNR + FPR = 1, a set of probability 0
under any prior with a density: its posterior never has mass at 0, and on chance-level counts its
lower quantile is positive (0.0046 at 50/50/50/50; 0.045 for an attack that never guesses
"member"). Reading the attack as it guesses, the event "no advantage" (TPR - FPR <= delta) is a
half-square: the prior gives it 1/2 and the posterior its data-driven probability (exactly 1/2
when TPR and FPR have the same posterior), so the lower quantiles are 0 unless the counts move the
posterior away from it. Where the attack clearly beats chance the two definitions agree (the worked
cases of spec 5.4 to 1e-5); they differ where the posterior reaches past the diagonal (case 4).

Posterior ("joint-beta", the paper's): independent Jeffreys priors give FNR ~ Beta(FN + 1/2,
TP + 1/2) and FPR ~ Beta(FP + 1/2, TN + 1/2); epsilon's posterior is their push-forward. Below the
diagonal the region R(e) is bounded by one curve, FPR >= lo_e(FNR), so the CDF is a 1-D integral,
computed with a fixed Gauss-Legendre rule after the substitution u = F_FNR(x):

    Pr[eps <= e] = int_0^1 f_FNR(x) (1 - F_FPR(lo_e(x))) dx
    lo_e(x) = max(0, 1 - delta - x e^e, (1 - delta - x) e^-e)

(lo_0(x) = 1 - delta - x: Pr[eps = 0] is the posterior probability of no advantage). The
equal-tailed credible interval is [q(alpha/2), q(1 - alpha/2)] of that distribution, the
one-sided lower bound q(alpha) and the point estimate the posterior median q(1/2), which always
lies in the interval (the plug-in epsilon of the observed rates need not: inf for 487/1/512/0,
0 below the interval for 50/50/50/50 under the paper's definition). Quantiles are found by root
finding on the CDF; the reference library integrates in 2-D with tolerance 1e-2, takes 16-190 s
and is wrong on extreme counts (spec 5.4); this takes well under a second.
"joint-dirichlet" (a Dirichlet(counts + 1/2) over the four cells) gives the same joint law of
(FNR, FPR): within-group proportions of a Dirichlet are independent Betas with exactly these
parameters, so both methods share this computation.

No evidence: when the counts show no advantage (TP/P - FP/N <= delta, exactly: an attack no
better than chance, or one that never guesses "member"), the maximum-likelihood rates lie in the
no-advantage set, so the data favour no leakage at least as much as any leakage and whatever mass
the posterior puts on epsilon > 0 comes from the prior. The lower bounds are then 0 for every
method. For Clopper-Pearson this changes nothing (its rectangle contains the observed rates); for
the posterior it matters only with few samples on one side, e.g. TP 0, FN 1, TN 1000, FP 0, where
Beta(1/2, 3/2) for TPR against FPR near 0 leaves Pr[no advantage] = 0.023 and a q(0.05) of 1.56.

Baselines: Clopper-Pearson and Jeffreys intervals of FNR and FPR at level alpha/2 each, mapped to
epsilon through the rectangle: ``attack_epsilon`` decreases in both rates, so its range over the
rectangle runs from the upper-right corner to the lower-left one. Their point estimates: the
plug-in epsilon of the observed rates (Clopper-Pearson, whose intervals contain them) and of the
rates' Jeffreys posterior medians (Jeffreys, whose intervals contain those at any alpha).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import optimize
from scipy.special import roots_legendre
from scipy.stats import beta as beta_dist

from dpfl.errors import ConfigError

__all__ = [
    "METHODS",
    "AttackCounts",
    "EpsilonInterval",
    "attack_epsilon",
    "eps_from_fnr_fpr",
    "estimate",
    "posterior_cdf",
    "posterior_density",
    "posterior_quantile",
    "verdict",
]

METHODS = ("joint-beta", "joint-dirichlet", "beta", "jeffreys")
MAX_EPS = 30.0


@dataclass(frozen=True)
class AttackCounts:
    tp: int
    tn: int
    fp: int
    fn: int

    def __post_init__(self) -> None:
        for name in ("tp", "tn", "fp", "fn"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
                raise ConfigError(f"--{name} must be an integer >= 0, got {v!r}")
        if self.tp + self.fn == 0 or self.tn + self.fp == 0:
            raise ConfigError(
                "counts need at least one member (tp + fn > 0) and one non-member (tn + fp > 0)"
            )

    @property
    def fnr(self) -> float:
        return self.fn / (self.fn + self.tp)

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn)

    def shows_advantage(self, delta: float) -> bool:
        """Whether the observed rates beat chance by more than delta: TP/P - FP/N > delta, in
        exact arithmetic (the observed ``attack_epsilon`` is positive iff this holds)."""
        return Fraction(self.tp, self.tp + self.fn) - Fraction(self.fp, self.fp + self.tn) > (
            Fraction(delta)
        )


def _check(delta: float, alpha: float | None = None) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"--delta must be in (0, 1), got {delta!r}")
    if alpha is not None and not (isinstance(alpha, int | float) and 0 < alpha < 1):
        raise ConfigError(f"--alpha must be in (0, 1), got {alpha!r}")


def eps_from_fnr_fpr(fnr: float, fpr: float, delta: float) -> float:
    """The smallest epsilon whose (epsilon, delta)-DP region contains (FNR, FPR) (the paper's
    function: a point above the diagonal, an attack worse than chance, is reflected)."""
    if fpr > 1 - fnr:  # reflect into the lower-left triangle
        fpr, fnr = 1 - fnr, 1 - fpr
    lo, hi = min(fpr, fnr), max(fpr, fnr)
    if hi > 1 - delta - lo:
        return 0.0
    if lo == 0:
        return math.inf
    return math.log((1 - delta - hi) / lo)


def attack_epsilon(fnr: float, fpr: float, delta: float) -> float:
    """The epsilon an attack with these error rates demonstrates: ``eps_from_fnr_fpr`` where it
    beats chance (FNR + FPR < 1 - delta, i.e. TPR - FPR > delta), else 0. Non-increasing in
    both rates."""
    if fnr + fpr >= 1 - delta:
        return 0.0
    return eps_from_fnr_fpr(fnr, fpr, delta)


def _lower_boundary(x: np.ndarray, e: float, delta: float) -> np.ndarray:
    """lo_e(x): below the diagonal, attack_epsilon(x, y) <= e iff y >= lo_e(x)."""
    return np.maximum.reduce(
        [np.zeros_like(x), 1 - delta - x * math.exp(e), (1 - delta - x) * math.exp(-e)]
    )


GAUSS_NODES = 2000


@functools.lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-point Gauss-Legendre rule on [-1, 1], computed once per n. scipy's
    ``roots_legendre`` (Newton iterations from asymptotic initial guesses, O(n)) takes about a
    millisecond; numpy's ``leggauss`` solves a dense n x n eigenproblem (2-15 s at n = 2,000)."""
    u, w = roots_legendre(n)
    u.setflags(write=False)
    w.setflags(write=False)
    return u, w


@functools.lru_cache(maxsize=64)
def _fnr_nodes(fn: int, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes for integrals against FNR's posterior, in the variable u = F_FNR(x):
    int f_FNR(x) g(x) dx = int_0^1 g(F_FNR^-1(u)) du. The substitution absorbs the posterior's
    peak (a Beta with thousands of counts has width ~1e-2), so a fixed rule is accurate: 2,000
    nodes reproduce the spec's quadrature reference values to 1e-5. The weights are positive
    and each node's term is non-decreasing in e, so the computed CDF is monotone."""
    u, w = _gauss_legendre(GAUSS_NODES)
    return beta_dist.ppf((u + 1) / 2, fn + 0.5, tp + 0.5), w / 2


def posterior_cdf(counts: AttackCounts, e: float, delta: float) -> float:
    """Pr_posterior[attack epsilon <= e]; at e = 0, the posterior probability that the attack
    has no advantage (TPR - FPR <= delta)."""
    if e < 0:
        return 0.0
    x, w = _fnr_nodes(counts.fn, counts.tp)
    sf = beta_dist.sf(_lower_boundary(x, e, delta), counts.fp + 0.5, counts.tn + 0.5)
    return min(max(float(np.sum(w * sf)), 0.0), 1.0)


def _quantiles(counts: AttackCounts, qs: tuple[float, ...], delta: float) -> list[float]:
    """Posterior quantiles, the CDF at the bracket's ends computed once for all of them."""
    at_zero, at_max = posterior_cdf(counts, 0.0, delta), posterior_cdf(counts, MAX_EPS, delta)
    out = []
    for q in qs:
        if at_zero >= q:
            out.append(0.0)
        elif at_max < q:
            out.append(math.inf)
        else:
            f = lambda e, q=q: posterior_cdf(counts, e, delta) - q  # noqa: E731
            out.append(float(optimize.brentq(f, 0.0, MAX_EPS, xtol=1e-7)))
    return out


def posterior_quantile(counts: AttackCounts, q: float, delta: float) -> float:
    """The q-quantile of epsilon's posterior (0 when Pr[eps <= 0] >= q; inf beyond MAX_EPS)."""
    return _quantiles(counts, (q,), delta)[0]


def posterior_density(counts: AttackCounts, grid: np.ndarray, delta: float) -> np.ndarray:
    """Density of the continuous part of epsilon's posterior on ``grid`` (numerical derivative
    of the CDF; the mass at 0, ``posterior_cdf(counts, 0, delta)``, is not in it), for plots."""
    cdf = np.array([posterior_cdf(counts, float(e), delta) for e in grid])
    return np.gradient(cdf, grid)


def _frequentist(counts: AttackCounts, method: str):
    """``eps_range(level, delta)``: the rates' equal-tailed (1 - level) intervals (Clopper-Pearson
    for ``beta``, Jeffreys otherwise) mapped to an epsilon interval through the rectangle."""

    def interval(x: int, n: int, level: float) -> tuple[float, float]:
        if method == "beta":
            lo = 0.0 if x == 0 else beta_dist.ppf(level / 2, x, n - x + 1)
            hi = 1.0 if x == n else beta_dist.ppf(1 - level / 2, x + 1, n - x)
        else:
            lo = 0.0 if x == 0 else beta_dist.ppf(level / 2, x + 0.5, n - x + 0.5)
            hi = 1.0 if x == n else beta_dist.ppf(1 - level / 2, x + 0.5, n - x + 0.5)
        return float(lo), float(hi)

    def eps_range(level: float, delta: float) -> tuple[float, float]:
        # attack_epsilon is non-increasing in both rates: its smallest value on the rectangle is
        # at the upper-right corner, its largest at the lower-left one
        fnr_l, fnr_r = interval(counts.fn, counts.fn + counts.tp, level)
        fpr_l, fpr_r = interval(counts.fp, counts.fp + counts.tn, level)
        return attack_epsilon(fnr_r, fpr_r, delta), attack_epsilon(fnr_l, fpr_l, delta)

    return eps_range


@dataclass(frozen=True)
class EpsilonInterval:
    """``point`` (posterior median for the Bayesian methods, plug-in epsilon for the baselines)
    lies in [lo, hi], the equal-tailed (1 - alpha) interval; ``one_sided_lo`` is the (1 - alpha)
    lower bound. ``p_no_advantage``: the posterior probability that the attack has no advantage
    (epsilon = 0; Bayesian methods only). ``counts_show_advantage``: TP/P - FP/N > delta."""

    method: str
    alpha: float
    delta: float
    point: float
    lo: float
    hi: float
    one_sided_lo: float
    p_no_advantage: float | None = None
    counts_show_advantage: bool = True

    @property
    def no_evidence(self) -> bool:
        """The lower bound is 0: these counts are no evidence of leakage."""
        return self.one_sided_lo == 0.0


def estimate(
    counts: AttackCounts, delta: float = 1e-5, alpha: float = 0.05, method: str = "joint-beta"
) -> EpsilonInterval:
    """Point estimate, equal-tailed (1 - alpha) interval and one-sided lower bound of epsilon."""
    _check(delta, alpha)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    advantage = counts.shows_advantage(delta)
    p0 = None
    if method in ("joint-beta", "joint-dirichlet"):
        p0 = posterior_cdf(counts, 0.0, delta)
        lo, hi, one, point = _quantiles(counts, (alpha / 2, 1 - alpha / 2, alpha, 0.5), delta)
        # the quantiles are ordered; root finding (xtol 1e-7) must not invert nearby ones
        point = min(max(point, lo), hi)
    else:
        # each rate's interval at confidence 1 - alpha/2 (two-sided) or 1 - alpha (one-sided),
        # as the reference library calls statsmodels' proportion_confint
        eps_range = _frequentist(counts, method)
        lo, hi = eps_range(alpha / 2, delta)
        one, _ = eps_range(alpha, delta)
        if method == "beta":  # the observed rates, inside every Clopper-Pearson interval
            point = attack_epsilon(counts.fnr, counts.fpr, delta) if advantage else 0.0
        else:  # the rates' Jeffreys posterior medians, inside every Jeffreys interval
            point = attack_epsilon(
                float(beta_dist.median(counts.fn + 0.5, counts.tp + 0.5)),
                float(beta_dist.median(counts.fp + 0.5, counts.tn + 0.5)),
                delta,
            )
    if not advantage:
        # the observed rates show no advantage: the likelihood is largest at no leakage, and any
        # posterior mass on epsilon > 0 is the prior's, not the data's (module docstring)
        lo = one = 0.0
    return EpsilonInterval(method, alpha, delta, point, lo, hi, one, p0, advantage)


def _pct(p: float) -> str:
    return f"{100 * p:.3g}%"


def verdict(counts: AttackCounts, interval: EpsilonInterval) -> str:
    """One sentence on what the counts say: the lower bound read as evidence, or not."""
    bayesian = interval.p_no_advantage is not None
    level = _pct(1 - interval.alpha)
    rates = f"TPR {1 - counts.fnr:.3g}, FPR {counts.fpr:.3g}"
    if not interval.no_evidence:
        how = "posterior probability" if bayesian else "confidence"
        return (
            f"evidence of leakage: epsilon >= {interval.one_sided_lo:.4f} with {level} {how} "
            f"({rates})"
        )
    text = "no evidence of leakage (lower bound 0): "
    if counts.tp + counts.fp == 0:
        text += f"the attack never guesses member ({rates})"
    elif interval.counts_show_advantage:
        return text + f"the advantage seen ({rates}) is within the {level} bound's uncertainty"
    else:
        text += f"the attack is no better than chance ({rates})"
        if counts.tn + counts.fn > 0 and counts.tp + counts.fp > 0:
            flipped = AttackCounts(tp=counts.fn, tn=counts.fp, fp=counts.tn, fn=counts.tp)
            if not estimate(flipped, interval.delta, interval.alpha, "beta").no_evidence:
                text += (
                    "; it does clearly worse than chance, and its guesses flipped would be "
                    "another attack, to audit on fresh counts"
                )
    if bayesian and interval.p_no_advantage < 1:
        text += (
            f"; the posterior's {_pct(1 - interval.p_no_advantage)} on epsilon > 0 comes from "
            "the prior on the rates (Jeffreys, Beta(1/2, 1/2) each), not from the data, whose "
            "likelihood is highest at no advantage"
        )
    return text
