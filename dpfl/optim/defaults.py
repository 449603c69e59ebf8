"""Each solver's default learning rate, with and without DP (no torch import: the CLI and
``dpfl config show`` read it).

Measured, not guessed: ``benchmarks/default_lr.py`` sweeps each solver over a log grid of learning
rates (3e-4 .. 2) on the embedded default (digits, the small CNN, 5 epochs, seed 0) and we keep
the grid point of best held-out accuracy, or the one below it when the next larger rate already
fails (accuracy < 0.5: a default should work with a margin, not sit at the edge of divergence).
DP: flat clipping C = 1, noise multiplier 1.0, batch 128 (``dpfl train``'s defaults); plain: the
same without clipping and noise. Our choice; the figures are in the README.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LR", "default_lr"]

#: name -> (learning rate under DP-SGD, learning rate without DP)
DEFAULT_LR: dict[str, tuple[float, float]] = {
    "sgd": (1.0, 0.1),
    "adam": (0.01, 0.003),
    "adamw": (0.01, 0.003),
    "sgd-sai": (0.5, 0.1),
    "scale": (0.003, 0.003),
    "swan": (0.01, 0.003),
    "sinkgd": (0.01, 0.001),
    "frugal": (0.01, 0.01),
    "conda": (0.01, 0.01),
    "muon": (0.1, 0.1),
    "auon": (0.5, 0.03),
    "hybrid-auon": (0.5, 0.03),
    "drop-muon": (0.5, 0.1),
    "lion": (0.003, 0.001),
    "adan": (0.03, 0.01),
    "adabelief": (0.01, 0.003),
    "adamp": (0.01, 0.01),
    "diffgrad": (0.03, 0.01),
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
