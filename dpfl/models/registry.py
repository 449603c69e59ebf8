"""Model registry: name -> model for a data set's shape; ``model.path`` names an own model.

``model.path`` (resolved by :mod:`dpfl.sources` when the config is built) is either an import
string ``package.module:factory``, whose return value is the model, or a checkpoint file loaded
into the built-in model ``model.name`` (:mod:`dpfl.models.imported`).
"""

from __future__ import annotations

from torch import nn

from dpfl.config import ModelConfig
from dpfl.errors import ConfigError
from dpfl.models.cnn import SmallCNN
from dpfl.models.mlp import MLP
from dpfl.registry import Registry

__all__ = ["MODELS", "create_model"]

MODELS: Registry[nn.Module] = Registry("model")


@MODELS.register("cnn")
def _cnn(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    if image_size < 2:
        raise ConfigError(
            f"model.name='cnn' convolves over pixels, and these records are {channels} "
            f"values of 1x1 (tabular data, e.g. a CSV file): set model.name='mlp', or model.path "
            "to an own model"
        )
    return SmallCNN(channels, num_classes, image_size)


@MODELS.register("mlp")
def _mlp(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    return MLP(channels * image_size * image_size, num_classes)


def create_model(
    cfg: ModelConfig, *, channels: int, image_size: int, num_classes: int
) -> nn.Module:
    """The model ``cfg`` names, for records ``[channels, image_size, image_size]``.

    Raises:
        ConfigError: an unknown name; an import string that does not import, or whose factory
            fails or returns no ``nn.Module``; a checkpoint that does not load or fit the model.
    """
    from dpfl.models import imported
    from dpfl.sources import FACTORY, is_import_string

    shape = {"channels": channels, "image_size": image_size, "num_classes": num_classes}
    if cfg.path is not None and is_import_string(cfg.path):
        return imported.build_from_factory(cfg.path, **shape)
    if cfg.name.lower() == FACTORY:
        raise ConfigError("model.name='factory' needs model.path = 'package.module:factory'")
    model = MODELS.create(cfg.name, cfg, channels, image_size, num_classes)
    if cfg.path is not None:
        imported.load_checkpoint(model, cfg.path, cfg.name)
    return model
