"""Run a federation from a config, record it in the store, and resume killed runs."""

from __future__ import annotations

from collections.abc import Callable

from dpfl.config import Config
from dpfl.errors import ConfigError, StoreError
from dpfl.server.loop import FederationResult, ResumeState, load_checkpoint, run_rounds
from dpfl.store import RunHandle, RunStore

__all__ = ["export_final_model", "resume_state", "simulate"]


def simulate(
    cfg: Config,
    run: RunHandle | None = None,
    *,
    resume: ResumeState | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> FederationResult:
    """Runs ``cfg`` on its configured backend (``federation.backend``)."""
    if cfg.federation.backend == "inprocess":
        from dpfl.clients.client_app import app
        from dpfl.simulation.inprocess import InProcessGrid

        grid = InProcessGrid(app, cfg.federation.num_clients)
        return run_rounds(grid, cfg, run, resume=resume, on_round=on_round)
    from dpfl.simulation.ray_backend import simulate_on_ray

    return simulate_on_ray(cfg, run, resume=resume, on_round=on_round)


def resume_state(
    store: RunStore, run_id: str, kinds: tuple[str, ...] = ("simulate",)
) -> tuple[Config, ResumeState | None]:
    """The config of run ``run_id`` and the state after its last checkpointed round."""
    row = store.get_run(run_id)
    if row["kind"] not in kinds:
        what = "a simulation" if kinds == ("simulate",) else f"a {' or '.join(kinds)} run"
        raise ConfigError(f"run {run_id} is a {row['kind']} run, not {what}")
    if row["status"] == "completed":
        raise ConfigError(f"run {run_id} already completed; nothing to resume")
    cfg = Config.from_dict(row["config"])
    checkpoints = [
        a for a in store.artifacts(row["id"], with_data=True) if a["kind"] == "checkpoint"
    ]
    events = store.privacy_events(row["id"])
    if not checkpoints:
        if events:
            raise StoreError(
                f"run {run_id} spent privacy but has no checkpoint to resume from; start a new run"
            )
        return cfg, None
    last = max(checkpoints, key=lambda a: a["round"])
    ck = load_checkpoint(last["data"])
    return cfg, ResumeState(
        round=int(ck["round"]),
        global_state=ck["global_state"],
        strategy_state=ck["strategy"],
        participants={int(k): v for k, v in ck["participants"].items()},
        events=events,
        extra=ck.get("async"),
    )


def export_final_model(store: RunStore, run: RunHandle, cfg: Config, output=None) -> None:
    """The federation's final global model (its last checkpoint: what the server released),
    exported in the task's format to ``output`` and as the run's ``model`` artifacts; both
    backends write the same checkpoints, so this works for either."""
    from pathlib import Path

    import torch

    from dpfl.clients.central import export
    from dpfl.tasks import get_task

    checkpoints = [
        a for a in store.artifacts(run.run_id, with_data=True) if a["kind"] == "checkpoint"
    ]
    if not checkpoints:
        return
    state = load_checkpoint(max(checkpoints, key=lambda a: a["round"])["data"])["global_state"]
    torch.manual_seed(cfg.seed)
    task = get_task(cfg)
    model = task.build_model(task.load_data())
    task.load_trainable_state(model, state)
    export(task, model, run, None if output is None else Path(output))
