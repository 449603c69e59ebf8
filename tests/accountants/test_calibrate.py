import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from dpfl.accountants.rdp import ORDERS
from dpfl.errors import ConfigError, PrivacyBudgetError
from tests.reference import exact_gaussian_epsilon, gaussian_mu, rdp_gaussian_epsilon


@settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    target=st.floats(0.2, 20.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 5000),
    delta=st.sampled_from([1e-3, 1e-5, 1e-7]),
)
def test_calibration_never_overshoots_rdp(target, q, steps, delta):
    # Execute
    cal = calibrate_noise(target, delta, q, steps, "rdp")
    # Assert: the reported epsilon is the accountant's own, and within the target
    eps = compute_epsilon([Phase(cal.noise_multiplier, q, steps)], delta, "rdp")
    assert eps == cal.epsilon
    assert eps <= target
    # ... and the noise is not needlessly large: 0.1 % less noise overshoots
    less = compute_epsilon([Phase(cal.noise_multiplier / (1 + 1e-3), q, steps)], delta, "rdp")
    assert less > target


@pytest.mark.parametrize(
    "accountant,target,q,steps",
    [
        ("prv", 1.0, 0.01, 1000),
        ("prv", 8.0, 0.04, 2250),
        ("pld", 0.05, 1e-3, 100_000),
        ("pld", 0.5, 0.256, 1000),
        ("pld", 3.0, 0.01, 100_000),
        ("pld", 60.0, 0.5, 100),
        ("rdp", 0.05, 1e-3, 100_000),
    ],
)
def test_calibration_is_within_the_relative_tolerance(accountant, target, q, steps):
    # Execute
    cal = calibrate_noise(target, 1e-5, q, steps, accountant)
    # Assert: within the target, and 0.1 % less noise is not
    assert compute_epsilon([Phase(cal.noise_multiplier, q, steps)], 1e-5, accountant) == cal.epsilon
    assert cal.epsilon <= target
    less = Phase(cal.noise_multiplier / (1 + 1e-3), q, steps)
    assert compute_epsilon([less], 1e-5, accountant) > target


@pytest.mark.parametrize("target,steps", [(0.05, 1), (1.0, 10), (8.0, 1000)])
def test_calibration_matches_the_gaussian_closed_forms(target, steps):
    # q = 1: the optimal noise multiplier solves a closed form (exact for pld's reference,
    # RDP's own for rdp), found here by root finding on the formulas alone
    def optimal(formula):
        return brentq(
            lambda s: formula(gaussian_mu([(s, steps)])) - target,
            math.sqrt(steps) / 20,
            1e4,
            xtol=1e-12,
        )

    exact = optimal(lambda mu: exact_gaussian_epsilon(mu, 1e-5))
    rdp = optimal(lambda mu: rdp_gaussian_epsilon(mu, 1e-5, ORDERS))
    # rdp: within its relative tolerance of its own optimum
    ours = calibrate_noise(target, 1e-5, 1.0, steps, "rdp").noise_multiplier
    assert rdp * (1 - 1e-9) <= ours <= rdp * (1 + 1e-3)
    # pld: an upper bound within 0.5 % of the exact epsilon, so at least the exact noise, and
    # within about 0.5 % more
    ours = calibrate_noise(target, 1e-5, 1.0, steps, "pld").noise_multiplier
    assert exact <= ours <= exact * 1.006


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_calibration_agrees_with_opacus(accountant):
    # Opacus' bisection with the same tolerance lands within ~1% of ours (both err on more noise)
    ours = calibrate_noise(8.0, 1e-5, 0.04, 2250, accountant).noise_multiplier
    theirs = get_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=0.04, steps=2250, accountant=accountant
    )
    assert ours == pytest.approx(theirs, rel=0.01)


def test_calibration_with_prior_spend_covers_the_whole_history():
    prior = [Phase(1.0, 0.01, 2000)]
    spent = compute_epsilon(prior, 1e-5, "rdp")
    cal = calibrate_noise(spent + 1.0, 1e-5, 0.01, 1000, "rdp", prior=prior)
    total = compute_epsilon([*prior, Phase(cal.noise_multiplier, 0.01, 1000)], 1e-5, "rdp")
    assert total == cal.epsilon <= spent + 1.0
    assert total > spent


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_with_prior_spend_matches_the_closed_form(accountant):
    # Prepare: 4 Gaussian releases at sigma 10 already spent (q = 1); calibrate 4 more so that
    # the whole history meets epsilon 2. By the closed form, the whole history is one Gaussian
    # with mu^2 = 4/10^2 + 4/sigma^2, so the noise needed is sqrt(4 / (mu_target^2 - 0.04)).
    prior = [Phase(10.0, 1.0, 4)]
    target = 2.0
    if accountant == "pld":
        formula = lambda mu: exact_gaussian_epsilon(mu, 1e-5)  # noqa: E731
    else:
        formula = lambda mu: rdp_gaussian_epsilon(mu, 1e-5, ORDERS)  # noqa: E731
    mu_target = brentq(lambda mu: formula(mu) - target, 1e-3, 20, xtol=1e-13)
    needed = math.sqrt(4 / (mu_target**2 - 0.04))
    # Execute
    cal = calibrate_noise(target, 1e-5, 1.0, 4, accountant, prior=prior)
    # Assert
    assert needed * (1 - 1e-9) <= cal.noise_multiplier <= needed * 1.01
    total = compute_epsilon([*prior, Phase(cal.noise_multiplier, 1.0, 4)], 1e-5, accountant)
    assert total == cal.epsilon <= target


def test_prior_spend_beyond_target_is_a_budget_error():
    with pytest.raises(PrivacyBudgetError, match="already spends"):
        calibrate_noise(0.5, 1e-5, 0.01, 100, prior=[Phase(0.5, 0.1, 1000)])


def test_unreachable_target_is_a_budget_error():
    with pytest.raises(PrivacyBudgetError, match="cannot be met"):
        calibrate_noise(1e-7, 1e-5, 1.0, 100_000, "rdp")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_epsilon": -1.0}, "target epsilon"),
        ({"target_epsilon": 0.0}, "target epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "moments"}, "unknown accountant"),
        ({"rel_tol": 0.0}, "relative tolerance"),
    ],
)
def test_invalid_calibration_arguments(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100} | kwargs
    with pytest.raises(ConfigError, match=match):
        calibrate_noise(**args)
