"""Per-sample differential privacy on one learner (torch + Opacus; no Flower imports)."""

from dpfl.privacy.clipping import (
    AdaptiveClip,
    AutomaticClip,
    ClipPolicy,
    FlatClip,
    GroupClip,
    PerLayerClip,
)
from dpfl.privacy.dicesgd import ErrorFeedback
from dpfl.privacy.engine import PrivateTraining, make_backend, make_clip_policy, make_private
from dpfl.privacy.optimizer import DPOptimizer

__all__ = [
    "AdaptiveClip",
    "AutomaticClip",
    "ClipPolicy",
    "DPOptimizer",
    "ErrorFeedback",
    "FlatClip",
    "GroupClip",
    "PerLayerClip",
    "PrivateTraining",
    "make_backend",
    "make_clip_policy",
    "make_private",
]
