"""The prv accountant: its grid is sized before any work (refused when too large, whatever the
number of phases), and large grids are widened to a fast FFT length without changing results."""

import time

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from dpfl.accountants import Phase, compute_epsilon
from dpfl.accountants.prv import (
    FAST_FFT_FROM,
    MAX_PRV_POINTS,
    PRVGridTooLarge,
    _widened,
    fast_length,
    prv_grid_points,
)

DELTA = 1e-5


def _smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def _opacus_domain(history, delta=DELTA):
    prvs = [PoissonSubsampledGaussianPRV(p.sample_rate, p.noise_multiplier) for p in history]
    return PRVAccountant()._get_domain(
        prvs=prvs,
        num_self_compositions=[p.steps for p in history],
        eps_error=0.01,
        delta_error=delta / 1000,
    )


def test_fast_length_is_the_next_even_5_smooth_number():
    for n in [*range(1, 2000), 7_528_004, 22_388_542]:
        m = fast_length(n)
        assert m >= n and m % 2 == 0 and _smooth(m)
        if n < 2000:  # brute force
            assert m == next(k for k in range(n, 4 * n + 4) if k % 2 == 0 and _smooth(k))
    assert fast_length(7_528_004) == 7_558_272  # 2**7 * 3**10; 7,528,004 = 44 * 171,091


def test_widened_grid_keeps_opacus_layout_and_mesh():
    # Opacus' FFT composition assumes t_min = -(size/2 - 1) dt and t_max = (size/2) dt
    domain = _opacus_domain([Phase(1.0, 0.01, 15_000)])
    wide = _widened(domain)
    assert wide.size == fast_length(domain.size) > domain.size
    assert wide.dt == pytest.approx(domain.dt, rel=1e-12)
    assert wide.t_min / wide.dt == pytest.approx(-(wide.size / 2 - 1), abs=1e-6)
    assert wide.t_max / wide.dt == pytest.approx(wide.size / 2, abs=1e-6)
    assert wide.t_min <= domain.t_min and wide.t_max >= domain.t_max


def test_widened_grid_gives_opacus_epsilon():
    # Prepare: a grid above FAST_FFT_FROM (1.1e6 points, Opacus' own length 1,107,334)
    history = [Phase(1.0, 0.01, 15_000)]
    assert _opacus_domain(history).size >= FAST_FFT_FROM
    reference = PRVAccountant()
    reference.history = [p.as_tuple() for p in history]
    # Execute
    eps = compute_epsilon(history, DELTA, "prv")
    # Assert: the same upper bound up to the discretization's rounding
    assert eps == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-6)


def test_grid_points_are_opacus_grid_below_the_widening():
    history = [Phase(1.5, 0.04, 2250)]
    assert prv_grid_points(history, DELTA) == _opacus_domain(history).size < FAST_FFT_FROM


def test_grid_is_refused_from_its_true_size_before_any_work():
    # Prepare: an RDP estimate of the grid said 1.6e7 points (allowed); Opacus' grid is 2.2e7
    history = [Phase(0.6, 0.001, 1_000_000)]
    assert prv_grid_points(history, DELTA) > MAX_PRV_POINTS
    # Execute
    start = time.perf_counter()
    with pytest.raises(PRVGridTooLarge, match=r"use pld \(tighter\) or rdp") as info:
        compute_epsilon(history, DELTA, "prv")
    # Assert: refused in milliseconds, not after a minute of composing
    assert time.perf_counter() - start < 5
    assert "sigma=0.6, q=0.001, steps=1000000" in str(info.value)


def test_each_phase_counts_towards_the_grid():
    # Prepare: three phases of ~7.5e6 points each (every phase keeps its own discretized copy)
    history = [Phase(s, 0.01, 33_334) for s in (0.99, 1.0, 1.01)]
    per_phase = _opacus_domain(history).size
    assert per_phase < MAX_PRV_POINTS < 3 * per_phase
    # Execute / Assert
    start = time.perf_counter()
    with pytest.raises(PRVGridTooLarge, match="per phase x 3 phases"):
        compute_epsilon(history, DELTA, "prv")
    assert time.perf_counter() - start < 5
