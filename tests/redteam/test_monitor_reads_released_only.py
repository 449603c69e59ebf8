"""The divergence / no-progress monitor decides only on released values (DESIGN 2b): every loss
it is given is a held-out loss of a released model, never the (un-noised) training loss of the
private batches, and never a loss on the training split. A spy records what the monitor is
given and every held-out evaluation the run makes; the two must match value for value."""

from __future__ import annotations

import math

import pytest

import dpfl.clients.central as central
import dpfl.server.loop as loop
from dpfl.clients.client_app import train as dpfl_train
from dpfl.clients.monitor import TrainingMonitor
from dpfl.config import load_config
from dpfl.simulation.inprocess import InProcessGrid


def _spy(monkeypatch, module):
    """Records held-out losses (evaluate on the loaded data's test split) and what the monitor
    is given (initial loss, check_loss and final arguments)."""
    held_out: list[float] = []
    given: list[tuple[str, float]] = []
    datasets: list = []
    real_get_task = module.get_task

    def get_task(cfg):  # the run builds through the task seam: wrap its data and evaluation
        task = real_get_task(cfg)
        real_load, real_evaluate = task.load_data, task.evaluate

        def load_data():
            data = real_load()
            datasets.append(data)
            return data

        def evaluate(model, dataset):
            out = real_evaluate(model, dataset)
            if any(dataset is d.test for d in datasets):
                held_out.append(out["loss"])
            return out

        task.load_data, task.evaluate = load_data, evaluate
        return task

    class SpyMonitor(TrainingMonitor):
        def __init__(self, initial_loss, **kwargs):
            given.append(("initial", float(initial_loss)))
            super().__init__(initial_loss, **kwargs)

        def check_loss(self, loss, where):
            given.append((where, float(loss)))
            return super().check_loss(loss, where)

        def final(self, loss, judged=True, accuracy=None):
            given.append(("final", float(loss)))  # accuracy: held-out too (server / test set)
            return super().final(loss, judged, accuracy=accuracy)

    monkeypatch.setattr(module, "get_task", get_task)
    monkeypatch.setattr(module, "TrainingMonitor", SpyMonitor)
    return held_out, given


def _assert_only_held_out(held_out, given):
    assert given, "the monitor was never consulted"
    assert given[0][0] == "initial"
    for where, value in given:
        assert any(value == h or (math.isnan(value) and math.isnan(h)) for h in held_out), (
            f"the monitor was given {value!r} at {where}: not a held-out loss of a released "
            f"model (held-out losses: {held_out})"
        )


@pytest.mark.parametrize("privacy", ["privacy.noise-multiplier=1.0", "privacy.enabled=false"])
def test_central_monitor_sees_held_out_losses_only(monkeypatch, privacy):
    held_out, given = _spy(monkeypatch, central)
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "data.batch-size=64",
            "training.epochs=2",
            "training.max-steps=40",  # > one epoch (23 steps): judged for progress, 1 epoch logged
            privacy,
        ],
    )
    result = central.train_central(cfg)
    assert result.train.steps > 0
    kinds = [w for w, _ in given]
    assert "epoch 1" in kinds and "final" in kinds, kinds
    _assert_only_held_out(held_out, given)


def test_server_monitor_sees_held_out_losses_only(monkeypatch):
    # without DP the clients send their training loss (diagnostics): the monitor must not use it
    held_out, given = _spy(monkeypatch, loop)
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "federation.num-clients=4",
            "federation.rounds=3",
            "data.batch-size=32",
            "federation.local-steps=3",
            "privacy.enabled=false",
            "optimizer.lr=0.1",
        ],
    )
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return dpfl_train(msg, context)

    result = loop.run_rounds(InProcessGrid(app, 4), cfg)
    assert result.rounds_completed == 3
    kinds = [w for w, _ in given]
    assert kinds[:5] == ["initial", "round 1", "round 2", "round 3", "final"], kinds
    _assert_only_held_out(held_out, given)
