"""Shared pieces of dpfl's optimizers: hyperparameter checks, role handling, and the AdamW
update with the DP-AdamBC correction.

DP-AdamBC (Tang, Panda, Mittal, AAAI 2024, arXiv 2312.14334): a privatized gradient's second
moment is biased by the noise, E[g~^2] = E[g^2] + s^2 with s = sigma C / B per coordinate, so the
denominator uses ``sqrt(max(v_hat - s^2, floor))``. The private step writes s^2 into every param
group that has a ``dp_noise_var`` key, before each inner step.

The floor gamma' (the paper's value was not found, spec 0.2) is ours: ``(floor_rel * s)^2`` with
``floor_rel = 1``, i.e. the denominator never drops below the noise std. An absolute floor such as
1e-8 makes noise-dominated coordinates (where v_hat - s^2 is about 0) take steps of
m_hat / 1e-4: measured here, SCALE's AdamW part then diverged under DP on digits at every lr.
With the relative floor, pure-noise coordinates step as uncorrected Adam would, and the
correction removes the noise bias where the signal dominates.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dpfl.errors import ConfigError
from dpfl.validation import positive

__all__ = ["adamw_update", "check_betas", "check_lr", "check_momentum", "infer_role"]


def check_lr(lr: float, name: str = "lr") -> None:
    positive(name, lr)


def check_momentum(momentum: float, name: str = "momentum") -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {momentum!r}")


def check_betas(betas: tuple[float, float]) -> None:
    if len(betas) != 2:
        raise ConfigError(f"betas must be a pair, got {betas!r}")
    check_momentum(betas[0], "beta1")
    check_momentum(betas[1], "beta2")


def check_non_negative(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def infer_role(group: dict[str, Any]) -> str:
    """The group's role, or (plain params) hidden for 2+-D tensors and vector otherwise."""
    role = group.get("role")
    if role is not None:
        return role
    dims = {p.dim() for p in group["params"]}
    if dims and min(dims) >= 2:
        return "hidden"
    if dims and max(dims) <= 1:
        return "vector"
    raise ConfigError(
        "a param group without a role mixes matrices and vectors; build groups with "
        "dpfl.optim.roles.role_param_groups(model)"
    )


@torch.no_grad()
def adamw_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    noise_var: float = 0.0,
    floor_rel: float = 1.0,
) -> None:
    """One AdamW step on ``p`` (decoupled weight decay, bias-corrected moments, DP-AdamBC)."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    b1, b2 = betas
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(grad, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = state["exp_avg"] / (1 - b1**t)
    v_hat = state["exp_avg_sq"] / (1 - b2**t)
    if noise_var > 0:
        v_hat = (v_hat - noise_var).clamp_min(max(1e-8, floor_rel**2 * noise_var))
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the hybrid solvers: parameters of ``matrix_roles`` (default: hidden matrices) get
    the subclass's :meth:`matrix_step`; every other parameter gets AdamW at ``adam_lr`` (with
    DP-AdamBC). Conv filters reach ``matrix_step`` as they are; subclasses view them (out, -1)."""

    matrix_roles: tuple[str, ...] = ("hidden",)

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        check_lr(defaults["lr"])
        check_lr(defaults["adam_lr"], "adam_lr")
        check_betas(defaults["betas"])
        check_non_negative(defaults.get("weight_decay", 0.0), "weight_decay")
        if "momentum" in defaults:
            check_momentum(defaults["momentum"])
        super().__init__(params, {**defaults, "dp_noise_var": 0.0})
        for group in self.param_groups:
            group["role"] = infer_role(group)

    def matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def apply(p: torch.Tensor, update: torch.Tensor, group: dict, scale: float = 1.0) -> None:
        """Decoupled weight decay, then ``p -= lr * scale * update`` (update reshaped to p)."""
        if group.get("weight_decay"):
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.reshape(p.shape), alpha=-group["lr"] * scale)

    def before_step(self) -> None:
        """Hook run once per step before any parameter is updated."""

    def skip(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is left untouched (weights and state) this step."""
        return False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.before_step()
        for group in self.param_groups:
            matrix = group["role"] in self.matrix_roles
            for p in group["params"]:
                if p.grad is None or self.skip(p):
                    continue
                if matrix and p.dim() >= 2:
                    self.matrix_step(p, p.grad, self.state[p], group)
                else:
                    adamw_update(
                        p,
                        p.grad,
                        self.state[p],
                        lr=group["adam_lr"],
                        betas=group["betas"],
                        eps=group["eps"],
                        weight_decay=group.get("weight_decay", 0.0),
                        noise_var=group["dp_noise_var"],
                    )
        return loss
