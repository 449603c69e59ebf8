"""The pld accountant against dp_accounting used directly at a finer discretization, and against
the Gaussian mechanism's closed form (q = 1)."""

import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as library_pld

from dpfl.accountants import Phase, PrivacyLedger, compute_epsilon, create_opacus_accountant
from dpfl.accountants.pld import single_release_pld
from tests.reference import (
    dp_accounting_pld_epsilon,
    exact_gaussian_epsilon,
    gaussian_mu,
)

DELTA = 1e-5

# (phases, reference interval): epsilon 0.0002 .. 550, q 1e-3 .. 0.5, 1 .. 1e5 steps. The
# reference interval is ~1/4 of dpfl's (error ~1/16 of dpfl's; much finer intervals are not
# better: below ~1e-6 the library's own rounding noise grows again).
GRID = [
    ([(57.0, 0.256, 1000)], 1.2e-4),  # prv: 0.510 here
    ([(1.0, 0.01, 10_000)], 3.5e-4),
    ([(0.8, 0.5, 100)], 3.3e-3),  # epsilon ~58
    ([(1.0, 1e-3, 100_000)], 3.6e-5),
    ([(20.0, 1e-3, 100_000)], 1.1e-6),  # epsilon ~0.045
    ([(2.0, 0.5, 1)], 1.1e-2),
    ([(0.7, 0.5, 20)], 7.8e-3),
    ([(40.0, 0.5, 1)], 2.9e-4),
    ([(8.0, 0.01, 1000)], 3.1e-5),
    ([(3.0, 0.5, 1000)], 1.2e-3),
    ([(0.45, 0.01, 100_000)], 1.2e-3),  # epsilon ~350: beyond the supported range, still tight
    ([(1.0, 0.01, 500), (2.0, 0.05, 300), (0.8, 1e-3, 20_000)], 1.5e-4),
    ([(4.0, 0.2, 50), (1.5, 0.02, 2000)], 5.8e-4),
]


@pytest.mark.parametrize("phases,interval", GRID, ids=[str(g[0]) for g in GRID])
def test_within_half_a_percent_above_a_fine_dp_accounting_reference(phases, interval):
    # Prepare
    reference = dp_accounting_pld_epsilon(phases, DELTA, interval)
    # Execute
    eps = compute_epsilon([Phase(*p) for p in phases], DELTA, "pld")
    # Assert: an upper bound (never below the finer pessimistic estimate), and tight
    assert reference <= eps <= reference * 1.005


@pytest.mark.parametrize(
    "phases", [[(1.0, 1)], [(5.0, 1)], [(20.0, 1)], [(2.0, 10)], [(0.9, 3), (3.0, 40)]]
)
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_gaussian_closed_form_is_a_tight_lower_bound(phases, delta):
    # q = 1: T Gaussian releases are one Gaussian mechanism with known exact epsilon
    exact = exact_gaussian_epsilon(gaussian_mu(phases), delta)
    eps = compute_epsilon([Phase(s, 1.0, t) for s, t in phases], delta, "pld")
    assert exact <= eps <= exact * 1.005


def test_delta_is_used():
    # Prepare: one Gaussian release, epsilon at two deltas from the closed form
    mu = gaussian_mu([(2.0, 10)])
    phases = [Phase(2.0, 1.0, 10)]
    for delta in (1e-3, 1e-7):
        exact = exact_gaussian_epsilon(mu, delta)
        # Execute / Assert
        assert exact <= compute_epsilon(phases, delta, "pld") <= exact * 1.005


def test_single_release_distribution_is_the_librarys_own():
    # dpfl evaluates the hockey-stick curve on the whole grid at once; the discretized
    # distribution must be the one dp_accounting's from_gaussian_mechanism builds
    for sigma, q, d in [(1.0, 0.01, 1e-3), (57.0, 0.256, 1e-4), (0.8, 0.5, 1e-2), (2.0, 1.0, 1e-3)]:
        ours = single_release_pld(sigma, q, d)
        theirs = library_pld.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=d
        )
        for a, b in [(ours._pmf_remove, theirs._pmf_remove), (ours._pmf_add, theirs._pmf_add)]:
            a, b = a.to_dense_pmf(), b.to_dense_pmf()
            assert a._lower_loss == b._lower_loss and a._probs.size == b._probs.size
            np.testing.assert_allclose(a._probs, b._probs, rtol=0, atol=1e-10)
            assert a._infinity_mass == pytest.approx(b._infinity_mass, rel=1e-9, abs=1e-30)
        assert ours.get_epsilon_for_delta(DELTA) == pytest.approx(
            theirs.get_epsilon_for_delta(DELTA), rel=1e-9
        )


def test_tighter_than_rdp_and_prv_where_they_are_loose():
    phases = [Phase(57.0, 0.256, 1000)]
    pld = compute_epsilon(phases, DELTA, "pld")
    assert pld < compute_epsilon(phases, DELTA, "prv") < compute_epsilon(phases, DELTA, "rdp")


def test_composition_is_order_free_and_grouped_phases_are_exact():
    a, b = Phase(1.0, 0.01, 500), Phase(2.0, 0.05, 300)
    ab = compute_epsilon([a, b], DELTA, "pld")
    assert ab == pytest.approx(compute_epsilon([b, a], DELTA, "pld"), rel=1e-9)
    # a, b, a is a + a + b: equal (sigma, q) phases anywhere in the history compose as one
    aba = compute_epsilon([a, b, a], DELTA, "pld")
    assert aba > ab
    assert aba == pytest.approx(
        compute_epsilon([Phase(1.0, 0.01, 1000), b], DELTA, "pld"), rel=1e-9
    )


@pytest.mark.parametrize("steps", [1, 10, 100, 1000])
def test_monotone_in_steps_and_noise(steps):
    e = lambda s, t: compute_epsilon([Phase(s, 0.01, t)], DELTA, "pld")  # noqa: E731
    assert e(1.0, steps) < e(1.0, steps + 1) and e(1.0, steps) < e(1.0, 2 * steps)
    assert e(0.8, steps) > e(1.0, steps) > e(2.0, steps)


def test_edge_cases():
    assert compute_epsilon([], DELTA, "pld") == 0.0
    assert compute_epsilon([Phase(1.0, 0.1, 0)], DELTA, "pld") == 0.0
    assert compute_epsilon([Phase(1.0, 0.1, 10), Phase(0.0, 0.1, 1)], DELTA, "pld") == math.inf


def test_opacus_style_accountant_steps_like_compute_epsilon():
    acc = create_opacus_accountant("pld")
    for _ in range(30):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    acc.step(noise_multiplier=2.0, sample_rate=0.05)
    assert len(acc) == 31 and acc.mechanism() == "pld"
    expected = compute_epsilon([Phase(1.0, 0.05, 30), Phase(2.0, 0.05, 1)], DELTA, "pld")
    assert acc.get_epsilon(DELTA) == expected


def test_a_budget_can_be_enforced_with_pld():
    ledger = PrivacyLedger("pld", DELTA, target_epsilon=1.0)
    ledger.record("central", 2.0, 0.02, 100)
    assert ledger.epsilon("central") == compute_epsilon([Phase(2.0, 0.02, 100)], DELTA, "pld")
