"""One client's round of federated training, Flower-free (the ClientApp only decodes and encodes).

Three modes, from the config:

* no DP: local training from the global model; the new model is returned;
* sample-level DP (``privacy.level = "sample"``): local DP-SGD whose ledger persists across
  rounds in the client's state (one accountant for the whole run, never a fresh one per round).
  The noise multiplier is fixed at the first participation (given, or calibrated once for the
  worst case, every round: ``rounds`` x local steps; with ``federation.calibration =
  "expected"``, for ``ceil(rounds * sampling rate)`` rounds, and the budget guard stops the
  client if it is sampled more often). A client whose budget is spent stops training and says
  so (``status = "budget-exhausted"``);
* user-level DP (``dp-fedavg``): local non-private training, then the update
  ``theta_local - theta_global`` is clipped to the server's current clip norm; the reply carries
  the clipped update and whether it was left unclipped (for adaptive clipping).

What leaves a client (DESIGN 2b): under DP, by default, only the update and the privacy report
(``status``, ``participant``, ``phases`` and the metrics
:data:`~dpfl.federation_messages.PRIVACY_REPORT_METRICS`, plus ``unclipped`` for the trusted
dp-fedavg server). Nothing else computed from the client's records: no training loss, no local
accuracy, no exact number of examples (so FedAvg under DP averages unweighted; our choice). With
``federation.client-diagnostics = true`` the reply adds
:data:`~dpfl.federation_messages.DIAGNOSTIC_METRICS`, which the guarantee does not cover (the
server stores them as ``uncovered/...``). Without DP they are always sent: nothing is protected
there, and FedAvg weights by ``num-examples``.

The local evaluation runs only when its result leaves the client.
"""

from __future__ import annotations

import functools
import io
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from dpfl.accountants import (
    Phase,
    PrivacyLedger,
    calibrate_noise,
    merge_phases,
    steps_for_epochs,
)
from dpfl.clients.central import privacy_kwargs
from dpfl.clients.local_train import train_non_private, train_private
from dpfl.config import Config
from dpfl.data.partition import partition_indices, train_test_split_indices
from dpfl.device import resolve_device
from dpfl.errors import ConfigError
from dpfl.optim import create_optimizer
from dpfl.optim.schedule import refuse_in_federation
from dpfl.privacy import make_private
from dpfl.server.aggregation import flat_clip, subtract
from dpfl.server.strategies import client_behaviour
from dpfl.tasks import TaskData, get_task

__all__ = [
    "ClientResult",
    "client_datasets",
    "participant_name",
    "run_client_round",
    "sends_diagnostics",
]


def participant_name(partition_id: int) -> str:
    return f"client-{partition_id}"


def sends_diagnostics(cfg: Config) -> bool:
    """Whether replies carry the client diagnostics: always without DP, opt-in under DP."""
    return not cfg.privacy.enabled or cfg.federation.client_diagnostics


@dataclass
class ClientResult:
    status: str  # "trained" | "budget-exhausted"
    arrays: dict[str, torch.Tensor] | None
    num_examples: int  # local; sent (as metric num-examples) only with the diagnostics
    metrics: dict[str, float] = field(default_factory=dict)  # exactly what the reply carries
    phases: list[Phase] = field(default_factory=list)
    optimizer_state: bytes | None = None  # with optimizer.local-state = "persist"


def _source(cfg: Config) -> tuple:
    """What the task's data depend on: the task, the data and model sections (a text task's
    tokenizer comes with its model) and the seed."""
    return cfg.task, cfg.data, cfg.model, cfg.seed


def _source_task(source: tuple):
    from dpfl.config import Config

    task_name, data_cfg, model_cfg, seed = source
    return get_task(Config(task=task_name, seed=seed, data=data_cfg, model=model_cfg))


@functools.lru_cache(maxsize=8)
def _task_data(source: tuple) -> TaskData:
    return _source_task(source).load_data()


@functools.lru_cache(maxsize=8)
def _partitions(cfg_key: tuple) -> list[np.ndarray]:
    source, k, scheme, alpha, cpc = cfg_key
    seed = source[-1]
    task = _source_task(source)
    data = _task_data(source)
    labels = task.labels(data.train)
    if labels is None:
        labels = np.zeros(len(data.train), dtype=np.int64)  # no labels: only iid splits apply
    return partition_indices(
        labels,
        k,
        scheme,
        alpha=alpha,
        classes_per_client=cpc,
        seed=seed,
        groups=task.groups(data.train),
    )


def client_datasets(cfg: Config, partition_id: int) -> tuple[TensorDataset | Subset, Subset]:
    """This client's local (train, test) data: its partition of the training split."""
    f = cfg.federation
    if not (0 <= partition_id < f.num_clients):
        raise ConfigError(f"partition-id {partition_id} outside 0..{f.num_clients - 1}")
    key = (_source(cfg), f.num_clients, f.partition, f.dirichlet_alpha, f.classes_per_client)
    idx = _partitions(key)[partition_id]
    data = _task_data(_source(cfg))
    train_idx, test_idx = train_test_split_indices(
        idx, f.client_test_fraction, cfg.seed + partition_id
    )
    return Subset(data.train, train_idx.tolist()), Subset(data.train, test_idx.tolist())


