"""A new user's first hour (issue 10): defaults that train, errors instead of tracebacks, bad
options refused before a run exists, runs that diverge or stall end failed, progress lines
without a terminal, ``dpfl config show``, ``--device``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.config import Config, describe_fields
from dpfl.optim.defaults import DEFAULT_LR
from dpfl.store import RunStore

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line(result, fragment: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert not result.stderr.startswith("\n"), repr(result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("dpfl: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    return errors[0]


def runs_in(store: Path) -> list[dict]:
    if not store.exists():
        return []
    with RunStore(store) as s:
        return s.list_runs()


# -- bad options: one line, exit 2, and no run in the store ---------------------------------------
BAD_TRAIN = [
    (["--set", "optimizer.lr=1e308"], "optimizer.lr must be in (0, 1000]"),
    (["--set", "seed=99999999999999999999"], "seed must be an integer in [0, 2**63 - 1]"),
    (["--set", "data.test-fraction=0.999"], "data.test-fraction=0.999 leaves 0 training"),
    (["--set", "training.epochs=1e9"], "training.epochs must be in (0, 100000]"),
    (["--set", "training.epochs=9000", "--set", "data.batch-size=1"], "(more than 10,000,000)"),
    (["--epsilon", "3", "--non-private"], "--epsilon with --non-private"),
    (["--non-private", "--set", "privacy.clip-norm=2"], "privacy.clip-norm set while privacy"),
    (["--set", "data.batch-size=5000"], "data.batch-size (5000) exceeds the 1438 training"),
    (["--set", "lora.r=4"], "lora.r: dpfl train trains image models whole"),
    (["--set", "privacy.target-epsilon=1e-5"], "cannot be met by the central run"),
    (["--plot", "p.txt"], ".png"),
    (["--device", "tpu"], "training.device must be auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("args,fragment", BAD_TRAIN)
def test_bad_train_options_are_one_line_and_leave_no_run(tmp_path, args, fragment):
    store = tmp_path / "runs.sqlite"
    one_line(invoke("train", *args, "--store", str(store)), fragment)
    assert runs_in(store) == []


BAD_SIMULATE = [
    (["--set", "privacy.target-epsilon=1e-5"], "cannot be met by client 0"),
    (["--set", "federation.num-clients=5000"], "5000 clients need at least"),
    (["--set", "data.batch-size=5000"], "exceeds every client's training records"),
    (["--set", "lora.alpha=8"], "lora.alpha: dpfl simulate"),
    (["--plot", "rounds.txt"], ".png"),
]


@pytest.mark.parametrize("args,fragment", BAD_SIMULATE)
def test_bad_simulate_options_are_one_line_and_leave_no_run(tmp_path, args, fragment):
    store = tmp_path / "runs.sqlite"
    one_line(invoke("simulate", *args, "--store", str(store)), fragment)
    assert runs_in(store) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present here")
def test_cuda_without_a_gpu_is_refused_up_front(tmp_path):
    store = tmp_path / "runs.sqlite"
    one_line(invoke("train", "--device", "cuda", "--store", str(store)), "no CUDA device")
    assert runs_in(store) == []


# -- runs that diverge or make no progress: exit 1, status failed, one line -----------------------
def test_a_diverging_run_stops_and_is_stored_failed(tmp_path):
    store = tmp_path / "runs.sqlite"
    result = invoke(
        "train", "--set", "optimizer.lr=1000", "--epochs", "3", "--json", "--store", str(store)
    )
    line = one_line(result, "training diverged", code=1)
    assert "optimizer.lr is 1000" in line
    summary = json.loads(result.stdout)
    assert summary["stopped"] == "diverged" and summary["steps"] < summary["steps_planned"]
    (run,) = runs_in(store)
    assert run["status"] == "failed" and "diverged" in run["error"]


def test_a_run_without_progress_is_not_completed(tmp_path):
    store = tmp_path / "runs.sqlite"
    result = invoke(
        "train", "--set", "optimizer.lr=1e-6", "--epochs", "1", "--json", "--store", str(store)
    )
    one_line(result, "no progress", code=1)
    assert json.loads(result.stdout)["stopped"] == "no-progress"
    assert runs_in(store)[0]["status"] == "failed"


def test_a_short_run_is_not_judged_for_progress(tmp_path):
    """Fewer steps than one epoch: too short to call stalled (the tests' and users' smoke runs)."""
    result = invoke(
        "train",
        "--set",
        "optimizer.lr=1e-6",
        "--set",
        "training.max-steps=3",
        "--json",
        "--store",
        str(tmp_path / "s.sqlite"),
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stopped"] == "completed"


# -- defaults that train --------------------------------------------------------------------------


def _accuracy(*args) -> float:
    result = invoke("train", "--epochs", "5", "--json", "--store", "runs.sqlite", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("solver", sorted(DEFAULT_LR))
def test_every_solver_trains_with_its_default_lr_under_dp(solver):
    # floor: 0.5 on 10 classes (chance 0.1); the sweep's figures are 0.6 (drop-muon) .. 0.94
    assert _accuracy("--optimizer", solver) >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["sgd", "adam", "lion", "muon", "scale"])
def test_solvers_train_without_dp_with_their_plain_default(solver):
    assert _accuracy("--optimizer", solver, "--non-private") >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["flat", "per-layer", "adaptive", "automatic", "dicesgd"])
def test_every_clip_policy_trains_at_epsilon_3(clipping):
    assert _accuracy("--clipping", clipping, "--epsilon", "3") >= 0.5


def test_non_private_readme_command_trains():
    assert _accuracy("--non-private") >= 0.9


def test_adam_trains_with_its_default():
    assert _accuracy("--optimizer", "adam") >= 0.8


# -- progress without a terminal ------------------------------------------------------------------
def test_progress_lines_without_a_terminal_and_json_stays_one_object(tmp_path):
    result = invoke("train", "--epochs", "2", "--json", "--store", str(tmp_path / "s.sqlite"))
    assert result.exit_code == 0
    json.loads(result.stdout)  # stdout: exactly the one JSON object
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1", "2"]
    assert "test accuracy" in lines[0] and "epsilon" in lines[0]
    plain = invoke("train", "--epochs", "2", "--store", str(tmp_path / "s.sqlite"))
    assert plain.stdout.count("\nepoch ") + plain.stdout.startswith("epoch ") == 2


# -- dpfl config show -----------------------------------------------------------------------------
def test_config_show_lists_every_key_with_default_range_and_meaning():
    result = invoke("config", "show", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    expected = {"name", "seed", "task"} | {
        f"{section}.{f.name.replace('_', '-')}"
        for section in Config().to_dict()
        if isinstance(getattr(Config(), section), object)
        and dataclasses.is_dataclass(getattr(Config(), section))
        for f in dataclasses.fields(getattr(Config(), section))
    }
    assert set(shown) == expected
    for key, row in shown.items():
        assert row["allowed"] and row["doc"], key
    assert shown["optimizer.lr"]["solver_default"] == {"dp": 1.0, "non_private": 0.1}
    assert shown["privacy.delta"]["allowed"] == "(0, 1)"


def test_config_show_reflects_set_and_rejects_unknown_sections():
    result = invoke("config", "show", "optimizer", "--set", "optimizer.name='adam'", "--json")
    rows = json.loads(result.stdout)
    assert rows["optimizer.name"]["value"] == "adam"
    assert all(k.startswith("optimizer.") for k in rows)
    one_line(invoke("config", "show", "foo"), "unknown config section 'foo'")
    assert len(describe_fields()) == len(json.loads(invoke("config", "show", "--json").stdout))


def test_help_points_to_config_show():
    for args in ([], ["train"], ["simulate"], ["audit", "run"]):
        text = " ".join(invoke(*args, "--help").stdout.replace("│", " ").split())
        assert "dpfl config show" in text, args


# -- start-up -------------------------------------------------------------------------------------
def test_cli_start_up_does_not_import_torch_or_flower():
    code = (
        "import sys; import dpfl.cli.main; "
        "heavy = [m for m in ('torch', 'opacus', 'flwr', 'matplotlib') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_classifier_whose_accuracy_rose_made_progress_even_if_its_loss_did_not_fall():
    from dpfl.clients.monitor import TrainingMonitor

    m = TrainingMonitor(0.693, initial_accuracy=0.58)
    assert m.final(0.99, accuracy=0.74) is None  # over-confident, but it learned
    assert m.final(0.99, accuracy=0.585)[0] == "no-progress"  # +0.5 points: not progress
    assert m.final(0.99)[0] == "no-progress"  # no accuracy given: judged on the loss
    assert TrainingMonitor(0.693).final(0.99, accuracy=0.9)[0] == "no-progress"
    assert m.final(float("nan"), accuracy=0.9)[0] == "diverged"  # divergence still wins
