"""``dpfl epsilon`` / ``dpfl calibrate`` on the input a new user gives them: every bad phases
file, step count or tolerance is one line and exit 2; ``-a all`` shows each accountant's result
or why it failed; slow prv work is announced before it starts."""

import json
import math

import pytest
from typer.testing import CliRunner

from dpfl.accountants import Phase, compute_epsilon
from dpfl.cli import budget
from dpfl.cli.main import app
from tests.cli.test_cli import assert_one_line_error

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [*args, "--no-record"], catch_exceptions=False)


# -- phases files --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_binary_phases_file_is_one_line(tmp_path, suffix):
    path = tmp_path / f"phases{suffix}"
    path.write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8
    assert_one_line_error(invoke("epsilon", "--phases", str(path)), "is not UTF-8 text")


PHASE = '{"sigma": 1.0, "sample-rate": 0.1, "steps": 3}'
BAD_FILES = [
    ("empty.toml", "", "is empty"),
    ("blank.json", " \n\t\n", "is empty"),
    ("bad.toml", "[[phases]\n", "malformed TOML"),
    ("deep.toml", "x = " + "[" * 100_000, "malformed TOML"),
    ("bad.json", "{not json", "malformed JSON"),
    ("deep.json", "[" * 100_000, "malformed JSON"),
    ("digits.json", "[" + "1" * 5000 + "]", "malformed JSON"),
    ("other.toml", "delta = 1e-6\n[[phases]]\nsigma = 1.0\nsample-rate = 0.1\nsteps = 3\n",
     "unknown key 'delta'"),
    ("other.json", '{"phases": [' + PHASE + '], "delta": 1e-6}', "unknown key 'delta'"),
    ("table.toml", "[phases]\nsigma = 1.0\n", "non-empty list of phases"),
    ("numbers.json", "[1, 2]", "phase 1 must be a table/object"),
    ("nan.json", '[{"sigma": NaN, "sample-rate": 0.1, "steps": 3}]', "phase 1: noise multiplier"),
    ("text.json", '[{"sigma": "1", "sample-rate": 0.1, "steps": 3}]', "must be a number"),
    ("float.json", '[{"sigma": 1.0, "sample-rate": 0.1, "steps": 3.5}]', "integer"),
    ("huge.json", '[{"sigma": 1.0, "sample-rate": 0.1, "steps": 1' + "0" * 400 + "}]",
     "steps must be at most 1e+08"),
    ("epochs.toml", "[[phases]]\nsigma = 1.0\nsample-rate = 0.1\nepochs = 1e300\n",
     "at most 1e+08"),
    ("many.toml", "[[phases]]\nsigma = 1.0\nsample-rate = 0.1\nsteps = 60000000\n" * 2,
     "1.2e+08 steps in all"),
]  # fmt: skip


