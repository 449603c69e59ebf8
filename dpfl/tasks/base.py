"""The task interface (see :mod:`dpfl.tasks`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dpfl.config import Config
from dpfl.registry import Registry

__all__ = ["TASKS", "Task", "TaskData", "get_task"]


@dataclass(frozen=True)
class TaskData:
    """A task's data: the training split, the held-out split and what the model builder needs."""

    train: Dataset
    test: Dataset
    info: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """What one kind of training needs; stateless, one instance per config."""

    name: ClassVar[str] = ""
    #: the evaluation metric reported as the run's result ("accuracy", "perplexity")
    metric: ClassVar[str] = "accuracy"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abstractmethod
    def load_data(self) -> TaskData:
        """The training and held-out splits (validated; errors are ConfigErrors)."""

    @abstractmethod
    def build_model(self, data: TaskData) -> nn.Module:
        """A fresh model for ``data`` (seeded by the caller)."""

    @abstractmethod
    def per_sample_loss(self, output: Any, target: Any) -> torch.Tensor:
        """One loss per record ``[B]``: what the private step clips per record."""

    @abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Held-out metrics: at least ``loss`` and :attr:`metric`."""

    def labels(self, dataset: Dataset) -> np.ndarray | None:
        """Per-record labels for label-skewed partitions (None: the task has none)."""
        return None

    def groups(self, dataset: Dataset) -> np.ndarray | None:
        """Per-record owners for ``federation.partition = "natural"`` (None: the data has none)."""
        return None

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a federation exchanges and a checkpoint keeps (default: the whole state)."""
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Loads what :meth:`trainable_state` gave (strictly: same keys, same shapes)."""
        model.load_state_dict(state)

    def export(self, model: nn.Module, directory: Path) -> list[Path]:
        """Writes the trained model to ``directory`` (default: ``model.pt``, a state_dict that
        ``model.path`` loads back); returns the files written."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "model.pt"
        torch.save(self.trainable_state(model), path)
        return [path]


TASKS: Registry[type[Task]] = Registry("task")


def get_task(cfg: Config) -> Task:
    """The task named by ``cfg.task``."""
    return TASKS.get(cfg.task)(cfg)
