"""Benchmark: time of a Bayesian epsilon interval and its width relative to Clopper-Pearson.

Cases: the spec's worked counts (dp_and_fl.md 5.4) plus two larger games, delta 1e-5, alpha 0.05.
``interval_seconds`` is the slowest case (equal-tailed interval and one-sided bound, cold
per-count caches; target < 0.5 s; the reference library takes 16-190 s); ``width_ratio_vs_cp`` the
mean over the cases with a finite Clopper-Pearson interval (the paper reports up to ~40 %
narrower, i.e. 0.6). The 2,000-point Gauss-Legendre rule is a per-process constant: it is
computed once before the timed cases and its cost reported as ``rule_seconds``.
The last line is one JSON object; ``--quick`` and full mode run the same cases (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

from dpfl.audit import AttackCounts, estimate
from dpfl.audit.posterior import GAUSS_NODES, _fnr_nodes, _gauss_legendre

CASES = [
    (900, 900, 100, 100),
    (600, 600, 400, 400),
    (950, 990, 10, 50),
    (487, 1, 512, 0),
    (4500, 4500, 500, 500),
    (200, 200, 50, 50),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(the same cases; kept for symmetry)")
    parser.parse_args(argv)
    _gauss_legendre.cache_clear()
    t0 = time.perf_counter()
    _gauss_legendre(GAUSS_NODES)
    rule_seconds = time.perf_counter() - t0
    seconds, ratios = [], []
    rows = {}
    for case in CASES:
        counts = AttackCounts(*case)
        _fnr_nodes.cache_clear()
        t0 = time.perf_counter()
        bayes = estimate(counts, 1e-5, 0.05)
        seconds.append(time.perf_counter() - t0)
        cp = estimate(counts, 1e-5, 0.05, "beta")
        ratio = None
        if math.isfinite(cp.hi - cp.lo) and cp.hi > cp.lo:
            ratio = (bayes.hi - bayes.lo) / (cp.hi - cp.lo)
            ratios.append(ratio)
        rows["-".join(map(str, case))] = {"seconds": round(seconds[-1], 3), "width_ratio": ratio}
        print(f"{case}: {seconds[-1]:.3f}s, width vs CP {ratio}", file=sys.stderr)
    result = {
        "interval_seconds": round(max(seconds), 3),
        "width_ratio_vs_cp": round(statistics.mean(ratios), 3),
        "rule_seconds": round(rule_seconds, 3),
        "cases": rows,
    }
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