def _model(cfg: Config) -> torch.nn.Module:
    return get_task(cfg).build_model(_task_data(_source(cfg)))


def _local_steps(cfg: Config, n_train: int) -> int:
    q = min(cfg.data.batch_size / n_train, 1.0)
    steps = steps_for_epochs(cfg.federation.local_epochs, q)
    return min(steps, cfg.federation.local_steps) if cfg.federation.local_steps else steps


def calibration_plan(cfg: Config, n_train: int, partition_id: int) -> tuple[float, int]:
    """(sample rate, steps) client ``partition_id`` with ``n_train`` records calibrates its
    noise for at its first round under a target epsilon: its participations times its local
    steps. Sync mode: every round (``federation.calibration = "worst-case"``, the default: a
    client sampled in every round still ends within its budget) or the expected
    ``ceil(rounds x fraction)`` (``"expected"``: less noise, and a client sampled more often
    stops on its budget). Async mode: the client's participations in the schedule of
    :func:`dpfl.server.async_schedule.plan` (each local round it will run on the virtual clock;
    on the real clock a plan, and the budget guard stops a client sent more work). ``dpfl
    simulate`` checks every client's plan with this before the run starts."""
    q = min(cfg.data.batch_size / n_train, 1.0)
    f = cfg.federation
    if f.mode == "async":
        planned_rounds = max(1, _async_participations(cfg)[partition_id])
    elif f.calibration == "worst-case":
        planned_rounds = f.rounds
    else:
        planned_rounds = max(1, math.ceil(f.rounds * _participation(cfg)))
    return q, planned_rounds * _local_steps(cfg, n_train)


def _async_participations(cfg: Config) -> list[int]:
    from dpfl.server.async_schedule import participations, plan

    return participations(plan(cfg), cfg.federation.num_clients)


def _participation(cfg: Config) -> float:
    f = cfg.federation
    return f.clients_per_round / f.num_clients if f.clients_per_round else f.fraction


def _seed(cfg: Config, server_round: int, partition_id: int, secret: int | None = None) -> int:
    """The client's seed this round (batch sampling and noise).

    * ``privacy.secure-mode``: from the OS CSPRNG;
    * a client ``secret`` (what a ClientApp outside dpfl's own simulations holds): derived from
      it, so the server, which knows the run seed, cannot regenerate the client's noise and
      subtract it from the update;
    * otherwise from the run seed: reproducible, for simulations where server and clients are
      one trust domain (``dpfl simulate``) and for the Flower-free API.
    """
    if cfg.privacy.enabled and cfg.privacy.secure_mode:
        return secrets.randbelow(2**31 - 1)
    base = cfg.seed if secret is None else secret
    return (base * 1_000_003 + server_round * 7_919 + partition_id) % (2**31 - 1)


def _optimizer(
    cfg: Config, model: torch.nn.Module, global_state: dict, saved: bytes | None = None
) -> torch.optim.Optimizer:
    # under user-level DP the local solver trains without noise (the server adds it)
    private = cfg.privacy.enabled and cfg.privacy.level == "sample"
    refuse_in_federation(cfg.optimizer)  # also where no pre-run check ran (Deployment Engine)
    opt = create_optimizer(cfg.optimizer, model, private=private)
    if saved is not None and cfg.optimizer.local_state == "persist":
        opt.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False))
    return client_behaviour(cfg).wrap_optimizer(opt, model, global_state)


def _history_ledger(cfg: Config, who: str, phases: list[Phase]) -> PrivacyLedger:
    p = cfg.privacy
    events = [
        {
            "seq": i,
            "participant": who,
            "mechanism": "subsampled-gaussian",
            "noise_multiplier": ph.noise_multiplier,
            "sample_rate": ph.sample_rate,
            "steps": ph.steps,
            "accountant": p.accountant,
            "delta": p.delta,
        }
        for i, ph in enumerate(phases)
    ]
    return PrivacyLedger.from_events(events, p.accountant, p.delta, target_epsilon=p.target_epsilon)


