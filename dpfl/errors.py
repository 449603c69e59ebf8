"""The dpfl error tree.

Every error that a user can cause (bad configuration, bad arguments, a spent privacy budget, a
missing run) is a :class:`DpflError`. The CLI turns any of them into one line on stderr and exit
status 2; anything else that escapes is a bug.
"""

from __future__ import annotations

__all__ = [
    "AccountantError",
    "ConfigError",
    "DpflError",
    "IncompatibleModelError",
    "PrivacyBudgetError",
    "RunNotFoundError",
    "StoreError",
]


class DpflError(Exception):
    """Base class of every error that dpfl raises on purpose."""


class ConfigError(DpflError, ValueError):
    """A configuration value, key or argument is invalid (names the key and what is allowed)."""


class PrivacyBudgetError(DpflError):
    """A release would spend more privacy than the budget allows, or no noise can meet it."""


class AccountantError(DpflError):
    """A privacy accountant cannot compute a value for the given history."""


class IncompatibleModelError(DpflError):
    """The model cannot be trained privately as given (unsupported layer, BatchNorm, ...)."""


class StoreError(DpflError):
    """The run store cannot be opened, read or written."""


class RunNotFoundError(StoreError, LookupError):
    """No run (or more than one run) matches the given id or prefix."""
