"""The pre-run check (dpfl/preflight.py) calibrates exactly the plans the run will calibrate:
the central learner's (q, planned steps), every client's first-round plan (rate B / n_k and
ceil(rounds x participation) x local steps, for each client's own n_k), the dp-fedavg server's
(fraction, rounds). Spies record every calibrate_noise call of the check and of the run; the
expected plans are computed here from the config and the clients' sizes."""

from __future__ import annotations

import math

import pytest

import dpfl.accountants
import dpfl.clients.federated as federated
import dpfl.privacy.engine as engine
import dpfl.server.loop as loop
from dpfl.clients.central import train_central
from dpfl.clients.federated import client_datasets
from dpfl.config import load_config
from dpfl.preflight import check_simulate, check_train
from dpfl.simulation.runner import simulate


def _spy(monkeypatch, module) -> list[tuple]:
    calls: list[tuple] = []
    real = module.calibrate_noise

    def calibrate_noise(target, delta, sample_rate, steps, accountant="rdp", **kwargs):
        calls.append((target, delta, sample_rate, steps, accountant))
        return real(target, delta, sample_rate, steps, accountant, **kwargs)

    monkeypatch.setattr(module, "calibrate_noise", calibrate_noise)
    return calls


def test_central_check_calibrates_the_run_plan(monkeypatch):
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "data.batch-size=64",
            "training.epochs=3",
            "training.max-steps=10",
            "privacy.target-epsilon=2.0",
        ],
    )
    checked = _spy(monkeypatch, dpfl.accountants)  # preflight imports it at call time
    check_train(cfg)
    ran = _spy(monkeypatch, engine)
    result = train_central(cfg)
    assert len(checked) == 1 and checked == ran, (checked, ran)
    ((_, _, q, steps, _),) = ran
    assert steps == 10 == result.steps_planned  # min(epochs / q, max-steps)
    assert result.epsilon <= 2.0


def _expected_client_plans(cfg) -> set[tuple[float, int]]:
    f = cfg.federation
    participation = f.clients_per_round / f.num_clients if f.clients_per_round else f.fraction
    if f.calibration == "worst-case":  # every round
        rounds = f.rounds
    else:
        rounds = max(1, math.ceil(f.rounds * participation))
    plans = set()
    for pid in range(f.num_clients):
        n = len(client_datasets(cfg, pid)[0])
        q = min(cfg.data.batch_size / n, 1.0)
        local = math.ceil(f.local_epochs / q - 1e-9)
        if f.local_steps:
            local = min(local, f.local_steps)
        plans.add((q, rounds * local))
    return plans


@pytest.mark.parametrize(
    "extra",
    [
        ["federation.local-steps=3", "federation.fraction=1.0"],
        ["federation.local-epochs=0.5", "federation.fraction=0.6"],
        [
            "federation.local-epochs=0.5",
            "federation.fraction=0.6",
            "federation.calibration='expected'",
        ],
    ],
    ids=["local-steps", "local-epochs", "expected-participation"],
)
def test_simulate_check_calibrates_every_clients_plan(monkeypatch, extra):
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "federation.num-clients=4",
            "federation.partition='dirichlet'",  # clients of different sizes: different plans
            "federation.rounds=3",
            "data.batch-size=32",
            "privacy.target-epsilon=4.0",
            *extra,
        ],
    )
    expected = _expected_client_plans(cfg)
    assert len(expected) > 1  # the partition gives the clients different plans
    checked = _spy(monkeypatch, dpfl.accountants)
    check_simulate(cfg)
    ran = _spy(monkeypatch, federated)
    result = simulate(cfg)
    assert {(c[2], c[3]) for c in checked} == expected
    assert ran and {(c[2], c[3]) for c in ran} <= expected
    assert {c[:2] + c[4:] for c in checked + ran} == {(4.0, 1e-5, "rdp")}
    assert max(result.epsilon.values()) <= 4.0


def test_user_level_check_calibrates_the_server_plan(monkeypatch):
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "federation.num-clients=40",
            "federation.fraction=0.25",
            "federation.rounds=7",
            "privacy.level='user'",
            "federation.strategy='dp-fedavg'",
            "privacy.target-epsilon=5.0",
        ],
    )
    checked = _spy(monkeypatch, dpfl.accountants)
    check_simulate(cfg)
    ran = _spy(monkeypatch, loop)
    loop._server_noise(cfg)
    assert checked == ran == [(5.0, 1e-5, 0.25, 7, "rdp")]
