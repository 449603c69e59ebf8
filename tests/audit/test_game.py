"""The audit game end to end: a memorizing model is caught, a DP model is not over-caught."""

import json
import math

import pytest
from typer.testing import CliRunner

from dpfl.audit.game import run_audit
from dpfl.cli.main import app
from dpfl.config import load_config
from tests.cli.test_cli import assert_one_line_error


@pytest.mark.slow
def test_non_private_model_that_memorizes_its_canaries_gives_a_clear_positive_bound():
    cfg = load_config(
        None,
        ["privacy.enabled=false", "optimizer.lr=0.1", "training.epochs=40", "data.batch-size=64"],
    )
    result = run_audit(cfg, models=2, canaries=100)
    assert math.isinf(result.theoretical_epsilon)
    assert result.intervals["score"].one_sided_lo > 2.0
    assert result.clopper_pearson["score"].one_sided_lo > 1.5


@pytest.mark.slow
def test_dp_model_at_small_epsilon_stays_below_its_theoretical_epsilon():
    cfg = load_config(None, ["privacy.target-epsilon=1.0", "training.epochs=10"])
    result = run_audit(cfg, models=2, canaries=100)
    assert result.theoretical_epsilon <= 1.0
    for attack in ("loss", "score"):
        assert result.intervals[attack].one_sided_lo <= result.theoretical_epsilon
        assert result.clopper_pearson[attack].one_sided_lo <= result.theoretical_epsilon


def test_audit_run_cli_records_the_run(store_path):
    runner = CliRunner()
    png = store_path.parent / "posterior.png"
    r = runner.invoke(
        app,
        [
            "audit",
            "run",
            "--models",
            "1",
            "--canaries",
            "20",
            "--json",
            "--set",
            "training.epochs=1",
            "--store",
            str(store_path),
            "--plot",
            str(png),
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["attacks"]) == {"loss", "score"}
    assert out["theoretical_epsilon"] > 0
    row = out["attacks"]["score"]
    assert row["tp"] + row["tn"] + row["fp"] + row["fn"] == 20
    assert png.read_bytes()[:4] == b"\x89PNG"
    for args, fragment in [
        (["--models", "0"], "at least 1 model"),
        (["--alpha", "2"], "--alpha"),
        (["--shadow-fpr", "1"], "shadow-fpr"),
    ]:
        assert_one_line_error(
            runner.invoke(app, ["audit", "run", *args, "--store", str(store_path)]), fragment
        )


def test_readme_audit_run_at_epsilon_1_shortened(store_path):
    # the README's `dpfl audit run --set privacy.target-epsilon=1 --models 2 --canaries 100`,
    # with one epoch and 20 canaries per model
    args = ["audit", "run", "--set", "privacy.target-epsilon=1", "--set", "training.epochs=1"]
    args += ["--models", "2", "--canaries", "20", "--json", "--store", str(store_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert 0 < out["theoretical_epsilon"] <= 1.0
    for row in out["attacks"].values():
        assert row["tp"] + row["tn"] + row["fp"] + row["fn"] == 40
        assert row["bayes_lo"] <= row["point"] <= row["bayes_hi"]
        assert row["bayes_one_sided_lo"] <= out["theoretical_epsilon"]
        assert row["no_evidence"] == (row["bayes_one_sided_lo"] == 0.0)
        assert row["verdict"].startswith(
            "no evidence of leakage (lower bound 0)" if row["no_evidence"] else "evidence"
        )
