"""``dpfl epsilon`` and ``dpfl calibrate``: privacy budgets without training."""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dpfl.cli.common import DEFAULT_STORE, StoreOption, console, err_console, fmt_eps
from dpfl.cli.main import app
from dpfl.errors import AccountantError, ConfigError, DpflError, PrivacyBudgetError
from dpfl.jsonutil import dumps
from dpfl.validation import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    positive,
)

if TYPE_CHECKING:
    from dpfl.accountants import Phase

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Start-up: the accountants (numpy, scipy; Opacus and torch only for prv / gdp) and the run
# store are imported inside the commands, so that ``dpfl --help`` does not pay for them.

#: A phases file is a short list of tables; anything larger is not one (or is /dev/zero).
MAX_PHASES_FILE_BYTES = 1 << 20
#: Above this many grid points, the prv accountant takes seconds: say so before starting.
PRV_NOTE_POINTS = 5_000_000
#: Rough prv cost per grid point (seconds), measured on one CPU core.
PRV_SECONDS_PER_POINT = 1e-6


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


def _short(n: int) -> str:
    return f"{n:.3g}" if n < 10**300 else f"about 1e{len(str(n)) - 1}"


def _resolve_steps(sample_rate: float | None, steps: int | None, epochs: float | None) -> int:
    from dpfl.accountants.phases import MAX_STEPS, steps_for_epochs

    if sample_rate is None:
        raise ConfigError("--sample-rate is required")
    check_sample_rate("--sample-rate", sample_rate)
    if (steps is None) == (epochs is None):
        raise ConfigError("give exactly one of --steps or --epochs")
    if epochs is not None:
        positive("--epochs", epochs)
        if not epochs / sample_rate <= MAX_STEPS:
            raise ConfigError(
                f"--epochs {epochs:g} at --sample-rate {sample_rate:g} is "
                f"{epochs / sample_rate:.3g} steps (epochs / sample rate); at most {MAX_STEPS:.0e}"
            )
        return steps_for_epochs(epochs, sample_rate)
    if steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ConfigError(f"--steps must be at most {MAX_STEPS:.0e}, got {_short(steps)}")
    return steps


def _read_phases(path: Path) -> list[Phase]:
    from dpfl.accountants import phases_from_records

    what = f"phases file {path}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PHASES_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror or e}") from None
    if len(raw) > MAX_PHASES_FILE_BYTES:
        raise ConfigError(
            f"{what} is larger than {MAX_PHASES_FILE_BYTES >> 20} MiB; a phases file is a short "
            "TOML or JSON list of phases"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "it must be TOML ([[phases]] tables) or JSON (a list of phases)"
        ) from None
    if not text.strip():
        raise ConfigError(f"{what} is empty; it must hold a non-empty list of phases")
    data: Any
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ConfigError(f"malformed JSON in {path}: {e}") from None
        if isinstance(data, dict):
            _only_phases_key(data, path)
            records = data.get("phases")
        else:
            records = data
    else:
        try:
            data = tomllib.loads(text)
        except (ValueError, RecursionError) as e:  # TOMLDecodeError is a ValueError
            raise ConfigError(f"malformed TOML in {path}: {e}") from None
        _only_phases_key(data, path)
        records = data.get("phases")
    if not isinstance(records, list) or not records:
        raise ConfigError(
            f"{path} must hold a non-empty list of phases (TOML [[phases]] tables or a JSON list)"
        )
    return phases_from_records(records)


def _only_phases_key(data: dict, path: Path) -> None:
    unknown = [str(k) for k in data if k != "phases"]
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0][:40]!r} in {path}: it must hold only a non-empty list of "
            'phases (TOML [[phases]] tables, or JSON {"phases": [...]} or a list)'
        )


def _record(store_path: Path, kind: str, config: dict, summary: dict) -> str | None:
    from dpfl.store import RunStore

    with RunStore(store_path) as store, store.run(kind, config) as run:
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        run.finish("completed", summary=summary)
        return run.run_id


def _eps_text(x: float | None) -> str:
    """Epsilon as printed: 4 decimals; huge values (no meaningful privacy) in 4 digits."""
    if x is not None and math.isfinite(x) and x >= 1e6:
        return f"{x:.4g}"
    return fmt_eps(x)


