"""Benchmark: the asynchronous federation (``federation.mode = "async"``, virtual clock).

* ``overhead_ratio``: dpfl's async loop (Flower ClientApp on the in-process grid, messages,
  reply parsing, run store, a checkpoint per evaluation) / a plain sequential loop that replays
  the same schedule with the same Flower-free client function (``run_client_round``) and the
  same update rule, no records, no store. 20 clients, FedBuff c = 5, F-80, sample-level DP
  (noise multiplier 1.0), 2 local steps of batch 16, evaluation every 0.5 of simulated time.
  Both must end with the same accuracy (``same_result``). One process, the arms interleaved
  after a warm-up (data caches filled), median of repeats; wall and process CPU time.
* ``fedfix_time_to_target_ratio``: simulated time FedFix-0.5 needs to reach the target accuracy
  (``target_accuracy``: 0.60 full, 0.30 quick) / sync FedAvg's; F-80, MNIST-5k, 20 clients,
  Dirichlet(0.1), n_SGD 10 (5 quick) at batch 64, SGD lr 0.01 momentum 0.9 (fresh each local
  round, as the paper), no DP, the ``weight`` policies, horizon 30 (6 quick), evaluation every
  0.5 of simulated time. Below 1: FedFix is faster.
* ``fedasync_final_std_ratio``: std of the last 10 evaluations of async FedAvg (``weight``
  policy) / FedFix-0.5's, same setting: above 1, async is the less steady.

The last line is one JSON object. ``--quick`` finishes in under 90 s on 2 cores (one seed,
shorter horizons); the full mode takes the median over seeds 0-2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

OVERHEAD = [
    "data.name='mnist-5k'", "federation.num-clients=20", "federation.mode='async'",
    "federation.async-scheme='fedbuff'", "federation.async-buffer=5",
    "federation.client-speeds='F-80'", "federation.local-steps=2", "data.batch-size=16",
    "privacy.target-epsilon='none'", "privacy.noise-multiplier=1.0",
    "federation.eval-interval=0.5",
]  # fmt: skip


def _config(sets):
    from dpfl.cli.simulate import DEFAULT_CONFIG
    from dpfl.config import load_config

    return load_config(DEFAULT_CONFIG, sets)


def async_loop(cfg, store_path: str) -> float:
    """dpfl's loop, as ``dpfl simulate`` runs it (store included); the final accuracy."""
    from dpfl.clients.client_app import simulation_app
    from dpfl.server.loop import run_rounds
    from dpfl.simulation.inprocess import InProcessGrid
    from dpfl.store import RunStore

    grid = InProcessGrid(simulation_app(), cfg.federation.num_clients)
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        return run_rounds(grid, cfg, run).accuracy


def plain_loop(cfg) -> float:
    """The same schedule and local work without Flower, messages or store."""
    from dpfl.clients.federated import run_client_round
    from dpfl.server.async_loop import eval_due
    from dpfl.server.async_schedule import plan
    from dpfl.tasks import get_task

    torch.manual_seed(cfg.seed)
    task = get_task(cfg)
    data = task.load_data()
    model = task.build_model(data)
    state = task.trainable_state(model)
    versions = {0: state}
    clients: dict[int, dict] = {}
    acc = math.nan
    aggs = plan(cfg)
    interval, last_eval = cfg.federation.eval_interval, None
    for a in aggs:
        replies = []
        for i, v in zip(a.participants, a.sent_versions, strict=True):
            res = run_client_round(cfg, i, versions[v], v + 1, clients.setdefault(i, {}))
            replies.append((res.arrays, versions[v]))
        fresh = all(v == a.index - 1 for v in a.sent_versions)
        if fresh and math.fsum(a.weights) == 1.0:
            state = {k: sum(r[k] * w for (r, _), w in zip(replies, a.weights, strict=True))
                     for k in state}  # fmt: skip
        else:
            state = {
                k: state[k]
                + sum(w * (r[k] - s[k]) for (r, s), w in zip(replies, a.weights, strict=True))
                for k in state
            }
        versions[a.index] = state
        if a is aggs[-1] or eval_due(a.time, last_eval, interval):
            task.load_trainable_state(model, state)
            acc = task.evaluate(model, data.test)[task.metric]
            last_eval = a.time
    return acc


