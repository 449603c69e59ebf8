"""The synchronous round loop of dpfl's ServerApp, on any Flower ``Grid``.

Per round: sample clients (Poisson with rate ``federation.fraction`` from a generator seeded by
``(seed, round)``, or a fixed-size seeded sample), send the global model, collect replies, record
the privacy each client reports in the ledger (durably, before anything derived from the reply is
used), drop malformed replies with a recorded reason (client error, missing reply, wrong keys,
shape or dtype, NaN/Inf), aggregate, evaluate on the server's held-out set, record metrics and a
checkpoint. Under user-level DP a round in which fewer clients reply than were sampled is skipped
(fail closed): the noise calibration assumes every sampled update is in the sum.

What the server stores (README, "What leaves a client / what the server publishes"): per round,
the evaluation of the new global model on the server's own held-out set, the counts of
replying and dropped clients, the largest epsilon spent, and the strategy's released summary
(dp-fedavg: clip, next clip, noisy unclipped fraction). Under DP nothing else derived from the
clients' replies: their diagnostics (``federation.client-diagnostics``) are stored per client
with names prefixed ``uncovered/`` (not covered by the guarantee). Without DP the mean client
training loss is stored too, as before (nothing is protected there).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from dpfl.accountants import PrivacyLedger, calibrate_noise
from dpfl.clients.federated import client_datasets
from dpfl.clients.monitor import StopTraining, TrainingMonitor
from dpfl.config import Config
from dpfl.errors import PrivacyBudgetError
from dpfl.federation_messages import DIAGNOSTIC_METRICS
from dpfl.server.replies import ParsedReply, parse_reply, record_spent, train_message
from dpfl.server.strategies import Reply, create_strategy
from dpfl.store import UNCOVERED_PREFIX, RunHandle
from dpfl.tasks import Task, get_task

__all__ = ["FederationResult", "ResumeState", "run_rounds", "sample_clients"]


@dataclass
class ResumeState:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    participants: dict[int, str]
    events: list[dict[str, Any]]
    extra: dict[str, Any] | None = None  # the async loop's own state (dpfl.server.async_loop)


@dataclass
class FederationResult:
    rounds_completed: int
    accuracy: float
    loss: float
    epsilon: dict[str, float]
    stopped: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    noise_multiplier: float | None = None
    message: str | None = None  # why the run stopped early or failed (stopped != completed)


def sample_clients(cfg: Config, nodes: list[int], server_round: int) -> list[int]:
    """The round's clients: Poisson (each with probability ``fraction``) or a fixed-size sample."""
    rng = np.random.default_rng([cfg.seed, server_round])
    f = cfg.federation
    if f.clients_per_round is not None:
        return sorted(
            rng.choice(nodes, size=min(f.clients_per_round, len(nodes)), replace=False).tolist()
        )
    return [n for n, u in zip(nodes, rng.random(len(nodes)), strict=True) if u < f.fraction]


def _server_noise(cfg: Config) -> float | None:
    """dp-fedavg's noise multiplier: given, or calibrated for all rounds at rate q."""
    p = cfg.privacy
    if not (p.enabled and p.level == "user"):
        return None
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    return calibrate_noise(
        p.target_epsilon, p.delta, cfg.federation.fraction, cfg.federation.rounds, p.accountant
    ).noise_multiplier


def _checkpoint(global_state, strategy, participants, server_round) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "round": server_round,
            "global_state": global_state,
            "strategy": strategy.state_dict(),
            "participants": participants,
        },
        buf,
    )
    return buf.getvalue()


def load_checkpoint(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=False)


