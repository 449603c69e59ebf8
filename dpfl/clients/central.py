"""Centralized private training from a :class:`~dpfl.config.Config` (``dpfl train``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from dpfl.accountants import steps_for_epochs
from dpfl.clients.local_train import (
    LocalTrainResult,
    evaluate,
    train_non_private,
    train_private,
)
from dpfl.config import Config
from dpfl.data import load_dataset
from dpfl.models import create_model
from dpfl.optim import create_optimizer
from dpfl.privacy import PrivateTraining, make_private
from dpfl.store import RunHandle

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
            "clip_lr": p.clip_lr,
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


def train_central(
    cfg: Config,
    run: RunHandle | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> CentralResult:
    """Trains ``cfg.model`` on ``cfg.data`` with the configured privacy; records to ``run``.

    ``on_step(step, planned, loss)`` reports progress.
    """
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed)
    model = create_model(
        cfg.model, channels=data.channels, image_size=data.image_size, num_classes=data.num_classes
    )
    optimizer = create_optimizer(cfg.optimizer, model)
    loader = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True)
    q = min(cfg.data.batch_size / len(data.train), 1.0)
    planned = steps_for_epochs(cfg.training.epochs, q)
    if cfg.training.max_steps is not None:
        planned = min(planned, cfg.training.max_steps)

    def log_epoch(epoch: int, model_: torch.nn.Module, eps: float) -> None:
        loss, acc = evaluate(model_, data.test)
        if run is not None:
            run.log_metrics({"test_accuracy": acc, "test_loss": loss, "epsilon": eps}, round=epoch)

    if not cfg.privacy.enabled:
        return _train_non_private(cfg, model, optimizer, loader, planned, run, on_step, data)

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
            on_step=None if on_step is None else (lambda s, loss: on_step(s, planned, loss)),
            on_epoch=lambda e: log_epoch(e, pt.model, pt.epsilon()),
        )
    finally:
        pt.detach()
    loss, acc = evaluate(model, data.test)
    eps = pt.epsilon()
    if run is not None:
        run.log_metrics(
            {"test_accuracy": acc, "test_loss": loss, "epsilon": eps, "steps": result.steps},
            scope="final",
        )
    return CentralResult(acc, loss, eps, cfg.privacy.delta, pt.noise_multiplier, result, planned)


def _train_non_private(cfg, model, optimizer, loader, planned, run, on_step, data) -> CentralResult:
    result = train_non_private(
        model,
        optimizer,
        loader,
        planned,
        None if on_step is None else (lambda s, loss: on_step(s, planned, loss)),
    )
    loss, acc = evaluate(model, data.test)
    if run is not None:
        run.log_metrics(
            {"test_accuracy": acc, "test_loss": loss, "steps": result.steps}, scope="final"
        )
    return CentralResult(acc, loss, math.inf, cfg.privacy.delta, None, result, planned)
