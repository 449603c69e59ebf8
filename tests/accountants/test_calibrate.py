import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants.utils import get_noise_multiplier

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from dpfl.errors import ConfigError, PrivacyBudgetError


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
    # ... and the noise is not needlessly large: within tolerance, or any less noise overshoots
    less = compute_epsilon([Phase(cal.noise_multiplier * (1 - 1e-5), q, steps)], delta, "rdp")
    assert target - eps <= 0.01 or less > target


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.01, 1000), (8.0, 0.04, 2250)])
def test_calibration_never_overshoots_prv(target, q, steps):
    cal = calibrate_noise(target, 1e-5, q, steps, "prv")
    assert compute_epsilon([Phase(cal.noise_multiplier, q, steps)], 1e-5, "prv") <= target
    assert target - cal.epsilon <= 0.01


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
    ],
)
def test_invalid_calibration_arguments(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100} | kwargs
    with pytest.raises(ConfigError, match=match):
        calibrate_noise(**args)
