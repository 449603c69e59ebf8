"""``dpfl train``: centralized private training on the embedded default (digits, small CNN)."""

from __future__ import annotations

import math
from enum import Enum
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
    fail,
    fmt_eps,
    load_run_config,
    progress_reporter,
)
from dpfl.cli.main import app
from dpfl.errors import ConfigError, StoreError
from dpfl.jsonutil import dumps


class Clipping(str, Enum):
    flat = "flat"
    per_layer = "per-layer"
    adaptive = "adaptive"
    automatic = "automatic"
    dicesgd = "dicesgd"


class GradSample(str, Enum):
    hooks = "hooks"
    functorch = "functorch"
    ghost = "ghost"
    bk = "bk"


@app.command()
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    clipping: Annotated[
        Clipping | None, typer.Option("--clipping", help="Clip policy (privacy.clipping).")
    ] = None,
    grad_sample: Annotated[
        GradSample | None,
        typer.Option("--grad-sample", help="Per-sample norm backend (privacy.grad-sample-mode)."),
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="Target epsilon (privacy.target-epsilon).")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Training epochs (training.epochs).")
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option("--optimizer", help="Local solver (optimizer.name; see dpfl optimizers)."),
    ] = None,
    non_private: Annotated[
        bool,
        typer.Option(
            "--non-private",
            help="Train without DP (a baseline; the solver's non-DP learning rate is used).",
        ),
    ] = False,
    device: DeviceOption = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue a killed run from its last completed epoch."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Write the trained model here (a directory; a peft adapter for LoRA tasks, "
            "model.pt otherwise). The run store keeps it either way.",
            file_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    plot: PlotOption = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Centralized DP-SGD training (default: scikit-learn digits, small CNN).

    Every config key can be set with --set (list them: dpfl config show).
    """
    from dpfl.clients.central import train_central
    from dpfl.preflight import check_train
    from dpfl.store import RunStore

    if non_private and (epsilon is not None or clipping is not None or grad_sample is not None):
        flags = (("--epsilon", epsilon), ("--clipping", clipping), ("--grad-sample", grad_sample))
        given = [n for n, v in flags if v is not None]
        raise ConfigError(f"{', '.join(given)} with --non-private: choose one")
    sets = list(overrides or [])
    if clipping is not None:
        sets.append(f"privacy.clipping='{clipping.value}'")
    if grad_sample is not None:
        sets.append(f"privacy.grad-sample-mode='{grad_sample.value}'")
    if epsilon is not None:
        sets.append(f"privacy.target-epsilon={epsilon!r}")
    if epochs is not None:
        sets.append(f"training.epochs={epochs!r}")
    if optimizer is not None:
        sets.append(f"optimizer.name={optimizer!r}")
    if device is not None:
        sets.append(f"training.device={device!r}")
    if non_private:
        sets.append("privacy.enabled=false")
    check_plot(plot)
    if output is not None and output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output} is not empty: choose a new or empty directory")
    state = None
    if resume is not None:
        if config is not None or sets:
            raise ConfigError(
                "--resume continues a run with its own config; drop the other options"
            )
        if not store.exists():
            raise StoreError(f"no run store at {store} (use --store PATH)")
        from dpfl.clients.central import central_resume_state

        with RunStore(store) as s:
            run_id = s.resolve_run_id(resume)
            cfg, state = central_resume_state(s, run_id, kinds=("train",))
    else:
        cfg, explicit = load_run_config(config, sets)
        check_train(cfg, explicit)  # all that can be refused is refused before the run exists

    with (
        RunStore(store) as s,
        s.tracking(
            s.reopen_run(run_id)
            if resume is not None
            else s.create_run("train", cfg.to_dict(), name=cfg.name, seed=cfg.seed)
        ) as run,
    ):
        with progress_reporter("train", {"loss": "-"}, as_json) as report:

            def on_step(step: int, planned: int, loss: float) -> None:
                shown = "-" if math.isnan(loss) else f"{loss:.3f}"
                report.update(completed=step, total=planned, loss=shown)

            def on_epoch(epoch: int, m: dict[str, float]) -> None:
                eps = "" if not cfg.privacy.enabled else f"  epsilon {m['epsilon']:.3f}"
                report.line(
                    f"epoch {epoch}  test accuracy {m['test_accuracy']:.4f}  "
                    f"test loss {m['test_loss']:.4f}{eps}"
                )

            result = train_central(cfg, run, on_step, on_epoch, output=output, resume=state)
        summary = {
            "run": run.run_id,
            "accuracy": result.accuracy,
            "test_loss": result.test_loss,
            "epsilon": result.epsilon,
            "delta": result.delta,
            "noise_multiplier": result.noise_multiplier,
            "lr": result.lr,
            "steps": result.train.steps,
            "steps_planned": result.steps_planned,
            "stopped": result.train.stopped,
            "seconds": result.train.seconds,
            "clipping": cfg.privacy.clipping if cfg.privacy.enabled else "none",
            "grad_sample_mode": cfg.privacy.grad_sample_mode if cfg.privacy.enabled else "none",
        }
        failed = result.train.stopped in ("diverged", "no-progress")
        if failed:
            run.finish("failed", error=result.train.budget_message, summary=summary)
        else:
            run.finish("completed", summary=summary)
        if plot is not None:
            from dpfl.store import run_to_dict
            from dpfl.store.plot import plot_run

            plot_run(run_to_dict(s, run.run_id), plot)

    if as_json:
        console.print(dumps(summary), markup=False)
    else:
        _table(cfg, run.run_id, result, summary)
    if failed:
        fail(result.train.budget_message or result.train.stopped, code=1)


def _table(cfg, run_id: str, result, summary) -> None:
    from rich.table import Table

    table = Table(title=f"dpfl train: {cfg.data.name} / {cfg.model.name} (run {run_id})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("test accuracy", f"{result.accuracy:.4f}")
    table.add_row("test loss", f"{result.test_loss:.4f}")
    table.add_row(
        f"epsilon ({cfg.privacy.accountant}, delta={cfg.privacy.delta:g})", fmt_eps(result.epsilon)
    )
    if result.noise_multiplier is not None:
        table.add_row("noise multiplier", f"{result.noise_multiplier:.4f}")
    table.add_row("optimizer / lr", f"{cfg.optimizer.name} / {result.lr:g}")
    table.add_row("clipping / backend", f"{summary['clipping']} / {summary['grad_sample_mode']}")
    table.add_row(
        "steps", f"{result.train.steps} of {result.steps_planned} ({result.train.stopped})"
    )
    table.add_row("time", f"{result.train.seconds:.1f}s")
    console.print(table)
    if result.train.budget_message and result.train.stopped == "budget":
        console.print(f"stopped: {result.train.budget_message}", markup=False)
