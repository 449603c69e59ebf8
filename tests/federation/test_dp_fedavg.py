"""User-level DP-FedAvg on the server: noise, clipping, adaptive direction, accounting."""

import math

import pytest
import torch
from scipy import stats

from dpfl.accountants import Phase, PrivacyLedger, compute_epsilon
from dpfl.config import load_config
from dpfl.errors import PrivacyBudgetError
from dpfl.server.strategies import DPFedAvg, Reply

USER = [
    "privacy.level='user'",
    "federation.strategy='dp-fedavg'",
    "federation.num-clients=50",
    "federation.fraction=0.2",
]


def strategy(*extra, z=1.3, target=None):
    cfg = load_config(None, [*USER, *extra])
    ledger = PrivacyLedger("rdp", 1e-5, target_epsilon=target)
    return DPFedAvg(cfg, ledger, z), ledger


def replies(updates):
    return [Reply(i, f"client-{i}", u, 1, {}) for i, u in enumerate(updates)]


def test_noise_std_on_the_mean_is_z_clip_over_expected_clients():
    # Prepare: zero updates, so the new model minus the old is pure noise / m
    s, ledger = strategy("privacy.clip-norm=0.5")
    zero = {"w": torch.zeros(200_000)}
    # Execute
    new = s.aggregate({"w": torch.zeros(200_000)}, replies([zero] * 7), server_round=1)
    # Assert: m = q K = 10 expected clients; std = z S / m
    noise = new["w"].double()
    expected = 1.3 * 0.5 / 10
    n = noise.numel()
    assert abs(float(noise.std()) / expected - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest((noise / expected).numpy(), "norm").pvalue > 1e-4
    assert ledger.history("server") == [Phase(1.3, 0.2, 1)]


def test_updates_are_reclipped_and_summed_unweighted():
    s, _ = strategy("privacy.clip-norm=1.0", z=0.0)
    big = {"w": torch.tensor([30.0, 40.0])}  # norm 50 -> clipped to norm 1
    small = {"w": torch.tensor([0.3, 0.4])}  # norm 0.5 -> kept
    rs = replies([big, small])
    rs[0].num_examples = 1000  # weights must not matter under DP
    new = s.aggregate({"w": torch.zeros(2)}, rs, server_round=1)
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 10
    assert torch.allclose(new["w"], expected)


@pytest.mark.parametrize("norm,direction", [(100.0, +1), (1e-4, -1)])
def test_adaptive_clip_grows_when_updates_are_clipped_and_shrinks_otherwise(norm, direction):
    s, _ = strategy(
        "privacy.clipping='adaptive'", "privacy.clip-norm=1.0", "privacy.count-noise-std=0.5", z=0.5
    )
    clips = [s.clip]
    for r in range(1, 6):
        update = {"w": torch.full((4,), norm / 2)}
        s.aggregate({"w": torch.zeros(4)}, replies([update] * 10), server_round=r)
        clips.append(s.clip)
    assert all((b - a) * direction > 0 for a, b in zip(clips, clips[1:], strict=False)), clips


def test_adaptive_noise_split_keeps_the_accounted_multiplier():
    s, ledger = strategy("privacy.clipping='adaptive'", "privacy.count-noise-std=2.0", z=1.0)
    assert s.gradient_multiplier() == pytest.approx((1.0 - 0.25**2) ** -0.5)
    s.aggregate({"w": torch.zeros(3)}, replies([{"w": torch.zeros(3)}]), server_round=1)
    assert ledger.history("server") == [Phase(1.0, 0.2, 1)]  # z, not z_g


def test_server_budget_refuses_the_release_that_would_exceed_it():
    s, ledger = strategy(z=1.0, target=1.0)
    state = {"w": torch.zeros(3)}
    rounds = 0
    with pytest.raises(PrivacyBudgetError):
        for r in range(1, 1000):
            state = s.aggregate(state, replies([{"w": torch.ones(3)}]), server_round=r)
            rounds += 1
    assert (
        compute_epsilon([Phase(1.0, 0.2, rounds)], 1e-5)
        <= 1.0
        < compute_epsilon([Phase(1.0, 0.2, rounds + 1)], 1e-5)
    )
    assert ledger.epsilon("server") <= 1.0


def test_server_noise_is_seeded():
    a, _ = strategy()
    b, _ = strategy()
    ra = a.aggregate({"w": torch.zeros(5)}, replies([{"w": torch.zeros(5)}]), 1)
    rb = b.aggregate({"w": torch.zeros(5)}, replies([{"w": torch.zeros(5)}]), 1)
    assert torch.equal(ra["w"], rb["w"]) and float(ra["w"].abs().sum()) > 0
