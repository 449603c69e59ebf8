"""Pure aggregation functions on model states (``name -> tensor``), shared by every strategy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "State",
    "add_scaled",
    "check_state",
    "coordinate_median",
    "flat_clip",
    "global_norm",
    "subtract",
    "trimmed_mean",
    "weighted_average",
]

State = dict[str, torch.Tensor]


def _float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def check_state(
    reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> str | None:
    """Why ``state`` cannot be aggregated with ``reference`` (None when it can): missing or extra
    keys, wrong shape or dtype, NaN or Inf."""
    if set(state) != set(reference):
        missing = sorted(set(reference) - set(state))[:3]
        extra = sorted(set(state) - set(reference))[:3]
        return f"wrong keys (missing {missing}, unexpected {extra})"
    for k, ref in reference.items():
        v = state[k]
        if tuple(v.shape) != tuple(ref.shape):
            return f"wrong shape for {k}: {tuple(v.shape)} instead of {tuple(ref.shape)}"
        if v.dtype != ref.dtype:
            return f"wrong dtype for {k}: {v.dtype} instead of {ref.dtype}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"non-finite values (NaN/Inf) in {k}"
    return None


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted mean of the floating tensors; other tensors are taken from the first state."""
    total = float(sum(weights))
    out = dict(states[0])
    for k in _float_keys(states[0]):
        out[k] = sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
    return out


def coordinate_median(states: Sequence[State]) -> State:
    out = dict(states[0])
    for k in _float_keys(states[0]):
        out[k] = torch.stack([s[k] for s in states]).median(dim=0).values
    return out


def trimmed_mean(states: Sequence[State], trim_fraction: float) -> State:
    """Coordinate-wise mean after dropping the ``floor(trim_fraction * n)`` smallest and largest."""
    n = len(states)
    cut = int(math.floor(trim_fraction * n))
    out = dict(states[0])
    for k in _float_keys(states[0]):
        stacked = torch.stack([s[k] for s in states]).sort(dim=0).values
        out[k] = stacked[cut : n - cut].mean(dim=0)
    return out


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> State:
    """``a - b`` on floating tensors (the model update)."""
    return {k: a[k] - b[k] for k in _float_keys(a)}


def add_scaled(
    state: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], scale: float
) -> State:
    out = dict(state)
    for k, u in update.items():
        out[k] = state[k] + scale * u
    return out


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(u.double().pow(2).sum()) for u in update.values()))


def flat_clip(update: Mapping[str, torch.Tensor], clip: float) -> tuple[State, float]:
    """``update * min(1, clip / ||update||)`` over the global L2 norm; returns (clipped, norm)."""
    norm = global_norm(update)
    factor = min(1.0, clip / (norm + 1e-12))
    return {k: u * factor for k, u in update.items()}, norm
