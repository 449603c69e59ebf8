"""Noise calibration: the smallest noise multiplier whose epsilon stays within a target.

Written here rather than taken from ``opacus.accountants.utils.get_noise_multiplier`` because
dpfl needs three things it lacks: calibrating the *next* phase of a run that has already spent
privacy (``prior`` phases, e.g. a client resuming, or the rest of a budget), a guarantee checked
on the returned value rather than on the search bracket, and a tolerance relative to the answer
(Opacus stops at an absolute 0.01 in epsilon: 20 % of a target of 0.05). The epsilon of every
candidate is computed by :func:`~dpfl.accountants.epsilon.compute_epsilon`, always with a fresh
accountant, never a live one.

Guarantee: the returned ``epsilon`` is the accountant's epsilon for ``prior + [phase]`` at the
returned noise multiplier, and it is <= ``target_epsilon``; and a noise multiplier smaller by the
factor ``1 + rel_tol`` was evaluated and exceeds the target, so the returned one is within
``rel_tol`` (default 0.1 %) of the smallest that meets the target. (A stopping rule on epsilon
alone cannot promise this: with a large prior spend, epsilon barely moves with the new phase's
noise.)

Search (our choice): epsilon is close to a power law in sigma, so the root of
``log eps(sigma) = log target`` is found by secant steps in (log sigma, log eps), kept inside a
bracket [lo, hi] with eps(lo) > target >= eps(hi) and falling back to bisection in log sigma when
a step does not halve the bracket. Each secant estimate is nudged by a quarter of the tolerance
toward the side of the bracket that has not moved, so both ends close on the root and the
bracket usually meets the tolerance after 4-7 evaluations. ``rdp``, ``pld`` and ``prv``
(0.01-1 s per evaluation) start from the answer, at 1 % tolerance, of integer-order RDP
(:func:`~dpfl.accountants.rdp.integer_rdp_epsilon`, milliseconds per evaluation; within ~15 % of
theirs) and from its slope, and then need 3-5 evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dpfl.accountants.epsilon import EpsilonAboveRange, compute_epsilon
from dpfl.accountants.phases import Phase, check_step_count
from dpfl.accountants.rdp import integer_rdp_epsilon
from dpfl.errors import AccountantError, ConfigError, PrivacyBudgetError
from dpfl.validation import check_epsilon, check_sample_rate

__all__ = [
    "MAX_REL_TOL",
    "MIN_REL_TOL",
    "Calibration",
    "calibrate_noise",
    "check_rel_tol",
]

MAX_NOISE_MULTIPLIER = 1e6
MIN_NOISE_MULTIPLIER = 1e-6
#: Range of the relative tolerance. Above 0.5 the answer could be 1.5x the smallest noise that
#: meets the target (no longer a calibration); below 1e-6 the accountants' own numerical error
#: (PRV, PLD discretization) exceeds what the search resolves, and the evaluations only add up.
MIN_REL_TOL, MAX_REL_TOL = 1e-6, 0.5
_MAX_EVALUATIONS = 200


def check_rel_tol(name: str, value: object) -> None:
    """A relative tolerance on the noise multiplier: a number in [MIN_REL_TOL, MAX_REL_TOL]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not MIN_REL_TOL <= value <= MAX_REL_TOL:
        raise ConfigError(
            f"{name} must be in [{MIN_REL_TOL:g}, {MAX_REL_TOL:g}] (relative to the noise "
            f"multiplier; 0.001 = 0.1 %), got {value!r}"
        )


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
    rel_tol: float = 1e-3,
) -> Calibration:
    """Finds the noise multiplier for ``steps`` releases at ``sample_rate`` so that the whole
    history ``prior + [phase]`` spends at most ``target_epsilon`` at ``delta``.

    Args:
        steps: releases in the new phase, in [1, MAX_STEPS].
        rel_tol: the returned noise multiplier is at most ``1 + rel_tol`` times the smallest one
            that meets the target, in [MIN_REL_TOL, MAX_REL_TOL] = [1e-6, 0.5].

    Raises:
        PrivacyBudgetError: ``prior`` alone already exceeds the target, or even a noise
            multiplier of 1e6 does not meet it.
        ConfigError: an argument is out of range.
    """
    check_epsilon("target epsilon", target_epsilon)
    check_sample_rate("sample rate", sample_rate)
    check_step_count("steps", steps)
    check_rel_tol("relative tolerance", rel_tol)
    prior = list(prior)
    compute_epsilon([], delta, accountant)  # validates delta and the accountant's name
    if prior:
        spent = compute_epsilon(prior, delta, accountant)
        if spent >= target_epsilon:
            raise PrivacyBudgetError(
                f"the prior history already spends epsilon {spent:.4g} >= target {target_epsilon:g}"
            )

    evaluations = 0

    def eps(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        try:
            return compute_epsilon([*prior, Phase(sigma, sample_rate, steps)], delta, accountant)
        except EpsilonAboveRange as e:
            if target_epsilon <= e.bound:  # above the bound, so above the target: too little noise
                return math.inf
            raise

    start, slope = 1.0, None
    if accountant in ("rdp", "pld", "prv"):
        seed, seed_slope = _seed(target_epsilon, delta, sample_rate, steps, prior)
        if seed is not None:
            start, slope = seed, seed_slope
    sigma, epsilon, _ = _search(eps, target_epsilon, start, math.log1p(rel_tol), slope)
    if sigma is None:
        raise PrivacyBudgetError(
            f"target epsilon {target_epsilon:g} at delta {delta:g} cannot be met with a noise "
            f"multiplier <= {MAX_NOISE_MULTIPLIER:g} ({steps} steps at q={sample_rate:g})"
        )
    return Calibration(sigma, epsilon, accountant, evaluations)


def _seed(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, prior: list[Phase]
) -> tuple[float | None, float]:
    # integer-order RDP (milliseconds), within ~15 % of rdp, pld and prv and close to rdp
    def seed_eps(sigma: float) -> float:
        return integer_rdp_epsilon([*prior, Phase(sigma, sample_rate, steps)], delta)

    seed, _, seed_slope = _search(seed_eps, target_epsilon, 1.0, math.log1p(1e-2))
    return seed, seed_slope


def _search(
    eps: Callable[[float], float],
    target: float,
    start: float,
    tol: float,
    slope: float | None = None,
) -> tuple[float | None, float, float]:
    """(sigma, eps(sigma), slope) with eps(sigma) <= target and some sigma' >= sigma / e**tol
    evaluated with eps(sigma') > target (or sigma at MIN_NOISE_MULTIPLIER); sigma None if even
    MAX_NOISE_MULTIPLIER exceeds the target. ``slope`` (in and out): d log eps / d log sigma.

    Works on points (s, g) = (log sigma, log eps - log target): g > 0 above the target.
    """
    log_target = math.log(target)
    s_min, s_max = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)
    lo: tuple[float, float] | None = None  # largest s seen with g > 0
    hi: tuple[float, float, float] | None = None  # smallest s seen with g <= 0, and its eps
    previous: tuple[float, float] | None = None
    last_root: float | None = None
    widths: list[float] = []
    s = min(max(math.log(start), s_min), s_max)
    for _ in range(_MAX_EVALUATIONS):
        value = eps(math.exp(s))
        gs = math.log(value) - log_target if value > 0 else -math.inf
        if gs > 0:
            if lo is None or s > lo[0]:
                lo = (s, gs)
        elif hi is None or s < hi[0]:
            hi = (s, gs, value)
        if hi is not None and (hi[0] <= s_min or (lo is not None and hi[0] - lo[0] <= tol)):
            if lo is not None and math.isfinite(lo[1] - hi[1]) and hi[0] > lo[0]:
                slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
            return math.exp(hi[0]), hi[2], slope if slope is not None else -1.0
        if lo is not None and lo[0] >= s_max:
            return None, math.inf, -1.0

        if lo is None or hi is None:  # one side only: Newton step in log-log, at most x16
            if not math.isfinite(gs):
                step = math.copysign(math.log(16), gs)
            else:
                step = -gs / _slope(previous, (s, gs), slope)
                step += math.copysign(max(0.05 * abs(step), tol), step)  # aim past the target
                step = min(max(step, -math.log(16)), math.log(16))
            previous = (s, gs)
            s = min(max(s + step, s_min), s_max)
            continue

        widths.append(hi[0] - lo[0])
        stalled = len(widths) >= 3 and widths[-1] > 0.5 * widths[-3]
        if stalled or not math.isfinite(lo[1] - hi[1]):
            s, last_root = (lo[0] + hi[0]) / 2, None
            continue
        root = lo[0] + lo[1] * (hi[0] - lo[0]) / (lo[1] - hi[1])
        # aim just past the root, on the side that did not just move, by the last correction
        nudge = max(0.5 * tol, abs(root - last_root) if last_root is not None else 0.0)
        last_root = root
        s = root + (nudge if gs > 0 else -nudge)
        s = min(max(s, lo[0] + 0.1 * tol), hi[0] - 0.1 * tol)
    raise AccountantError("noise calibration did not converge")


def _slope(a: tuple[float, float] | None, b: tuple[float, float], guess: float | None) -> float:
    """d g / d s from two points, kept in [-8, -0.25] (epsilon falls with sigma, roughly as
    sigma**-1 to sigma**-2); ``guess`` (or -1) without a usable first point."""
    if a is None or a[0] == b[0] or not math.isfinite(a[1]):
        value = guess if guess is not None else -1.0
    else:
        value = (b[1] - a[1]) / (b[0] - a[0])
    return min(max(value, -8.0), -0.25)
