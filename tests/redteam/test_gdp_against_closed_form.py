"""gdp's epsilon and calibration against the mu-GDP closed form, computed here: Poisson
subsampling gives mu = q sqrt(T (e^(1/sigma^2) - 1)) (Dong, Roth, Su 2019, Corollary 5.4, as in
Opacus' compute_mu_poisson), and mu-GDP is (eps, delta(eps))-DP with
delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (tests.reference). In particular
epsilon is 0 exactly when delta(0) = 2 Phi(mu/2) - 1 <= delta, and positive just above it."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from tests.reference import exact_gaussian_delta, exact_gaussian_epsilon

DELTA = 1e-5


def mu_poisson(sigma: float, q: float, steps: int) -> float:
    return q * math.sqrt(steps * math.expm1(sigma**-2))


def sigma_for_mu(mu: float, q: float, steps: int) -> float:
    return 1 / math.sqrt(math.log1p((mu / q) ** 2 / steps))


@pytest.mark.parametrize("q,steps", [(0.01, 1000), (0.1, 50), (1.0, 1)])
@pytest.mark.parametrize("factor", [1.5, 3.0, 30.0, 300.0])
def test_gdp_epsilon_is_positive_just_above_the_zero_boundary(q, steps, factor):
    # Prepare: mu with delta(0) = factor * DELTA (> DELTA), so epsilon > 0
    mu = 2 * norm.ppf((1 + factor * DELTA) / 2)
    sigma = sigma_for_mu(mu, q, steps)
    assert exact_gaussian_delta(0.0, mu_poisson(sigma, q, steps)) > DELTA
    expected = exact_gaussian_epsilon(mu_poisson(sigma, q, steps), DELTA)
    assert expected > 0
    # Execute / Assert
    eps = compute_epsilon([Phase(sigma, q, steps)], DELTA, "gdp")
    assert eps == pytest.approx(expected, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("q,steps", [(0.01, 1000), (1.0, 1)])
def test_gdp_epsilon_is_zero_below_the_boundary(q, steps):
    mu = 2 * norm.ppf((1 + 0.5 * DELTA) / 2)  # delta(0) = DELTA / 2
    assert compute_epsilon([Phase(sigma_for_mu(mu, q, steps), q, steps)], DELTA, "gdp") == 0.0


@pytest.mark.parametrize(
    "target,q,steps", [(1e-4, 0.01, 1000), (1e-3, 1.0, 1), (0.5, 0.02, 3000), (8.0, 0.04, 2250)]
)
def test_gdp_calibration_meets_the_closed_form(target, q, steps):
    cal = calibrate_noise(target, DELTA, q, steps, "gdp")
    exact = exact_gaussian_epsilon(mu_poisson(cal.noise_multiplier, q, steps), DELTA)
    assert exact <= target * (1 + 1e-6)
    # and within the tolerance: 0.2 % less noise exceeds the target by the closed form too
    less = exact_gaussian_epsilon(mu_poisson(cal.noise_multiplier / 1.002, q, steps), DELTA)
    assert less > target
