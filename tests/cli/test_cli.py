import json

import pytest
from typer.testing import CliRunner

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from dpfl.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, fragment: str):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dpfl: error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr


# -- epsilon -------------------------------------------------------------------------------------
def test_epsilon_json_all_accountants(store_path):
    result = invoke(
        "epsilon",
        "--sigma",
        "1.5",
        "--sample-rate",
        "0.04",
        "--epochs",
        "90",
        "--accountant",
        "all",
        "--json",
        "--store",
        str(store_path),
    )
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(values) == {"rdp", "prv", "pld", "gdp"}
    assert values["rdp"] == pytest.approx(7.32911117143, abs=1e-9)
    assert values["pld"] <= values["prv"] <= values["rdp"]


def test_epsilon_table_and_recorded_run(store_path):
    result = invoke(
        "epsilon",
        "-s",
        "1.1",
        "-q",
        "0.01",
        "-t",
        "1000",
        "--delta",
        "1e-5",
        "--store",
        str(store_path),
    )
    assert result.exit_code == 0
    expected = compute_epsilon([Phase(1.1, 0.01, 1000)], 1e-5, "rdp")
    assert f"epsilon = {expected:.4f}" in result.stdout
    listed = invoke("runs", "list", "--json", "--store", str(store_path))
    runs = json.loads(listed.stdout)["runs"]
    assert len(runs) == 1 and runs[0]["kind"] == "epsilon" and runs[0]["status"] == "completed"
    assert runs[0]["summary"]["epsilon_rdp"] == pytest.approx(expected)


def test_epsilon_no_record_writes_no_store(tmp_path):
    result = invoke("epsilon", "-s", "1", "-q", "0.1", "-t", "10", "--no-record")
    assert result.exit_code == 0
    assert not (tmp_path / "dpfl-runs.sqlite").exists()


def test_epsilon_table_with_all(store_path):
    result = invoke(
        "epsilon", "-s", "1", "-q", "0.01", "-t", "500", "-a", "all", "--store", str(store_path)
    )
    assert result.exit_code == 0
    for name in ("rdp", "prv", "pld", "gdp", "can underestimate"):
        assert name in result.stdout


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_epsilon_phases_file(tmp_path, suffix):
    # Prepare
    path = tmp_path / f"phases{suffix}"
    if suffix == ".toml":
        path.write_text(
            "[[phases]]\nnoise-multiplier = 1.0\nsample-rate = 0.01\nsteps = 500\n"
            "[[phases]]\nnoise-multiplier = 2.0\nsample-rate = 0.02\nepochs = 4\n"
        )
    else:
        path.write_text(
            json.dumps(
                [
                    {"noise-multiplier": 1.0, "sample-rate": 0.01, "steps": 500},
                    {"noise-multiplier": 2.0, "sample-rate": 0.02, "epochs": 4},
                ]
            )
        )
    # Execute
    result = invoke("epsilon", "--phases", str(path), "-a", "all", "--json", "--no-record")
    # Assert
    values = json.loads(result.stdout)
    expected = compute_epsilon([Phase(1.0, 0.01, 500), Phase(2.0, 0.02, 200)], 1e-5, "rdp")
    assert values["rdp"] == pytest.approx(expected)
    assert values["gdp"] is None  # heterogeneous: not supported by gdp, reported as null


def test_epsilon_zero_noise_is_infinite():
    result = invoke("epsilon", "-s", "0", "-q", "0.1", "-t", "10", "--json", "--no-record")
    assert json.loads(result.stdout) == {"rdp": "inf"}


