"""Where models train: ``training.device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).

``auto`` is CUDA when torch sees a GPU, else the CPU. Data loaders yield CPU tensors; batches are
moved to the model's device in the training step. Noise comes from the private step's seeded
CPU generator and is moved to the device, so a seeded run draws the same noise on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dpfl.errors import ConfigError

__all__ = ["resolve_device", "to_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device for ``training.device``; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"training.device={name!r} but torch sees no CUDA device (torch "
            f"{torch.__version__}); use training.device='cpu' or 'auto'"
        )
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"training.device={name!r}: only {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
