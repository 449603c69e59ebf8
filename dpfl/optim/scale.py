"""SCALE: column-normalized SGD with last-layer momentum (Glentis, Li, Han, Hong, arXiv
2506.16659; spec ``optimizers.md`` section 2, following the official code).

Roles (param groups from :func:`dpfl.optim.roles.role_param_groups`, never module names):

* ``hidden`` (2+-D weights): u = colnorm(g); p <- p (1 - lr wd) - lr u. No state.
* ``embedding``: the same with the RMS taken over the vocabulary (``dim=0``). No state.
* ``head``: m <- beta m + (1 - beta) g (zero-initialized, no bias correction), then colnorm(m).
  4 bytes/param.
* ``vector``: AdamW (betas 0.9, 0.999, eps 1e-8) at ``adam_lr`` times the current/initial lr
  ratio of the group (it follows the same schedule shape), with DP-AdamBC when the private step
  sets ``dp_noise_var``. 8 bytes/param.

colnorm(G) for a (out, in) weight (conv filters viewed as (out, -1)): G / rms(G, dim=1).clamp_min
(1e-8): one scale per output unit over its inputs, RMS not L2 (the paper's "column" in its
y = xW convention is our row; spec 2.1).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from dpfl.optim._common import (
    adamw_update,
    check_betas,
    check_lr,
    check_momentum,
    check_non_negative,
    infer_role,
)

__all__ = ["SCALE", "colnorm"]


def colnorm(g: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Divide by the RMS along ``dim`` of the (size(0), -1) view (dim 1: per output unit)."""
    g2 = g.reshape(g.shape[0], -1)
    rms = g2.pow(2).mean(dim=dim, keepdim=True).sqrt().clamp_min(1e-8)
    return (g2 / rms).reshape(g.shape)


class SCALE(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        adam_lr: float = 2e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        check_lr(lr)
        check_lr(adam_lr, "adam_lr")
        check_momentum(momentum)
        check_betas(betas)
        check_non_negative(weight_decay, "weight_decay")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            adam_lr=adam_lr,
            betas=tuple(betas),
            eps=eps,
            dp_noise_var=0.0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group["role"] = infer_role(group)
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            role, lr, wd = group["role"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if role == "vector":
                    adam_lr = group["adam_lr"] * lr / group["initial_lr"]
                    adamw_update(
                        p,
                        g,
                        self.state[p],
                        lr=adam_lr,
                        betas=group["betas"],
                        eps=group["eps"],
                        weight_decay=wd,
                        noise_var=group["dp_noise_var"],
                    )
                    continue
                if role == "head":
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    g = state["momentum_buffer"].lerp_(g, 1 - group["momentum"])
                u = colnorm(g, dim=0 if role == "embedding" else 1)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u, alpha=-lr)
        return loss
