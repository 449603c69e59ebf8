"""Ranges the accountants enforce: at most MAX_STEPS steps from a user, a relative calibration
tolerance in [1e-6, 0.5], and gdp at both ends of Opacus' root bracket [0, 500]."""

import math

import pytest
from scipy.stats import norm

from dpfl.accountants import (
    MAX_STEPS,
    Phase,
    calibrate_noise,
    compute_epsilon,
    phases_from_records,
    steps_for_epochs,
)
from dpfl.accountants.epsilon import GDP_MAX_EPSILON, EpsilonAboveRange
from dpfl.errors import AccountantError, ConfigError

DELTA = 1e-5


# -- steps ---------------------------------------------------------------------------------------
def test_epochs_beyond_max_steps_are_refused():
    assert MAX_STEPS == 10**8
    assert steps_for_epochs(1e6, 0.01) == MAX_STEPS  # the limit itself is allowed
    with pytest.raises(ConfigError, match=r"1e\+302 steps .*at most 1e\+08"):
        steps_for_epochs(1e300, 0.01)


@pytest.mark.parametrize(
    "records,fragment",
    [
        ([{"sigma": 1.0, "sample-rate": 0.1, "steps": 10**400}], "phase 1: steps must be at most"),
        ([{"sigma": 1.0, "sample-rate": 0.1, "epochs": 1e300}], "phase 1: 1e+300 epochs"),
        ([{"sigma": 1.0, "sample-rate": 0.1, "steps": 6 * 10**7}] * 2, "1.2e+08 steps in all"),
    ],
)
def test_phase_records_beyond_max_steps_are_refused(records, fragment):
    with pytest.raises(ConfigError) as info:
        phases_from_records(records)
    assert fragment in str(info.value)
    assert len(str(info.value)) < 200  # never a 400-digit number


def test_calibration_beyond_max_steps_is_refused():
    with pytest.raises(ConfigError, match=r"steps must be an integer in \[1, 1e\+08\]"):
        calibrate_noise(3.0, DELTA, 0.01, 10**9)


# -- calibration tolerance -----------------------------------------------------------------------
@pytest.mark.parametrize("rel_tol", [100.0, 0.6, 1e-9, 0.0, -1e-3, math.nan])
def test_tolerance_outside_its_range_is_refused(rel_tol):
    with pytest.raises(ConfigError, match=r"relative tolerance must be in \[1e-06, 0\.5\]"):
        calibrate_noise(3.0, DELTA, 0.01, 1000, rel_tol=rel_tol)


@pytest.mark.parametrize("rel_tol", [0.5, 1e-6])
def test_tolerance_at_the_ends_of_its_range(rel_tol):
    cal = calibrate_noise(3.0, DELTA, 0.01, 1000, rel_tol=rel_tol)
    assert cal.epsilon <= 3.0
    # a noise multiplier smaller by the factor 1 + rel_tol exceeds the target
    smaller = cal.noise_multiplier / (1 + rel_tol)
    assert compute_epsilon([Phase(smaller, 0.01, 1000)], DELTA) > 3.0


# -- gdp at the ends of Opacus' bracket ----------------------------------------------------------
def _gdp_mu(sigma: float, q: float, steps: int) -> float:
    """mu of Poisson-subsampled Gaussian DP-SGD under the CLT (Bu et al. 2020, eq. (6))."""
    return q * math.sqrt(steps) * math.sqrt(math.exp(sigma**-2) - 1)


def test_gdp_beyond_its_range_says_so():
    # mu-GDP's delta at epsilon 500 is above delta: epsilon > 500, Opacus' bracket has no root
    mu = _gdp_mu(0.1, 0.01, 100)
    assert norm.cdf(-500 / mu + mu / 2) - math.exp(500) * norm.cdf(-500 / mu - mu / 2) > DELTA
    with pytest.raises(EpsilonAboveRange, match="epsilon is above 500") as info:
        compute_epsilon([Phase(0.1, 0.01, 100)], DELTA, "gdp")
    assert isinstance(info.value, AccountantError) and info.value.bound == GDP_MAX_EPSILON


def test_gdp_is_zero_where_mu_gdp_already_gives_delta():
    # delta(0) = 2 Phi(mu / 2) - 1 <= delta: the mechanism is (0, delta)-DP under mu-GDP
    sigma, q, steps = 1e4, 0.01, 100
    mu = _gdp_mu(sigma, q, steps)
    assert 2 * norm.cdf(mu / 2) - 1 <= DELTA
    assert compute_epsilon([Phase(sigma, q, steps)], DELTA, "gdp") == 0.0


def test_gdp_calibration_passes_through_epsilon_above_its_range():
    # the search tries sigma 1/16 (epsilon > 500) on its way to the answer for a target of 50
    cal = calibrate_noise(50.0, DELTA, 0.01, 100, "gdp")
    assert cal.epsilon <= 50.0
    smaller = cal.noise_multiplier / (1 + 1e-3)
    assert compute_epsilon([Phase(smaller, 0.01, 100)], DELTA, "gdp") > 50.0


def test_gdp_calibration_above_its_range_fails_with_the_reason():
    with pytest.raises(EpsilonAboveRange, match="above 500"):
        calibrate_noise(1000.0, DELTA, 0.01, 100, "gdp")
