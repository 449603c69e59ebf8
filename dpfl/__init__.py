"""dpfl: differentially private and federated training on Flower and Opacus."""

from dpfl.config import Config, load_config
from dpfl.errors import (
    AccountantError,
    ConfigError,
    DpflError,
    IncompatibleModelError,
    PrivacyBudgetError,
    RunNotFoundError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "AccountantError",
    "Config",
    "ConfigError",
    "DpflError",
    "IncompatibleModelError",
    "PrivacyBudgetError",
    "RunNotFoundError",
    "StoreError",
    "__version__",
    "load_config",
]
