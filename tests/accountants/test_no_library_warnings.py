"""No library warning reaches the user: Opacus' "Optimal order is the largest alpha" (with a path
into site-packages), GDP's caveat, numerical RuntimeWarnings. Small epsilon (the best RDP order is
above Opacus' 63) and huge epsilon (below its 1.1) are where they used to appear."""

import subprocess
import sys
import warnings

import pytest

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from dpfl.errors import AccountantError

SMALL = Phase(57.0, 0.256, 1000)  # epsilon ~0.5
HUGE = Phase(0.5, 0.5, 10_000)  # epsilon ~7300


@pytest.mark.parametrize("name", ["rdp", "prv", "pld", "gdp"])
@pytest.mark.parametrize("phase", [SMALL, HUGE], ids=["small", "huge"])
def test_compute_epsilon_emits_no_warning(name, phase):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compute_epsilon([phase], 1e-5, name)
        except AccountantError:  # prv's grid and gdp's root finding give up at epsilon 7300
            assert phase is HUGE and name in ("prv", "gdp")
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("name", ["rdp", "pld", "gdp"])
@pytest.mark.parametrize(
    "target,q,steps", [(0.5, 0.256, 1000), (0.05, 1e-3, 10_000), (60, 0.5, 100)]
)
def test_calibration_emits_no_warning(name, target, q, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate_noise(target, 1e-5, q, steps, name)
    assert [str(w.message) for w in caught] == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    # a real process: under pytest, warnings are captured before they would reach stderr
    return subprocess.run(
        [sys.executable, "-m", "dpfl.cli.main", *args, "--no-record"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["epsilon", "-s", "57", "-q", "0.256", "-t", "1000", "-a", "all"],
        ["epsilon", "-s", "0.5", "-q", "0.5", "-t", "10000", "-a", "all"],
        ["calibrate", "-e", "0.05", "-q", "0.001", "-t", "10000", "-a", "all"],
    ],
    ids=["small-epsilon", "huge-epsilon", "calibrate"],
)
def test_cli_prints_no_warning(args):
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "pld" in result.stdout and "Warning" not in result.stdout
