"""Shared CLI pieces: the store option, consoles, number formatting."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = [
    "ConfigOption",
    "JsonOption",
    "PlotOption",
    "SetOption",
    "StoreOption",
    "console",
    "err_console",
    "fmt_eps",
    "fmt_float",
]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)

StoreOption = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar="DPFL_STORE",
        help="SQLite run store (created if missing).",
        dir_okay=False,
    ),
]
DEFAULT_STORE = Path("dpfl-runs.sqlite")
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", dir_okay=False)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
PlotOption = Annotated[
    Path | None,
    typer.Option("--plot", help="Write the run's metrics and epsilon to this PNG.", dir_okay=False),
]


def fmt_float(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def fmt_eps(x: float | None) -> str:
    """Epsilon with 4 decimals (or inf: no privacy)."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf (no privacy)"
    return f"{x:.4f}"
