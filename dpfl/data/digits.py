"""scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes): the embedded default for
fast tests and centralized training. Ships inside scikit-learn; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dpfl.errors import ConfigError

__all__ = ["load_digits_split"]


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Stratified train/test split of the digits as ``[N, 1, 8, 8]`` float tensors in [0, 1]."""
    if not (0 < test_fraction < 1):
        raise ConfigError(f"test fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in range(10):
        idx = np.flatnonzero(bunch.target == label)
        rng.shuffle(idx)
        test_idx.extend(idx[: max(1, round(len(idx) * test_fraction))].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    train = np.flatnonzero(~mask)
    rng.shuffle(train)
    test = np.flatnonzero(mask)
    return (
        TensorDataset(x[train], y[train]),
        TensorDataset(x[test], y[test]),
    )
