"""Range checks shared by the config, the accountants and the CLI.

Each check takes the value and the name the user knows it by (``privacy.delta``, ``--delta``) and
raises :class:`~dpfl.errors.ConfigError` naming both the value and the allowed range. NaN fails
every check (comparisons with NaN are false, and each check is written so that false means bad).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dpfl.errors import ConfigError

__all__ = [
    "Check",
    "at_least",
    "at_most",
    "in_range",
    "check_delta",
    "check_epsilon",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "in_unit_interval_closed_open",
    "non_negative",
    "positive",
]

Check = Callable[[str, object], None]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _describe(text: str):
    """Attaches the human-readable range a check enforces (``dpfl config show`` lists it)."""

    def mark(check):
        check.describe = text
        return check

    return mark


@_describe("> 0")
def positive(name: str, value: object) -> None:
    """value > 0 and finite."""
    v = _number(name, value)
    if not (0 < v < math.inf):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


@_describe(">= 0")
def non_negative(name: str, value: object) -> None:
    """value >= 0 and finite."""
    v = _number(name, value)
    if not (0 <= v < math.inf):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@_describe("[0, 1)")
def in_unit_interval_closed_open(name: str, value: object) -> None:
    """0 <= value < 1 (momentum, dropout)."""
    v = _number(name, value)
    if not (0 <= v < 1):
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def at_least(minimum: int) -> Check:
    """An integer check: value >= minimum."""

    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")

    return _describe(f"integer >= {minimum}")(check)


def at_most(maximum: int) -> Check:
    """An integer check: 1 <= value <= maximum (lengths: a longer run would never finish)."""

    def check(name: str, value: object) -> None:
        at_least(1)(name, value)
        if value > maximum:  # type: ignore[operator]
            raise ConfigError(f"{name} must be an integer in [1, {maximum:g}], got {value!r}")

    return _describe(f"integer in [1, {maximum:g}]")(check)


def in_range(low: float, high: float, *, low_open: bool = True) -> Check:
    """A number in (low, high] (or [low, high] with ``low_open=False``)."""

    def check(name: str, value: object) -> None:
        v = _number(name, value)
        ok = (low < v if low_open else low <= v) and v <= high
        if not ok:
            bracket = "(" if low_open else "["
            raise ConfigError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")

    return _describe(f"{'(' if low_open else '['}{low:g}, {high:g}]")(check)


@_describe("> 0")
def check_epsilon(name: str, value: object) -> None:
    """A target epsilon: finite and > 0."""
    positive(name, value)


@_describe("(0, 1)")
def check_delta(name: str, value: object) -> None:
    """A delta: 0 < delta < 1."""
    v = _number(name, value)
    if not (0 < v < 1):
        raise ConfigError(f"{name} must be in (0, 1), got {value!r}")


@_describe("(0, 1]")
def check_sample_rate(name: str, value: object) -> None:
    """A sampling probability: 0 < q <= 1."""
    v = _number(name, value)
    if not (0 < v <= 1):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")


@_describe(">= 0 (0: no privacy)")
def check_noise_multiplier(name: str, value: object) -> None:
    """A noise multiplier: finite and >= 0 (0 means no privacy: epsilon is infinite)."""
    non_negative(name, value)


def check_steps(name: str, value: object) -> None:
    """A number of steps: integer >= 1."""
    at_least(1)(name, value)
