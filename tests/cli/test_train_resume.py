"""``dpfl train --resume``: a killed central run continues from its last epoch's checkpoint
and ends with the same model as an uninterrupted run (digits, the small CNN)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.clients import central
from dpfl.store import RunStore


def _train(store, *args):
    argv = ["train", "--epochs", "3", "--json", "--store", str(store), *args]
    return CliRunner().invoke(app, argv, catch_exceptions=False)


@pytest.mark.parametrize("extra", [(), ("--set", "optimizer.schedule='cosine'")])
def test_a_killed_train_run_resumes_bit_identically(tmp_path, monkeypatch, extra):
    r = _train(tmp_path / "whole.sqlite", *extra)
    assert r.exit_code == 0, r.output
    reference = json.loads(r.stdout)
    real = central.train_private

    def killed_in_epoch_two(pt, **kw):
        inner = kw["on_step"]

        def on_step(step, loss):
            inner(step, loss)
            if pt.optimizer.steps >= int(1.5 * len(pt.data_loader)):
                raise KeyboardInterrupt

        return real(pt, **{**kw, "on_step": on_step})

    store = tmp_path / "killed.sqlite"
    monkeypatch.setattr(central, "train_private", killed_in_epoch_two)
    assert _train(store, *extra).exit_code == 130
    monkeypatch.setattr(central, "train_private", real)
    with RunStore(store) as s:
        (run,) = s.list_runs()
    r = CliRunner().invoke(
        app, ["train", "--resume", run["id"], "--json", "--store", str(store)],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert resumed["run"] == run["id"]
    assert resumed["accuracy"] == reference["accuracy"]
    assert resumed["test_loss"] == reference["test_loss"]
    assert resumed["epsilon"] >= reference["epsilon"]  # the killed attempt's extra steps count
    r = CliRunner().invoke(app, ["train", "--resume", run["id"], "--store", str(store)])
    assert r.exit_code == 2 and "already completed" in r.stderr
    r = CliRunner().invoke(
        app, ["train", "--resume", run["id"], "--epochs", "2", "--store", str(store)]
    )
    assert r.exit_code == 2 and "drop the other options" in r.stderr
