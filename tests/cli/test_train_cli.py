import json

import pytest
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.store import RunStore
from tests.cli.test_cli import assert_one_line_error

runner = CliRunner()
FAST = ["--set", "training.max-steps=4", "--set", "data.batch-size=64"]


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("clipping", ["flat", "per-layer", "adaptive", "automatic", "dicesgd"])
def test_train_every_clipping_records_run_and_ledger(store_path, clipping):
    result = invoke("train", "--clipping", clipping, "--json", "--store", str(store_path), *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["clipping"] == clipping
    with RunStore(store_path) as store:
        run = store.get_run(summary["run"])
        events = store.privacy_events(run["id"])
    assert run["status"] == "completed" and run["summary"]["accuracy"] == summary["accuracy"]
    assert len(events) == 4 and all(e["participant"] == "central" for e in events)
    assert events[-1]["epsilon_after"] == pytest.approx(summary["epsilon"])
    if clipping == "dicesgd":
        assert all("paper-claimed" in e["note"] for e in events)


@pytest.mark.parametrize("backend", ["hooks", "functorch", "ghost", "bk"])
def test_train_every_backend(store_path, backend):
    result = invoke("train", "--grad-sample", backend, "--json", "--store", str(store_path), *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["grad_sample_mode"] == backend


def test_train_with_target_epsilon_stays_within_it(store_path):
    result = invoke(
        "train",
        "--epsilon",
        "0.8",
        "--epochs",
        "1",
        "--json",
        "--store",
        str(store_path),
        "--set",
        "data.batch-size=64",
    )
    summary = json.loads(result.stdout)
    assert summary["epsilon"] <= 0.8 and summary["stopped"] == "completed"


def test_train_table_and_plot(store_path, tmp_path):
    out = tmp_path / "train.png"
    result = invoke(
        "train",
        "--store",
        str(store_path),
        "--plot",
        str(out),
        "--epochs",
        "1",
        "--set",
        "data.batch-size=256",
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.stdout and "epsilon" in result.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_train_non_private_baseline(store_path):
    result = invoke("train", "--non-private", "--json", "--store", str(store_path), *FAST)
    summary = json.loads(result.stdout)
    assert summary["epsilon"] == "inf" and summary["clipping"] == "none"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--set", "privacy.delta=2"], "privacy.delta must be in (0, 1)"),
        (["--epsilon", "-1"], "privacy.target-epsilon must be a finite number > 0"),
        (["--clipping", "fancy"], "'fancy' is not one of"),
        (["--set", "data.name=cifar"], "unknown data set 'cifar'; valid: digits"),
        (
            ["--set", "privacy.clipping='adaptive'", "--set", "privacy.noise-multiplier=100"],
            "adaptive clipping needs noise multiplier",
        ),
        (["--set", "bogus.key=1"], "unknown config key 'bogus'"),
        (["--config", "missing.toml"], "config file not found"),
        (["--grad-sample", "ghost", "--clipping", "per-layer"], "per-layer clipping needs"),
    ],
)
def test_train_bad_input_is_one_line(store_path, args, fragment):
    assert_one_line_error(invoke("train", "--store", str(store_path), *FAST, *args), fragment)
