"""SinkGD: stateless gradient multi-normalization by square-root Sinkhorn (Scetbon, Ma, Gong,
Meeds, arXiv 2502.06742; spec ``optimizers.md`` section 4; official code not found, the update
follows three consistent readings of the paper's Alg. 3/4).

Hidden matrices G (m x n; conv filters viewed (out, -1)), in float32:

    repeat iters (default 5):
        X <- sqrt(n) X / ||row||      (every row gets norm sqrt(n))
        X <- sqrt(m) X / ||column||   (every column gets norm sqrt(m))
    p <- p - lr X

Other parameters: AdamW at ``adam_lr``. Default lr = 0.05 x adam_lr (the readers' ratio).
State: none on hidden matrices; 8 bytes/param elsewhere.
"""

from __future__ import annotations

import math

import torch

from dpfl.errors import ConfigError
from dpfl.optim._common import MatrixOptimizer

__all__ = ["SinkGD", "sr_sinkhorn"]


def sr_sinkhorn(g: torch.Tensor, iters: int = 5, eps: float = 1e-8) -> torch.Tensor:
    x = g.reshape(g.shape[0], -1).to(torch.float32, copy=True)  # scaled in place below
    m, n = x.shape
    for _ in range(iters):
        x.mul_(
            torch.linalg.vector_norm(x, dim=1, keepdim=True)
            .clamp_min_(eps)
            .reciprocal_()
            .mul_(math.sqrt(n))
        )
        x.mul_(
            torch.linalg.vector_norm(x, dim=0, keepdim=True)
            .clamp_min_(eps)
            .reciprocal_()
            .mul_(math.sqrt(m))
        )
    return x.reshape(g.shape).to(g.dtype)


class SinkGD(MatrixOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        iters: int = 5,
        adam_lr: float = 2e-2,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if iters < 1:
            raise ConfigError(f"iters must be >= 1, got {iters}")
        super().__init__(
            params,
            dict(
                lr=lr,
                iters=iters,
                adam_lr=adam_lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
            ),
        )

    def matrix_step(self, p, grad, state, group) -> None:
        self.apply(p, sr_sinkhorn(grad, group["iters"]), group)
