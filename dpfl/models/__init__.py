"""Model builders by name."""

from dpfl.models.cnn import SmallCNN
from dpfl.models.registry import MODELS, create_model

__all__ = ["MODELS", "SmallCNN", "create_model"]
