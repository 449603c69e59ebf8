"""``dpfl simulate``: a simulated DP federation on the embedded default (MNIST-5k, 10 clients)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpfl.cli.common import (
    DEFAULT_STORE,
    ConfigOption,
    DeviceOption,
    JsonOption,
    PlotOption,
    SetOption,
    StoreOption,
    check_plot,
    console,
    epsilon_summary,
    fail,
    fmt_eps,
    load_run_config,
    planned_rounds,
    progress_reporter,
    round_reporter,
)
from dpfl.cli.main import app
from dpfl.errors import ConfigError, StoreError
from dpfl.jsonutil import dumps

#: used when no --config is given: MNIST-5k, 10 clients, sample-level DP at epsilon 8
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "defaults" / "simulate.toml"


@app.command()
def simulate(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue a killed run from its last completed round."),
    ] = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
    plot: PlotOption = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Federated training on Flower (in-process engine by default; federation.backend=ray).

    Without --config: MNIST-5k over 10 clients, sample-level DP at epsilon 8 per client.
    Every config key can be set with --set (list them: dpfl config show).
    """
    from dpfl.preflight import check_simulate
    from dpfl.simulation.runner import resume_state
    from dpfl.simulation.runner import simulate as run_simulation
    from dpfl.store import RunStore

    if resume is not None and not store.exists():
        raise StoreError(f"no run store at {store} (use --store PATH)")
    check_plot(plot)
    sets = list(overrides or [])
    if device is not None:
        sets.append(f"training.device={device!r}")
    with RunStore(store) as s:
        if resume is not None:
            if config is not None or sets:
                raise ConfigError(
                    "--resume continues a run with its own config; drop --config/--set/--device"
                )
            run_id = s.resolve_run_id(resume)
            cfg, state = resume_state(s, run_id)
            run = s.reopen_run(run_id)
        else:
            cfg, explicit = load_run_config(config, sets, DEFAULT_CONFIG)
            state = None
            check_simulate(cfg, explicit)  # refused before the run exists in the store
            run = s.create_run("simulate", cfg.to_dict(), name=cfg.name, seed=cfg.seed)
        fields, make_on_round = round_reporter(cfg)
        unit = "aggregation" if cfg.federation.mode == "async" else "round"
        with s.tracking(run), progress_reporter(unit, fields, as_json) as report:
            first = 0 if state is None else state.round
            report.update(total=planned_rounds(cfg), completed=first)
            on_round = make_on_round(report)
            result = run_simulation(cfg, run, resume=state, on_round=on_round)
        eps = result.epsilon
        eps_max, eps_median = epsilon_summary(cfg, eps)
        summary = {
            "run": run.run_id,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "rounds": result.rounds_completed,
            "stopped": result.stopped,
            "seconds": result.seconds,
            "privacy": "none" if not cfg.privacy.enabled else f"{cfg.privacy.level}-level",
            "delta": cfg.privacy.delta,
            "epsilon_max": eps_max,
            "epsilon_median": eps_median,
            "epsilon": eps,
            "noise_multiplier": result.noise_multiplier,
        }
        failed = result.stopped in ("failed", "diverged", "no-progress")
        if failed:
            summary["error"] = result.message
            run.finish("failed", error=result.message, summary=summary)
        else:
            run.finish("completed", summary=summary)
        if plot is not None:
            from dpfl.store import run_to_dict
            from dpfl.store.plot import plot_run

            plot_run(run_to_dict(s, run.run_id), plot, ["accuracy", "loss"])

    if as_json:
        console.print(dumps(summary), markup=False)
    else:
        _table(cfg, run.run_id, result, summary)
    if failed:
        fail(result.message or result.stopped, code=1)


def _table(cfg, run_id: str, result, summary) -> None:
    from rich.table import Table

    f = cfg.federation
    table = Table(
        title=f"dpfl simulate: {cfg.data.name}, {f.num_clients} clients, "
        f"{f.strategy} (run {run_id})"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("test accuracy (server held-out)", f"{result.accuracy:.4f}")
    table.add_row("test loss", f"{result.loss:.4f}")
    if f.mode == "async":
        total = planned_rounds(cfg)
        table.add_row(
            f"aggregations ({f.async_scheme}, {f.clock} clock, horizon {f.horizon:g})",
            f"{result.rounds_completed} of {total if total else '?'} ({result.stopped})",
        )
    else:
        table.add_row("rounds", f"{result.rounds_completed} of {f.rounds} ({result.stopped})")
    table.add_row("privacy", summary["privacy"])
    if cfg.privacy.enabled:
        who = "server (user-level)" if cfg.privacy.level == "user" else "per client, max / median"
        value = fmt_eps(summary["epsilon_max"])
        if cfg.privacy.level == "sample":
            value += f" / {fmt_eps(summary['epsilon_median'])}"
        table.add_row(
            f"epsilon {who} ({cfg.privacy.accountant}, delta={cfg.privacy.delta:g})", value
        )
    if cfg.privacy.enabled and f.client_diagnostics:
        table.add_row("client diagnostics", "stored as uncovered/...: NOT covered by DP")
    table.add_row("time", f"{result.seconds:.1f}s")
    console.print(table)
