"""Shared CLI pieces: the store option, consoles, number formatting."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = [
    "ConfigOption",
    "DeviceOption",
    "JsonOption",
    "PlotOption",
    "SetOption",
    "StoreOption",
    "console",
    "check_plot",
    "fail",
    "err_console",
    "fmt_eps",
    "fmt_float",
    "epsilon_summary",
    "load_run_config",
    "progress_reporter",
    "round_reporter",
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
    typer.Option(
        "--set",
        help="Override a config key: section.key=value (repeatable; every key, its default and "
        "range: dpfl config show).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
PlotOption = Annotated[
    Path | None,
    typer.Option("--plot", help="Write the run's metrics and epsilon to this PNG.", dir_okay=False),
]


DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="auto, cpu, cuda or cuda:N (training.device; default auto)."),
]


def fail(message: str, code: int = 1) -> None:
    """Ends the command with ONE line ``dpfl: error: ...`` on stderr (exit 1: the run failed;
    bad input raises a DpflError instead, which exits 2)."""
    import click

    click.echo(f"dpfl: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def check_plot(path: Path | None) -> None:
    """Refuses a --plot path that cannot be written as an image, before any run starts."""
    if path is None:
        return
    from dpfl.store.plot import check_plot_path

    check_plot_path(path)


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


def load_run_config(path: Path | None, overrides: list[str], default: Path | None = None):
    """(config, explicitly set dotted keys) from a TOML file (or ``default``) and ``--set``s."""
    from dpfl.config import load_config
    from dpfl.preflight import explicit_keys

    source = path or default
    cfg = load_config(source, overrides)
    data: dict[str, Any] = {}
    if path is not None:  # the default file is ours: its keys are not the user's
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return cfg, explicit_keys(data, overrides)


class _Lines:
    """Progress as plain lines (no terminal, or --json): one per epoch / round."""

    def __init__(self, console_: Console) -> None:
        self.console = console_

    def update(self, **_: Any) -> None:
        pass

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


class _Bar:
    """A rich progress bar on a terminal; epoch / round lines are not printed."""

    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def update(self, **fields: Any) -> None:
        self.progress.update(self.task, **fields)

    def line(self, text: str) -> None:
        pass


@contextmanager
def progress_reporter(label: str, fields: dict[str, str], as_json: bool) -> Iterator[Any]:
    """A progress bar on an interactive terminal; otherwise one plain line per epoch / round
    (on stderr under ``--json``, whose stdout is the one JSON object; else on stdout)."""
    if as_json or not err_console.is_terminal:
        yield _Lines(err_console if as_json else console)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    shown = "  ".join(f"{k} {{task.fields[{k}]}}" for k in fields)
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(shown),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    with progress:
        yield _Bar(progress, progress.add_task(label, total=None, **fields))


#: the progress bar's short names of the tasks' metrics
SHORT_METRIC = {"accuracy": "acc", "perplexity": "ppl"}


def round_reporter(cfg, metric: str = "accuracy", traffic: bool = False):
    """``(fields, make)`` for a federation's progress: ``fields`` for :func:`progress_reporter`,
    ``make(report)`` the ``on_round(r, row)`` hook that updates it and prints one line per
    round (the server's held-out ``metric``, loss, clients, epsilon; ``traffic``: the bytes the
    round moved)."""
    short = SHORT_METRIC.get(metric, metric[:4])

    def make(report):
        def on_round(r: int, row: dict[str, float]) -> None:
            eps = row.get("epsilon-max", math.nan)
            shown = "inf" if math.isinf(eps) else f"{eps:.2f}"
            report.update(completed=r, eps=shown, **{short: f"{row[metric]:.3f}"})
            eps_text = f"  epsilon max {shown}" if cfg.privacy.enabled else ""
            moved = row.get("bytes-down", 0) + row.get("bytes-up", 0)
            bytes_text = f"  {int(moved):,} bytes" if traffic else ""
            total = planned_rounds(cfg)
            if cfg.federation.mode == "async":  # one line per evaluated aggregation
                clock = row.get("virtual-time", row.get("time", math.nan))
                where = f"aggregation {r}/{total if total else '?'}  t {clock:.2f}"
            else:
                where = f"round {r}/{total}"
            report.line(
                f"{where}  {metric} {row[metric]:.4f}  "
                f"loss {row['loss']:.4f}  clients {int(row['clients'])}{bytes_text}{eps_text}"
            )

        return on_round

    return {short: "-", "eps": "-"}, make


def planned_rounds(cfg) -> int | None:
    """Rounds of a sync federation; aggregations of an async one on the virtual clock (its
    schedule); None on the real clock (arrival-driven)."""
    f = cfg.federation
    if f.mode != "async":
        return f.rounds
    if f.clock == "real":
        return None
    from dpfl.server.async_schedule import plan

    return len(plan(cfg))


def epsilon_summary(cfg, eps: dict[str, float]) -> tuple[float, float]:
    """(max, median) epsilon over a federation's participants (inf without DP; 0 for a DP run
    in which nobody released anything)."""
    import statistics

    if not cfg.privacy.enabled:
        return math.inf, math.inf
    return max(eps.values(), default=0.0), (statistics.median(eps.values()) if eps else 0.0)