def run_rounds(
    grid: Grid,
    cfg: Config,
    run: RunHandle | None = None,
    *,
    resume: ResumeState | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> FederationResult:
    """Runs the configured rounds on ``grid``; records everything to ``run``. With
    ``federation.mode = "async"``, runs :func:`dpfl.server.async_loop.run_async` instead."""
    if cfg.federation.mode == "async":
        from dpfl.server.async_loop import run_async

        return run_async(grid, cfg, run, resume=resume, on_round=on_round)
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    task = get_task(cfg)
    data = task.load_data()
    client_datasets(cfg, 0)  # partitions the data now: a bad split is a config error, up front
    model = task.build_model(data)
    user_dp = cfg.privacy.enabled and cfg.privacy.level == "user"
    sink = None if run is None else run.record_privacy_event
    ledger = PrivacyLedger(
        cfg.privacy.accountant,
        cfg.privacy.delta,
        target_epsilon=cfg.privacy.target_epsilon if user_dp else None,
        sink=sink,
    )
    z = _server_noise(cfg)
    strategy = create_strategy(cfg, ledger=ledger, noise_multiplier=z)
    global_state = task.trainable_state(model)
    participants: dict[int, str] = {}
    first = 1
    if resume is not None:
        global_state, first = resume.global_state, resume.round + 1
        strategy.load_state_dict(resume.strategy_state)
        participants = dict(resume.participants)
        restored = PrivacyLedger.from_events(
            resume.events, cfg.privacy.accountant, cfg.privacy.delta
        )
        ledger.load_state_dict(restored.state_dict() | {"target_epsilon": ledger.target_epsilon})
    flat_config = cfg.to_flat()
    nodes = sorted(grid.get_node_ids())
    history: list[dict[str, float]] = []
    stopped, completed, message = "completed", first - 1, None
    loss, acc = _evaluate(task, model, global_state, data.test)
    # on the server's held-out set: released models only
    monitor = TrainingMonitor(loss, initial_accuracy=acc if task.metric == "accuracy" else None)
    drops: dict[str, int] = {}

    for r in range(first, cfg.federation.rounds + 1):
        if run is not None:
            run.start_round(r)
        sampled = sample_clients(cfg, nodes, r)
        info: dict[str, Any] = {"sampled": len(sampled), "dropped": []}
        if not sampled:
            _end(run, r, "skipped", info | {"reason": "no client sampled"})
            continue
        arrays = ArrayRecord(global_state)  # one record for every sampled client
        messages = [
            train_message(
                arrays,
                flat_config,
                strategy.client_config(),
                n,
                r,
                history=_known_history(cfg, ledger, participants.get(n)),
                ttl=cfg.federation.reply_timeout,
            )
            for n in sampled
        ]
        replies = {
            m.metadata.src_node_id: m
            for m in grid.send_and_receive(messages, timeout=cfg.federation.reply_timeout)
        }
        reference = strategy.reply_reference(global_state, cfg)
        valid: list[Reply] = []
        for n in sampled:
            parsed = accept_reply(n, replies.get(n), reference, ledger, participants, r)
            if parsed.reason is not None:
                info["dropped"].append(
                    {"node": n, "participant": participants.get(n), "reason": parsed.reason}
                )
                drops[parsed.reason] = drops.get(parsed.reason, 0) + 1
            else:
                valid.append(parsed.reply)
        if run is not None and cfg.federation.client_diagnostics:
            _record_diagnostics(run, r, valid)
        if user_dp and len(valid) < len(sampled):
            reason = (
                f"fail closed: {len(valid)} of {len(sampled)} sampled clients replied validly; "
                "nothing aggregated, nothing released"
            )
            _end(run, r, "skipped", info | {"reason": reason})
            continue
        if not valid:
            _end(run, r, "skipped", info | {"reason": "no valid reply"})
            continue
        global_before = global_state
        try:
            global_state = strategy.aggregate(global_state, valid, r)
        except PrivacyBudgetError as e:
            _end(run, r, "skipped", info | {"reason": f"privacy budget: {e}"})
            stopped, message = "budget", str(e)
            break
        loss, acc = _evaluate(task, model, global_state, data.test)
        try:
            monitor.check_loss(loss, f"round {r}")
        except StopTraining as e:
            stopped, message = e.status, e.message
        eps = _epsilons(ledger, user_dp)
        row = {
            task.metric: acc,  # accuracy, or perplexity for a causal LM
            "loss": loss,
            "clients": float(len(valid)),
            "dropped": float(len(info["dropped"])),
            # what the round moved: the task's trainable state, to every sampled client and
            # back from each valid reply (shapes fixed by the config: no record's influence)
            "bytes-down": float(len(sampled) * _nbytes(global_before)),
            "bytes-up": float(sum(_nbytes(rep.arrays) for rep in valid)),
            "epsilon-max": max(eps.values(), default=0.0) if cfg.privacy.enabled else math.inf,
            **{k: float(v) for k, v in strategy.summary().items()},
        }
        losses = [rep.metrics.get("train-loss", math.nan) for rep in valid]
        losses = [x for x in losses if math.isfinite(x)]
        if not cfg.privacy.enabled and losses:  # under DP: only as uncovered/ diagnostics
            row["train-loss"] = statistics.fmean(losses)
        history.append({"round": float(r), **row})
        if run is not None:
            run.log_metrics(row, round=r, scope="server")
            run.add_artifact(
                "checkpoint",
                f"round-{r}.pt",
                _checkpoint(global_state, strategy, participants, r),
                round=r,
            )
            _end(run, r, "completed", info)
        completed = r
        if on_round is not None:
            on_round(r, row)
        if stopped != "completed":
            break

    if stopped == "completed" and completed == 0 and first <= cfg.federation.rounds:
        common = max(drops, key=drops.get) if drops else "no client was sampled"
        stopped = "failed"
        message = f"no round aggregated a valid reply (most common reason: {common})"
    elif stopped == "completed":
        verdict = monitor.final(
            loss, judged=len(history) >= 3, accuracy=acc if task.metric == "accuracy" else None
        )
        if verdict is not None:
            stopped, message = verdict
    return FederationResult(
        rounds_completed=completed,
        accuracy=acc,
        loss=loss,
        epsilon=_epsilons(ledger, user_dp) if cfg.privacy.enabled else {},
        stopped=stopped,
        seconds=time.perf_counter() - start_time,
        history=history,
        noise_multiplier=z,
        message=message,
    )


def _evaluate(task: Task, model: torch.nn.Module, state, dataset) -> tuple[float, float]:
    """(loss, the task's metric) of the global ``state`` on the server's held-out set."""
    task.load_trainable_state(model, state)
    m = task.evaluate(model, dataset)
    return m["loss"], m[task.metric]


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _epsilons(ledger: PrivacyLedger, user_dp: bool) -> dict[str, float]:
    if user_dp:
        return {"server": ledger.epsilon("server")}
    return ledger.spent()


def _record_diagnostics(run: RunHandle, r: int, replies: list[Reply]) -> None:
    """Each client's diagnostics, one scope per participant, names marked ``uncovered/``."""
    for rep in replies:
        found = {k: rep.metrics[k] for k in DIAGNOSTIC_METRICS if k in rep.metrics}
        if found:
            run.log_metrics(
                {UNCOVERED_PREFIX + k: v for k, v in found.items()}, round=r, scope=rep.participant
            )


def _end(run: RunHandle | None, r: int, status: str, info: dict[str, Any]) -> None:
    if run is not None:
        run.end_round(r, status, info)


def _known_history(cfg: Config, ledger: PrivacyLedger, who: str | None):
    """The privacy history the server recorded for client ``who`` (sample-level DP only)."""
    user_dp = cfg.privacy.level == "user"
    if who is None or not cfg.privacy.enabled or user_dp:
        return None
    return ledger.history(who)


def accept_reply(node, message, reference, ledger, participants, server_round) -> ParsedReply:
    """Parses a reply, remembers who the node is, and records the privacy it reports before
    anything of it is used (also when its update is then dropped)."""
    parsed = parse_reply(node, message, reference)
    if parsed.participant is not None:
        participants[node] = parsed.participant
    record_spent(ledger, parsed, server_round)
    return parsed
