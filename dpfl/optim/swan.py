"""SWAN: stateless SGD with gradient normalization and whitening (Ma, Gong, Scetbon, Meeds, ICML
2025; spec ``optimizers.md`` section 3; the paper's text and code were not found: this follows
the formal definition restated by the same authors and the spec's proposal).

Hidden matrices G (conv filters viewed (out, -1)), in float32, oriented so that m <= n:

    G~ = (G - row mean) / (row std + eps)                 GradNorm (each of the m rows over n)
    A = G~ G~^T;  Y = A / ||A||_F;  Z = I                  coupled Newton-Schulz for A^{-1/2}:
    repeat ns_steps:  T = 3I - Z Y;  Y <- beta Y T;  Z <- beta T Z
    D = Z G~;  D <- sqrt(m n) D / ||D||_F                  whitened, rescaled to entry-RMS 1
    p <- p - lr D                                          (transposed back)

``ns_beta = 0.5`` with 6-10 steps is the classical coupled iteration (converges to A^{-1/2}
scaled); the "diagonal" cheap variant of one re-implementation is not provided. Other
parameters: AdamW at ``adam_lr``. State: none on hidden matrices.
"""

from __future__ import annotations

import math

import torch

from dpfl.errors import ConfigError
from dpfl.optim._common import MatrixOptimizer

__all__ = ["SWAN", "swan_direction"]


def swan_direction(
    g: torch.Tensor, ns_steps: int = 8, ns_beta: float = 0.5, eps: float = 1e-8
) -> torch.Tensor:
    x = g.reshape(g.shape[0], -1).float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    m, n = x.shape
    x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, unbiased=False, keepdim=True) + eps)
    a = x @ x.T
    y = a / (a.norm() + eps)
    z = torch.eye(m, dtype=x.dtype)
    eye3 = 3 * torch.eye(m, dtype=x.dtype)
    for _ in range(ns_steps):
        t = eye3 - z @ y
        y, z = ns_beta * y @ t, ns_beta * t @ z
    d = z @ x
    d = math.sqrt(m * n) * d / (d.norm() + eps)
    if transposed:
        d = d.T
    return d.reshape(g.shape).to(g.dtype)


class SWAN(MatrixOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        ns_steps: int = 8,
        ns_beta: float = 0.5,
        adam_lr: float = 2e-2,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if ns_steps < 1 or not 0 < ns_beta <= 1:
            raise ConfigError("SWAN needs ns_steps >= 1 and 0 < ns_beta <= 1")
        super().__init__(
            params,
            dict(
                lr=lr,
                ns_steps=ns_steps,
                ns_beta=ns_beta,
                adam_lr=adam_lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
            ),
        )

    def matrix_step(self, p, grad, state, group) -> None:
        self.apply(p, swan_direction(grad, group["ns_steps"], group["ns_beta"]), group)
