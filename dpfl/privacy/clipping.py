"""Clip policies: per-sample gradient norms -> per-sample clip factors.

The policy is the only thing that differs between clipping variants. Every backend produces a
``[B, P]`` matrix of per-sample norms (one column per trainable parameter tensor) and applies a
``[B, P]`` matrix of factors to form the clipped sum ``sum_i f_ip * g_ip``. The policy also states
the L2 sensitivity of one sample's clipped contribution, which the noise is scaled by:
``std = sigma * sensitivity`` on the sum.

Factor formulas (``eps = 1e-6`` as in Opacus and fastDP's Abadi clipping):

* flat:      f_i = min(1, C / (||g_i|| + eps))                      sensitivity C
* per-layer: f_ip = min(1, C_p / (||g_ip|| + eps))                  sensitivity sqrt(sum_p C_p^2)
* automatic: f_i = C / (||g_i|| + gamma)   (AUTO-S, Bu et al. 2023)   sensitivity C
* adaptive:  flat at the current C_t, which then moves towards the target unclipped quantile
             (sample-level version of Andrew et al. 2021; see :class:`AdaptiveClip`)
* per-group: per-layer factors whose thresholds are set from outside between steps (the RL
             controller); sensitivity sqrt(sum_p C_p^2) at the thresholds in force.

Automatic clipping is scaled by C (fastDP fixes C = 1 and absorbs it in the learning rate);
with C = 1 it is exactly AUTO-S, and for any C the contribution norm is < C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dpfl.errors import ConfigError
from dpfl.privacy.noise import gaussian_like
from dpfl.validation import in_unit_interval_closed_open, positive

__all__ = [
    "AdaptiveClip",
    "AutomaticClip",
    "ClipPolicy",
    "FlatClip",
    "GroupClip",
    "PerLayerClip",
    "flat_factors",
]

CLIP_EPS = 1e-6


def flat_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(1, C / (||g_i|| + eps))`` for total norms ``[B]``."""
    return (clip / (norms + CLIP_EPS)).clamp(max=1.0)


def total_norms(norms: torch.Tensor) -> torch.Tensor:
    """Per-sample norms over all parameters from per-parameter norms ``[B, P]``."""
    return norms.pow(2).sum(dim=1).sqrt()


