"""Measured per-record sensitivity of the private step on hard models (issue 9).

For every model of ``tests/privacy/hard_models.py`` (the accepted and the refused ones) and
every backend, trains one step with noise 0 at a clip C between the smallest and the largest
per-sample gradient norm, then again with each record removed, and prints

    max_i ||S(X) - S(X without i)|| / C

(must be <= 1), or ``refused`` with the first words of the error, or the exception type of a
crash. Run it on an older checkout to get the "before" column:

    python experiments/boundaries/sensitivity.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dpfl.errors import IncompatibleModelError  # noqa: E402
from tests.privacy.hard_models import BATCH, accepted_cases, refused_cases  # noqa: E402
from tests.privacy.test_boundaries import _drop, _microbatch, _private, _released  # noqa: E402

BACKENDS = ("bk", "hooks", "functorch", "ghost")


def measure(factory, inputs, y, loss, backend) -> str:
    try:
        _, reference = _private(factory, backend, 1.0)
        try:
            clip = float(_microbatch(reference, inputs, y, loss).norm(dim=1).median())
        except Exception:  # noqa: BLE001 - no per-record reference (train-mode BatchNorm)
            clip = 0.05  # small: every record clipped, so any excess is the model's mixing
        pt, _ = _private(factory, backend, clip)
        full = _released(pt, inputs, y, loss)
        samples = pt.optimizer.last_stats.get("samples")
        worst = 0.0
        for i in range(BATCH):
            pt_i, _ = _private(factory, backend, clip)
            keep = torch.arange(BATCH) != i
            worst = max(
                worst, float((full - _released(pt_i, _drop(inputs, i), y[keep], loss)).norm())
            )
        note = "" if samples == BATCH else f" (stats: {samples} samples for {BATCH})"
        return f"{worst / clip:.3f}{note}"
    except IncompatibleModelError as e:
        return "refused: " + " ".join(str(e).split()[:6])
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        return f"crash: {type(e).__name__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    table = {}
    for kind, cases in (("accepted", accepted_cases()), ("refused", refused_cases())):
        for name, (factory, inputs, y, loss, _) in cases.items():
            row = {b: measure(factory, inputs, y, loss, b) for b in BACKENDS}
            table[f"{kind}:{name}"] = row
            if not args.json:
                print(f"{kind:8s} {name:36s} " + " | ".join(f"{b}: {row[b]}" for b in BACKENDS))
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    main()
