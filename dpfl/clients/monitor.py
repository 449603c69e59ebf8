"""Stopping runs that diverge or make no progress, judged only on what DP releases.

The training loss of a private batch is a function of private records, un-noised: deciding to
stop on it would leak. The monitor looks at the released model only (its parameters becoming
NaN/Inf, checked after every step) and at its loss on the held-out split (the server's or the
central run's test set, which is not training data), evaluated at the points where the run
already evaluates (every epoch, every round). Post-processing of released values: free.

Rules (our choice): *diverged* when the parameters stop being finite, or the held-out loss is
NaN/Inf or more than ``factor`` (10) times the loss of the initial model; *no progress* when a
run long enough to be judged (at least one epoch; at least 3 aggregated rounds) ends with a
held-out loss less than 1% below the initial one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["StopTraining", "TrainingMonitor"]

#: how many times its initial held-out loss a run's loss may grow before it is called diverged
DIVERGENCE_FACTOR = 10.0
#: the least relative decrease of the held-out loss that counts as progress
MIN_PROGRESS = 0.01


class StopTraining(Exception):
    """Raised by a step or evaluation hook to end a run early with ``status``."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _hint(lr: float | None) -> str:
    return f" (optimizer.lr is {lr:g}: lower it)" if lr is not None else " (lower optimizer.lr)"


class TrainingMonitor:
    """Checks released models against divergence; ``initial_loss`` is the held-out loss at start.

    ``lr`` (the learning rate in use) only makes the messages more useful.
    """

    def __init__(
        self,
        initial_loss: float,
        *,
        lr: float | None = None,
        factor: float = DIVERGENCE_FACTOR,
        initial_accuracy: float | None = None,
    ) -> None:
        self.initial_loss = float(initial_loss)
        self.initial_accuracy = initial_accuracy  # classifiers: see final()
        self.lr = lr
        self.factor = factor

    def check_parameters(self, model: nn.Module, step: int) -> None:
        """After step ``step``: every trainable parameter finite."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and not bool(torch.isfinite(p).all()):
                    raise StopTraining(
                        "diverged",
                        f"training diverged: parameter {name} is NaN/Inf after step {step}"
                        + _hint(self.lr),
                    )

    def check_loss(self, loss: float, where: str) -> None:
        """A held-out loss measured at ``where`` ("epoch 3", "round 2")."""
        if not math.isfinite(loss):
            raise StopTraining(
                "diverged",
                f"training diverged: held-out loss is {loss} at {where}" + _hint(self.lr),
            )
        if math.isfinite(self.initial_loss) and loss > self.factor * self.initial_loss:
            raise StopTraining(
                "diverged",
                f"training diverged: held-out loss {loss:.4g} at {where} is more than "
                f"{self.factor:g}x its initial {self.initial_loss:.4g}" + _hint(self.lr),
            )

    def final(
        self,
        loss: float,
        judged: bool = True,
        accuracy: float | None = None,
    ) -> tuple[str, str] | None:
        """(status, message) if the finished run diverged or (when long enough to be
        ``judged``) made no progress, else None. ``accuracy``: the final held-out accuracy of
        a classifier (with ``initial_accuracy``): a run whose accuracy rose by at least
        ``MIN_PROGRESS`` (absolute) made progress even if its loss did not fall (an
        over-confident classifier: measured on MiniLM under DP-Adam, accuracy 0.58 -> 0.74
        with the held-out loss 0.69 -> 0.99)."""
        try:
            self.check_loss(loss, "the end")
        except StopTraining as e:
            return e.status, e.message
        if (
            accuracy is not None
            and self.initial_accuracy is not None
            and accuracy >= self.initial_accuracy + MIN_PROGRESS
        ):
            return None
        if judged and loss > (1 - MIN_PROGRESS) * self.initial_loss:
            if loss > self.initial_loss:  # it got worse: a step too large, not too small
                return (
                    "no-progress",
                    f"no progress: held-out loss rose from {self.initial_loss:.4g} to {loss:.4g}"
                    + _hint(self.lr).replace(")", ", or spend more privacy budget)"),
                )
            return (
                "no-progress",
                f"no progress: held-out loss {loss:.4g} at the end is not 1% below its initial "
                f"{self.initial_loss:.4g} (raise optimizer.lr, train longer, or spend more "
                "privacy budget)",
            )
        return None
