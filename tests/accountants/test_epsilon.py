import math

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from dpfl.accountants import Phase, compute_epsilon, steps_for_epochs
from dpfl.accountants.rdp import LARGE_ORDERS, LOW_ORDERS, ORDERS
from dpfl.errors import AccountantError, ConfigError
from tests.reference import (
    exact_gaussian_epsilon,
    gaussian_mu,
    rdp_gaussian_epsilon,
)

DELTA = 1e-5


# -- values pinned by Opacus' own test suite (opacus/tests/accountants_test.py) ------------------
def test_rdp_matches_opacus_pinned_value():
    # Prepare: sigma 1.5, q 0.04, 90 epochs
    steps = steps_for_epochs(90, 0.04)
    # Execute
    eps = compute_epsilon([Phase(1.5, 0.04, steps)], DELTA, "rdp")
    # Assert
    assert steps == 2250
    assert eps == pytest.approx(7.32911117143, abs=1e-9)


def test_prv_matches_opacus_pinned_value():
    eps = compute_epsilon([Phase(1.5, 0.04, int(90 // 0.04))], DELTA, "prv")
    assert eps == pytest.approx(6.777395712150674, abs=1e-6)


def test_gdp_matches_opacus_pinned_range():
    eps = compute_epsilon([Phase(1.5, 0.04, int(90 // 0.04))], DELTA, "gdp")
    assert 6.59 < eps < 6.6


@pytest.mark.parametrize("name,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 300), (0.8, 0.1, 50), (2.0, 0.5, 7)])
def test_equals_opacus_stepped_accountant(name, cls, sigma, q, steps):
    # Prepare: Opacus' accountant stepped one release at a time, as its optimizer hook does
    acc = cls()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    # Execute / Assert
    assert compute_epsilon([Phase(sigma, q, steps)], DELTA, name) == pytest.approx(
        acc.get_epsilon(delta=DELTA), rel=1e-12
    )


def test_gdp_equals_opacus_stepped_accountant():
    acc = GaussianAccountant()
    for _ in range(200):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    assert compute_epsilon([Phase(1.1, 0.02, 200)], DELTA, "gdp") == pytest.approx(
        acc.get_epsilon(delta=DELTA), rel=1e-12
    )


# -- against closed forms (q = 1: the plain Gaussian mechanism) ----------------------------------
@pytest.mark.parametrize("phases", [[(1.0, 1)], [(2.0, 10)], [(5.0, 100)], [(0.9, 3), (3.0, 40)]])
def test_rdp_equals_closed_form_gaussian(phases):
    mu = gaussian_mu(phases)
    eps = compute_epsilon([Phase(s, 1.0, t) for s, t in phases], DELTA, "rdp")
    assert eps == pytest.approx(rdp_gaussian_epsilon(mu, DELTA, ORDERS), rel=1e-9)
    # RDP is an upper bound on the exact epsilon
    assert eps >= exact_gaussian_epsilon(mu, DELTA)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("delta", [1e-3, 1e-8])
def test_epsilon_is_at_the_given_delta(name, delta):
    # Prepare: 10 Gaussian releases at sigma 2 (q = 1): exact and RDP closed forms at this delta
    mu = gaussian_mu([(2.0, 10)])
    exact = exact_gaussian_epsilon(mu, delta)
    # Execute
    eps = compute_epsilon([Phase(2.0, 1.0, 10)], delta, name)
    # Assert: an upper bound on the exact value, and close to it (never the value at 1e-5)
    if name == "rdp":
        assert eps == pytest.approx(rdp_gaussian_epsilon(mu, delta, ORDERS), rel=1e-9)
    else:
        assert exact - 1e-6 <= eps <= exact * 1.005 + (0.02 if name == "prv" else 0.0)
    assert abs(eps - exact_gaussian_epsilon(mu, 1e-5)) > 0.1


# -- the extended RDP orders ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "sigma,q", [(1.0, 0.01), (57.0, 0.256), (5.0, 0.1), (0.5, 0.5), (0.3, 0.9), (2.0, 1.0)]
)
def test_large_orders_equal_opacus_series(sigma, q):
    # dpfl's vectorized sum over integer orders >= 64 against Opacus' own loop, where Opacus'
    # floating-point sum does not overflow
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    from dpfl.accountants.rdp import rdp_per_step

    theirs = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=LARGE_ORDERS))
    ours = rdp_per_step(q, sigma)[-len(LARGE_ORDERS) :]
    finite = np.isfinite(theirs)
    assert finite.sum() >= 10 and np.isfinite(ours).all()
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-10)


@pytest.mark.parametrize("sigma", [30.0, 50.0, 100.0])
def test_small_epsilon_uses_orders_beyond_opacus_defaults(sigma):
    # Prepare: one Gaussian release (q = 1), epsilon 0.03 .. 0.11; Opacus' orders stop at 63
    mu = 1 / sigma
    # Execute
    eps = compute_epsilon([Phase(sigma, 1.0, 1)], DELTA, "rdp")
    # Assert: the closed form over all orders, tighter than over Opacus' defaults, still a bound
    assert eps == pytest.approx(rdp_gaussian_epsilon(mu, DELTA, ORDERS), rel=1e-9)
    assert eps < 0.9 * rdp_gaussian_epsilon(mu, DELTA, RDPAccountant.DEFAULT_ALPHAS)
    assert eps >= exact_gaussian_epsilon(mu, DELTA)


def test_huge_epsilon_uses_low_orders():
    # sigma 0.5, q 0.5, 1e4 steps: the optimum is below Opacus' smallest order 1.1
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(LOW_ORDERS) + list(RDPAccountant.DEFAULT_ALPHAS)
    rdp = compute_rdp(q=0.5, noise_multiplier=0.5, steps=10_000, orders=orders)
    expected, best = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert best < 1.1
    assert compute_epsilon([Phase(0.5, 0.5, 10_000)], DELTA, "rdp") == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("phases", [[(1.0, 1)], [(2.0, 10)], [(0.9, 3), (3.0, 40)]])
def test_prv_brackets_exact_gaussian_epsilon(phases):
    # PRV returns the upper end of an interval of width <= 2 * eps_error (0.01) around the truth
    exact = exact_gaussian_epsilon(gaussian_mu(phases), DELTA)
    eps = compute_epsilon([Phase(s, 1.0, t) for s, t in phases], DELTA, "prv")
    assert exact - 1e-6 <= eps <= exact + 0.02


def test_heterogeneous_gaussian_composes_to_one_equivalent_gaussian():
    # Prepare: 3 steps at sigma 0.9 then 40 at sigma 3 is exactly one Gaussian with this sigma
    parts = [Phase(0.9, 1.0, 3), Phase(3.0, 1.0, 40)]
    sigma_eq = 1 / gaussian_mu([(0.9, 3), (3.0, 40)])
    # Execute
    rdp_parts = compute_epsilon(parts, DELTA, "rdp")
    rdp_whole = compute_epsilon([Phase(sigma_eq, 1.0, 1)], DELTA, "rdp")
    # Assert
    assert rdp_parts == pytest.approx(rdp_whole, rel=1e-9)


# -- heterogeneous composition -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rdp", "prv", "pld", "gdp"])
def test_split_phase_equals_whole(name):
    whole = compute_epsilon([Phase(1.1, 0.02, 1000)], DELTA, name)
    split = compute_epsilon(
        [Phase(1.1, 0.02, 400), Phase(1.1, 0.02, 0), Phase(1.1, 0.02, 600)], DELTA, name
    )
    assert split == whole


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_composition_is_order_free_and_exceeds_each_part(name):
    a, b = Phase(1.0, 0.01, 500), Phase(2.0, 0.05, 300)
    ab = compute_epsilon([a, b], DELTA, name)
    ba = compute_epsilon([b, a], DELTA, name)
    assert ab == pytest.approx(ba, rel=1e-9 if name == "rdp" else 1e-3)
    assert ab > max(compute_epsilon([a], DELTA, name), compute_epsilon([b], DELTA, name))


def test_gdp_refuses_heterogeneous_history():
    with pytest.raises(AccountantError, match="single"):
        compute_epsilon([Phase(1.0, 0.01, 5), Phase(2.0, 0.01, 5)], DELTA, "gdp")


# -- order between accountants, monotonicity -----------------------------------------------------
@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("steps", [100, 1000])
def test_prv_is_tighter_than_rdp(sigma, q, steps):
    phases = [Phase(sigma, q, steps)]
    assert compute_epsilon(phases, DELTA, "prv") <= compute_epsilon(phases, DELTA, "rdp")


@pytest.mark.parametrize("name", ["rdp", "prv", "pld", "gdp"])
def test_monotone_in_steps_and_noise(name):
    e = lambda s, t: compute_epsilon([Phase(s, 0.01, t)], DELTA, name)  # noqa: E731
    assert e(1.0, 100) < e(1.0, 1000) < e(1.0, 5000)
    assert e(0.8, 1000) > e(1.0, 1000) > e(2.0, 1000)


# -- edge cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rdp", "prv", "pld", "gdp"])
def test_no_releases_spend_nothing(name):
    assert compute_epsilon([], DELTA, name) == 0.0
    assert compute_epsilon([Phase(1.0, 0.1, 0)], DELTA, name) == 0.0


@pytest.mark.parametrize("name", ["rdp", "prv", "pld", "gdp"])
def test_zero_noise_is_infinite_epsilon(name):
    assert compute_epsilon([Phase(1.0, 0.1, 10), Phase(0.0, 0.1, 1)], DELTA, name) == math.inf


def test_epsilon_is_never_negative_at_large_delta():
    assert compute_epsilon([Phase(50.0, 0.001, 1)], 0.9, "rdp") >= 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan")])
def test_invalid_delta(delta):
    with pytest.raises(ConfigError, match="delta"):
        compute_epsilon([Phase(1.0, 0.1, 10)], delta, "rdp")


def test_unknown_accountant_lists_valid_names():
    with pytest.raises(ConfigError, match="gdp, pld, prv, rdp"):
        compute_epsilon([], DELTA, "moments")


@pytest.mark.parametrize(
    "args,match",
    [
        ((-1.0, 0.1, 1), "noise multiplier"),
        ((float("nan"), 0.1, 1), "noise multiplier"),
        ((float("inf"), 0.1, 1), "noise multiplier"),
        ((1.0, 0.0, 1), "sample rate"),
        ((1.0, 1.5, 1), "sample rate"),
        ((1.0, 0.1, -1), "steps"),
        ((1.0, 0.1, 1.5), "steps"),
        ((1.0, 0.1, True), "steps"),
    ],
)
def test_invalid_phase(args, match):
    with pytest.raises(ConfigError, match=match):
        Phase(*args)
