"""AuON and Hybrid-AuON (Maity, arXiv 2509.24320; spec ``optimizers.md`` 7.2), paper / 2025-code
semantics:

    m <- beta m + (1 - beta) g;   u = (1 - beta) g + beta m          (Nesterov, beta 0.95)
    hybrid: u <- NewtonSchulz5(u, ns_steps)                          (default 1 step, v1 abstract)
    X = u / (||u||_F + 1e-7);  r = sqrt(mean(cosh(gamma X)^2))
    O = X / (r + 1e-8);  p <- p (1 - lr wd) - lr sqrt(max(1, R/C)) O

Since ||X||_F = 1, 1 <= r <= sqrt(1 + sinh(gamma)^2 / N) (spec's bound): for real tensors the
cosh factor is about 1 and AuON is a unit-Frobenius-norm Nesterov update. Other parameters:
AdamW (the official README's lr 0.008 and betas (0.8, 0.95)). State: momentum, 4 bytes/param.
"""

from __future__ import annotations

import math

import torch

from dpfl.errors import ConfigError
from dpfl.optim._common import MatrixOptimizer
from dpfl.optim.muon import newton_schulz5

__all__ = ["AuON", "auon_direction"]


def auon_direction(u: torch.Tensor, gamma: float = 1.0) -> tuple[torch.Tensor, float]:
    """(O, r) for a 2-D update ``u``."""
    x = u / (torch.linalg.vector_norm(u) + 1e-7)
    r = math.sqrt(float(torch.cosh(x * gamma).square_().mean()))
    return x.div_(r + 1e-8), r


class AuON(MatrixOptimizer):
    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        gamma: float = 1.0,
        hybrid: bool = False,
        ns_steps: int = 1,
        weight_decay: float = 0.0,
        adam_lr: float = 8e-3,
        betas=(0.8, 0.95),
        eps: float = 1e-8,
    ) -> None:
        if gamma <= 0 or ns_steps < 1:
            raise ConfigError("AuON needs gamma > 0 and ns_steps >= 1")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                gamma=gamma,
                hybrid=hybrid,
                ns_steps=ns_steps,
                weight_decay=weight_decay,
                adam_lr=adam_lr,
                betas=tuple(betas),
                eps=eps,
            ),
        )

    def matrix_step(self, p, grad, state, group) -> None:
        beta = group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"].lerp_(grad, 1 - beta)
        u = grad.lerp(buf, beta).reshape(p.shape[0], -1)
        if group["hybrid"]:
            u = newton_schulz5(u, group["ns_steps"])
        o, _ = auon_direction(u, group["gamma"])
        scale = math.sqrt(max(1.0, u.shape[0] / u.shape[1]))
        self.apply(p, o, group, scale)
