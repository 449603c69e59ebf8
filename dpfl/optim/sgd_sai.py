"""SGD-SaI: SGD with momentum and a per-tensor learning-rate scale fixed at the first step
(Xu, Xiang, Cai, Wen, arXiv 2412.11768; spec ``optimizers.md`` section 1).

The scale of tensor p is its gradient signal-to-noise ratio at the first step:

* ``gsnr="sqrt_numel"`` (default): sqrt(numel(p)), data-independent (official v1.1.0). Under DP the
  data-dependent statistic equals it within about 2 % (spec 1.3, 1.5) and this needs no privacy
  argument at all, so it is our default;
* ``gsnr="std"``: ||g|| / (std(g) + eps) of the first (privatized) gradient (official v1.0.3 /
  v1.0.4); a one-element tensor gets 1.0 (= sqrt(numel)) instead of the official |g| / eps.

``normalize="max"`` divides every scale by the global maximum (v1.0.4, the paper's wording);
``"none"`` keeps raw scales (v1.0.3, v1.1.0; those need a far smaller lr). The momentum buffer
starts at the first gradient (``first_buffer="grad"``, official) or at zero
(``"zeros"``); buf <- beta buf + (1 - beta) g; momentum 0 uses g itself (the official code
crashes there). Decoupled weight decay: p <- p (1 - lr wd) - lr scale buf.

State: the momentum buffer (4 bytes/param; none at momentum 0) plus one scalar per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from dpfl.errors import ConfigError
from dpfl.optim._common import check_lr, check_momentum, check_non_negative

__all__ = ["SGDSaI"]


class SGDSaI(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
        gsnr: str = "sqrt_numel",
        normalize: str = "max",
        first_buffer: str = "grad",
    ) -> None:
        check_lr(lr)
        check_momentum(momentum)
        check_non_negative(weight_decay, "weight_decay")
        check_non_negative(eps, "eps")
        if gsnr not in ("sqrt_numel", "std"):
            raise ConfigError(f"gsnr must be sqrt_numel or std, got {gsnr!r}")
        if normalize not in ("max", "none"):
            raise ConfigError(f"normalize must be max or none, got {normalize!r}")
        if first_buffer not in ("grad", "zeros"):
            raise ConfigError(f"first_buffer must be grad or zeros, got {first_buffer!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        self.gsnr_mode, self.normalize, self.first_buffer = gsnr, normalize, first_buffer
        self.gsnr_max: float | None = None

    @staticmethod
    def _gsnr(grad: torch.Tensor, mode: str, eps: float) -> float:
        n = grad.numel()
        if mode == "sqrt_numel" or n == 1:
            return math.sqrt(n)
        return float(grad.norm() / (grad.std() + eps))

    @torch.no_grad()
    def _init_scales(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["gsnr"] = self._gsnr(p.grad, self.gsnr_mode, group["eps"])
        values = [s["gsnr"] for s in self.state.values() if "gsnr" in s]
        self.gsnr_max = max(values, default=1.0)

    def scale(self, p: torch.Tensor) -> float:
        g = self.state[p]["gsnr"]
        return g / self.gsnr_max if self.normalize == "max" else g

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.gsnr_max is None:
            self._init_scales()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "gsnr" not in state:  # a tensor without gradient at the first step
                    state["gsnr"] = self._gsnr(p.grad, self.gsnr_mode, group["eps"])
                g = p.grad
                if beta != 0:
                    if "momentum_buffer" not in state:
                        buf = g.clone() if self.first_buffer == "grad" else torch.zeros_like(g)
                        if self.first_buffer == "zeros":
                            buf.lerp_(g, 1 - beta)
                        state["momentum_buffer"] = buf
                    else:
                        state["momentum_buffer"].lerp_(g, 1 - beta)
                    g = state["momentum_buffer"]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(g, alpha=-lr * self.scale(p))
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = super().state_dict()
        out["gsnr_max"] = self.gsnr_max
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        self.gsnr_max = state_dict.pop("gsnr_max", None)
        super().load_state_dict(state_dict)
