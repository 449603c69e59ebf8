"""Data set registry: name -> (train, test, shape facts); a ``data.path`` is read by its reader."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import TensorDataset

from dpfl.config import DataConfig
from dpfl.data.digits import load_digits_split
from dpfl.registry import Registry

__all__ = ["DATASETS", "ImageData", "load_dataset"]


@dataclass(frozen=True)
class ImageData:
    """A data set as every loop uses it: records ``[channels, image_size, image_size]`` (float32)
    and labels ``0 .. num_classes - 1`` (int64). ``classes`` names the labels of an own data set
    (the original labels or folder names, in the order of their ids)."""

    train: TensorDataset
    test: TensorDataset
    channels: int
    image_size: int
    num_classes: int
    classes: tuple[str, ...] | None = None


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


def _from_path(cfg: DataConfig, seed: int) -> ImageData:
    from dpfl.data import files
    from dpfl.sources import resolve_data_source

    # a DataConfig has resolved these already; resolving again costs nothing and keeps a
    # hand-built one (e.g. dataclasses.replace) honest
    reader, path = resolve_data_source(cfg.name, cfg.path, cfg.label_column)
    if reader == "npz":
        loaded = files.read_npz(path, cfg.test_fraction, seed)
    elif reader == "folder":
        loaded = files.read_folder(path, cfg.test_fraction, seed)
    else:
        loaded = files.read_csv(path, cfg.label_column, cfg.test_fraction, seed)
    train, test, channels, image_size, classes = loaded
    return ImageData(train, test, channels, image_size, len(classes), classes)


def load_dataset(cfg: DataConfig, seed: int = 0) -> ImageData:
    """The data set ``cfg`` names: a built-in one, or the records at ``cfg.path``.

    Raises:
        ConfigError: an unknown name, or a file that is missing, malformed or unusable (one line
            naming the file and the fix).
    """
    if cfg.path is not None:
        return _from_path(cfg, seed)
    return DATASETS.create(cfg.name, cfg, seed)
