"""Benchmarks run and print the figures they name (the timings themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accountants_benchmark_quick_prints_its_json_figures():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accountants.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    for acc in ("rdp", "prv", "gdp"):
        for steps in ("1e3", "1e4", "1e5"):
            assert figures[f"{acc}_{steps}_s"] > 0
        assert figures[f"calibrate_{acc}_s"] > 0
