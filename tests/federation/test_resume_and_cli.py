"""dpfl simulate from the CLI: resume after a kill, bad input, the store."""

import json

import pytest
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.config import load_config
from dpfl.simulation.runner import simulate
from dpfl.store import RunStore
from tests.cli.test_cli import assert_one_line_error

runner = CliRunner()
FAST = [
    "--set",
    "data.name='digits'",
    "--set",
    "federation.num-clients=4",
    "--set",
    "federation.local-steps=3",
    "--set",
    "data.batch-size=32",
    "--set",
    "federation.rounds=3",
]


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _overrides():
    return [FAST[i + 1] for i in range(0, len(FAST), 2)]


def test_resume_continues_at_the_next_round_with_the_ledger_intact(store_path, tmp_path):
    # Prepare: the reference, uninterrupted
    cfg = load_config(None, [*_overrides(), "privacy.target-epsilon=3.0"])
    with RunStore(tmp_path / "ref.sqlite") as store, store.run("simulate", cfg.to_dict()) as run:
        reference = simulate(cfg, run)
        ref_events = store.privacy_events(run.run_id)

    # ... and the same run, killed after round 2
    def kill_after_two(r, row):
        if r == 2:
            raise KeyboardInterrupt

    with RunStore(store_path) as store:
        with pytest.raises(KeyboardInterrupt), store.run("simulate", cfg.to_dict()) as run:
            simulate(cfg, run, on_round=kill_after_two)
        assert store.get_run(run.run_id)["status"] == "interrupted"
    # Execute
    result = invoke("simulate", "--resume", run.run_id[:8], "--json", "--store", str(store_path))
    # Assert
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rounds"] == 3 and summary["accuracy"] == reference.accuracy
    with RunStore(store_path) as store:
        events = store.privacy_events(run.run_id)
        rounds = store.rounds(run.run_id)
        status = store.get_run(run.run_id)["status"]
    assert status == "completed" and [r["round"] for r in rounds] == [1, 2, 3]

    def key(e):
        return (e["participant"], e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"])

    assert sorted(map(key, events)) == sorted(map(key, ref_events))
    assert summary["epsilon"] == pytest.approx(reference.epsilon, rel=1e-12)


def test_simulate_json_records_the_run(store_path):
    result = invoke("simulate", *FAST, "--json", "--store", str(store_path))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["privacy"] == "sample-level" and summary["epsilon_max"] <= 8.0
    with RunStore(store_path) as store:
        run = store.get_run(summary["run"])
        assert run["status"] == "completed" and run["kind"] == "simulate"
        assert len([m for m in store.metrics(run["id"]) if m["name"] == "accuracy"]) == 3


def test_simulate_table_and_plot(store_path, tmp_path):
    out = tmp_path / "sim.png"
    result = invoke("simulate", *FAST, "--plot", str(out), "--store", str(store_path))
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.stdout and "epsilon per client" in result.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--set", "federation.num-clients=0"], "federation.num-clients must be an integer >= 1"),
        (["--set", "federation.fraction=0"], "federation.fraction must be in (0, 1]"),
        (["--set", "federation.strategy='krum'"], "federation.strategy must be one of"),
        (["--set", "federation.strategy='dp-fedavg'"], "user-level DP is the dp-fedavg strategy"),
        (
            [
                "--set",
                "privacy.level='user'",
                "--set",
                "federation.strategy='dp-fedavg'",
                "--set",
                "federation.clients-per-round=2",
            ],
            "unset federation.clients-per-round",
        ),
        (["--set", "federation.clients-per-round=9"], "exceeds federation.num-clients"),
        (["--set", "federation.num-clients=2000"], "2000 clients need at least 4000 samples"),
        (["--set", "privacy.delta=1.5"], "privacy.delta must be in (0, 1)"),
        (["--resume", "nope"], "no run store at"),
    ],
)
def test_simulate_bad_input_is_one_line(store_path, args, fragment):
    if args[0] != "--resume":
        args = [*FAST, *args, "--store", str(store_path)]
    else:
        args = [*args, "--store", str(store_path.parent / "missing.sqlite")]
    result = invoke("simulate", *args)
    assert_one_line_error(result, fragment)


def test_resume_refuses_completed_runs_and_extra_config(store_path):
    done = json.loads(invoke("simulate", *FAST, "--json", "--store", str(store_path)).stdout)
    assert_one_line_error(
        invoke("simulate", "--resume", done["run"], "--store", str(store_path)), "already completed"
    )
    assert_one_line_error(
        invoke("simulate", "--resume", done["run"], "--set", "seed=1", "--store", str(store_path)),
        "--resume continues a run with its own config",
    )
