"""Measured optimizer-state size: bytes of state tensors per parameter, by role."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from dpfl.optim.roles import assign_roles

__all__ = ["ProbeModel", "state_bytes_per_param"]


class ProbeModel(nn.Module):
    """A tiny model with every role: embedding, LayerNorm, hidden Linear, head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16)
        self.hidden = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.norm(self.emb(ids)).mean(1))))


def state_bytes_per_param(opt: Optimizer, model: nn.Module) -> dict[str, float]:
    """Bytes of (non-scalar) state tensors in ``opt.state`` per parameter of each role."""
    roles = assign_roles(model)
    names = {id(p): n for n, p in model.named_parameters()}
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            role = roles[names[id(p)]]
            size = sum(
                v.numel() * v.element_size() for v in _tensors(opt.state[p]) if v.numel() > 1
            )
            total[role] = total.get(role, 0) + size
            count[role] = count.get(role, 0) + p.numel()
    return {r: total[r] / count[r] for r in total}


def _tensors(state):
    for v in state.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):
            yield from _tensors(v)
