"""``dpfl runs show | export | plot`` on small recorded runs (no training)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.store import RunStore
from tests.cli.test_cli import assert_one_line_error

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


BUDGET = "client error: PrivacyBudgetError: target epsilon 1e-05 cannot be met"


@pytest.fixture
def recorded(store_path):
    """Four rounds: round 1 drops two replies (one named client, one silent node), rounds 2-3 drop
    every reply for the same reason and are skipped, round 4 is clean."""
    with RunStore(store_path) as store, store.run("simulate", {"seed": 0}) as run:
        run.start_round(1)
        run.log_metrics({"accuracy": 0.4, "loss": 2.0, "clients": 3.0}, round=1, scope="server")
        run.end_round(
            1,
            "completed",
            {
                "sampled": 5,
                "dropped": [
                    {"node": 3, "participant": "client-2", "reason": "malformed reply: no arrays"},
                    {"node": 7, "participant": None, "reason": "no reply (timeout or lost)"},
                ],
            },
        )
        for r in (2, 3):
            run.start_round(r)
            dropped = [{"node": n, "participant": None, "reason": BUDGET} for n in range(1, 11)]
            info = {"sampled": 10, "dropped": dropped, "reason": "no valid reply"}
            run.end_round(r, "skipped", info)
        run.start_round(4)
        run.log_metrics({"accuracy": 0.6, "loss": 1.5, "clients": 3.0}, round=4, scope="server")
        run.end_round(4, "completed", {"sampled": 3, "dropped": []})
    return run.run_id


def test_show_lists_dropped_replies_per_round(store_path, recorded):
    result = invoke("runs", "show", recorded, "--store", str(store_path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "dropped replies" in out
    assert "client-2" in out and "malformed reply" in out
    assert "node 7" in out and "timeout or lost" in out
    assert "PrivacyBudgetError" in out
    # the two identical rounds are one row: rounds 2-3, nodes 1 to 10
    assert "2-3" in out and "node 1..node 10" in out
    assert out.count("PrivacyBudgetError") == 1


def test_show_lists_rounds_that_did_not_complete_with_their_reason(store_path, recorded):
    out = invoke("runs", "show", recorded, "--store", str(store_path)).stdout
    assert "4 recorded, 2 completed, 2 skipped" in out
    assert "no valid reply" in out


def test_show_json_is_one_object_with_the_dropped_replies(store_path, recorded):
    result = invoke("runs", "show", recorded, "--json", "--store", str(store_path))
    doc = json.loads(result.stdout)
    assert len(doc["dropped"]) == 22
    assert doc["dropped"][0] == {
        "round": 1,
        "node": 3,
        "participant": "client-2",
        "reason": "malformed reply: no arrays",
    }


def test_reason_with_brackets_is_shown_verbatim(store_path):
    with RunStore(store_path) as store, store.run("simulate", {}) as run:
        reason = "wrong shape for conv1.weight: [8, 1, 3, 3] vs [bold]x[/bold]"
        run.end_round(
            1, "completed", {"dropped": [{"node": 1, "participant": "c", "reason": reason}]}
        )
    out = invoke("runs", "show", run.run_id, "--store", str(store_path)).stdout
    assert "[8, 1, 3, 3]" in out and "[bold]x[/bold]" in out


# -- export -------------------------------------------------------------------------------------
def test_export_json_unknown_table_is_an_error(store_path, recorded):
    assert_one_line_error(
        invoke(
            "runs", "export", recorded, "-f", "json", "--table", "foo", "--store", str(store_path)
        ),
        "unknown export table 'foo'; valid: metrics, ledger, rounds, dropped",
    )


def test_export_json_one_table(store_path, recorded):
    result = invoke(
        "runs", "export", recorded, "-f", "json", "--table", "dropped", "--store", str(store_path)
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["table"] == "dropped" and len(doc["rows"]) == 22


def test_export_csv_rounds_info_is_json(store_path, recorded):
    result = invoke(
        "runs", "export", recorded, "-f", "csv", "--table", "rounds", "--store", str(store_path)
    )
    assert result.exit_code == 0, result.output
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert json.loads(rows[1]["info"])["reason"] == "no valid reply"


# -- plot ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x.txt", "x", "x.jpeg"])
def test_plot_bad_suffix_is_one_line_and_writes_nothing(store_path, recorded, tmp_path, name):
    out = tmp_path / name
    assert_one_line_error(
        invoke("runs", "plot", recorded, "--output", str(out), "--store", str(store_path)),
        ".png, .svg or .pdf",
    )
    assert not out.exists()


def test_plot_into_a_missing_folder_is_one_line(store_path, recorded, tmp_path):
    out = tmp_path / "missing" / "x.png"
    assert_one_line_error(
        invoke("runs", "plot", recorded, "-o", str(out), "--store", str(store_path)),
        "does not exist",
    )


def test_plot_default_output_and_svg(store_path, recorded, tmp_path):
    result = invoke("runs", "plot", recorded, "--store", str(store_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{recorded}.png").read_bytes()[:4] == b"\x89PNG"
    svg = tmp_path / "p.svg"
    result = invoke("runs", "plot", recorded, "-o", str(svg), "--store", str(store_path))
    assert result.exit_code == 0, result.output
    assert svg.read_text().startswith("<?xml")
