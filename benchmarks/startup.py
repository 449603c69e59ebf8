"""Start-up time of the CLI: ``dpfl --help`` and ``dpfl epsilon ...`` against a bare
``python -c "import typer"`` (the floor any typer CLI pays), side by side, median of N runs.

Targets (issue 10): ``dpfl --help`` under 1 s, ``dpfl epsilon`` under 1.5 s on a 2-core machine.
Prints one line per command and, last, a JSON object with the medians and the ratios to typer.

    python benchmarks/startup.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "import_typer": [sys.executable, "-c", "import typer"],
    "dpfl_help": [sys.executable, "-m", "dpfl", "--help"],
    "dpfl_epsilon": [
        sys.executable, "-m", "dpfl", "epsilon", "--sigma", "1.1", "--sample-rate", "0.01",
        "--steps", "10000", "--delta", "1e-5",
    ],
}  # fmt: skip


def median_seconds(argv: list[str], n: int, cwd: str) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 runs each instead of 7")
    args = ap.parse_args()
    n = 3 if args.quick else 7
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cwd:  # dpfl epsilon records to ./dpfl-runs.sqlite
        for _ in range(2):  # interleaved rounds: load changes hit every command alike
            for name, argv in COMMANDS.items():
                out[name] = out.get(name, 0.0) + median_seconds(argv, n, cwd) / 2
    for name in ("dpfl_help", "dpfl_epsilon"):
        out[f"{name}_vs_typer"] = out[name] / out["import_typer"]
    for name, value in out.items():
        print(f"{name:24s} {value:.3f}{'x' if 'vs' in name else ' s'}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
