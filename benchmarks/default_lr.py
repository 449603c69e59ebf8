"""How each solver's default learning rate (dpfl/optim/defaults.py) was chosen, and a check that
the table still holds: a log-grid sweep on the embedded default (digits, small CNN, 5 epochs,
seed 0), with DP (flat C = 1, noise multiplier 1.0, batch 128) and without.

Prints one line per (solver, mode, lr) and, last, a JSON object: for each solver and mode the
best grid point, the rule's pick (the best, or the point below it when the next larger rate
fails, accuracy < 0.5) and the accuracy at the table's default.

    python benchmarks/default_lr.py            # the whole sweep (~15 min on 2 cores)
    python benchmarks/default_lr.py --quick    # sgd and adam only, 3 grid points around the default
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from dpfl.clients.central import train_central
from dpfl.config import load_config
from dpfl.optim.defaults import DEFAULT_LR

GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 0.5, 1.0, 2.0)
FAIL = 0.5


def accuracy(name: str, lr: float, private: bool) -> float:
    sets = [f"optimizer.name='{name}'", f"optimizer.lr={lr}", "training.epochs=5"]
    if not private:
        sets.append("privacy.enabled=false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_central(load_config(None, sets)).accuracy


def pick(results: dict[float, float]) -> float:
    lrs = sorted(results)
    best = max(lrs, key=lambda lr: results[lr])
    i = lrs.index(best)
    if i + 1 < len(lrs) and results[lrs[i + 1]] < FAIL and i > 0:
        return lrs[i - 1]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["sgd", "adam"] if args.quick else sorted(DEFAULT_LR)
    out: dict[str, dict] = {}
    for name in names:
        for mode, private in (("dp", True), ("plain", False)):
            default = DEFAULT_LR[name][0 if private else 1]
            grid = sorted(set(GRID) | {default})
            if args.quick:
                i = grid.index(default)
                grid = grid[max(0, i - 1) : i + 2]
            results = {}
            for lr in grid:
                results[lr] = accuracy(name, lr, private)
                print(f"{name:12s} {mode:5s} lr={lr:<8g} accuracy={results[lr]:.3f}", flush=True)
            out[f"{name}/{mode}"] = {
                "best_lr": max(results, key=results.get),
                "rule_lr": pick(results),
                "default_lr": default,
                "accuracy_at_default": results[default],
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
