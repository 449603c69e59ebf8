"""Benchmark: ``dpfl simulate`` (Flower ClientApp on the in-process grid, run store, checkpoints)
against a plain sequential Python loop doing the same local training and aggregation.

Workload: ``dpfl simulate``'s embedded default (MNIST-5k, IID, SmallCNN, sample-level DP-SGD)
with N clients, 10 sampled per round (Poisson rate 10/N), 3 rounds, 2 local steps of batch 16,
noise multiplier 1.0, server evaluation each round. The plain loop calls the same Flower-free
client function (``run_client_round``) and the same FedAvg aggregation, with no Flower records,
no messages, no store; both must end with the same accuracy (``same_result_<n>``).

Both run as fresh child processes (interpreter start and imports included, as a user sees
them); wall time is measured around the child, peak RSS with ``os.wait4`` (the child and
everything it waits for: the in-process engine starts no other process). Repetitions
interleave the variants. Last line: one JSON object with ``overhead_ratio_10``,
``overhead_ratio_100`` and ``mem_ratio_1000_vs_10`` (full mode). ``--quick`` (< 60 s) runs one
repetition and estimates the memory ratio from 10 vs 200 clients (``mem_ratio_note`` says so).

Flower's own Ray simulation measured 4.2-5.8x a plain loop here (notes/flower.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PER_ROUND = 10
ROUNDS = 3


def overrides(num_clients: int) -> list[str]:
    return [
        "data.name='mnist-5k'",
        f"federation.num-clients={num_clients}",
        f"federation.fraction={min(1.0, PER_ROUND / num_clients)}",
        f"federation.rounds={ROUNDS}",
        "federation.local-steps=2",
        "data.batch-size=16",
        "privacy.noise-multiplier=1.0",
        "privacy.level='sample'",
    ]


def plain_loop(num_clients: int) -> dict:
    """The same training without Flower, messages or store (the baseline)."""
    import numpy as np
    import torch

    from dpfl.cli.simulate import DEFAULT_CONFIG
    from dpfl.clients.federated import run_client_round
    from dpfl.clients.local_train import evaluate
    from dpfl.config import load_config
    from dpfl.data import load_dataset
    from dpfl.models import create_model
    from dpfl.server.strategies import FedAvg, Reply

    cfg = load_config(DEFAULT_CONFIG, overrides(num_clients))  # what dpfl simulate loads
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed)
    model = create_model(cfg.model, channels=1, image_size=28, num_classes=10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clients: dict[int, dict] = {}
    acc = 0.0
    for r in range(1, ROUNDS + 1):
        rng = np.random.default_rng([cfg.seed, r])
        sampled = [n for n, u in enumerate(rng.random(num_clients)) if u < cfg.federation.fraction]
        replies = []
        for pid in sampled:
            res = run_client_round(cfg, pid, state, r, clients.setdefault(pid, {}))
            replies.append(Reply(pid, f"client-{pid}", res.arrays, res.num_examples, res.metrics))
        state = FedAvg().aggregate(state, replies, r)
        model.load_state_dict(state)
        _, acc = evaluate(model, data.test)
    return {"accuracy": acc}


def run_child(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child failed: {' '.join(args)}")
    return wall, usage.ru_maxrss * 1024, out


def sim_args(num_clients: int, store: str) -> list[str]:
    sets = [x for kv in overrides(num_clients) for x in ("--set", kv)]
    return [sys.executable, "-m", "dpfl", "simulate", "--json", "--store", store, *sets]


def plain_args(num_clients: int) -> list[str]:
    return [sys.executable, __file__, "--child-plain", str(num_clients)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 60 s")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child-plain", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_plain is not None:
        print(json.dumps(plain_loop(args.child_plain)))
        return {}
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = [10, 100]
    mem_sizes = [10, 200] if args.quick else [10, 1000]
    wall: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for n in sorted(set(sizes + mem_sizes)):
                variants = [("sim", sim_args(n, os.path.join(tmp, f"s{rep}-{n}.sqlite")))]
                if n in sizes:
                    variants.append(("plain", plain_args(n)))
                if rep % 2:
                    variants.reverse()
                for name, cmd in variants:
                    w, m, out = run_child(cmd)
                    wall.setdefault(f"{name}_{n}", []).append(w)
                    rss.setdefault(f"{name}_{n}", []).append(m)
                    accuracy[f"{name}_{n}"] = json.loads(out.strip().splitlines()[-1])["accuracy"]
    med = {k: statistics.median(v) for k, v in wall.items()}
    mem = {k: statistics.median(v) for k, v in rss.items()}
    result: dict[str, object] = {}
    for n in sizes:
        result[f"overhead_ratio_{n}"] = round(med[f"sim_{n}"] / med[f"plain_{n}"], 3)
        result[f"sim_{n}_s"] = round(med[f"sim_{n}"], 2)
        result[f"plain_{n}_s"] = round(med[f"plain_{n}"], 2)
        # same seeds, same computation: the final accuracies must agree exactly
        result[f"same_result_{n}"] = accuracy[f"sim_{n}"] == accuracy[f"plain_{n}"]
        result[f"accuracy_{n}"] = accuracy[f"sim_{n}"]
    big = mem_sizes[1]
    key = "mem_ratio_1000_vs_10"
    result[key] = round(mem[f"sim_{big}"] / mem["sim_10"], 3)
    if args.quick:
        result["mem_ratio_note"] = f"quick: estimated from {big} vs 10 clients (full mode: 1000)"
    result[f"sim_{big}_peak_rss_mb"] = round(mem[f"sim_{big}"] / 2**20, 1)
    result["sim_10_peak_rss_mb"] = round(mem["sim_10"] / 2**20, 1)
    result["repeats"] = repeats
    for k, v in result.items():
        print(f"{k:28s} {v}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