class ClipPolicy:
    """Maps per-sample, per-parameter norms ``[B, P]`` to factors ``[B, P]``."""

    #: Whether the factor is the same for all parameters of a sample (ghost clipping needs it).
    scalar_factor: ClassVar[bool] = True
    name: ClassVar[str] = ""

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sensitivity(self) -> float:
        """L2 norm bound of one sample's clipped contribution, at the current thresholds."""
        raise NotImplementedError

    def gradient_multiplier(self, noise_multiplier: float, expected_batch_size: float) -> float:
        """Noise multiplier of the gradient release; smaller than the accounted one when part of
        the budget pays for another release in the same step (the adaptive clip's count)."""
        return noise_multiplier

    def observe(
        self, norms: torch.Tensor, expected_batch_size: float, generator: torch.Generator | None
    ) -> None:
        """Accumulates statistics of a physical batch (adaptive clipping)."""

    def end_step(
        self, expected_batch_size: float, generator: torch.Generator | None, secure: bool = False
    ) -> None:
        """Called once per logical step, after the noisy release."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"clipping": self.name, "sensitivity": self.sensitivity()}


class FlatClip(ClipPolicy):
    """All-layer (global norm) clipping at ``clip_norm``."""

    name = "flat"

    def __init__(self, clip_norm: float) -> None:
        positive("clip norm", clip_norm)
        self.clip_norm = float(clip_norm)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        return flat_factors(total_norms(norms), self.clip_norm)[:, None].expand_as(norms)

    def sensitivity(self) -> float:
        return self.clip_norm


class AutomaticClip(ClipPolicy):
    """AUTO-S normalization ``C / (||g_i|| + gamma)``; every contribution has norm < C."""

    name = "automatic"

    def __init__(self, clip_norm: float = 1.0, gamma: float = 0.01) -> None:
        positive("clip norm", clip_norm)
        positive("automatic clipping gamma", gamma)
        self.clip_norm, self.gamma = float(clip_norm), float(gamma)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        f = self.clip_norm / (total_norms(norms) + self.gamma)
        return f[:, None].expand_as(norms)

    def sensitivity(self) -> float:
        return self.clip_norm


class PerLayerClip(ClipPolicy):
    """Each parameter tensor p clipped to its own threshold C_p."""

    name = "per-layer"
    scalar_factor = False

    def __init__(self, thresholds: Sequence[float]) -> None:
        if not thresholds:
            raise ConfigError("per-layer clipping needs at least one threshold")
        for c in thresholds:
            positive("per-layer clip threshold", c)
        self.thresholds = torch.tensor([float(c) for c in thresholds], dtype=torch.float64)

    @classmethod
    def even_split(cls, clip_norm: float, num_params: int) -> PerLayerClip:
        """Thresholds C / sqrt(P) each, so the total sensitivity is C (our default split)."""
        positive("clip norm", clip_norm)
        return cls([clip_norm / math.sqrt(num_params)] * num_params)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        if norms.shape[1] != len(self.thresholds):
            raise ConfigError(
                f"per-layer clipping has {len(self.thresholds)} thresholds but the model has "
                f"{norms.shape[1]} trainable parameter tensors"
            )
        c = self.thresholds.to(device=norms.device, dtype=norms.dtype)
        return (c[None, :] / (norms + CLIP_EPS)).clamp(max=1.0)

    def sensitivity(self) -> float:
        return float(self.thresholds.pow(2).sum().sqrt())


class GroupClip(PerLayerClip):
    """Per-parameter thresholds set from outside between steps (for an RL clip controller)."""

    name = "per-group"

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != len(self.thresholds):
            raise ConfigError(f"expected {len(self.thresholds)} thresholds, got {len(thresholds)}")
        for c in thresholds:
            positive("group clip threshold", c)
        self.thresholds = torch.tensor([float(c) for c in thresholds], dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.thresholds = torch.tensor(state["thresholds"], dtype=torch.float64)


class AdaptiveClip(ClipPolicy):
    """Quantile-tracking flat clip (Andrew, Thakkar, McMahan, Ramaswamy 2021), per step.

    Each logical step releases, next to the noisy gradient sum, a noisy count of samples that
    were *not* clipped::

        b_i = 1[||g_i|| <= C_t]
        b~  = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / B + 1/2      (sensitivity 1/2)
        C_{t+1} = C_t * exp(-lr * (b~ - target_quantile))          (geometric update)

    so C grows when more samples than ``1 - target_quantile`` are clipped. The pair of releases is
    one Gaussian mechanism of multiplier z when the gradient uses
    ``z_grad = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et al., Sec. 3), so the accountant records z.

    Args:
        initial_clip: C_0.
        target_quantile: fraction of samples to leave unclipped (gamma), in [0, 1).
        lr: learning rate eta_C of the geometric update.
        count_noise_std: sigma_b; None means B/20 (expected batch size B; Andrew et al.'s m/20).
        min_clip, max_clip: bounds on C_t.
    """

    name = "adaptive"

    def __init__(
        self,
        initial_clip: float,
        target_quantile: float = 0.5,
        lr: float = 0.2,
        count_noise_std: float | None = None,
        min_clip: float = 1e-6,
        max_clip: float = 1e6,
    ) -> None:
        positive("adaptive initial clip", initial_clip)
        in_unit_interval_closed_open("adaptive target quantile", target_quantile)
        positive("adaptive clip learning rate", lr)
        if count_noise_std is not None:
            positive("adaptive count noise std", count_noise_std)
        if not (0 < min_clip <= initial_clip <= max_clip):
            raise ConfigError("adaptive clipping needs 0 < min_clip <= initial_clip <= max_clip")
        self.clip_norm = float(initial_clip)
        self.target_quantile = float(target_quantile)
        self.lr = float(lr)
        self.count_noise_std = count_noise_std
        self.min_clip, self.max_clip = float(min_clip), float(max_clip)
        self._unclipped = 0.0
        self._seen = 0

    def sigma_b(self, expected_batch_size: float) -> float:
        return (
            self.count_noise_std if self.count_noise_std is not None else expected_batch_size / 20
        )

    def gradient_multiplier(self, noise_multiplier: float, expected_batch_size: float) -> float:
        """z_grad = (z^-2 - (2 sigma_b)^-2)^-1/2; requires z < 2 sigma_b."""
        two_sb = 2 * self.sigma_b(expected_batch_size)
        if noise_multiplier == 0:
            return 0.0  # no privacy at all (epsilon is infinite); nothing to split
        if noise_multiplier >= two_sb:
            raise ConfigError(
                f"adaptive clipping needs noise multiplier {noise_multiplier:g} < 2 * count noise "
                f"std = {two_sb:g}; raise the batch size or privacy count-noise-std"
            )
        return (noise_multiplier**-2 - two_sb**-2) ** -0.5

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        return flat_factors(total_norms(norms), self.clip_norm)[:, None].expand_as(norms)

    def sensitivity(self) -> float:
        return self.clip_norm

    def observe(self, norms, expected_batch_size, generator) -> None:
        total = total_norms(norms)
        self._unclipped += float((total <= self.clip_norm).sum()) - 0.5 * total.numel()
        self._seen += total.numel()

    def end_step(
        self, expected_batch_size: float, generator: torch.Generator | None, secure: bool = False
    ) -> None:
        # the count's noise from the same source as the gradient's: the OS CSPRNG in secure mode
        # (a seeded generator there would make the released count predictable from the seed)
        noise = float(gaussian_like(torch.zeros((), dtype=torch.float64), 1.0, generator, secure))
        noisy = (self._unclipped + self.sigma_b(expected_batch_size) * noise) / expected_batch_size
        fraction = min(max(noisy + 0.5, 0.0), 1.0)
        self.clip_norm = min(
            max(
                self.clip_norm * math.exp(-self.lr * (fraction - self.target_quantile)),
                self.min_clip,
            ),
            self.max_clip,
        )
        self._unclipped, self._seen = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
