"""Each local solver inside a sample-level-DP federation on digits, against AdamW and SGD.

5 IID clients over scikit-learn's digits, every client training with DP-SGD (noise calibrated so
each client's records are (8, 1e-5)-DP over the run), FedAvg, 10 rounds of 1 local epoch at batch
32, local solver state reset each round; learning rates from ``LRS`` (one per solver, not tuned
per setting). Records the server's test accuracy and the solver's optimizer-state bytes per
parameter of the CNN's hidden matrices (measured on the CNN after a step).

    python experiments/local_solvers/run.py     # writes results.json and prints a table
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from dpfl.config import OptimizerConfig, load_config
from dpfl.models import SmallCNN
from dpfl.optim import create_optimizer
from dpfl.optim.state_size import state_bytes_per_param
from dpfl.simulation.runner import simulate

HERE = Path(__file__).parent
LRS = {
    "sgd": 0.5,
    "adamw": 5e-3,
    "sgd-sai": 0.5,
    "scale": 0.01,
    "swan": 3e-3,
    "sinkgd": 3e-3,
    "frugal": 3e-3,
    "conda": 3e-3,
    "muon": 0.02,
    "auon": 0.02,
    "hybrid-auon": 0.02,
    "drop-muon": 0.02,
}


def momentum(name: str) -> float:
    return 0.9 if name == "sgd-sai" else 0.0


def memory(name: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = create_optimizer(OptimizerConfig(name=name, lr=LRS[name], momentum=momentum(name)), model)
    for _ in range(10):
        opt.zero_grad()
        model(torch.rand(8, 1, 8, 8)).sum().backward()
        opt.step()
    return state_bytes_per_param(opt, model)


def main(seeds: int = 2) -> None:
    rows = []
    for name, lr in LRS.items():
        accs = []
        for seed in range(seeds):
            cfg = load_config(
                None,
                [
                    f"seed={seed}",
                    "data.name='digits'",
                    "data.batch-size=32",
                    "federation.num-clients=5",
                    "federation.rounds=10",
                    "federation.local-epochs=1",
                    "privacy.target-epsilon=8.0",
                    f"optimizer.name='{name}'",
                    f"optimizer.lr={lr}",
                    "optimizer.momentum=0.9" if name in ("sgd-sai",) else "optimizer.momentum=0.0",
                ],
            )
            accs.append(simulate(cfg).accuracy)
        mem = memory(name)
        rows.append(
            {
                "solver": name,
                "lr": lr,
                "accuracy_mean": statistics.mean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accuracies": accs,
                "state_bytes_per_param": mem,
            }
        )
        print(
            f"{name:12s} acc {statistics.mean(accs):.4f} hidden {mem.get('hidden', 0):g} B/param",
            flush=True,
        )
    (HERE / "results.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\n| solver | lr | test accuracy (mean +- std, {seeds} seeds) | state B/param: hidden "
        "| head | vector |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        m = r["state_bytes_per_param"]
        print(
            f"| {r['solver']} | {r['lr']:g} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} "
            f"| {m.get('hidden', 0):g} | {m.get('head', 0):g} | {m.get('vector', 0):g} |"
        )


if __name__ == "__main__":
    main()
