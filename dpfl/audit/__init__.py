"""Bayesian DP audits: membership-inference counts -> a posterior over epsilon."""

from dpfl.audit.posterior import (
    METHODS,
    AttackCounts,
    EpsilonInterval,
    attack_epsilon,
    eps_from_fnr_fpr,
    estimate,
    posterior_cdf,
    posterior_density,
    posterior_quantile,
    verdict,
)

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
