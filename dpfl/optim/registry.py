"""Optimizer registry: ``create_optimizer(OptimizerConfig, params)``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from dpfl.config import OptimizerConfig
from dpfl.registry import Registry

__all__ = ["OPTIMIZERS", "create_optimizer"]

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params, cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> Optimizer:
    """The optimizer named ``cfg.name`` over ``params``."""
    return OPTIMIZERS.create(cfg.name, [p for p in params if p.requires_grad], cfg)