def _note_prv_cost(points: int, per: str = "") -> None:
    """One line on stderr before a prv computation that takes seconds (never a silent wait)."""
    if points < PRV_NOTE_POINTS:
        return
    seconds = points * PRV_SECONDS_PER_POINT
    err_console.print(
        f"dpfl: note: the prv accountant composes a grid of {points:.2g} points here: roughly "
        f"{seconds:.0f} s{per} on one core; pld is as tight or tighter and takes about a second",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _note_prv_calibration(
    target: float, delta: float, sample_rate: float, steps: int, rdp: dict[str, Any] | None
) -> None:
    """The prv note for a calibration: the grid at rdp's answer (prv's is a little smaller, its
    grid a little larger), calibrated here at 1 % unless rdp was just calibrated."""
    from dpfl.accountants import Phase, calibrate_noise
    from dpfl.accountants.prv import MAX_PRV_POINTS

    sigma = rdp.get("noise_multiplier") if rdp else None
    if sigma is None:
        try:
            sigma = calibrate_noise(target, delta, sample_rate, steps, "rdp", rel_tol=1e-2)
            sigma = sigma.noise_multiplier
        except DpflError:  # rdp cannot: neither can prv, which will say why
            return
    points = _prv_points([Phase(sigma, sample_rate, steps)], delta)
    if points is not None and points <= MAX_PRV_POINTS:
        _note_prv_cost(points, " per evaluation, 3-8 evaluations")


def _prv_points(history: list[Phase], delta: float) -> int | None:
    """The prv grid size for ``history``, or None where prv answers without one."""
    from dpfl.accountants import merge_phases
    from dpfl.accountants.prv import prv_grid_points

    merged = merge_phases(history)
    if not merged or any(p.noise_multiplier == 0 for p in merged):
        return None
    try:
        return prv_grid_points(merged, delta)
    except (ValueError, ArithmeticError, RuntimeError):  # prv itself will report it
        return None


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
    from rich.table import Table

    from dpfl.accountants import Phase, compute_epsilon

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
    if "prv" in names:
        points = _prv_points(history, delta)
        if points is not None:
            from dpfl.accountants.prv import MAX_PRV_POINTS

            if points <= MAX_PRV_POINTS:
                _note_prv_cost(points)
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
            {f"epsilon_{k}": v for k, v in results.items()}
            | {f"error_{k}": v for k, v in failures.items()},
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
            f"epsilon = {_eps_text(results[names[0]])}  ({names[0]}, delta={delta:g}, {desc})"
        )
        return
    table = Table(title=f"epsilon at delta={delta:g} ({desc})")
    table.add_column("accountant")
    table.add_column("epsilon", justify="right")
    table.add_column("note")
    for name in names:
        note = f"failed: {failures[name]}" if name in failures else NOTES[name]
        table.add_row(name, _eps_text(results[name]), note)
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
            help="Relative, in [1e-6, 0.5]: the noise multiplier is within this fraction of the "
            "smallest one that meets the target.",
        ),
    ] = 1e-3,
    as_json: JsonOption = False,
    store: StoreOption = DEFAULT_STORE,
    no_record: NoRecordOption = False,
) -> None:
    """Smallest noise multiplier that keeps epsilon within a target (never above it).

    With -a all, an accountant that cannot calibrate is shown as failed, with its reason; the
    command fails only if none can.
    """
    from rich.table import Table

    from dpfl.accountants import calibrate_noise
    from dpfl.accountants.calibrate import check_rel_tol

    if target_epsilon is None:
        raise ConfigError("--epsilon (target epsilon) is required")
    check_epsilon("--epsilon", target_epsilon)
    check_rel_tol("--tolerance", tolerance)
    check_delta("--delta", delta)
    n = _resolve_steps(sample_rate, steps, epochs)
    names = _names(accountant)
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, DpflError] = {}
    with (
        err_console.status("calibrating noise...", spinner="dots") if not as_json else nullcontext()
    ):
        for name in names:
            if name == "prv":
                _note_prv_calibration(target_epsilon, delta, sample_rate, n, results.get("rdp"))
            try:
                cal = calibrate_noise(
                    target_epsilon, delta, sample_rate, n, name, rel_tol=tolerance
                )
            except (AccountantError, PrivacyBudgetError) as e:
                if len(names) == 1:
                    raise
                failures[name] = e
                results[name] = {"noise_multiplier": None, "epsilon": None, "error": str(e)}
            else:
                results[name] = {"noise_multiplier": cal.noise_multiplier, "epsilon": cal.epsilon}
    if len(failures) == len(names) > 1:
        reasons = "; ".join(f"{k}: {e}" for k, e in failures.items())
        raise type(next(iter(failures.values())))(f"no accountant could calibrate: {reasons}")

    if not no_record:
        _record(
            store,
            "calibrate",
            {
                "target_epsilon": target_epsilon,
                "delta": delta,
                "sample_rate": sample_rate,
                "steps": n,
                "tolerance": tolerance,
                "accountants": names,
            },
            {f"noise_multiplier_{k}": v["noise_multiplier"] for k, v in results.items()}
            | {f"epsilon_{k}": v["epsilon"] for k, v in results.items()}
            | {f"error_{k}": str(e) for k, e in failures.items()},
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
        if name in failures:
            table.add_row(name, "-", "-", f"failed: {failures[name]}")
        else:
            table.add_row(
                name, f"{r['noise_multiplier']:.4f}", _eps_text(r["epsilon"]), NOTES[name]
            )
    console.print(table)
