"""Embedded data sets (shipped in packages or the repo; nothing is downloaded at run time)."""

from dpfl.data.registry import DATASETS, ImageData, load_dataset

__all__ = ["DATASETS", "ImageData", "load_dataset"]
