"""DP-FedAvg's adaptive clip: the count of unclipped updates is released with noise of std
count_std (sensitivity 1/2 on the centred bits), which the split of the multiplier assumes
(z_grad = (z^-2 - (2 count_std)^-2)^-1/2). The released fraction, over many rounds on the same
updates, must have mean = the true fraction and std = count_std / expected clients."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dpfl.accountants import PrivacyLedger
from dpfl.config import load_config
from dpfl.server.strategies import DPFedAvg, Reply

USER = [
    "privacy.level='user'",
    "federation.strategy='dp-fedavg'",
    "federation.num-clients=50",
    "federation.fraction=0.2",  # 10 expected clients
    "privacy.clipping='adaptive'",
    "privacy.clip-norm=1.0",
]


@pytest.mark.parametrize("count_std", [0.5, 2.0])
def test_released_unclipped_fraction_has_the_accounted_noise(count_std):
    cfg = load_config(None, [*USER, f"privacy.count-noise-std={count_std}"])
    s = DPFedAvg(cfg, PrivacyLedger("rdp", 1e-5), 0.5)
    # 10 replies: 5 below the clip (unclipped), 5 far above it
    small, big = {"w": torch.tensor([0.1, 0.0])}, {"w": torch.tensor([30.0, 40.0])}
    replies = [Reply(i, f"client-{i}", u, 1, {}) for i, u in enumerate([small] * 5 + [big] * 5)]
    fractions = []
    for r in range(1, 401):
        s.clip = 1.0  # the same clip every round, so the same bits
        s.aggregate({"w": torch.zeros(2)}, replies, server_round=r)
        fractions.append(s.summary()["noisy-unclipped-fraction"])
    b = torch.tensor(fractions, dtype=torch.float64)
    sd = count_std / 10
    n = b.numel()
    assert abs(float(b.mean()) - 0.5) < 5 * sd / math.sqrt(n)
    assert abs(float(b.std()) / sd - 1) < 5 / math.sqrt(2 * n), float(b.std())
    assert stats.kstest(((b - 0.5) / sd).numpy(), "norm").pvalue > 1e-4
