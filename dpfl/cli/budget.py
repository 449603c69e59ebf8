"""``dpfl epsilon`` and ``dpfl calibrate``: privacy budgets without training."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpfl.accountants import (
    Phase,
    calibrate_noise,
    compute_epsilon,
    phases_from_records,
    steps_for_epochs,
)
from dpfl.cli.common import DEFAULT_STORE, StoreOption, console, err_console, fmt_eps
from dpfl.cli.main import app
from dpfl.errors import AccountantError, ConfigError
from dpfl.jsonutil import dumps
from dpfl.store import RunStore
from dpfl.validation import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    positive,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class AccountantChoice(str, Enum):
    rdp = "rdp"
    prv = "prv"
    pld = "pld"
    gdp = "gdp"
    all = "all"


ORDER = ("rdp", "prv", "pld", "gdp")
NOTES = {
    "rdp": "upper bound (Renyi DP)",
    "prv": "upper bound (PRV, eps_error 0.01)",
    "pld": "upper bound (PLD, pessimistic; within 0.5 %)",
    "gdp": "CLT approximation; can underestimate",
}

AccountantOption = Annotated[
    AccountantChoice,
    typer.Option("--accountant", "-a", help="rdp, prv, pld, gdp, or all for a table of them."),
]
DeltaOption = Annotated[float, typer.Option("--delta", "-d", help="Target delta, in (0, 1).")]
SampleRateOption = Annotated[
    float | None, typer.Option("--sample-rate", "-q", help="Poisson sampling rate, in (0, 1].")
]
StepsOption = Annotated[int | None, typer.Option("--steps", "-t", help="Number of noisy steps.")]
EpochsOption = Annotated[
    float | None, typer.Option("--epochs", help="Expected passes (steps = epochs / sample rate).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
NoRecordOption = Annotated[
    bool, typer.Option("--no-record", help="Do not record this computation in the run store.")
]


def _names(choice: AccountantChoice) -> list[str]:
    return list(ORDER) if choice is AccountantChoice.all else [choice.value]


def _resolve_steps(sample_rate: float | None, steps: int | None, epochs: float | None) -> int:
    if sample_rate is None:
        raise ConfigError("--sample-rate is required")
    check_sample_rate("--sample-rate", sample_rate)
    if (steps is None) == (epochs is None):
        raise ConfigError("give exactly one of --steps or --epochs")
    if epochs is not None:
        positive("--epochs", epochs)
        return steps_for_epochs(epochs, sample_rate)
    if steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1, got {steps}")
    return steps


def _read_phases(path: Path) -> list[Phase]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read phases file {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"malformed JSON in {path}: {e}") from None
        records = data.get("phases") if isinstance(data, dict) else data
    else:
        try:
            records = tomllib.loads(text).get("phases")
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"malformed TOML in {path}: {e}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(
            f"{path} must hold a non-empty list of phases (TOML [[phases]] tables or a JSON list)"
        )
    return phases_from_records(records)


def _record(store_path: Path, kind: str, config: dict, summary: dict) -> str | None:
    with RunStore(store_path) as store, store.run(kind, config) as run:
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        run.finish("completed", summary=summary)
        return run.run_id


@app.command()
def epsilon(
    sigma: Annotated[
        float | None,
        typer.Option("--sigma", "--noise-multiplier", "-s", help="Noise multiplier (std / clip)."),
    ] = None,
    sample_rate: SampleRateOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    delta: DeltaOption = 1e-5,
    accountant: AccountantOption = AccountantChoice.rdp,
    phases: Annotated[
        Path | None,
        typer.Option(
            "--phases",
            help="TOML ([[phases]] noise-multiplier/sample-rate/steps) or JSON list of phases, "
            "composed in order (heterogeneous training).",
            dir_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    store: StoreOption = DEFAULT_STORE,
    no_record: NoRecordOption = False,
) -> None:
    """Epsilon spent by DP-SGD (Poisson-subsampled Gaussian) after the given steps."""
    check_delta("--delta", delta)
    if phases is not None:
        if any(v is not None for v in (sigma, sample_rate, steps, epochs)):
            raise ConfigError("use either --phases or --sigma/--sample-rate/--steps, not both")
        history = _read_phases(phases)
    else:
        if sigma is None:
            raise ConfigError("--sigma (noise multiplier) is required, or --phases FILE")
        check_noise_multiplier("--sigma", sigma)
        n = _resolve_steps(sample_rate, steps, epochs)
        history = [Phase(sigma, sample_rate, n)]

    results: dict[str, float | None] = {}
    failures: dict[str, str] = {}
    names = _names(accountant)
    with (
        err_console.status("computing epsilon...", spinner="dots") if not as_json else nullcontext()
    ):
        for name in names:
            try:
                results[name] = compute_epsilon(history, delta, name)
            except AccountantError as e:
                if len(names) == 1:
                    raise
                results[name], failures[name] = None, str(e)

    if not no_record:
        _record(
            store,
            "epsilon",
            {"phases": [asdict(p) for p in history], "delta": delta, "accountants": names},
            {f"epsilon_{k}": v for k, v in results.items()},
        )
    if as_json:
        console.print(dumps(results), markup=False)
        return
    total_steps = sum(p.steps for p in history)
    desc = (
        f"sigma={history[0].noise_multiplier:g}, q={history[0].sample_rate:g}, steps={total_steps}"
        if len(history) == 1
        else f"{len(history)} phases, {total_steps} steps"
    )
    if len(names) == 1:
        console.print(
            f"epsilon = {fmt_eps(results[names[0]])}  ({names[0]}, delta={delta:g}, {desc})"
        )
        return
    table = Table(title=f"epsilon at delta={delta:g} ({desc})")
    table.add_column("accountant")
    table.add_column("epsilon", justify="right")
    table.add_column("note")
    for name in names:
        note = failures.get(name, NOTES[name])
        table.add_row(name, fmt_eps(results[name]), note)
    console.print(table)


@app.command()
def calibrate(
    target_epsilon: Annotated[
        float | None, typer.Option("--epsilon", "-e", help="Target epsilon (> 0).")
    ] = None,
    delta: DeltaOption = 1e-5,
    sample_rate: SampleRateOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    accountant: AccountantOption = AccountantChoice.rdp,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            help="Relative: the noise multiplier is within this fraction of the smallest one.",
        ),
    ] = 1e-3,
    as_json: JsonOption = False,
    store: StoreOption = DEFAULT_STORE,
    no_record: NoRecordOption = False,
) -> None:
    """Smallest noise multiplier that keeps epsilon within a target (never above it)."""
    if target_epsilon is None:
        raise ConfigError("--epsilon (target epsilon) is required")
    check_epsilon("--epsilon", target_epsilon)
    positive("--tolerance", tolerance)
    check_delta("--delta", delta)
    n = _resolve_steps(sample_rate, steps, epochs)
    results: dict[str, dict[str, float]] = {}
    with (
        err_console.status("calibrating noise...", spinner="dots") if not as_json else nullcontext()
    ):
        for name in _names(accountant):
            cal = calibrate_noise(target_epsilon, delta, sample_rate, n, name, rel_tol=tolerance)
            results[name] = {"noise_multiplier": cal.noise_multiplier, "epsilon": cal.epsilon}

    if not no_record:
        _record(
            store,
            "calibrate",
            {
                "target_epsilon": target_epsilon,
                "delta": delta,
                "sample_rate": sample_rate,
                "steps": n,
                "accountants": list(results),
            },
            {f"noise_multiplier_{k}": v["noise_multiplier"] for k, v in results.items()}
            | {f"epsilon_{k}": v["epsilon"] for k, v in results.items()},
        )
    if as_json:
        console.print(dumps(results), markup=False)
        return
    table = Table(
        title=f"noise for epsilon <= {target_epsilon:g} at delta={delta:g} "
        f"(q={sample_rate:g}, steps={n})"
    )
    table.add_column("accountant")
    table.add_column("noise multiplier", justify="right")
    table.add_column("epsilon achieved", justify="right")
    table.add_column("note")
    for name, r in results.items():
        table.add_row(name, f"{r['noise_multiplier']:.4f}", fmt_eps(r["epsilon"]), NOTES[name])
    console.print(table)