def overhead(repeats: int, horizon: float) -> dict:
    from dpfl.server.async_schedule import plan

    cfg = _config([*OVERHEAD, f"federation.horizon={horizon}"])
    wall: dict[str, list[float]] = {"async": [], "plain": []}
    cpu: dict[str, list[float]] = {"async": [], "plain": []}
    acc: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(cfg)  # warm-up: data and partitions cached, as in a long run
        for rep in range(repeats):
            arms = ["async", "plain"] if rep % 2 == 0 else ["plain", "async"]
            for arm in arms:
                t0, c0 = time.perf_counter(), time.process_time()
                if arm == "async":
                    acc[arm] = async_loop(cfg, str(Path(tmp) / f"{rep}.sqlite"))
                else:
                    acc[arm] = plain_loop(cfg)
                wall[arm].append(time.perf_counter() - t0)
                cpu[arm].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "overhead_ratio": round(med["async"] / med["plain"], 3),
        "overhead_cpu_ratio": round(med_cpu["async"] / med_cpu["plain"], 3),
        "async_s": round(med["async"], 2),
        "plain_s": round(med["plain"], 2),
        "same_result": acc["async"] == acc["plain"],
        "overhead_aggregations": len(plan(cfg)),
    }


def convergence(scheme_sets, seed: int, horizon: float, steps: int, every: float):
    """(simulated times, accuracies) of the evaluations of one run."""
    from dpfl.simulation.runner import simulate

    cfg = _config(
        [
            "data.name='mnist-5k'", "federation.num-clients=20", "federation.mode='async'",
            "federation.client-speeds='F-80'", "federation.partition='dirichlet'",
            "federation.dirichlet-alpha=0.1", f"federation.local-steps={steps}",
            "data.batch-size=64", "privacy.enabled=false", "optimizer.lr=0.01",
            "optimizer.momentum=0.9", f"federation.horizon={horizon}",
            f"federation.eval-interval={every}", f"seed={seed}", *scheme_sets,
        ]
    )  # fmt: skip
    result = simulate(cfg)
    return [h["virtual-time"] for h in result.history], [h["accuracy"] for h in result.history]


def time_to(target: float, times, accs) -> float:
    return next((t for t, a in zip(times, accs, strict=True) if a >= target), math.inf)


SCHEMES = {
    "sync": ["federation.async-scheme='sync'"],
    "fedfix": ["federation.async-scheme='fedfix'", "federation.async-window=0.5"],
    "fedasync": ["federation.async-scheme='fedasync'"],
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 90 s")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    result: dict[str, object] = overhead(repeats=1 if quick else 3, horizon=1.5 if quick else 3)
    target = 0.30 if quick else 0.60
    horizon, steps, every = (6.0, 5, 0.5) if quick else (30.0, 10, 0.5)
    seeds = [0] if quick else [0, 1, 2]
    ttt, stds = [], []
    for seed in seeds:
        runs = {name: convergence(sets, seed, horizon, steps, every)
                for name, sets in SCHEMES.items()}  # fmt: skip
        t_fix = time_to(target, *runs["fedfix"])
        t_sync = time_to(target, *runs["sync"])
        ttt.append(t_fix / t_sync if math.isfinite(t_sync) else math.nan)
        std_async = statistics.stdev(runs["fedasync"][1][-10:])
        std_fix = statistics.stdev(runs["fedfix"][1][-10:])
        stds.append(std_async / std_fix if std_fix > 0 else math.inf)
        result[f"seed{seed}_final_accuracy"] = {k: round(v[1][-1], 4) for k, v in runs.items()}
        result[f"seed{seed}_time_to_target"] = {k: time_to(target, *v) for k, v in runs.items()}
    result["fedfix_time_to_target_ratio"] = round(statistics.median(ttt), 3)
    result["fedasync_final_std_ratio"] = round(statistics.median(stds), 3)
    result["target_accuracy"] = target
    result["setting"] = (
        f"F-80, MNIST-5k, 20 clients, Dirichlet(0.1), n_SGD {steps}, B 64, no DP, horizon "
        f"{horizon}, eval every {every}, seeds {seeds}"
    )
    for k, v in result.items():
        print(f"{k:32s} {v}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
