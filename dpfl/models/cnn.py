"""The small CNN of the image demos (GroupNorm, not BatchNorm: BatchNorm mixes samples, which
per-sample DP cannot allow)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv(16)-GN-ReLU-[pool]-conv(32)-GN-ReLU-pool-fc(64)-ReLU-fc(classes).

    For 8x8 inputs (scikit-learn digits) this is the 38k-parameter CNN Opacus was measured on
    here (``notes/opacus.md``), with GroupNorm; larger inputs get an extra pooling stage so the
    classifier keeps 512 inputs.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2) if image_size >= 16 else nn.Identity(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2) if image_size == 8 else nn.AdaptiveMaxPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