# -- calibrate -----------------------------------------------------------------------------------
def test_calibrate_json_never_overshoots(store_path):
    result = invoke(
        "calibrate",
        "--epsilon",
        "3",
        "--delta",
        "1e-5",
        "--sample-rate",
        "0.01",
        "--steps",
        "2000",
        "--json",
        "--store",
        str(store_path),
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["rdp"]
    assert out["epsilon"] <= 3
    assert out["noise_multiplier"] == calibrate_noise(3, 1e-5, 0.01, 2000).noise_multiplier
    assert compute_epsilon([Phase(out["noise_multiplier"], 0.01, 2000)], 1e-5) == out["epsilon"]


def test_calibrate_table_with_epochs():
    result = invoke("calibrate", "-e", "8", "-q", "0.04", "--epochs", "90", "--no-record")
    assert result.exit_code == 0
    assert "noise multiplier" in result.stdout and "steps=2250" in result.stdout


# -- runs ----------------------------------------------------------------------------------------
@pytest.fixture
def recorded(store_path):
    from dpfl.accountants import PrivacyLedger
    from dpfl.store import RunStore

    with RunStore(store_path) as store, store.run("train", {"seed": 1}, name="demo") as run:
        ledger = PrivacyLedger(sink=run.record_privacy_event)
        ledger.record("client-0", 1.0, 0.1, 10, round=1)
        ledger.record("client-1", 1.0, 0.1, 20, round=1)
        run.log_metrics({"accuracy": 0.75}, round=1, scope="server")
        run.end_round(1)
    return run.run_id


def test_runs_list_and_show(store_path, recorded):
    listed = invoke("runs", "list", "--store", str(store_path))
    assert listed.exit_code == 0 and recorded in listed.stdout and "completed" in listed.stdout
    shown = invoke("runs", "show", recorded[:5], "--store", str(store_path))
    assert shown.exit_code == 0
    for text in ("client-0", "client-1", "accuracy", "0.75", "privacy spent"):
        assert text in shown.stdout
    as_json = json.loads(
        invoke("runs", "show", recorded, "--json", "--store", str(store_path)).stdout
    )
    assert set(as_json["epsilon"]) == {"client-0", "client-1"}


def test_runs_export_csv_and_json(store_path, recorded, tmp_path):
    csv_out = invoke(
        "runs",
        "export",
        recorded,
        "--format",
        "csv",
        "--table",
        "ledger",
        "--store",
        str(store_path),
    )
    assert csv_out.exit_code == 0
    assert csv_out.stdout.splitlines()[0].startswith("seq,participant,mechanism")
    assert len(csv_out.stdout.splitlines()) == 3
    target = tmp_path / "run.json"
    done = invoke(
        "runs", "export", recorded, "-f", "json", "-o", str(target), "--store", str(store_path)
    )
    assert done.exit_code == 0 and json.loads(target.read_text())["run"]["id"] == recorded


def test_runs_list_filters(store_path, recorded):
    out = json.loads(
        invoke("runs", "list", "--kind", "epsilon", "--json", "--store", str(store_path)).stdout
    )
    assert out["runs"] == []


# -- bad input: one line, exit 2 -----------------------------------------------------------------
BAD = [
    (
        ["epsilon", "-s", "1", "-q", "0.01", "-t", "100", "--delta", "1"],
        "--delta must be in (0, 1)",
    ),
    (
        ["epsilon", "-s", "1", "-q", "0.01", "-t", "100", "--delta", "0"],
        "--delta must be in (0, 1)",
    ),
    (["epsilon", "-s", "1", "-q", "0.01", "-t", "100", "--delta", "-1e-5"], "--delta"),
    (["epsilon", "-s", "1", "-q", "0", "-t", "100"], "--sample-rate must be in (0, 1]"),
    (["epsilon", "-s", "1", "-q", "1.5", "-t", "100"], "--sample-rate must be in (0, 1]"),
    (["epsilon", "-s", "-1", "-q", "0.1", "-t", "100"], "--sigma must be a finite number >= 0"),
    (["epsilon", "-s", "nan", "-q", "0.1", "-t", "100"], "--sigma"),
    (["epsilon", "-s", "1", "-q", "0.1", "-t", "0"], "--steps must be an integer >= 1"),
    (["epsilon", "-s", "1", "-q", "0.1", "--epochs", "-2"], "--epochs must be a finite number > 0"),
    (["epsilon", "-s", "1", "-q", "0.1"], "give exactly one of --steps or --epochs"),
    (["epsilon", "-s", "1", "-q", "0.1", "-t", "5", "--epochs", "1"], "exactly one of --steps"),
    (["epsilon", "-q", "0.1", "-t", "5"], "--sigma (noise multiplier) is required"),
    (["epsilon", "-s", "1", "-t", "5"], "--sample-rate is required"),
    (["epsilon", "-s", "abc", "-q", "0.1", "-t", "5"], "'abc' is not a valid float"),
    (["epsilon", "-s", "1", "-q", "0.1", "-t", "5", "-a", "moments"], "'moments' is not one of"),
    (["epsilon", "-s", "1", "-q", "0.1", "-t", "5", "--bogus"], "--bogus"),
    (["epsilon", "--phases", "missing.toml"], "cannot read phases file"),
    (["epsilon", "--phases", "p.toml", "-s", "1"], "either --phases or --sigma"),
    (["calibrate", "-q", "0.1", "-t", "5"], "--epsilon (target epsilon) is required"),
    (["calibrate", "-e", "-1", "-q", "0.1", "-t", "5"], "--epsilon must be a finite number > 0"),
    (["calibrate", "-e", "0", "-q", "0.1", "-t", "5"], "--epsilon must be a finite number > 0"),
    (["calibrate", "-e", "1", "-q", "0.1", "-t", "5", "-d", "2"], "--delta must be in (0, 1)"),
    (["calibrate", "-e", "1e-9", "-q", "1", "-t", "100000"], "cannot be met"),
    (["calibrate", "-e", "1", "-q", "0.1", "-t", "5", "--tolerance", "0"], "--tolerance"),
    (["runs", "show", "nope"], "no run store at"),
    (["runs", "list", "--status", "odd"], "--status must be one of"),
    (["bogus"], "No such command 'bogus'"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    (tmp_path / "p.toml").write_text("[[phases]]\nsigma = 1.0\nsample-rate = 0.1\nsteps = 3\n")
    assert_one_line_error(invoke(*args), fragment)


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("[[phases]\n", "malformed TOML"),
        ("x = 1\n", "non-empty list of phases"),
        ("[[phases]]\nsigma = 1.0\nsample-rate = 0.1\n", "phase 1 needs"),
        ("[[phases]]\nsigma = 1.0\nsample-rate = 3\nsteps = 1\n", "phase 1: sample rate"),
    ],
)
def test_bad_phase_files(tmp_path, content, fragment):
    path = tmp_path / "phases.toml"
    path.write_text(content)
    assert_one_line_error(invoke("epsilon", "--phases", str(path), "--no-record"), fragment)


def test_bad_json_phase_file(tmp_path):
    path = tmp_path / "phases.json"
    path.write_text("{not json")
    assert_one_line_error(invoke("epsilon", "--phases", str(path), "--no-record"), "malformed JSON")


def test_unknown_and_ambiguous_runs(store_path, recorded):
    assert_one_line_error(
        invoke("runs", "show", "zzzz", "--store", str(store_path)), "no run 'zzzz'"
    )
    assert_one_line_error(
        invoke(
            "runs",
            "export",
            recorded,
            "-f",
            "csv",
            "--table",
            "weights",
            "--store",
            str(store_path),
        ),
        "unknown export table",
    )
    assert_one_line_error(
        invoke("runs", "export", recorded, "-f", "xml", "--store", str(store_path)),
        "'xml' is not one of",
    )


def test_corrupt_store_is_one_line(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"garbage" * 200)
    assert_one_line_error(invoke("runs", "list", "--store", str(path)), "cannot open run store")


def test_help_works():
    result = invoke("--help")
    assert result.exit_code == 0 and "epsilon" in result.stdout and "calibrate" in result.stdout


def test_runs_plot_writes_a_png(store_path, recorded, tmp_path):
    out = tmp_path / "p.png"
    result = invoke("runs", "plot", recorded, "-o", str(out), "--store", str(store_path))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = invoke("runs", "plot", recorded, "-m", "loss", "--store", str(store_path))
    assert_one_line_error(bad, "run has no metric loss; recorded: accuracy")


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("dpfl ")
