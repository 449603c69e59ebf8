"""Phases of a privacy history: runs of identical noisy releases.

A phase ``(noise_multiplier, sample_rate, steps)`` stands for ``steps`` releases of the Poisson
subsampled Gaussian mechanism (records included independently with probability ``sample_rate``,
sum of clipped contributions plus Gaussian noise of std ``noise_multiplier * clip_norm``). This is
the unit of Opacus' accountant histories, so a history of phases composes heterogeneous training
(changing noise, changing sampling rates) exactly as Opacus does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dpfl.errors import ConfigError
from dpfl.validation import check_noise_multiplier, check_sample_rate, positive

__all__ = [
    "MAX_STEPS",
    "Phase",
    "check_step_count",
    "merge_phases",
    "phases_from_records",
    "steps_for_epochs",
]

#: Most releases a history given by a user may hold (``--steps``, epochs / sample rate, a phases
#: file, a calibration). Far beyond any training run (1e5-1e6 steps); rdp answers at any count,
#: but pld needs ~10 s at 1e8 steps and a minute at 1e9, prv refuses long before, and gdp's root
#: finding gives up at the epsilon such counts reach.
MAX_STEPS = 100_000_000


def check_step_count(name: str, value: object) -> None:
    """A number of steps given by a user: an integer in [1, MAX_STEPS]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 1 <= value <= MAX_STEPS:
        raise ConfigError(f"{name} must be an integer in [1, {MAX_STEPS:.0e}], got {value!r}")


@dataclass(frozen=True)
class Phase:
    """``steps`` releases of the Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: noise std divided by the clip norm (>= 0; 0 means no privacy).
        sample_rate: Poisson sampling probability q, in (0, 1].
        steps: number of releases (>= 0; a phase of 0 steps spends nothing).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        check_noise_multiplier("noise multiplier", self.noise_multiplier)
        check_sample_rate("sample rate", self.sample_rate)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {self.steps!r}")
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))

    def as_tuple(self) -> tuple[float, float, int]:
        """The Opacus history entry ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of steps in ``epochs`` expected passes at sampling rate ``sample_rate``.

    ``epochs / sample_rate`` is rounded to the nearest integer when it is one up to floating-point
    error (90 epochs at q = 0.04 is 2250 steps, as in Opacus' tests), and rounded *up* otherwise:
    more steps never understate the privacy spent.

    Raises:
        ConfigError: ``epochs`` or ``sample_rate`` out of range, or more than :data:`MAX_STEPS`
            steps.
    """
    positive("epochs", epochs)
    check_sample_rate("sample rate", sample_rate)
    exact = epochs / sample_rate
    if not exact <= MAX_STEPS:
        raise ConfigError(
            f"{epochs:g} epochs at sample rate {sample_rate:g} is {exact:.3g} steps "
            f"(epochs / sample rate); at most {MAX_STEPS:.0e}"
        )
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return max(1, int(nearest))
    return max(1, math.ceil(exact))


def merge_phases(phases: Iterable[Phase]) -> list[Phase]:
    """Drops empty phases and merges neighbours with equal parameters (same composition)."""
    merged: list[Phase] = []
    for p in phases:
        if p.steps == 0:
            continue
        last = merged[-1] if merged else None
        if last and (last.noise_multiplier, last.sample_rate) == (
            p.noise_multiplier,
            p.sample_rate,
        ):
            merged[-1] = Phase(p.noise_multiplier, p.sample_rate, last.steps + p.steps)
        else:
            merged.append(p)
    return merged


_PHASE_KEYS = {
    "noise-multiplier": "noise_multiplier",
    "noise_multiplier": "noise_multiplier",
    "sigma": "noise_multiplier",
    "sample-rate": "sample_rate",
    "sample_rate": "sample_rate",
    "steps": "steps",
    "epochs": "epochs",
}


def phases_from_records(records: Iterable[Mapping[str, Any]]) -> list[Phase]:
    """Builds phases from mappings with keys noise-multiplier (or sigma), sample-rate and steps
    (or epochs), at most :data:`MAX_STEPS` steps in all. Used for ``--phases`` files (TOML
    ``[[phases]]`` tables or a JSON list)."""
    phases = []
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, Mapping):
            raise ConfigError(f"phase {i} must be a table/object, got {rec!r}")
        kw: dict[str, Any] = {}
        for key, value in rec.items():
            if key not in _PHASE_KEYS:
                raise ConfigError(
                    f"phase {i}: unknown key {key!r}; valid: noise-multiplier, sample-rate, "
                    "steps, epochs"
                )
            kw[_PHASE_KEYS[key]] = value
        missing = [k for k in ("noise_multiplier", "sample_rate") if k not in kw]
        if missing or ("steps" in kw) == ("epochs" in kw):
            raise ConfigError(
                f"phase {i} needs noise-multiplier, sample-rate and one of steps or epochs"
            )
        try:
            if "epochs" in kw:
                kw["steps"] = steps_for_epochs(kw.pop("epochs"), kw["sample_rate"])
            steps = kw["steps"]
            if isinstance(steps, int) and not isinstance(steps, bool) and steps > MAX_STEPS:
                raise ConfigError(f"steps must be at most {MAX_STEPS:.0e}, got {_count(steps)}")
            phases.append(Phase(**kw))
        except ConfigError as e:
            raise ConfigError(f"phase {i}: {e}") from None
    total = sum(p.steps for p in phases)
    if total > MAX_STEPS:
        raise ConfigError(f"the phases hold {_count(total)} steps in all; at most {MAX_STEPS:.0e}")
    return phases


def _count(n: int) -> str:
    """A (possibly huge) integer, short: 123456789 -> '1.23e+08'."""
    return f"{n:.3g}" if n < 10**300 else f"about 1e{len(str(n)) - 1}"
