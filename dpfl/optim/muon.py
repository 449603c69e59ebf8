"""Muon on hidden matrices, AdamW on everything else, as one optimizer (Jordan et al. 2024; spec
``optimizers.md`` 7.1).

Hidden matrices (``role="hidden"``; conv filters viewed as (out, -1)):

    m <- beta m + (1 - beta) g                      (zero-initialized)
    u = (1 - beta) g + beta m   if nesterov else m
    O = NewtonSchulz5(u) * sqrt(max(1, rows / cols))
    p <- p (1 - lr wd) - lr O

NewtonSchulz5 is the official quintic iteration (a, b, c = 3.4445, -4.7750, 2.0315, 5 steps, on
the wide orientation, after scaling to Frobenius norm 1). Other roles get AdamW (official
``MuonWithAuxAdam`` defaults: lr 3e-4, betas (0.9, 0.95), eps 1e-10, wd 0), with DP-AdamBC when
the private step sets ``dp_noise_var``.

Why not ``torch.optim.Muon`` (present in torch 2.13): it rejects every non-2-D parameter (conv
filters included) and runs Newton-Schulz in bfloat16, which is slow and lossy on CPU; here the
iteration runs in float32 by default (``ns_dtype`` to change it) and a test checks that the update
equals torch.optim.Muon's on 2-D matrices. Defaults are the official repository's (lr 0.02,
wd 0), not torch's (lr 1e-3, wd 0.1).

State: momentum, 4 bytes/param on hidden matrices; AdamW's 8 elsewhere.
"""

from __future__ import annotations

import math

import torch

from dpfl.errors import ConfigError
from dpfl.optim._common import MatrixOptimizer

__all__ = ["MuonHybrid", "newton_schulz5"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Approximate orthogonalization U S' V^T of a 2-D matrix (S' roughly in [0.5, 1.5])."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if not wide:
        x = x.T
    return x.to(g.dtype)


class MuonHybrid(MatrixOptimizer):
    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        adam_lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-10,
    ) -> None:
        if ns_steps < 1:
            raise ConfigError(f"ns_steps must be >= 1, got {ns_steps}")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adam_lr=adam_lr,
                betas=tuple(betas),
                eps=eps,
            ),
        )
        self.ns_dtype = ns_dtype

    def matrix_step(self, p, grad, state, group) -> None:
        beta = group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"].lerp_(grad, 1 - beta)
        u = grad.lerp(buf, beta) if group["nesterov"] else buf
        u2 = u.reshape(u.shape[0], -1)
        o = newton_schulz5(u2, group["ns_steps"], self.ns_dtype)
        o = o * math.sqrt(max(1.0, u2.shape[0] / u2.shape[1]))
        self.apply(p, o, group)
