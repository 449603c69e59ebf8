"""FedProx's proximal term as an optimizer wrapper: before the inner step, every gradient gets
``mu * (theta - theta_global)`` added. Under sample-level DP it runs after the noise (the term does
not depend on data, so this is post-processing and costs no privacy)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

__all__ = ["ProximalOptimizer"]


class ProximalOptimizer(Optimizer):
    def __init__(self, inner: Optimizer, anchor: list[torch.Tensor], mu: float) -> None:
        self.inner, self.mu = inner, float(mu)
        params = [p for g in inner.param_groups for p in g["params"]]
        if len(params) != len(anchor):
            raise ValueError("one anchor tensor per parameter is needed")
        self._pairs = list(zip(params, [a.detach().clone() for a in anchor], strict=True))

    @property
    def param_groups(self):  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.inner.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for p, a in self._pairs:
            if p.grad is not None and self.mu:
                p.grad.add_(p - a, alpha=self.mu)
        return self.inner.step(closure)

    def state_dict(self):  # type: ignore[override]
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        self.inner.load_state_dict(state_dict)
