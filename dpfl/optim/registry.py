"""Optimizer registry: ``create_optimizer(OptimizerConfig, model)``.

Plain optimizers get the model's trainable parameters; hybrid ones (``scale``, ``muon``) get one
param group per role (:func:`dpfl.optim.roles.role_param_groups`).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn
from torch.optim import Optimizer

from dpfl.config import OptimizerConfig
from dpfl.errors import ConfigError
from dpfl.optim.auon import AuON
from dpfl.optim.conda import Conda
from dpfl.optim.defaults import default_lr
from dpfl.optim.drop_muon import DropMuon
from dpfl.optim.frugal import FRUGAL
from dpfl.optim.muon import MuonHybrid
from dpfl.optim.roles import role_param_groups
from dpfl.optim.scale import SCALE
from dpfl.optim.sgd_sai import SGDSaI
from dpfl.optim.sinkgd import SinkGD
from dpfl.optim.swan import SWAN
from dpfl.registry import Registry

__all__ = ["DESCRIPTIONS", "OPTIMIZERS", "create_optimizer"]

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adam_lr(cfg: OptimizerConfig) -> dict:
    return {} if cfg.adam_lr is None else {"adam_lr": cfg.adam_lr}


@OPTIMIZERS.register("sgd")
def _sgd(model, cfg: OptimizerConfig, **options) -> Optimizer:
    return torch.optim.SGD(
        _trainable(model),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        **options,
    )


@OPTIMIZERS.register("adam")
def _adam(model, cfg: OptimizerConfig, **options) -> Optimizer:
    return torch.optim.Adam(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay, **options)


@OPTIMIZERS.register("adamw")
def _adamw(model, cfg: OptimizerConfig, **options) -> Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay, **options)


@OPTIMIZERS.register("sgd-sai")
def _sgd_sai(model, cfg: OptimizerConfig, **options) -> Optimizer:
    return SGDSaI(
        _trainable(model),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        **options,
    )


def _hybrid(cls, momentum: float | None = None, **fixed):
    """A role-grouped solver; ``momentum`` is the class default used when the config has 0."""

    def make(model, cfg: OptimizerConfig, **options) -> Optimizer:
        kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, **_adam_lr(cfg), **fixed)
        if momentum is not None:
            kwargs["momentum"] = cfg.momentum or momentum
        return cls(role_param_groups(model), **(kwargs | options))

    return make


for _name, _factory in [
    ("scale", _hybrid(SCALE, momentum=0.9)),
    ("muon", _hybrid(MuonHybrid, momentum=0.95)),
    ("swan", _hybrid(SWAN)),
    ("sinkgd", _hybrid(SinkGD)),
    ("frugal", _hybrid(FRUGAL)),
    ("conda", _hybrid(Conda)),
    ("auon", _hybrid(AuON, momentum=0.95)),
    ("hybrid-auon", _hybrid(AuON, momentum=0.95, hybrid=True)),
    ("drop-muon", _hybrid(DropMuon, momentum=0.95)),
]:
    OPTIMIZERS.register(_name, _factory)


# Maintained implementations from pytorch-optimizer (kozistr/pytorch_optimizer), registered rather
# than rewritten. They know nothing of DP-AdamBC.
def _library(cls_name: str):
    def make(model, cfg: OptimizerConfig, **options) -> Optimizer:
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, cls_name)
        return cls(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay, **options)

    return make


for _name, _cls in [
    ("lion", "Lion"),
    ("adan", "Adan"),
    ("adabelief", "AdaBelief"),
    ("adamp", "AdamP"),
    ("diffgrad", "DiffGrad"),
]:
    OPTIMIZERS.register(_name, _library(_cls))

DESCRIPTIONS = {
    "sgd": "SGD (momentum optional); torch",
    "adam": "Adam; torch",
    "adamw": "AdamW; torch",
    "sgd-sai": "SGD-SaI: momentum SGD, per-tensor lr fixed from the first step's g-SNR",
    "scale": "SCALE: column-normalized SGD, momentum on the head only, AdamW on vectors",
    "swan": "SWAN: stateless row-standardized and whitened gradient on hidden matrices",
    "sinkgd": "SinkGD: stateless square-root-Sinkhorn normalized gradient on hidden matrices",
    "frugal": "FRUGAL: Adam on a rotating subset of hidden tensors, signSGD on the rest",
    "conda": "Conda: Adam in the momentum's singular basis (faster, not smaller)",
    "muon": "Muon: Newton-Schulz orthogonalized momentum on hidden matrices, AdamW elsewhere",
    "auon": "AuON: unit-norm (cosh-RMS scaled) Nesterov momentum on hidden matrices",
    "hybrid-auon": "Hybrid-AuON: AuON after one Newton-Schulz step",
    "drop-muon": "Drop-Muon: Muon on a random suffix of the layers each step",
    "lion": "Lion: sign of interpolated momentum; pytorch-optimizer",
    "adan": "Adan: adaptive Nesterov momentum; pytorch-optimizer",
    "adabelief": "AdaBelief: Adam with the belief second moment; pytorch-optimizer",
    "adamp": "AdamP: Adam with projection for scale-invariant weights; pytorch-optimizer",
    "diffgrad": "diffGrad: Adam with a gradient-change friction term; pytorch-optimizer",
}


def create_optimizer(cfg: OptimizerConfig, model: nn.Module, *, private: bool = True) -> Optimizer:
    """The optimizer named ``cfg.name`` over ``model``'s trainable parameters, with
    ``cfg.options`` (a JSON object) as extra constructor arguments.

    An unset ``cfg.lr`` is the solver's default learning rate for DP-SGD (``private``: the solver
    sees clipped, noised mean gradients) or for plain training (:mod:`dpfl.optim.defaults`).
    """
    factory = OPTIMIZERS.get(cfg.name)
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=default_lr(cfg.name, private=private))
    options = json.loads(cfg.options)
    try:
        return factory(model, cfg, **options)
    except TypeError as e:
        raise ConfigError(f"optimizer.options do not fit {cfg.name}: {e}") from None
