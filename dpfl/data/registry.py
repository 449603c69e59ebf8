"""Data set registry: name -> (train, test, shape facts)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import TensorDataset

from dpfl.config import DataConfig
from dpfl.data.digits import load_digits_split
from dpfl.registry import Registry

__all__ = ["DATASETS", "ImageData", "load_dataset"]


@dataclass(frozen=True)
class ImageData:
    train: TensorDataset
    test: TensorDataset
    channels: int
    image_size: int
    num_classes: int


DATASETS: Registry[ImageData] = Registry("data set")


@DATASETS.register("digits")
def _digits(cfg: DataConfig, seed: int) -> ImageData:
    train, test = load_digits_split(cfg.test_fraction, seed)
    return ImageData(train, test, channels=1, image_size=8, num_classes=10)


@DATASETS.register("mnist-5k")
def _mnist5k(cfg: DataConfig, seed: int) -> ImageData:
    from dpfl.data.mnist5k import load_mnist5k_split

    train, test = load_mnist5k_split(cfg.test_fraction, seed)
    return ImageData(train, test, channels=1, image_size=28, num_classes=10)


def load_dataset(cfg: DataConfig, seed: int = 0) -> ImageData:
    return DATASETS.create(cfg.name, cfg, seed)
