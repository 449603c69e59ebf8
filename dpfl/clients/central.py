"""Centralized private training from a :class:`~dpfl.config.Config` (``dpfl train``)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dpfl.accountants import steps_for_epochs
from dpfl.clients.local_train import (
    LocalTrainResult,
    train_non_private,
    train_private,
)
from dpfl.clients.monitor import TrainingMonitor
from dpfl.config import CLIP_LR_PER_STEP, Config
from dpfl.device import resolve_device
from dpfl.optim import create_optimizer
from dpfl.privacy import PrivateTraining, make_private
from dpfl.store import RunHandle
from dpfl.tasks import get_task

__all__ = ["CentralResult", "privacy_kwargs", "train_central"]


def privacy_kwargs(cfg: Config) -> dict[str, Any]:
    """make_private keyword arguments from the ``[privacy]`` section."""
    p = cfg.privacy
    return {
        "noise_multiplier": p.noise_multiplier,
        "target_epsilon": p.target_epsilon,
        "delta": p.delta,
        "clip_norm": p.clip_norm,
        "clipping": p.clipping,
        "grad_sample_mode": p.grad_sample_mode,
        "accountant": p.accountant,
        "poisson_sampling": p.poisson_sampling,
        "secure_mode": p.secure_mode,
        "clip_options": {
            "gamma": p.automatic_gamma,
            "target_quantile": p.target_quantile,
            "clip_lr": CLIP_LR_PER_STEP if p.clip_lr is None else p.clip_lr,
            "count_noise_std": p.count_noise_std,
        },
        "dicesgd_options": {
            "c2": p.clip_norm if p.dicesgd_c2 is None else p.dicesgd_c2,
            "c2_units": p.dicesgd_c2_units,
            "residual_rule": p.dicesgd_residual_rule,
        },
    }


@dataclass
class CentralResult:
    accuracy: float
    test_loss: float
    epsilon: float
    delta: float
    noise_multiplier: float | None
    train: LocalTrainResult
    steps_planned: int
    lr: float | None = None  # the learning rate used (the solver's default unless set)


def train_central(
    cfg: Config,
    run: RunHandle | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    output: Path | None = None,
) -> CentralResult:
    """Trains ``cfg.model`` on ``cfg.data`` with the configured privacy; records to ``run``.

    ``on_step(step, planned, loss)`` reports progress, ``on_epoch(epoch, metrics)`` the held-out
    evaluation after each epoch (``test_accuracy``, ``test_loss``, ``epsilon``). A run that
    diverges stops early and one that makes no progress is reported as such
    (``result.train.stopped``, see :mod:`dpfl.clients.monitor`). ``output``: a directory the
    trained model is exported to (the task's format: a peft adapter for LoRA); the run store
    keeps the same files as artifacts.
    """
    torch.manual_seed(cfg.seed)
    task = get_task(cfg)
    data = task.load_data()
    model = task.build_model(data)
    model.to(resolve_device(cfg.training.device))
    optimizer = create_optimizer(cfg.optimizer, model, private=cfg.privacy.enabled)
    loader = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True)
    planned = planned_steps(cfg, len(data.train))
    monitor = TrainingMonitor(
        task.evaluate(model, data.test)["loss"], lr=optimizer.param_groups[0]["lr"]
    )

    def log_epoch(epoch: int, model_: torch.nn.Module, eps: float) -> None:
        m = task.evaluate(model_, data.test)
        loss, acc = m["loss"], m[task.metric]
        if run is not None:
            metrics = {"test_accuracy": acc, "test_loss": loss}
            if cfg.privacy.enabled:
                metrics["epsilon"] = eps
            run.log_metrics(metrics, round=epoch)
        if on_epoch is not None:
            on_epoch(epoch, {"test_accuracy": acc, "test_loss": loss, "epsilon": eps})
        monitor.check_loss(loss, f"epoch {epoch}")

    def step_hook(step: int, loss: float) -> None:
        monitor.check_parameters(model, step)
        if on_step is not None:
            on_step(step, planned, loss)

    if not cfg.privacy.enabled:
        result = train_non_private(
            model,
            optimizer,
            loader,
            planned,
            step_hook,
            lambda e: log_epoch(e, model, math.inf),
            loss_fn=task.per_sample_loss,
        )
        return _finish(
            cfg, task, model, data, run, monitor, result, math.inf, None, planned, output
        )

    kwargs = privacy_kwargs(cfg)
    pt: PrivateTraining = make_private(
        model,
        optimizer,
        loader,
        steps=planned,
        physical_batch_size=cfg.data.physical_batch_size,
        seed=cfg.seed,
        ledger_sink=None if run is None else run.record_privacy_event,
        **kwargs,
    )
    try:
        result = train_private(
            pt,
            max_steps=planned,
            loss_fn=task.per_sample_loss,
            on_step=step_hook,
            on_epoch=lambda e: log_epoch(e, pt.model, pt.epsilon()),
        )
    finally:
        pt.detach()
    return _finish(
        cfg,
        task,
        model,
        data,
        run,
        monitor,
        result,
        pt.epsilon(),
        pt.noise_multiplier,
        planned,
        output,
    )


def export(task, model, run: RunHandle | None, output: Path | None) -> None:
    """The trained model, in the task's format: to ``output`` and as the run's artifacts."""
    if output is None and run is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) if output is None else Path(output)
        files = task.export(model, directory)
        if run is not None:
            for f in files:
                run.add_artifact("model", str(f.relative_to(directory)), f.read_bytes())


def planned_steps(cfg: Config, n_train: int) -> int:
    """Logical steps of a central run: ``training.epochs / q`` (capped by ``max-steps``)."""
    q = min(cfg.data.batch_size / n_train, 1.0)
    planned = steps_for_epochs(cfg.training.epochs, q)
    if cfg.training.max_steps is not None:
        planned = min(planned, cfg.training.max_steps)
    return planned


def _finish(
    cfg, task, model, data, run, monitor, result, eps, sigma, planned, output
) -> CentralResult:
    export(task, model, run, output)
    m = task.evaluate(model, data.test)
    loss, acc = m["loss"], m[task.metric]
    if result.stopped == "completed":
        one_epoch = math.ceil(len(data.train) / cfg.data.batch_size)
        verdict = monitor.final(loss, judged=result.steps >= one_epoch)
        if verdict is not None:
            result.stopped, result.budget_message = verdict
    if run is not None:
        final = {"test_accuracy": acc, "test_loss": loss, "steps": result.steps}
        if cfg.privacy.enabled:
            final["epsilon"] = eps
        run.log_metrics(final, scope="final")
    lr = monitor.lr
    return CentralResult(acc, loss, eps, cfg.privacy.delta, sigma, result, planned, lr)
