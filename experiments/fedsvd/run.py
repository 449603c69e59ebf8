"""FedSVD vs FFA-LoRA vs LoRA-FedAvg on Rotten Tomatoes with the pretrained all-MiniLM-L6-v2 +
LoRA r=8, under sample-level DP at epsilon 3 and 6 and without DP (README of this folder).

    python experiments/fedsvd/run.py --strategy fedsvd --setting eps3 --partition dirichlet --seed 0
    python experiments/fedsvd/run.py --queue            # every missing run, in priority order
    python experiments/fedsvd/run.py --table            # results.json as a Markdown table

Each run appends its row to runs.json; results.json is rebuilt from runs.json, keyed
``{setting: {strategy: {partition: {"mean", "std", "seeds", "accuracy"}}}}``.

Protocol (ours: the paper's 100 rounds x 10 steps x batch 128 on RoBERTa-large would take days
on these CPUs): 6 clients, Dirichlet(0.5) label skew or natural (by movie), Poisson client
sampling with fraction 0.5, ROUNDS rounds of LOCAL_STEPS local steps at batch 64 (Poisson), LoRA
r=8 alpha 16 on query/value + the mean-pool head, delta 1e-5, flat clipping C = 1, noise
calibrated for the worst case (every round). DP: SGD lr 0.5 without momentum (the official
scripts; with momentum 0.9 the first round's loss rose to 2.9), fresh each round
(``optimizer.local-state = "reset"``); non-private: Adam 2e-3. Server: unweighted mean under DP
(each client weight 1), weighted by examples without DP; FedSVD re-factorizes every round.
Accuracy: the global model on the server's held-out 20 % after the last round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dpfl.config import load_config
from dpfl.simulation.runner import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_queue import RunQueue  # noqa: E402

HERE = Path(__file__).parent
DEFAULTS = HERE.parent.parent / "dpfl" / "defaults" / "finetune-text.toml"
STRATEGIES = ("fedsvd", "ffa-lora", "lora-fedavg")
SETTINGS = ("eps3", "eps6", "nonprivate")
PARTITIONS = ("dirichlet", "natural")
ROUNDS, LOCAL_STEPS, BATCH = 12, 5, 64

COMMON = [
    "federation.num-clients=6", "federation.fraction=0.5", "federation.dirichlet-alpha=0.5",
    f"federation.rounds={ROUNDS}", f"federation.local-steps={LOCAL_STEPS}",
    "federation.local-epochs=1.0", f"data.batch-size={BATCH}", "data.physical-batch-size=32",
    "optimizer.schedule='constant'",  # federated clients: constant lr
]  # fmt: skip
PRIVATE = ["optimizer.name='sgd'", "optimizer.lr=0.5", "optimizer.momentum=0.0"]  # the paper
SETTING_SETS = {
    "eps3": ["privacy.target-epsilon=3.0", *PRIVATE],
    "eps6": ["privacy.target-epsilon=6.0", *PRIVATE],
    "nonprivate": ["privacy.enabled=false", "optimizer.name='adam'", "optimizer.lr=0.002",
                   "optimizer.momentum=0.0"],
}  # fmt: skip


def config(strategy: str, setting: str, partition: str, seed: int, extra=()):
    sets = [*COMMON, *SETTING_SETS[setting], f"federation.strategy='{strategy}'",
            f"federation.partition='{partition}'", f"seed={seed}", *extra]  # fmt: skip
    return load_config(DEFAULTS, sets)


def run_one(strategy: str, setting: str, partition: str, seed: int, extra=()) -> dict:
    cfg = config(strategy, setting, partition, seed, extra)
    start = time.time()

    def on_round(r, row):
        print(f"{strategy} {setting} {partition} seed {seed} round {r}: accuracy "
              f"{row['accuracy']:.4f} loss {row['loss']:.4f} eps-max {row['epsilon-max']:.3f}",
              flush=True)  # fmt: skip

    result = simulate(cfg, on_round=on_round)
    row = {
        "strategy": strategy,
        "setting": setting,
        "partition": partition,
        "seed": seed,
        "overrides": list(extra),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "rounds": result.rounds_completed,
        "stopped": result.stopped,
        "epsilon_max": max(result.epsilon.values(), default=float("inf")),
        "bytes_up_per_round": statistics.fmean(h["bytes-up"] for h in result.history)
        if result.history
        else None,
        "history": [round(h["accuracy"], 4) for h in result.history],
        "seconds": round(time.time() - start, 1),
        "threads": torch.get_num_threads(),
    }
    _append(row)
    return row


def _key(row: dict):
    return None if row.get("overrides") else (
        row["strategy"], row["setting"], row["partition"], row["seed"])  # fmt: skip


RUNS = RunQueue(HERE, _key)


def _runs() -> list[dict]:
    return RUNS.rows()


def _append(row: dict) -> None:
    RUNS.append(row, write_results)


def write_results(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        if r.get("overrides"):
            continue  # probes are kept in runs.json only
        cell = out.setdefault(r["setting"], {}).setdefault(r["strategy"], {})
        cell.setdefault(r["partition"], {"accuracy": [], "seeds": []})
        cell[r["partition"]]["accuracy"].append(r["accuracy"])
        cell[r["partition"]]["seeds"].append(r["seed"])
    for setting in out.values():
        for strategy in setting.values():
            for c in strategy.values():
                c["mean"] = statistics.fmean(c["accuracy"])
                c["std"] = statistics.stdev(c["accuracy"]) if len(c["accuracy"]) > 1 else 0.0
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def queue() -> list[tuple[str, str, str, int]]:
    """Every (strategy, setting, partition, seed) in priority order: the private Dirichlet cells
    (the paper's claim) at all seeds first, then seed 0 of every other cell, then the rest."""
    every = [
        (s, setting, p, seed)
        for seed in (0, 1, 2)
        for p in PARTITIONS
        for setting in SETTINGS
        for s in STRATEGIES
    ]
    first = [j for j in every if j[2] == "dirichlet" and j[1] != "nonprivate"]
    second = [j for j in every if j not in first and j[3] == 0]
    return first + second + [j for j in every if j not in first and j not in second]


def _claim_next() -> tuple[str, str, str, int] | None:
    """The first queued run neither done nor claimed by another --queue worker."""
    return RUNS.claim_next(queue())


def table() -> None:
    results = write_results(_runs())
    print("| partition | setting | " + " | ".join(STRATEGIES) + " |")
    print("|---|---|" + "---|" * len(STRATEGIES))
    for p in PARTITIONS:
        for setting in SETTINGS:
            cells = []
            for s in STRATEGIES:
                c = results.get(setting, {}).get(s, {}).get(p)
                cells.append(
                    "-" if c is None
                    else f"{c['mean']:.3f} +- {c['std']:.3f} ({len(c['seeds'])})"
                )  # fmt: skip
            print(f"| {p} | {setting} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=STRATEGIES)
    parser.add_argument("--setting", choices=SETTINGS)
    parser.add_argument("--partition", choices=PARTITIONS, default="dirichlet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra overrides (probes)")
    parser.add_argument("--queue", action="store_true", help="run every missing run in order")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.table:
        table()
        return
    if args.queue:
        while (job := _claim_next()) is not None:
            run_one(*job)
        return
    if args.strategy is None or args.setting is None:
        parser.error("--strategy and --setting are required (or --queue / --table)")
    run_one(args.strategy, args.setting, args.partition, args.seed, args.set)


if __name__ == "__main__":
    main()