@pytest.mark.parametrize("name,content,fragment", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_bad_phases_file_is_one_line(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    result = invoke("epsilon", "--phases", str(path))
    assert_one_line_error(result, fragment)
    assert len(result.stderr) < 400  # no echo of a huge value


def test_oversized_phases_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("# padding\n" * 200_000)  # 2 MB
    assert_one_line_error(invoke("epsilon", "--phases", str(path)), "larger than 1 MiB")


def test_phases_file_with_bom_is_read(tmp_path):
    path = tmp_path / "phases.json"
    path.write_bytes(b"\xef\xbb\xbf" + f"[{PHASE}]".encode())
    result = invoke("epsilon", "--phases", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rdp"] == compute_epsilon([Phase(1.0, 0.1, 3)], 1e-5)


# -- step counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--epochs", "1e300"], "--epochs 1e+300 at --sample-rate 0.01 is 1e+302 steps"),
        (["--epochs", "1e7"], "at most 1e+08"),
        (["--steps", "1" + "0" * 30], "--steps must be at most 1e+08, got 1e+30"),
        (["--steps", "100000001"], "--steps must be at most 1e+08"),
    ],
)
@pytest.mark.parametrize("command", ["epsilon", "calibrate"])
def test_step_counts_beyond_the_maximum_are_one_line(command, args, fragment):
    target = ["-s", "1"] if command == "epsilon" else ["-e", "3"]
    assert_one_line_error(invoke(command, *target, "-q", "0.01", *args), fragment)


def test_the_maximum_step_count_is_accepted():
    result = invoke("epsilon", "-s", "1", "-q", "0.01", "--steps", "100000000", "--json")
    assert result.exit_code == 0, result.output
    assert math.isfinite(json.loads(result.stdout)["rdp"])


def test_huge_epsilon_prints_short():
    # sigma 1e-9: epsilon ~5e20, in 4 significant digits (not 21 digits and 4 decimals)
    result = invoke("epsilon", "-s", "1e-9", "-q", "0.01", "-t", "1000")
    assert result.exit_code == 0, result.output
    expected = compute_epsilon([Phase(1e-9, 0.01, 1000)], 1e-5)
    assert f"epsilon = {expected:.4g}  (rdp" in result.stdout


# -- calibration tolerance -----------------------------------------------------------------------
@pytest.mark.parametrize("tolerance", ["100", "0.6", "1e-9", "0", "-0.1", "nan"])
def test_tolerance_outside_its_range_is_one_line(tolerance):
    result = invoke("calibrate", "-e", "3", "-q", "0.01", "-t", "1000", "--tolerance", tolerance)
    assert_one_line_error(result, "--tolerance must be in [1e-06, 0.5]")


def test_tolerance_inside_its_range_is_used():
    result = invoke("calibrate", "-e", "3", "-q", "0.01", "-t", "1000", "--tolerance", "0.5")
    assert result.exit_code == 0, result.output


# -- calibrate -a all ----------------------------------------------------------------------------
# epsilon 600, one full-batch release: beyond gdp's range (500), within reach of rdp, prv and pld
ALL = ["calibrate", "-e", "600", "-q", "1", "-t", "1", "-a", "all"]


def _table_notes(stdout: str) -> dict[str, str]:
    """accountant -> its note column, with rich's wrapped cell lines joined."""
    notes: dict[str, str] = {}
    name = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 4:
            continue
        name = cells[0] or name
        notes[name] = f"{notes.get(name, '')} {cells[3]}".strip()
    return notes


def test_calibrate_all_shows_results_and_the_failed_accountant():
    result = invoke(*ALL)
    assert result.exit_code == 0, result.output
    notes = _table_notes(result.stdout)
    assert set(notes) == {"rdp", "prv", "pld", "gdp"}
    assert notes["gdp"].startswith("failed: gdp accountant: epsilon is above 500")
    for name in ("rdp", "prv", "pld"):
        assert notes[name].startswith("upper bound")


def test_calibrate_all_json_has_null_and_the_reason():
    result = invoke(*ALL, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["gdp"]["noise_multiplier"] is None and out["gdp"]["epsilon"] is None
    assert "epsilon is above 500" in out["gdp"]["error"]
    for name in ("rdp", "prv", "pld"):
        sigma, eps = out[name]["noise_multiplier"], out[name]["epsilon"]
        assert 590 < eps <= 600 and "error" not in out[name]
        assert compute_epsilon([Phase(sigma, 1.0, 1)], 1e-5, name) == eps


def test_calibrate_all_fails_when_no_accountant_can():
    # epsilon 1e-9 over 1e5 full-batch steps needs more noise than 1e6 for every accountant
    result = invoke("calibrate", "-e", "1e-9", "-q", "1", "-t", "100000", "-a", "all")
    assert_one_line_error(result, "no accountant could calibrate: rdp: target epsilon 1e-09")


# -- prv: never a silent wait --------------------------------------------------------------------
def test_prv_grid_too_large_for_calibration_is_one_line_at_once():
    # the command: epsilon 1e6 needs sigma ~0.02, a prv grid of 1e10 points
    result = invoke(
        "calibrate", "--epsilon", "1e6", "--delta", "1e-5", "--sample-rate", "0.01",
        "--steps", "1000", "-a", "prv",
    )  # fmt: skip
    assert_one_line_error(result, "use pld (tighter) or rdp")


def test_slow_prv_is_announced_on_stderr(monkeypatch):
    monkeypatch.setattr(budget, "PRV_NOTE_POINTS", 1000)  # this history's grid: 8.6e4 points
    result = invoke("epsilon", "-s", "1", "-q", "0.01", "-t", "1000", "-a", "prv", "--json")
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert len(notes) == 1 and notes[0].startswith("dpfl: note: the prv accountant composes")
    assert "pld" in notes[0]
    assert set(json.loads(result.stdout)) == {"prv"}


def test_slow_prv_calibration_is_announced_on_stderr(monkeypatch):
    monkeypatch.setattr(budget, "PRV_NOTE_POINTS", 1000)
    result = invoke("calibrate", "-e", "1", "-q", "0.01", "-t", "1000", "-a", "prv", "--json")
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert len(notes) == 1 and "per evaluation" in notes[0]


def test_fast_prv_says_nothing():
    result = invoke("epsilon", "-s", "1", "-q", "0.01", "-t", "1000", "-a", "prv", "--json")
    assert result.exit_code == 0 and result.stderr == ""
