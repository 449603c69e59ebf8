"""Audits of digits models at epsilon 1, 4, 16 and without DP: theoretical epsilon (accountant)
against the audit's Bayesian interval and lower bound (shadow-calibrated score attack).

2 models x 200 mislabelled canaries each (fair coins), SmallCNN, 40 epochs at batch 64; DP runs
calibrate their noise to the target over the run (RDP, delta 1e-5).

    python experiments/audit/run.py      # writes results.json and prints a table
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpfl.audit.game import run_audit
from dpfl.config import load_config

HERE = Path(__file__).parent


def main() -> None:
    rows = []
    for eps in (1.0, 4.0, 16.0, math.inf):
        sets = ["training.epochs=40", "data.batch-size=64"]
        if math.isinf(eps):
            sets += ["privacy.enabled=false", "optimizer.lr=0.1"]
        else:
            sets += [f"privacy.target-epsilon={eps}"]
        r = run_audit(load_config(None, sets), models=2, canaries=200)
        for attack in ("score", "loss"):
            iv, cp, c = r.intervals[attack], r.clopper_pearson[attack], r.counts[attack]
            rows.append(
                {
                    "target": eps,
                    "theoretical": r.theoretical_epsilon,
                    "attack": attack,
                    "counts": [c.tp, c.tn, c.fp, c.fn],
                    "bayes_lo": iv.lo,
                    "bayes_hi": iv.hi,
                    "bayes_lower_bound": iv.one_sided_lo,
                    "cp_lower_bound": cp.one_sided_lo,
                }
            )
            print(rows[-1], flush=True)
    (HERE / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    print(
        "\n| target eps | accountant eps | attack | TP/TN/FP/FN | Bayesian 95% interval "
        "| Bayesian lower bound | Clopper-Pearson lower bound |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda x: "inf" if math.isinf(x) else f"{x:.3f}"  # noqa: E731
        print(
            f"| {f(r['target'])} | {f(r['theoretical'])} | {r['attack']} | "
            f"{'/'.join(map(str, r['counts']))} | [{f(r['bayes_lo'])}, {f(r['bayes_hi'])}] | "
            f"{f(r['bayes_lower_bound'])} | {f(r['cp_lower_bound'])} |"
        )


if __name__ == "__main__":
    main()
