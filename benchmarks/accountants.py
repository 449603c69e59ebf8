"""Benchmark: time to compute epsilon and to calibrate noise, per accountant.

Times ``compute_epsilon`` for one phase of 1e3, 1e4 and 1e5 steps (sigma 1.0, q 0.01,
delta 1e-5) with each of Opacus' RDP, PRV and GDP accountants, and ``calibrate_noise`` for
epsilon 3 over 1e4 steps. Each figure is the median of ``--repeats`` runs, accountants
interleaved within each repeat so that machine noise hits them alike.

``--quick`` times PRV once per case (PRV at 1e5 steps takes about 8 s a call here) and the
others 3 times; it finishes in about 20 s on 2 cores. The last line is one JSON object, e.g.
``{"rdp_1e5_s": 0.02, ..., "calibrate_rdp_s": 0.15, "prv_vs_rdp_1e4_ratio": 40.1}``. Every
figure is a cold computation; ``rdp_1e4_warm_s`` is the same RDP query with dpfl's cached one-step
curve (what a training loop that accounts every step pays).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from dpfl.accountants.epsilon import _rdp_per_step

SIGMA, Q, DELTA = 1.0, 0.01, 1e-5
STEPS = {"1e3": 1_000, "1e4": 10_000, "1e5": 100_000}


def _time(fn) -> float:
    # cold: dpfl caches the one-step RDP curve of each (q, sigma); clear it so every figure is a
    # first computation (the warm figure is reported separately)
    _rdp_per_step.cache_clear()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 60 s")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)

    cases: list[tuple[str, object]] = []
    for label, steps in STEPS.items():
        for acc in ("rdp", "prv", "gdp"):
            cases.append(
                (
                    f"{acc}_{label}_s",
                    lambda a=acc, t=steps: compute_epsilon([Phase(SIGMA, Q, t)], DELTA, a),
                )
            )
    for acc in ("rdp", "prv", "gdp"):
        cases.append(
            (f"calibrate_{acc}_s", lambda a=acc: calibrate_noise(3.0, DELTA, Q, STEPS["1e4"], a))
        )

    for _, fn in cases:  # warm-up: imports, first-call caches
        if "prv" not in _:
            fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(repeats):
        for name, fn in cases:
            if args.quick and "prv" in name and r > 0:
                continue
            samples[name].append(_time(fn))
    result = {name: round(statistics.median(v), 5) for name, v in samples.items()}
    # warm: a training loop accounting every step reuses the cached curve
    compute_epsilon([Phase(SIGMA, Q, STEPS["1e4"])], DELTA, "rdp")
    t0 = time.perf_counter()
    for _ in range(100):
        compute_epsilon([Phase(SIGMA, Q, STEPS["1e4"])], DELTA, "rdp")
    result["rdp_1e4_warm_s"] = round((time.perf_counter() - t0) / 100, 6)
    result["prv_vs_rdp_1e4_ratio"] = round(result["prv_1e4_s"] / result["rdp_1e4_s"], 2)
    result["calibrate_prv_vs_rdp_ratio"] = round(
        result["calibrate_prv_s"] / result["calibrate_rdp_s"], 2
    )
    for name, value in result.items():
        print(f"{name:28s} {value}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
