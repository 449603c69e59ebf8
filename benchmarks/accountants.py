"""Benchmark: accountant tightness against a fine PLD reference, and time to compute epsilon and
to calibrate noise, per accountant.

Tightness: for each case of ``GRID`` (epsilon ~0.05 to ~60, q 1e-3 to 0.5, 100 to 1e5 steps, one
heterogeneous history) epsilon at delta 1e-5 by dpfl's ``rdp``, ``prv`` and ``pld`` accountants
next to a reference: Google's dp_accounting used directly (its own PLD construction) at 1/4 of
``pld``'s discretization interval (not below 1e-6, where the library's rounding noise grows).
``pld_vs_reference_min/max`` and ``prv_vs_reference_max`` summarize the ratios (``pld`` must stay
in [1, 1.005]).

Timing: ``compute_epsilon`` for one phase of 1e3, 1e4 and 1e5 steps (sigma 1.0, q 0.01,
delta 1e-5) with each accountant, ``calibrate_noise`` for epsilon 3 over 1e4 steps
(``calibrate_<acc>_s``) and over 1e5 steps (``calibrate_<acc>_1e5_s``). Each figure is the median
of ``--repeats`` runs, accountants interleaved within each repeat so that machine noise hits them
alike; every figure is a cold computation (dpfl's caches are cleared), except
``rdp_1e4_warm_s``: the same RDP query with the cached one-step curve (what a training loop that
accounts every step pays).

``--quick`` times PRV once per case (about 8 s a call at 1e5 steps here), skips PRV calibration at
1e5 steps, and times the others 3 times; it finishes in under a minute on 2 cores. A readable
table goes to stderr; the last line of stdout is one JSON object, e.g.
``{"rdp_1e5_s": 0.02, ..., "calibrate_pld_1e5_s": 0.5, "pld_vs_reference_max": 1.0017, ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from dpfl.accountants import Phase, calibrate_noise, compute_epsilon
from dpfl.accountants.pld import discretization, single_release_pld
from dpfl.accountants.rdp import _integer_orders_per_step, rdp_per_step

SIGMA, Q, DELTA = 1.0, 0.01, 1e-5
STEPS = {"1e3": 1_000, "1e4": 10_000, "1e5": 100_000}
ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")
GRID = {
    "s57-q0.256-t1e3": [(57.0, 0.256, 1000)],
    "s1-q0.01-t1e4": [(1.0, 0.01, 10_000)],
    "s0.8-q0.5-t100": [(0.8, 0.5, 100)],  # epsilon ~58
    "s18-q0.01-t1e3": [(18.0, 0.01, 1000)],  # epsilon ~0.05
    "s1-q0.001-t1e5": [(1.0, 1e-3, 100_000)],
    "3-phases": [(1.0, 0.01, 500), (2.0, 0.05, 300), (0.8, 1e-3, 20_000)],
}


def _clear_caches() -> None:
    rdp_per_step.cache_clear()
    _integer_orders_per_step.cache_clear()
    single_release_pld.cache_clear()


def _time(fn) -> float:
    _clear_caches()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _reference(phases, interval: float) -> float:
    """dp_accounting alone: its Gaussian PLD per phase, self-composed, phases composed."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    composed = None
    for sigma, q, steps in phases:
        one = pld.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=interval
        )
        one = one.self_compose(steps) if steps > 1 else one
        composed = one if composed is None else composed.compose(one)
    return float(composed.get_epsilon_for_delta(DELTA))


def tightness() -> dict[str, dict[str, float]]:
    rows = {}
    for label, raw in GRID.items():
        phases = [Phase(*p) for p in raw]
        row = {f"eps_{a}": compute_epsilon(phases, DELTA, a) for a in ("rdp", "prv", "pld")}
        interval = max(discretization(phases, DELTA) / 4, 1e-6)
        t0 = time.perf_counter()
        row["eps_reference"] = _reference(raw, interval)
        row["reference_s"] = time.perf_counter() - t0
        row["pld_vs_reference"] = row["eps_pld"] / row["eps_reference"]
        row["prv_vs_reference"] = row["eps_prv"] / row["eps_reference"]
        rows[label] = {k: round(v, 6) for k, v in row.items()}
    return rows


def timings(quick: bool, repeats: int) -> dict[str, float]:
    cases: list[tuple[str, object]] = []
    for label, steps in STEPS.items():
        for acc in ACCOUNTANTS:
            cases.append(
                (
                    f"{acc}_{label}_s",
                    lambda a=acc, t=steps: compute_epsilon([Phase(SIGMA, Q, t)], DELTA, a),
                )
            )
    for acc in ACCOUNTANTS:
        cases.append(
            (f"calibrate_{acc}_s", lambda a=acc: calibrate_noise(3.0, DELTA, Q, STEPS["1e4"], a))
        )
    for acc in ("rdp", "pld") if quick else ("rdp", "pld", "prv"):
        cases.append(
            (
                f"calibrate_{acc}_1e5_s",
                lambda a=acc: calibrate_noise(3.0, DELTA, Q, STEPS["1e5"], a),
            )
        )

    for name, fn in cases:  # warm-up: imports, first-call caches
        if "prv" not in name:
            fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(repeats):
        for name, fn in cases:
            if "prv" in name and (r > 0 and quick or r > 1):
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
    result["pld_vs_prv_1e5_ratio"] = round(result["pld_1e5_s"] / result["prv_1e5_s"], 3)
    result["calibrate_prv_vs_rdp_ratio"] = round(
        result["calibrate_prv_s"] / result["calibrate_rdp_s"], 2
    )
    return result


def _print_table(rows: dict[str, dict[str, float]], result: dict[str, float]) -> None:
    out = sys.stderr
    head = ("case", "eps_rdp", "eps_prv", "eps_pld", "eps_ref", "pld/ref", "prv/ref")
    print(f"{head[0]:18s}" + "".join(f"{h:>11s}" for h in head[1:]), file=out)
    for label, r in rows.items():
        values = [r["eps_rdp"], r["eps_prv"], r["eps_pld"], r["eps_reference"]]
        print(
            f"{label:18s}"
            + "".join(f"{v:11.5g}" for v in values)
            + f"{r['pld_vs_reference']:11.5f}{r['prv_vs_reference']:11.5f}",
            file=out,
        )
    print(file=out)
    print(f"{'seconds':18s}" + "".join(f"{a:>11s}" for a in ACCOUNTANTS), file=out)
    for what in ("1e3", "1e4", "1e5"):
        line = "".join(f"{result[f'{a}_{what}_s']:11.4f}" for a in ACCOUNTANTS)
        print(f"{'epsilon ' + what:18s}" + line, file=out)
    for what, suffix in (("calibrate 1e4", "_s"), ("calibrate 1e5", "_1e5_s")):
        line = "".join(
            f"{result[key]:11.4f}" if (key := f"calibrate_{a}{suffix}") in result else f"{'-':>11s}"
            for a in ACCOUNTANTS
        )
        print(f"{what:18s}" + line, file=out)
    out.flush()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 60 s")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)

    rows = tightness()
    result: dict = timings(args.quick, repeats)
    result["pld_vs_reference_min"] = min(r["pld_vs_reference"] for r in rows.values())
    result["pld_vs_reference_max"] = max(r["pld_vs_reference"] for r in rows.values())
    result["prv_vs_reference_max"] = max(r["prv_vs_reference"] for r in rows.values())
    result["tightness"] = rows
    _print_table(rows, result)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
