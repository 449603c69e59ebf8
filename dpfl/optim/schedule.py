"""Learning-rate schedules of centralized training (``optimizer.schedule``).

A schedule is a pure function of the logical step count, so a resumed run continues it exactly
(nothing about it is checkpointed) and the private step never sees it: it scales the solver's
learning rate after the gradient was privatized, which is post-processing.
"""

from __future__ import annotations

import math

import torch

from dpfl.errors import ConfigError

__all__ = ["SCHEDULES", "LRSchedule", "lr_factor", "refuse_in_federation"]

SCHEDULES = ("constant", "cosine", "linear")


def refuse_in_federation(optimizer_cfg) -> None:
    """A federation's clients train at a constant rate (each round is a fresh local run): a
    schedule or warm-up is refused, in the pre-run check and in the client alike."""
    if optimizer_cfg.schedule != "constant" or optimizer_cfg.warmup_steps:
        raise ConfigError(
            "optimizer.schedule / optimizer.warmup-steps shape centralized training (dpfl train, "
            "dpfl finetune); a federation's clients train at a constant optimizer.lr: remove them"
        )


def lr_factor(schedule: str, step: int, planned: int, warmup: int = 0) -> float:
    """The multiplier of the base learning rate for the step that follows ``step`` steps done.

    Warm-up: ``(step + 1) / warmup`` for the first ``warmup`` steps. Then ``cosine`` decays by a
    half cosine and ``linear`` linearly from 1 towards 0 over the steps left; the last planned
    step still moves (its factor is ``1 / (planned - warmup)`` for ``linear``), none after it is
    planned.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(planned - warmup, 1)
    t = min(step - warmup, span - 1) / span  # in [0, 1)
    if schedule == "linear":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


class LRSchedule:
    """Sets every param group's ``lr`` to its base times :func:`lr_factor` of the step count.

    The base rates are read when it is made (before any resumed optimizer state is loaded, whose
    groups hold the scheduled rate of the checkpoint); ``apply(step)`` writes the rate of the
    next step into the groups the optimizer holds then (``load_state_dict`` replaces them).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: str, planned: int, warmup: int = 0
    ) -> None:
        lr_factor(schedule, 0, planned, warmup)  # validates the name
        self.optimizer = optimizer
        self.schedule, self.planned, self.warmup = schedule, planned, warmup
        self.base = [g["lr"] for g in optimizer.param_groups]

    @property
    def active(self) -> bool:
        return self.schedule != "constant" or self.warmup > 0

    def apply(self, step: int) -> None:
        if not self.active:
            return
        f = lr_factor(self.schedule, step, self.planned, self.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * f
