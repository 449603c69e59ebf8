"""Noise calibration: the smallest noise multiplier whose epsilon stays within a target.

Written here rather than taken from ``opacus.accountants.utils.get_noise_multiplier`` because
dpfl needs two things it lacks: calibrating the *next* phase of a run that has already spent
privacy (``prior`` phases, e.g. a client resuming, or the rest of a budget), and a guarantee
checked on the returned value rather than on the search bracket. The epsilon of every candidate
is still computed by Opacus (:func:`~dpfl.accountants.epsilon.compute_epsilon`), always with a
fresh accountant, never a live one.

Guarantee: the returned ``epsilon`` is the accountant's epsilon for ``prior + [phase]`` at the
returned noise multiplier, and it is <= ``target_epsilon``. The search stops once the returned
epsilon is within ``epsilon_tolerance`` of the target (or the bracket is narrower than 1e-6
relative), so the noise is at most slightly larger than necessary, never smaller.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from dpfl.accountants.epsilon import compute_epsilon
from dpfl.accountants.phases import Phase
from dpfl.errors import PrivacyBudgetError
from dpfl.validation import check_epsilon, check_sample_rate, check_steps

__all__ = ["Calibration", "calibrate_noise"]

MAX_NOISE_MULTIPLIER = 1e6


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibrate_noise`."""

    noise_multiplier: float
    epsilon: float
    accountant: str
    evaluations: int


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    *,
    prior: Sequence[Phase] = (),
    epsilon_tolerance: float = 0.01,
) -> Calibration:
    """Finds the noise multiplier for ``steps`` releases at ``sample_rate`` so that the whole
    history ``prior + [phase]`` spends at most ``target_epsilon`` at ``delta``.

    Raises:
        PrivacyBudgetError: ``prior`` alone already exceeds the target, or even a noise
            multiplier of 1e6 does not meet it.
        ConfigError: an argument is out of range.
    """
    check_epsilon("target epsilon", target_epsilon)
    check_sample_rate("sample rate", sample_rate)
    check_steps("steps", steps)
    check_epsilon("epsilon tolerance", epsilon_tolerance)
    prior = list(prior)
    evaluations = 0

    def eps(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        with warnings.catch_warnings():
            # Opacus warns when a candidate's optimal RDP order is at the edge of its range;
            # candidates far from the answer often are; it says nothing about the result.
            warnings.filterwarnings(
                "ignore", message="Optimal order is the (largest|smallest) alpha"
            )
            return compute_epsilon([*prior, Phase(sigma, sample_rate, steps)], delta, accountant)

    if prior:
        spent = compute_epsilon(prior, delta, accountant)
        if spent >= target_epsilon:
            raise PrivacyBudgetError(
                f"the prior history already spends epsilon {spent:.4g} >= target {target_epsilon:g}"
            )

    # Bracket: eps(lo) > target >= eps(hi). eps decreases in sigma and is inf at sigma = 0.
    hi, eps_hi = 1.0, eps(1.0)
    while eps_hi > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(
                f"target epsilon {target_epsilon:g} at delta {delta:g} cannot be met with a noise "
                f"multiplier <= {MAX_NOISE_MULTIPLIER:g} ({steps} steps at q={sample_rate:g})"
            )
        hi, eps_hi = hi * 2, eps(hi * 2)
    lo = hi / 2
    while eps(lo) <= target_epsilon and lo > 1e-6:
        hi, eps_hi = lo, eps(lo)
        lo /= 2

    while target_epsilon - eps_hi > epsilon_tolerance and (hi - lo) > 1e-6 * hi:
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return Calibration(hi, eps_hi, accountant, evaluations)
