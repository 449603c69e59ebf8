"""Each solver's default learning rate, with and without DP (no torch import: the CLI and
``dpfl config show`` read it).

Measured, not guessed: ``benchmarks/default_lr.py`` sweeps each solver over a log grid of learning
rates on the embedded default (digits, the small CNN, 5 epochs, seed 0) and we keep the best
grid point, rounded down to the next grid point below when the best sits at the edge of
divergence (a default should not be the fastest rate that still works, but one that works with a
margin). DP: flat clipping C = 1, noise multiplier 1.0, batch 128 (what ``dpfl train`` does);
plain: the same without clipping and noise. Our choice; the figures are in the README.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LR", "default_lr"]

#: name -> (learning rate under DP-SGD, learning rate without DP)
DEFAULT_LR: dict[str, tuple[float, float]] = {
    "sgd": (0.5, 0.1),
    "adam": (0.01, 0.003),
    "adamw": (0.01, 0.003),
    "sgd-sai": (0.5, 0.1),
    "scale": (0.003, 0.003),
    "swan": (0.01, 0.01),
    "sinkgd": (0.01, 0.01),
    "frugal": (0.01, 0.003),
    "conda": (0.01, 0.003),
    "muon": (0.1, 0.03),
    "auon": (0.1, 0.03),
    "hybrid-auon": (0.1, 0.03),
    "drop-muon": (0.1, 0.03),
    "lion": (0.001, 0.001),
    "adan": (0.01, 0.003),
    "adabelief": (0.01, 0.003),
    "adamp": (0.01, 0.003),
    "diffgrad": (0.01, 0.003),
}


def default_lr(name: str, *, private: bool) -> float:
    """The default learning rate of solver ``name`` (DP-SGD when ``private``)."""
    try:
        dp, plain = DEFAULT_LR[name.lower()]
    except KeyError:
        from dpfl.errors import ConfigError

        raise ConfigError(
            f"unknown optimizer {name!r}; valid: {', '.join(sorted(DEFAULT_LR))}"
        ) from None
    return dp if private else plain
