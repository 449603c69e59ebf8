"""A small multilayer perceptron: the built-in model for tabular data (CSV files, ``[N, F]``
arrays), where a record is ``[F, 1, 1]``; it flattens any record, so it also runs on images."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """flatten-fc(hidden)-ReLU-fc(hidden)-ReLU-fc(classes); no normalization layer, so nothing
    mixes the records of a batch."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
