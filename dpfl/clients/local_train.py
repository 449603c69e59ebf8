"""The Flower-free private training loop: used by ``dpfl train`` and, per client, by the
federation.

It runs a planned number of logical steps (``epochs / q``, or ``max_steps``) over a
:class:`~dpfl.privacy.PrivateTraining`, and stops early, without releasing anything, when the
privacy budget would be exceeded by the next step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpfl.accountants import steps_for_epochs
from dpfl.clients.monitor import StopTraining
from dpfl.device import to_device
from dpfl.errors import PrivacyBudgetError
from dpfl.privacy import PrivateTraining

__all__ = [
    "LocalTrainResult",
    "cross_entropy_per_sample",
    "evaluate",
    "train_non_private",
    "train_private",
]


def cross_entropy_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


@dataclass
class LocalTrainResult:
    steps: int
    stopped: str  # "completed" | "budget" | "diverged" | "no-progress"
    mean_loss: float
    epsilon: float
    seconds: float
    budget_message: str | None = None  # why it stopped early (budget, divergence)


def train_private(
    pt: PrivateTraining,
    *,
    epochs: float | None = None,
    max_steps: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> LocalTrainResult:
    """Trains for ``epochs`` expected passes (or ``max_steps`` steps, whichever is smaller).

    ``on_step(step, loss)`` is called after each step, ``on_epoch(epoch)`` after each full pass
    of the loader (1/q steps). Either may raise :class:`~dpfl.clients.monitor.StopTraining` to
    end the run with its status (a diverging run).
    """
    planned = max_steps if epochs is None else steps_for_epochs(epochs, pt.sample_rate)
    if max_steps is not None:
        planned = min(planned, max_steps)
    if planned is None or planned < 1:
        raise ValueError("train_private needs epochs or max_steps >= 1")
    start = time.perf_counter()
    steps, loss_sum, loss_n = 0, 0.0, 0
    stopped, message, epoch = "completed", None, 0
    while steps < planned:
        for x, y in pt.data_loader:
            try:
                loss = pt.train_step(x, y, loss_fn)
            except PrivacyBudgetError as e:
                stopped, message = "budget", str(e)
                break
            steps += 1
            if not math.isnan(loss):
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
            if (stop := _hook(on_step, steps, loss)) is not None:
                stopped, message = stop
                break
            if steps >= planned:
                break
        else:
            epoch += 1
            if (stop := _hook(on_epoch, epoch)) is not None:
                stopped, message = stop
                break
            continue
        if stopped != "completed":
            break
    return LocalTrainResult(
        steps=steps,
        stopped=stopped,
        mean_loss=loss_sum / loss_n if loss_n else float("nan"),
        epsilon=pt.epsilon(),
        seconds=time.perf_counter() - start,
        budget_message=message,
    )


def train_non_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
) -> LocalTrainResult:
    """Plain minibatch training for ``steps`` steps (cycling the loader): baselines, and the
    local solver of clients whose privacy is provided elsewhere (user-level DP-FedAvg).

    ``on_step`` and ``on_epoch`` as in :func:`train_private`."""
    start, done, loss_sum = time.perf_counter(), 0, 0.0
    stopped, message, epoch = "completed", None, 0
    device = _device_of(model)
    model.train()
    while done < steps and stopped == "completed":
        for x, y in loader:
            x, y = to_device(x, device), to_device(y, device)
            optimizer.zero_grad()
            out = model(**x) if isinstance(x, Mapping) else model(x)
            loss = loss_fn(out, y).mean()
            loss.backward()
            optimizer.step()
            done, loss_sum = done + 1, loss_sum + float(loss.detach())
            if (stop := _hook(on_step, done, float(loss.detach()))) is not None:
                stopped, message = stop
                break
            if done >= steps:
                break
        else:
            epoch += 1
            if (stop := _hook(on_epoch, epoch)) is not None:
                stopped, message = stop
    return LocalTrainResult(
        done, stopped, loss_sum / max(done, 1), math.inf, time.perf_counter() - start, message
    )


def _hook(fn: Callable | None, *args) -> tuple[str, str] | None:
    """Calls a step / epoch hook; (status, message) if it asked the run to stop."""
    if fn is None:
        return None
    try:
        fn(*args)
    except StopTraining as e:
        return e.status, e.message
    return None


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return torch.device("cpu") if p is None else p.device


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a classifier on ``dataset``."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct, n = 0.0, 0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        total_loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += int(y.numel())
    model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1)
