"""Gaussian noise for the private step, from an explicit generator.

Two sources:

* a seeded :class:`torch.Generator` (the default): reproducible runs and tests;
* ``secure=True``: uniform bits from the operating system's CSPRNG (``os.urandom``) turned into
  Gaussians by the Box-Muller transform in float64, and, as Opacus does in its secure mode
  (Holohan & Braghin 2021, arXiv 2107.10138), the sum of 4 independent draws divided by 2 (same
  distribution, harder floating-point attacks). Opacus needs the unmaintained ``torchcsprng`` for
  this; ours needs nothing (our choice, labelled as such).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["gaussian_like"]


def _secure_standard_normal(n: int) -> np.ndarray:
    total = np.zeros(n, dtype=np.float64)
    for _ in range(4):
        raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(2, n)
        # 53 random bits -> uniform in (0, 1]; u1 > 0 keeps the log finite
        u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
        u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
        total += np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return total / 2.0


def gaussian_like(
    reference: torch.Tensor,
    std: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> torch.Tensor:
    """A tensor shaped like ``reference`` of i.i.d. N(0, std^2) entries."""
    if std == 0:
        return torch.zeros_like(reference)
    if secure:
        z = _secure_standard_normal(reference.numel()).reshape(tuple(reference.shape))
        return torch.from_numpy(z).to(dtype=reference.dtype, device=reference.device).mul_(std)
    # drawn where the generator lives (the private step's is on the CPU), then moved: a seeded
    # run gets the same noise on every device
    device = reference.device if generator is None else generator.device
    noise = torch.normal(
        mean=0.0,
        std=std,
        size=tuple(reference.shape),
        generator=generator,
        dtype=reference.dtype,
        device=device,
    )
    return noise.to(reference.device)
