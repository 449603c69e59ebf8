"""Model registry: name -> model for a data set's shape."""

from __future__ import annotations

from torch import nn

from dpfl.config import ModelConfig
from dpfl.models.cnn import SmallCNN
from dpfl.registry import Registry

__all__ = ["MODELS", "create_model"]

MODELS: Registry[nn.Module] = Registry("model")


@MODELS.register("cnn")
def _cnn(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    return SmallCNN(channels, num_classes, image_size)


def create_model(
    cfg: ModelConfig, *, channels: int, image_size: int, num_classes: int
) -> nn.Module:
    return MODELS.create(cfg.name, cfg, channels, image_size, num_classes)
