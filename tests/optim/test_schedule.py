"""``optimizer.schedule``: closed-form factors, the rate each step of a central run used, and the
refusal under federation."""

from __future__ import annotations

import math

import pytest
import torch

from dpfl.clients import central
from dpfl.config import load_config
from dpfl.errors import ConfigError
from dpfl.optim.schedule import LRSchedule, lr_factor
from dpfl.preflight import check_simulate
from dpfl.tasks import get_task


def test_factors_follow_the_closed_forms():
    assert [lr_factor("constant", s, 10) for s in range(10)] == [1.0] * 10
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cos = [lr_factor("cosine", s, 4) for s in range(4)]
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    # warm-up 2 of 6 planned, then a linear decay over the 4 steps left
    got = [lr_factor("linear", s, 6, warmup=2) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert lr_factor("cosine", 50, 10) > 0  # past the plan: the last step's rate, never negative
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("step", 0, 10)


def test_schedule_scales_every_group_from_its_own_base():
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w1], "lr": 0.4}, {"params": [w2], "lr": 0.1}])
    sched = LRSchedule(opt, "linear", planned=4)
    opt.load_state_dict(opt.state_dict())  # replaces the groups, as a resume does
    sched.apply(2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.05])


@pytest.mark.parametrize("private", [True, False])
def test_central_steps_use_the_scheduled_rate(monkeypatch, private):
    cfg = load_config(
        None,
        [
            f"privacy.enabled={'true' if private else 'false'}",
            "privacy.noise-multiplier=1.0" if private else "seed=0",
            "optimizer.lr=0.2",
            "optimizer.schedule='cosine'",
            "optimizer.warmup-steps=2",
            "training.epochs=2.0",
            "data.batch-size=256",
        ],
    )
    seen: list[float] = []
    real = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    central.train_central(cfg)
    planned = central.planned_steps(cfg, len(get_task(cfg).load_data().train))
    assert len(seen) == planned >= 4
    want = [0.2 * lr_factor("cosine", s, planned, 2) for s in range(planned)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert seen[0] == pytest.approx(0.1) and seen[-1] < 0.2 * 0.2


def test_federation_refuses_a_schedule():
    cfg = load_config(None, ["optimizer.schedule='linear'", "federation.num-clients=2"])
    with pytest.raises(ConfigError, match="centralized training"):
        check_simulate(cfg)
