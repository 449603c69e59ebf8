"""Simulated federations end to end on the in-process engine (digits, a few clients)."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp

from dpfl.accountants import Phase, compute_epsilon
from dpfl.clients.client_app import train as dpfl_train
from dpfl.config import load_config
from dpfl.server.loop import run_rounds
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.simulation.runner import simulate
from dpfl.store import RunStore

BASE = [
    "data.name='digits'",
    "federation.num-clients=4",
    "federation.rounds=2",
    "data.batch-size=32",
    "federation.local-steps=3",
]


def cfg_with(*extra):
    return load_config(None, [*BASE, *extra])


@pytest.mark.parametrize(
    "extra",
    [
        ["privacy.enabled=false", "optimizer.lr=0.1"],
        ["privacy.enabled=false", "federation.strategy='fedprox'", "optimizer.lr=0.1"],
        ["privacy.enabled=false", "federation.strategy='median'", "optimizer.lr=0.1"],
        ["privacy.enabled=false", "federation.strategy='trimmed-mean'", "optimizer.lr=0.1"],
        ["privacy.noise-multiplier=1.0"],
        ["privacy.target-epsilon=4.0", "federation.strategy='fedprox'"],
        [
            "privacy.target-epsilon=4.0",
            "federation.strategy='trimmed-mean'",
            "federation.fraction=0.75",
        ],
        [
            "privacy.level='user'",
            "federation.strategy='dp-fedavg'",
            "privacy.noise-multiplier=0.8",
            "optimizer.lr=0.1",
        ],
        [
            "privacy.level='user'",
            "federation.strategy='dp-fedavg'",
            "privacy.clipping='adaptive'",
            "privacy.noise-multiplier=0.3",
            "privacy.count-noise-std=0.5",
            "optimizer.lr=0.1",
        ],
        [
            "privacy.target-epsilon=6",
            "federation.partition='dirichlet'",
            "federation.clients-per-round=2",
        ],
        ["privacy.noise-multiplier=1.0", "federation.partition='classes'"],
    ],
    ids=lambda e: " ".join(e),
)
def test_every_strategy_and_dp_mode_runs(store_path, extra):
    cfg = cfg_with(*extra)
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = simulate(cfg, run)
        rounds = store.rounds(run.run_id)
    assert result.rounds_completed >= 1
    assert math.isfinite(result.accuracy) and 0 <= result.accuracy <= 1
    assert [r["round"] for r in rounds] == [1, 2]
    if cfg.privacy.enabled:
        assert result.epsilon and all(math.isfinite(e) for e in result.epsilon.values())
        if cfg.privacy.target_epsilon is not None:
            assert max(result.epsilon.values()) <= cfg.privacy.target_epsilon


def test_per_client_epsilon_is_the_accountant_value_for_the_actual_steps(store_path):
    # Prepare: every client participates in every round with a fixed number of local steps
    cfg = cfg_with("privacy.noise-multiplier=1.1", "federation.rounds=3")
    # Execute
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = simulate(cfg, run)
        events = store.privacy_events(run.run_id)
    # Assert: 4 clients x 3 rounds x 3 steps, one persistent history per client
    assert set(result.epsilon) == {f"client-{i}" for i in range(4)}
    for who, eps in result.epsilon.items():
        mine = [e for e in events if e["participant"] == who]
        assert sum(e["steps"] for e in mine) == 9
        q = mine[0]["sample_rate"]
        assert all(e["noise_multiplier"] == 1.1 and e["sample_rate"] == q for e in mine)
        assert eps == pytest.approx(compute_epsilon([Phase(1.1, q, 9)], 1e-5), rel=1e-12)


def test_client_with_spent_budget_stops_and_says_so(store_path):
    # Prepare: clients calibrate their noise for ceil(3 rounds x 0.34) = 2 participations, but
    # the server (fraction 1.0) samples them every round
    def expects_sampling_rate_034(msg, ctx):
        msg.content["config"]["federation.fraction"] = 0.34
        return dpfl_train(msg, ctx)

    cfg = cfg_with(
        "privacy.target-epsilon=2.0", "federation.rounds=3", "federation.calibration='expected'"
    )
    grid = InProcessGrid(_wrapped(expects_sampling_rate_034), 4)
    # Execute
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(grid, cfg, run)
        rounds = store.rounds(run.run_id)
    # Assert: round 3 has no budget left for anyone, they say so, and nobody exceeds epsilon 2
    assert max(result.epsilon.values()) <= 2.0
    assert rounds[2]["status"] == "skipped" and rounds[2]["info"]["reason"] == "no valid reply"
    assert [d["reason"] for d in rounds[2]["info"]["dropped"]] == [
        "privacy budget spent: client stopped training"
    ] * 4


def test_worst_case_calibration_lets_a_client_sampled_every_round_finish_within_budget(
    store_path,
):
    # the default calibration plans for every round, whatever the fraction says: clients told
    # fraction 0.34 but sampled in all 3 rounds train in all 3 and end at (not over) epsilon 2
    def expects_sampling_rate_034(msg, ctx):
        msg.content["config"]["federation.fraction"] = 0.34
        return dpfl_train(msg, ctx)

    cfg = cfg_with("privacy.target-epsilon=2.0", "federation.rounds=3")
    assert cfg.federation.calibration == "worst-case"
    grid = InProcessGrid(_wrapped(expects_sampling_rate_034), 4)
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(grid, cfg, run)
        rounds = store.rounds(run.run_id)
        events = store.privacy_events(run.run_id)
    assert [r["status"] for r in rounds] == ["completed"] * 3
    assert all(not r["info"]["dropped"] for r in rounds)
    for who, eps in result.epsilon.items():
        mine = [e for e in events if e["participant"] == who]
        phases = [Phase(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in mine]
        assert eps == pytest.approx(compute_epsilon(phases, 1e-5), rel=1e-9)
        assert 1.9 < eps <= 2.0  # calibrated for exactly these participations


def _wrapped(fn):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context):
        return fn(msg, context)

    return app


def test_nan_client_is_dropped_with_a_reason_and_the_run_finishes(store_path):
    def poisoned(msg, ctx):
        reply = dpfl_train(msg, ctx)
        if ctx.node_config["partition-id"] == 1:
            state = reply.content["arrays"].to_torch_state_dict()
            state = {
                k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in state.items()
            }
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    cfg = cfg_with("privacy.noise-multiplier=1.0")
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(InProcessGrid(_wrapped(poisoned), 4), cfg, run)
        rounds = store.rounds(run.run_id)
        events = store.privacy_events(run.run_id)
    assert result.rounds_completed == 2 and math.isfinite(result.accuracy)
    for r in rounds:
        assert r["status"] == "completed"
        assert [d["reason"] for d in r["info"]["dropped"]] == [
            "non-finite values (NaN/Inf) in features.0.weight"
        ]
    # the dropped client's privacy spend is still on record
    assert any(e["participant"] == "client-1" for e in events)


def test_failing_client_is_dropped_and_user_level_dp_fails_closed(store_path):
    def failing(msg, ctx):
        if ctx.node_config["partition-id"] == 2:
            raise RuntimeError("disk on fire")
        return dpfl_train(msg, ctx)

    cfg = cfg_with(
        "privacy.level='user'",
        "federation.strategy='dp-fedavg'",
        "privacy.noise-multiplier=0.8",
        "optimizer.lr=0.1",
    )
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(InProcessGrid(_wrapped(failing), 4), cfg, run)
        rounds = store.rounds(run.run_id)
        events = store.privacy_events(run.run_id)
    assert result.rounds_completed == 0
    assert all(r["status"] == "skipped" and "fail closed" in r["info"]["reason"] for r in rounds)
    assert any("disk on fire" in d["reason"] for d in rounds[0]["info"]["dropped"])
    assert events == []  # nothing released, nothing accounted
    # a run that aggregated nothing is not "completed" (it said so with exit 0 before)
    assert result.stopped == "failed" and "no round aggregated" in result.message
    assert "fail closed" in result.message or "disk on fire" in result.message


def test_a_run_whose_every_client_refuses_fails_with_the_reason(store_path):
    def refusing(msg, ctx):
        raise RuntimeError("target epsilon cannot be met")

    cfg = cfg_with("privacy.noise-multiplier=1.0")
    result = run_rounds(InProcessGrid(_wrapped(refusing), 4), cfg)
    assert result.rounds_completed == 0 and result.stopped == "failed"
    assert "target epsilon cannot be met" in result.message


def test_a_diverging_federation_stops_at_the_round_it_diverges(store_path):
    cfg = cfg_with("privacy.enabled=false", "optimizer.lr=1000", "federation.rounds=4")
    result = run_rounds(InProcessGrid(_wrapped(dpfl_train), 4), cfg)
    assert result.stopped == "diverged" and "held-out loss" in result.message
    assert result.rounds_completed < 4


def test_non_dp_run_tolerates_a_failing_client(store_path):
    def failing(msg, ctx):
        if ctx.node_config["partition-id"] == 0:
            raise ValueError("bad shard")
        return dpfl_train(msg, ctx)

    cfg = cfg_with("privacy.enabled=false", "optimizer.lr=0.1")
    result = run_rounds(InProcessGrid(_wrapped(failing), 4), cfg)
    assert result.rounds_completed == 2
    assert all(row["dropped"] == 1.0 for row in result.history)


@pytest.mark.parametrize("local_state", ["reset", "persist"])
def test_local_solver_state_resets_or_persists_across_rounds(local_state):
    seen = []

    def spy(msg, ctx):
        reply = dpfl_train(msg, ctx)
        if ctx.node_config["partition-id"] == 0:
            seen.append("dpfl-optimizer" in ctx.state.config_records)
        return reply

    cfg = cfg_with(
        "privacy.noise-multiplier=1.0",
        "optimizer.name='muon'",
        "optimizer.lr=0.02",
        f"optimizer.local-state='{local_state}'",
    )
    result = run_rounds(InProcessGrid(_wrapped(spy), 4), cfg)
    assert result.rounds_completed == 2
    assert seen == ([True, True] if local_state == "persist" else [False, False])
