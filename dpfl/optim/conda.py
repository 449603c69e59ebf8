"""Conda: column-normalized Adam (Wang et al., arXiv 2509.24218; spec ``optimizers.md`` section 6,
following the official code). NOT memory-saving: it is in dpfl as a faster solver.

Hidden matrices W (R x C; conv filters viewed (out, -1)):

    m <- beta1 m + (1 - beta1) g                       (original coordinates)
    every ``update_proj_gap`` steps (and at the first): U, S, Vh = svd(m);
        O = Vh (right rotation) if R >= C else U (left rotation)
    g~ = rot(g), m~ = rot(m);  rot(X) = X O^T (R >= C) | O^T X (R < C)
    v <- beta2 v + (1 - beta2) g~^2                     (rotated coordinates; DP-AdamBC applies:
                                                         an orthogonal rotation keeps the
                                                         per-coordinate noise variance)
    N = unrot(m~ / (sqrt(v) + eps)) * scale;  step = lr sqrt(1 - beta2^t) / (1 - beta1^t)
    W <- W - step N;  W <- W - lr wd W                  (decoupled weight decay AFTER the update)

Other parameters: the same Adam without rotation (AdamW at ``adam_lr``). State: m, v and one
min(R, C)^2 rotation per matrix: >= 8 bytes/param.
"""

from __future__ import annotations

import torch

from dpfl.errors import ConfigError
from dpfl.optim._common import MatrixOptimizer

__all__ = ["Conda"]


class Conda(MatrixOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_proj_gap: int = 2000,
        scale: float = 1.0,
        adam_lr: float | None = None,
        floor_rel: float = 1.0,
    ) -> None:
        if update_proj_gap < 1 or scale <= 0:
            raise ConfigError("Conda needs update_proj_gap >= 1 and scale > 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                update_proj_gap=update_proj_gap,
                scale=scale,
                adam_lr=lr if adam_lr is None else adam_lr,
                floor_rel=floor_rel,
            ),
        )

    def matrix_step(self, p, grad, state, group) -> None:
        b1, b2 = group["betas"]
        g = grad.reshape(p.shape[0], -1).float()
        rows, cols = g.shape
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
        m = state["exp_avg"].lerp_(g, 1 - b1)
        if "rotation" not in state or state["step"] % group["update_proj_gap"] == 0:
            u, _, vh = torch.linalg.svd(m, full_matrices=False)
            state["rotation"] = vh if rows >= cols else u
        o = state["rotation"]
        right = rows >= cols

        def rot(x):
            return x @ o.T if right else o.T @ x

        g_r, m_r = rot(g), rot(m)
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(g_r)
        v = state["exp_avg_sq"].mul_(b2).addcmul_(g_r, g_r, value=1 - b2)
        state["step"] += 1
        t = state["step"]
        noise_var = group["dp_noise_var"]
        if noise_var > 0:  # DP-AdamBC in the rotated basis (bias-corrected v, relative floor)
            v_hat = (v / (1 - b2**t) - noise_var).clamp_min(group["floor_rel"] ** 2 * noise_var)
            v_eff = v_hat * (1 - b2**t)
        else:
            v_eff = v
        n = m_r / (v_eff.sqrt() + group["eps"])
        n = (n @ o if right else o @ n) * group["scale"]
        step = group["lr"] * (1 - b2**t) ** 0.5 / (1 - b1**t)
        p.add_(n.reshape(p.shape).to(p.dtype), alpha=-step)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
