"""Benchmark: private fine-tuning of all-MiniLM-L6-v2 against non-private fine-tuning.

The model is the MiniLM architecture (BERT, 6 layers, hidden 384, 22.7 M parameters) built the
way ``dpfl finetune`` builds it (``AutoModelForSequenceClassification`` + ``dpfl.tasks.hf.
apply_lora``), randomly initialized (step time and memory do not depend on the weights), fed the
text task's dict batches ``{"input_ids", "attention_mask"}`` of 32 x 64 tokens, in training mode
(dropout on) in both arms. A non-private step is ``zero_grad -> forward -> per-record loss mean
-> backward -> SGD step``; a private step is ``PrivateTraining.train_step`` (per-sample norms by
the ``bk`` backend, clipping, noise, the ledger event, the SGD step).

* ``lora_time_ratio``: DP-LoRA step / non-private LoRA step (LoRA r=8 on query/value + head).
* ``full_time_ratio``, ``full_mem_ratio``: the same for full fine-tuning (``lora.r = 0``).
* ``lora_bytes_ratio``: bytes a federated round moves per client with adapters only (the LoRA
  task's ``trainable_state``, what the server sends and a client returns) / with the full model
  (the ``lora.r = 0`` task's trainable state: every tensor).
* ``fedsvd_server_seconds_per_round``: FedSVD's server step on MiniLM's LoRA state (3 replies
  averaged, then every one of the 12 LoRA layers re-factorized by QR + r x r SVD), median of
  repeats; ``fedsvd_naive_svd_seconds``: the same re-factorization by a full SVD of each
  384 x 384 product ``B A`` (what the official code does), for comparison.
* ``fedsvd_upload_bytes_ratio``: bytes a FedSVD client uploads (its reply: B and the head, the
  strategy's ``ClientBehaviour``) / a LoRA-FedAvg client's (A, B and the head).

Time: the arms live in one process and are interleaved step by step (order rotating), each
ratio is median / median, of wall time (``*_time_ratio``) and of the process's CPU time
(``*_cpu_time_ratio``: with one thread, the step's own work, much less disturbed by other jobs on
a loaded machine). Memory: each arm runs again in a fresh child; training memory is the
peak RSS over the steps minus the RSS before the first step (VmHWM reset through
/proc/self/clear_refs), as in benchmarks/dp_overhead.py. One torch thread by default. The last
line is one JSON object; ``--quick`` finishes in under 90 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_overhead import _vm, time_interleaved_clocks  # noqa: E402

ARMS = ("lora-plain", "lora-dp", "full-plain", "full-dp")
BATCH, SEQ = 32, 64


def build(r: int):
    """MiniLM-architecture classifier with dpfl's LoRA (r = 0: full fine-tuning), train mode."""
    from transformers import BertConfig, BertForSequenceClassification

    from dpfl.config import LoraConfig
    from dpfl.tasks.hf import apply_lora

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512, num_labels=2,
    )  # fmt: skip
    model = apply_lora(BertForSequenceClassification(cfg), LoraConfig(r=r), "classifier")
    model.train()
    return model


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(
        0, 2, (BATCH,), generator=g
    )


def loss_fn(output, y):
    return torch.nn.functional.cross_entropy(output.logits, y, reduction="none")


def make_step(arm: str):
    from torch.utils.data import DataLoader

    from dpfl.privacy import make_private
    from dpfl.tasks.hf import TokenRecords

    kind, mode = arm.split("-")
    model = build(8 if kind == "lora" else 0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x, y = batch()
    if mode == "plain":

        def step():
            opt.zero_grad()
            loss_fn(model(**x), y).mean().backward()
            opt.step()

        return step
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (512, SEQ), generator=g)
    records = TokenRecords(ids, torch.ones_like(ids), torch.randint(0, 2, (512,), generator=g))
    pt = make_private(
        model, opt, DataLoader(records, batch_size=BATCH), noise_multiplier=1.0,
        clip_norm=1.0, grad_sample_mode="bk", seed=0,
    )  # fmt: skip
    return lambda: pt.train_step(x, y, loss_fn)


def child_memory(arm: str, steps: int) -> None:
    import gc

    torch.set_num_threads(1)
    step = make_step(arm)
    gc.collect()
    before = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    for _ in range(steps):
        step()
    print(json.dumps({"delta": _vm("VmHWM") - before}))


