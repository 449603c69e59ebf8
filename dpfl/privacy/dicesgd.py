"""DiceSGD error feedback (Zhang, Bu, Wu, Hong, ICLR 2024; spec ``dp_and_fl.md`` section 1).

A post-stage of the private step: the clipping error is fed back in later steps through a hidden
buffer, so the clipping threshold C1 no longer biases the fixed point. In SUM units (the buffer
``E = B e`` holds sums, as in the official code; spec 1.2 (a))::

    S_clip = sum_i clip(g_i, C1)          S_raw = sum_i g_i
    F      = clip(E, C2)                   (global L2 norm over all parameters)
    v      = S_clip + F                    released: (v + N(0, (sigma C1 k)^2)) / B,
                                           k = sqrt(1 + 2 C2 / C1)
    E'     = E - F + (S_raw - S_clip)      paper rule (default): e' = e + mean(g) - v/B
    E'     = E * min(x, 1 - min(x, 1)) + (S_raw - S_clip),  x = C2 / (||E|| + 1e-6)
                                           official code's rule (``residual_rule="code"``)

``c2_units="mean"`` reads C2 as a threshold on the mean-units buffer e = E/B (so E is clipped at
C2 * B, with B the expected batch size). The noise inflation sqrt(1 + 2 C2/C1) always uses the
SUM-units threshold, as the code does.

Privacy: the accountant is charged the plain DP-SGD multiplier sigma; the inflation is the price
the paper's own (hidden-state) analysis charges. No standard accountant can verify it (E depends on
every past sample, which defeats subsampling amplification; spec 1.2 (d)-(e)), so every ledger
event of a DiceSGD run carries the note :data:`LEDGER_NOTE`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dpfl.errors import ConfigError
from dpfl.validation import non_negative, positive

__all__ = ["LEDGER_NOTE", "ErrorFeedback"]

LEDGER_NOTE = "dicesgd: paper-claimed, calibrated as in the official code"


class ErrorFeedback:
    """The DiceSGD buffer and its update.

    Args:
        clip_norm: C1 (the flat clip of the per-sample gradients).
        c2: the feedback threshold; ``c2_units`` says in which units.
        c2_units: ``"sum"`` (official code) or ``"mean"``.
        residual_rule: ``"paper"`` (default) or ``"code"``.
    """

    def __init__(
        self,
        clip_norm: float,
        c2: float,
        c2_units: str = "sum",
        residual_rule: str = "paper",
    ) -> None:
        positive("dicesgd C1 (clip norm)", clip_norm)
        non_negative("dicesgd C2", c2)
        if c2_units not in ("sum", "mean"):
            raise ConfigError(f"dicesgd c2 units must be sum or mean, got {c2_units!r}")
        if residual_rule not in ("paper", "code"):
            raise ConfigError(f"dicesgd residual rule must be paper or code, got {residual_rule!r}")
        self.clip_norm = float(clip_norm)
        self.c2 = float(c2)
        self.c2_units = c2_units
        self.residual_rule = residual_rule
        self.buffer: list[torch.Tensor] | None = None

    def c2_sum(self, expected_batch_size: float) -> float:
        return self.c2 if self.c2_units == "sum" else self.c2 * expected_batch_size

    def noise_inflation(self, expected_batch_size: float) -> float:
        """sqrt(1 + 2 C2_sum / C1)."""
        return math.sqrt(1.0 + 2.0 * self.c2_sum(expected_batch_size) / self.clip_norm)

    @torch.no_grad()
    def apply(
        self,
        clipped: list[torch.Tensor],
        raw: list[torch.Tensor],
        expected_batch_size: float,
    ) -> list[torch.Tensor]:
        """Returns v = S_clip + clip(E, C2) and updates E (in place of the old buffer)."""
        if self.buffer is None:
            self.buffer = [torch.zeros_like(c) for c in clipped]
        c2 = self.c2_sum(expected_batch_size)
        norm = math.sqrt(sum(float(e.pow(2).sum()) for e in self.buffer))
        x = c2 / (norm + 1e-6)
        scale = min(x, 1.0)
        released = [c + e * scale for c, e in zip(clipped, self.buffer, strict=True)]
        keep = (1.0 - scale) if self.residual_rule == "paper" else min(x, 1.0 - scale)
        self.buffer = [
            e * keep + (r - c) for e, r, c in zip(self.buffer, raw, clipped, strict=True)
        ]
        return released

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": None if self.buffer is None else [e.clone() for e in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state.get("buffer")
        self.buffer = None if buf is None else [e.clone() for e in buf]
