"""Sync FedAvg, async FedAvg, FedFix and FedBuff on MNIST-5k with 20 clients (README of this
folder), with and without sample-level DP, on the virtual clock.

    python experiments/async/run.py --scheme fedfix-0.5 --speeds F-80 --privacy dp --seed 0
    python experiments/async/run.py --queue      # every missing run, in priority order
    python experiments/async/run.py --table      # results.json as a Markdown table
    python experiments/async/run.py --plot       # accuracy vs simulated time (plot.png)

Protocol (the paper's headline grid, sections 4.3-4.4 of the spec, on MNIST-5k instead of
CIFAR10 / Shakespeare): the SmallCNN, 20 clients, Dirichlet(0.1) label skew, client times F-0
or F-80, n_SGD = 10 local steps at batch 64 (Poisson under DP), a fresh SGD optimizer each local
round (lr 0.01 momentum 0.9 without DP; DP-SGD lr 0.1 momentum 0.9, clip 1), horizon T = 30
units of simulated time (30 rounds of sync FedAvg under F-80: its round lasts max tau = 1),
evaluation on the server's held-out 20 % every 0.5. Schemes and weights as the paper's
headline: FL / Async / FedFix-0.2,0.5,0.8 with the ``weight`` policy, FedBuff-5,10
``identical``. DP: epsilon 8 (delta 1e-5) per client, each calibrated for its own number of
local rounds in the schedule (fast clients train more often, so they add more noise per step).

Metrics per run: final accuracy, the mean of the last 10 evaluations and their std, and the
simulated time to reach TARGET accuracy (inf if never).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from dpfl.cli.simulate import DEFAULT_CONFIG
from dpfl.config import load_config
from dpfl.simulation.runner import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_queue import RunQueue  # noqa: E402

HERE = Path(__file__).parent
HORIZON, LOCAL_STEPS, BATCH, EVERY = 30.0, 10, 64, 0.5
TARGET = {"nodp": 0.6, "dp": 0.5}
SCHEMES = {
    "sync": ["federation.async-scheme='sync'"],
    "fedasync": ["federation.async-scheme='fedasync'", "federation.async-weights='weight'"],
    **{
        f"fedfix-{dt}": ["federation.async-scheme='fedfix'", f"federation.async-window={dt}"]
        for dt in (0.2, 0.5, 0.8)
    },
    **{
        f"fedbuff-{c}": [
            "federation.async-scheme='fedbuff'", f"federation.async-buffer={c}",
            "federation.async-weights='identical'",
        ]
        for c in (5, 10)
    },
}  # fmt: skip
SPEEDS = ("F-80", "F-0")
PRIVACY = {
    "nodp": ["privacy.enabled=false", "optimizer.lr=0.01"],
    "dp": ["privacy.target-epsilon=8.0", "optimizer.lr=0.1"],
}
COMMON = [
    "data.name='mnist-5k'", "federation.num-clients=20", "federation.mode='async'",
    "federation.partition='dirichlet'", "federation.dirichlet-alpha=0.1",
    f"federation.local-steps={LOCAL_STEPS}", f"data.batch-size={BATCH}",
    "optimizer.name='sgd'", "optimizer.momentum=0.9", f"federation.horizon={HORIZON}",
    f"federation.eval-interval={EVERY}",
]  # fmt: skip


def config(scheme: str, speeds: str, privacy: str, seed: int):
    sets = [*COMMON, *PRIVACY[privacy], *SCHEMES[scheme], f"federation.client-speeds='{speeds}'",
            f"seed={seed}"]  # fmt: skip
    return load_config(DEFAULT_CONFIG, sets)


def run_one(scheme: str, speeds: str, privacy: str, seed: int) -> dict:
    cfg = config(scheme, speeds, privacy, seed)
    start = time.time()
    result = simulate(cfg)
    times = [h["virtual-time"] for h in result.history]
    accs = [h["accuracy"] for h in result.history]
    target = TARGET[privacy]
    row = {
        "scheme": scheme,
        "speeds": speeds,
        "privacy": privacy,
        "seed": seed,
        "accuracy": result.accuracy,
        "last10_mean": statistics.fmean(accs[-10:]),
        "last10_std": statistics.stdev(accs[-10:]) if len(accs) > 1 else 0.0,
        "target": target,
        "time_to_target": next(
            (t for t, a in zip(times, accs, strict=True) if a >= target), math.inf
        ),  # fmt: skip
        "aggregations": result.rounds_completed,
        "stopped": result.stopped,
        "epsilon_max": max(result.epsilon.values(), default=math.inf),
        "epsilon_min": min(result.epsilon.values(), default=math.inf),
        "times": [round(t, 4) for t in times],
        "history": [round(a, 4) for a in accs],
        "seconds": round(time.time() - start, 1),
        "threads": torch.get_num_threads(),
    }
    RUNS.append(row, write_results)
    return row


def _key(row: dict):
    return (row["scheme"], row["speeds"], row["privacy"], row["seed"])


RUNS = RunQueue(HERE, _key)


def queue() -> list[tuple[str, str, str, int]]:
    """F-80 first (the heterogeneous case the paper is about), seed 0 first, no DP first."""
    return [
        (scheme, speeds, privacy, seed)
        for seed in (0, 1, 2)
        for speeds in SPEEDS
        for privacy in PRIVACY
        for scheme in SCHEMES
    ]


def write_results(rows: list[dict]) -> dict:
    import json

    out: dict = {}
    for r in rows:
        cell = out.setdefault(f"{r['privacy']}/{r['speeds']}", {}).setdefault(r["scheme"], {})
        for k in ("accuracy", "last10_mean", "last10_std", "time_to_target"):
            cell.setdefault(k, []).append(r[k])
        cell.setdefault("seeds", []).append(r["seed"])
    for setting in out.values():
        for cell in setting.values():
            for k in ("accuracy", "last10_mean", "last10_std"):
                cell[f"{k}_mean"] = statistics.fmean(cell[k])
            cell["accuracy_std"] = (
                statistics.stdev(cell["accuracy"]) if len(cell["seeds"]) > 1 else 0.0
            )
            finite = [t for t in cell["time_to_target"] if math.isfinite(t)]
            cell["time_to_target_median"] = (
                statistics.median(cell["time_to_target"])
                if len(finite) * 2 > len(cell["time_to_target"])
                else None  # most seeds never reached it
            )
            cell["time_to_target"] = [
                t if math.isfinite(t) else None for t in cell["time_to_target"]
            ]
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def table() -> None:
    results = write_results(RUNS.rows())
    print(
        "| privacy / speeds | scheme | final accuracy | last-10 mean +- std | time to target "
        "| seeds |"
    )
    print("|---|---|---|---|---|---|")
    for setting, cells in results.items():
        for scheme in SCHEMES:
            c = cells.get(scheme)
            if c is None:
                continue
            ttt = c["time_to_target_median"]
            print(
                f"| {setting} | {scheme} | {c['accuracy_mean']:.3f} +- {c['accuracy_std']:.3f} | "
                f"{c['last10_mean_mean']:.3f} +- {c['last10_std_mean']:.3f} | "
                f"{'never' if ttt is None else f'{ttt:g}'} | {len(c['seeds'])} |"
            )


def plot() -> None:
    from dpfl.plotting import pyplot, save_figure

    plt = pyplot()
    rows = [r for r in RUNS.rows() if r["seed"] == 0]
    settings = sorted({(r["privacy"], r["speeds"]) for r in rows})
    fig, axes = plt.subplots(len(settings), 1, figsize=(7, 2.6 * len(settings)), squeeze=False,
                             layout="constrained")  # fmt: skip
    for ax, (privacy, speeds) in zip(axes[:, 0], settings, strict=True):
        for scheme in SCHEMES:
            r = next((r for r in rows if (r["scheme"], r["privacy"], r["speeds"]) ==
                      (scheme, privacy, speeds)), None)  # fmt: skip
            if r is not None:
                ax.plot(r["times"], r["history"], label=scheme, lw=1.2)
        ax.set_title(
            f"{'epsilon 8' if privacy == 'dp' else 'no DP'}, {speeds} (seed 0)", fontsize=9
        )
        ax.set_xlabel("simulated time")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    save_figure(fig, HERE / "plot.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheme", choices=list(SCHEMES))
    parser.add_argument("--speeds", choices=SPEEDS, default="F-80")
    parser.add_argument("--privacy", choices=list(PRIVACY), default="nodp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queue", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.table:
        table()
        return
    if args.plot:
        plot()
        return
    if args.queue:
        while (job := RUNS.claim_next(queue())) is not None:
            run_one(*job)
        return
    if args.scheme is None:
        parser.error("--scheme is required (or --queue / --table / --plot)")
    run_one(args.scheme, args.speeds, args.privacy, args.seed)


if __name__ == "__main__":
    main()