def run_client_round(
    cfg: Config,
    partition_id: int,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    state: dict[str, Any],
    *,
    clip: float | None = None,
    server_history: list[Phase] | None = None,
    optimizer_state: bytes | None = None,
) -> ClientResult:
    """Trains one round; ``state`` (the client's persistent state) is updated in place. A
    ``state["noise-secret"]`` keeps the client's randomness from the server (see ``_seed``)."""
    seed = _seed(cfg, server_round, partition_id, state.get("noise-secret"))
    torch.manual_seed(seed)
    train, test = client_datasets(cfg, partition_id)
    task = get_task(cfg)
    model = _model(cfg).to(resolve_device(cfg.training.device))
    task.load_trainable_state(model, global_state)
    behaviour = client_behaviour(cfg)
    behaviour.prepare(model)  # before the solver and the private step see the parameters
    metrics: dict[str, float] = {"partition-id": float(partition_id)}
    diagnostics: dict[str, float] = {}  # computed on this client's records: leave only if opted in
    opt = _optimizer(cfg, model, global_state, optimizer_state)
    if cfg.privacy.enabled and cfg.privacy.level == "sample":
        result = _sample_level(
            cfg,
            partition_id,
            model,
            opt,
            train,
            server_round,
            state,
            server_history or [],
            metrics,
            diagnostics,
            seed,
        )
    else:
        result = _plain(cfg, model, opt, train, global_state, metrics, diagnostics, clip)
    if result.arrays is not None:
        result.arrays = behaviour.reply(result.arrays)  # e.g. ffa-lora / fedsvd: no A
    if cfg.optimizer.local_state == "persist":
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        result.optimizer_state = buf.getvalue()
    if sends_diagnostics(cfg):
        if result.status == "trained" and len(test) > 0:
            diagnostics["local-test-accuracy"] = task.evaluate(model, test)[task.metric]
        diagnostics["num-examples"] = float(len(train))
        metrics.update(diagnostics)
    return result


def _plain(cfg, model, opt, train, global_state, metrics, diagnostics, clip) -> ClientResult:
    """No DP on the client: the update is the model (or the clipped update for dp-fedavg)."""
    loader = DataLoader(train, batch_size=min(cfg.data.batch_size, len(train)), shuffle=True)
    task = get_task(cfg)
    done = train_non_private(
        model, opt, loader, _local_steps(cfg, len(train)), loss_fn=task.per_sample_loss
    )
    # local-steps depends on len(train) (epochs / q, q = B / n): a diagnostic
    diagnostics.update({"train-loss": done.mean_loss, "local-steps": float(done.steps)})
    new_state = task.trainable_state(model)
    if clip is None:
        return ClientResult("trained", new_state, len(train), metrics)
    clipped, norm = flat_clip(subtract(new_state, global_state), clip)
    metrics["unclipped"] = float(norm <= clip)  # for the trusted server's noisy count only
    diagnostics["update-norm"] = norm
    return ClientResult("trained", clipped, len(train), metrics)


def _sample_level(
    cfg, pid, model, opt, train, server_round, state, server_history, metrics, diagnostics, seed
) -> ClientResult:
    who = participant_name(pid)
    own = [Phase(*t) for t in state.get("phases", [])]
    # the client's own record wins; the server's (from the run store) restores a fresh process
    history = (
        own if sum(p.steps for p in own) >= sum(p.steps for p in server_history) else server_history
    )
    ledger = _history_ledger(cfg, who, history)
    local = _local_steps(cfg, len(train))
    sigma = state.get("sigma")
    if sigma is None and history:
        sigma = history[0].noise_multiplier
    if sigma is None:
        if cfg.privacy.noise_multiplier is not None:
            sigma = cfg.privacy.noise_multiplier
        else:
            q, planned = calibration_plan(cfg, len(train), pid)
            sigma = calibrate_noise(
                cfg.privacy.target_epsilon, cfg.privacy.delta, q, planned, cfg.privacy.accountant
            ).noise_multiplier
    state["sigma"] = sigma
    kwargs = privacy_kwargs(cfg)
    kwargs.update(noise_multiplier=sigma, target_epsilon=cfg.privacy.target_epsilon)
    loader = DataLoader(train, batch_size=cfg.data.batch_size)
    before = len(ledger.events)
    pt = make_private(
        model,
        opt,
        loader,
        participant=who,
        ledger=ledger,
        physical_batch_size=cfg.data.physical_batch_size,
        seed=seed,
        **kwargs,
    )
    try:
        result = train_private(pt, max_steps=local, loss_fn=get_task(cfg).per_sample_loss)
    finally:
        pt.detach()
    phases = merge_phases([e.phase() for e in ledger.events[before:]])
    state["phases"] = [p.as_tuple() for p in ledger.history(who)]
    # the privacy report: functions of the config and the privacy history
    metrics.update({"epsilon": ledger.epsilon(who), "noise-multiplier": sigma})
    # un-noised functions of the records (the loss of the private batches): diagnostics;
    # local-steps is in the phases too, but is kept off the default reply with the rest
    diagnostics.update({"train-loss": result.mean_loss, "local-steps": float(result.steps)})
    if result.steps == 0:
        return ClientResult("budget-exhausted", None, len(train), metrics, phases)
    new_state = get_task(cfg).trainable_state(model)
    metrics["budget-exhausted"] = float(result.stopped == "budget")
    return ClientResult("trained", new_state, len(train), metrics, phases)
