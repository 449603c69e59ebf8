"""``dpfl simulate``: a simulated DP federation on the embedded default (MNIST-5k, 10 clients)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dpfl.cli.common import (
    DEFAULT_STORE,
    ConfigOption,
    JsonOption,
    PlotOption,
    SetOption,
    StoreOption,
    console,
    err_console,
    fmt_eps,
)
from dpfl.cli.main import app
from dpfl.config import load_config
from dpfl.errors import ConfigError, StoreError
from dpfl.jsonutil import dumps
from dpfl.store import RunStore

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
    as_json: JsonOption = False,
    plot: PlotOption = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Federated training on Flower (in-process engine by default; federation.backend=ray).

    Without --config: MNIST-5k over 10 clients, sample-level DP at epsilon 8 per client.
    """
    from dpfl.simulation.runner import resume_state
    from dpfl.simulation.runner import simulate as run_simulation

    if resume is not None and not store.exists():
        raise StoreError(f"no run store at {store} (use --store PATH)")
    with RunStore(store) as s:
        if resume is not None:
            if config is not None or overrides:
                raise ConfigError(
                    "--resume continues a run with its own config; drop --config/--set"
                )
            run_id = s.resolve_run_id(resume)
            cfg, state = resume_state(s, run_id)
            run = s.reopen_run(run_id)
        else:
            cfg, state = load_config(config or DEFAULT_CONFIG, overrides or []), None
            run = s.create_run("simulate", cfg.to_dict(), name=cfg.name, seed=cfg.seed)
        progress = Progress(
            TextColumn("[bold]round"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[acc]}  eps {task.fields[eps]}"),
            TimeElapsedColumn(),
            console=err_console,
            disable=as_json,
            transient=True,
        )
        with s.tracking(run), progress:
            first = 0 if state is None else state.round
            task = progress.add_task(
                "rounds", total=cfg.federation.rounds, completed=first, acc="-", eps="-"
            )

            def on_round(r: int, row: dict[str, float]) -> None:
                eps = row.get("epsilon-max", math.nan)
                progress.update(
                    task,
                    completed=r,
                    acc=f"{row['accuracy']:.3f}",
                    eps="inf" if math.isinf(eps) else f"{eps:.2f}",
                )

            result = run_simulation(cfg, run, resume=state, on_round=on_round)
        eps = result.epsilon
        summary = {
            "run": run.run_id,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "rounds": result.rounds_completed,
            "stopped": result.stopped,
            "seconds": result.seconds,
            "privacy": "none" if not cfg.privacy.enabled else f"{cfg.privacy.level}-level",
            "delta": cfg.privacy.delta,
            "epsilon_max": max(eps.values(), default=0.0) if cfg.privacy.enabled else math.inf,
            "epsilon_median": statistics.median(eps.values())
            if eps
            else (0.0 if cfg.privacy.enabled else math.inf),
            "epsilon": eps,
            "noise_multiplier": result.noise_multiplier,
        }
        run.finish("completed", summary=summary)
        if plot is not None:
            from dpfl.store import run_to_dict
            from dpfl.store.plot import plot_run

            plot_run(run_to_dict(s, run.run_id), plot, ["accuracy", "loss"])

    if as_json:
        console.print(dumps(summary), markup=False)
        return
    f = cfg.federation
    table = Table(
        title=f"dpfl simulate: {cfg.data.name}, {f.num_clients} clients, "
        f"{f.strategy} (run {run.run_id})"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("test accuracy (server held-out)", f"{result.accuracy:.4f}")
    table.add_row("test loss", f"{result.loss:.4f}")
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