def memory(arms, steps: int) -> dict[str, int]:
    out = {}
    for arm in arms:  # one at a time: the children's peaks must not add up on the machine
        proc = subprocess.run(
            [sys.executable, __file__, "--child-memory", arm, "--steps", str(steps)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {arm} failed: {proc.stderr[-500:]}")
        out[arm] = json.loads(proc.stdout.strip().splitlines()[-1])["delta"]
    return out


def bytes_ratio() -> tuple[int, int]:
    from dpfl.tasks.text import TextClassification

    def nbytes(model) -> int:
        state = TextClassification.trainable_state(None, model)  # the task's rule, no config
        return sum(v.numel() * v.element_size() for v in state.values())

    return nbytes(build(8)), nbytes(build(0))


def fedsvd_figures(repeats: int) -> dict[str, float]:
    """FedSVD's server step and upload on the MiniLM LoRA state (see the module docstring)."""
    import statistics
    import time

    from dpfl.config import load_config
    from dpfl.lora import lora_pairs
    from dpfl.server.strategies import Reply, client_behaviour, create_strategy
    from dpfl.tasks.text import TextClassification

    state = TextClassification.trainable_state(None, build(8))
    cfg = {s: load_config(None, [f"federation.strategy='{s}'", "privacy.enabled=false"])
           for s in ("fedsvd", "lora-fedavg")}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    keep = client_behaviour(cfg["fedsvd"]).reply(state)
    replies = [
        Reply(
            i,
            f"client-{i}",
            {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in keep.items()},
            1,
            {},
        )  # fmt: skip
        for i in range(3)
    ]
    strategy = create_strategy(cfg["fedsvd"])
    pairs = lora_pairs(state)

    def naive() -> None:  # the d_out x d_in product, fully decomposed
        for a_key, b_key in pairs:
            r = state[a_key].shape[0]
            u, s_, vh = torch.linalg.svd(state[b_key] @ state[a_key], full_matrices=False)
            _ = vh[:r], u[:, :r] * s_[:r]

    times: dict[str, list[float]] = {"server": [], "naive": []}
    for _ in range(repeats):
        t = time.perf_counter()
        strategy.aggregate(state, replies, 1)
        times["server"].append(time.perf_counter() - t)
        t = time.perf_counter()
        naive()
        times["naive"].append(time.perf_counter() - t)

    def nbytes(st) -> int:
        return sum(v.numel() * v.element_size() for v in st.values())

    full_reply = client_behaviour(cfg["lora-fedavg"]).reply(state)
    return {
        "fedsvd_lora_layers": len(pairs),
        "fedsvd_server_seconds_per_round": round(statistics.median(times["server"]), 5),
        "fedsvd_naive_svd_seconds": round(statistics.median(times["naive"]), 5),
        "fedsvd_upload_bytes_per_client": nbytes(keep),
        "fedsvd_upload_bytes_ratio": round(nbytes(keep) / nbytes(full_reply), 4),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 90 s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(args.child_memory, args.steps)
        return {}
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {}
    for kind in ("lora", "full"):
        steps = {a: make_step(a) for a in ARMS if a.startswith(kind)}
        med, cpu = time_interleaved_clocks(steps, warmup=1, rounds=3 if args.quick else 10)
        result[f"{kind}_time_ratio"] = round(med[f"{kind}-dp"] / med[f"{kind}-plain"], 3)
        result[f"{kind}_cpu_time_ratio"] = round(cpu[f"{kind}-dp"] / cpu[f"{kind}-plain"], 3)
        result[f"{kind}_plain_step_s"] = round(med[f"{kind}-plain"], 3)
        del steps
    mem = memory(("full-plain", "full-dp"), steps=2 if args.quick else 4)
    result["full_mem_ratio"] = round(mem["full-dp"] / mem["full-plain"], 3)
    result["full_plain_train_mem_mb"] = round(mem["full-plain"] / 2**20, 1)
    lora_bytes, full_bytes = bytes_ratio()
    result["lora_bytes_per_client"] = lora_bytes
    result["full_bytes_per_client"] = full_bytes
    result["lora_bytes_ratio"] = round(lora_bytes / full_bytes, 5)
    result.update(fedsvd_figures(5 if args.quick else 20))
    result["threads"] = args.threads
    result["weights"] = "random-init"
    for k, v in result.items():
        print(f"{k:28s} {v}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
