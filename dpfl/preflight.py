"""Checks a whole run before it starts (and before the CLI records it in the store).

A :class:`~dpfl.config.Config` that exists is valid key by key; what only shows once the data and
the model are built is checked here, so that bad options end in one ``dpfl: error:`` line and no
``failed`` run in the store: the data loads and is large enough for the batch and the split, the
model builds and passes the privacy boundaries, the optimizer accepts its options, the device is
there, the planned number of steps is finite in practice, and a target epsilon can be met
(calibration runs now, for the central learner, every client or the server, exactly as the run
will do it). Keys that the command does not use are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any

from dpfl.config import LORA_STRATEGIES, Config, LoraConfig
from dpfl.errors import AccountantError, ConfigError, IncompatibleModelError, PrivacyBudgetError

__all__ = ["MAX_PLANNED_STEPS", "check_simulate", "check_train", "explicit_keys"]

#: a run planned for more logical steps than this would not finish (days on a GPU); refused
MAX_PLANNED_STEPS = 10_000_000


def explicit_keys(data: dict[str, Any], overrides: list[str]) -> set[str]:
    """Dotted keys a user set explicitly: in the config file's tables or with ``--set``."""
    keys = set()
    for section, table in data.items():
        if isinstance(table, dict):
            keys |= {f"{section}.{k}" for k in table}
        else:
            keys.add(section)
    for text in overrides:
        keys.add(text.partition("=")[0].strip())
    return keys


def _refuse_unused(cfg: Config, command: str, explicit: set[str]) -> None:
    lora = sorted(k for k in explicit if k.startswith("lora."))
    if cfg.task == "image-classification" and (lora or cfg.lora != LoraConfig()):
        what = ", ".join(lora) if lora else "the [lora] section"
        raise ConfigError(
            f"{what}: dpfl {command} trains image models whole, with no LoRA adapters; LoRA is "
            "for the text tasks (text-classification, causal-lm): remove the lora keys"
        )
    if cfg.task != "text-classification" and cfg.model.pooling != "auto":
        raise ConfigError(f"model.pooling is for text classification, not {cfg.task}: remove it")
    if cfg.task == "image-classification" and cfg.data.max_records is not None:
        raise ConfigError(
            "data.max-records is for the text tasks; image data sets are used whole: remove it"
        )
    if command == "simulate":
        from dpfl.optim.schedule import refuse_in_federation

        refuse_in_federation(cfg.optimizer)
        _refuse_other_mode(cfg, explicit)
    if not cfg.privacy.enabled:
        ignored = sorted(k for k in explicit if k.startswith("privacy.") and k != "privacy.enabled")
        if ignored:
            raise ConfigError(
                f"{', '.join(ignored)} set while privacy is disabled (--non-private / "
                "privacy.enabled=false): choose one"
            )


#: federation keys that only one mode reads
ASYNC_KEYS = tuple(
    f"federation.{k}"
    for k in ("async-scheme", "async-window", "async-buffer", "async-weights", "horizon",
              "client-speeds", "clock", "eval-interval")
)  # fmt: skip
SYNC_KEYS = ("federation.rounds", "federation.calibration")


def _refuse_other_mode(cfg: Config, explicit: set[str]) -> None:
    mode = cfg.federation.mode
    unused = sorted(explicit & set(SYNC_KEYS if mode == "async" else ASYNC_KEYS))
    if unused:
        other = "sync" if mode == "async" else "async"
        raise ConfigError(
            f"{', '.join(unused)}: read only in federation.mode='{other}', and this run is "
            f"{mode}: remove them or set federation.mode='{other}'"
        )


def _calibrate(cfg: Config, sample_rate: float, steps: int, who: str) -> None:
    from dpfl.accountants import calibrate_noise

    p = cfg.privacy
    try:
        calibrate_noise(p.target_epsilon, p.delta, sample_rate, steps, p.accountant)
    except (PrivacyBudgetError, AccountantError) as e:
        raise ConfigError(
            f"privacy.target-epsilon={p.target_epsilon:g} cannot be met by {who} "
            f"(sample rate {sample_rate:.4g}, {steps} steps): {e}"
        ) from None


def _check_model(cfg: Config, task, data, private: bool):
    """Builds the model and optimizer; ``private``: trained by DP-SGD (sample-level DP)."""
    from dpfl.optim import create_optimizer

    model = task.build_model(data)
    if private:
        from dpfl.privacy.boundaries import backend_refusals, validate_model

        try:
            validate_model(model)
            if cfg.privacy.level == "sample":
                backend_refusals(model, cfg.privacy.grad_sample_mode)
        except IncompatibleModelError as e:
            raise ConfigError(str(e)) from None
    create_optimizer(cfg.optimizer, model, private=private)
    return model


def _check_lora_strategy(cfg: Config, task, model) -> None:
    """lora-fedavg / ffa-lora / fedsvd train LoRA adapters: the model must have them, and
    fedsvd's A must be able to hold r orthonormal rows."""
    from dpfl.lora import embedding_adapters, lora_pairs

    strategy = cfg.federation.strategy
    state = task.trainable_state(model)
    pairs = lora_pairs(state)
    embedded = embedding_adapters(state)
    if strategy in ("ffa-lora", "fedsvd") and embedded:
        # peft starts an Embedding adapter's A at 0: frozen, the adapter could never move
        raise ConfigError(
            f"federation.strategy={strategy!r} freezes every LoRA A, and peft starts an "
            f"Embedding layer's A at zero ({embedded[0]}): that adapter would never train; "
            "leave embedding layers out of lora.target-modules"
        )
    if strategy == "fedsvd" and cfg.optimizer.local_state == "persist":
        raise ConfigError(
            "fedsvd re-factorizes B every round, so a client's kept solver state (momentum) "
            "would point along the old factors: use optimizer.local-state='reset'"
        )
    if not pairs:
        raise ConfigError(
            f"federation.strategy={strategy!r} trains LoRA adapters, and this model has none "
            f"(task {cfg.task}, lora.r={cfg.lora.r}): use a text task with lora.r > 0, or "
            "federation.strategy='fedavg'"
        )
    if strategy == "fedsvd":
        for a_key, b_key in pairs:
            (r, d_in), d_out = state[a_key].shape, state[b_key].shape[0]
            if r > min(d_in, d_out):
                raise ConfigError(
                    f"fedsvd: lora.r={r} exceeds a LoRA layer's dimensions ({d_out} x {d_in}, "
                    f"{a_key}); lower lora.r to at most {min(d_in, d_out)}"
                )


def _check_steps(planned: int, what: str) -> None:
    if planned > MAX_PLANNED_STEPS:
        raise ConfigError(
            f"{what} plans {planned:,} steps (more than {MAX_PLANNED_STEPS:,}): the run would not "
            "finish; lower the epochs or set training.max-steps"
        )


def check_train(cfg: Config, explicit: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Everything ``dpfl train`` needs, checked before it starts."""
    from dpfl.clients.central import planned_steps
    from dpfl.device import resolve_device
    from dpfl.tasks import get_task

    _refuse_unused(cfg, "train", explicit)
    resolve_device(cfg.training.device)
    task = get_task(cfg)
    data = task.load_data()
    n = len(data.train)
    if n < 2 or len(data.test) < 1:
        raise ConfigError(
            f"data.test-fraction={cfg.data.test_fraction:g} leaves {n} training and "
            f"{len(data.test)} test records; lower it"
        )
    if cfg.privacy.enabled and cfg.data.batch_size > n:
        raise ConfigError(
            f"data.batch-size ({cfg.data.batch_size}) exceeds the {n} training records (the "
            f"sample rate would be 1, every record in every step); use at most {n}"
        )
    planned = planned_steps(cfg, n)
    _check_steps(planned, f"training.epochs={cfg.training.epochs:g}")
    _check_model(cfg, task, data, cfg.privacy.enabled)
    if cfg.privacy.enabled and cfg.privacy.target_epsilon is not None:
        _calibrate(cfg, cfg.data.batch_size / n, planned, "the central run")


def check_simulate(cfg: Config, explicit: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Everything ``dpfl simulate`` needs, checked before it starts: the data and its split into
    clients, every client's privacy plan, the server's noise."""
    from dpfl.clients.federated import _local_steps, calibration_plan, client_datasets
    from dpfl.device import resolve_device
    from dpfl.tasks import get_task

    _refuse_unused(cfg, "simulate", explicit)
    resolve_device(cfg.training.device)
    f, p = cfg.federation, cfg.privacy
    task = get_task(cfg)
    data = task.load_data()
    sizes = [len(client_datasets(cfg, pid)[0]) for pid in range(f.num_clients)]
    empty = [pid for pid, n in enumerate(sizes) if n == 0]
    if empty:
        raise ConfigError(
            f"{len(empty)} of {f.num_clients} clients get no training record (client "
            f"{empty[0]}): lower federation.num-clients or federation.client-test-fraction, or "
            "use another federation.partition"
        )
    if p.enabled and p.level == "sample" and cfg.data.batch_size > max(sizes):
        raise ConfigError(
            f"data.batch-size ({cfg.data.batch_size}) exceeds every client's training records "
            f"(largest client: {max(sizes)}; the sample rate would be 1): lower it"
        )
    if f.mode == "async":
        from dpfl.server.async_loop import check_async
        from dpfl.server.async_schedule import participations, plan

        check_async(cfg)
        most = max(participations(plan(cfg), f.num_clients))
        if most == 0:
            raise ConfigError(
                f"no client returns within federation.horizon={f.horizon:g} (the slowest "
                "client needs longer than that): lengthen the horizon"
            )
        _check_steps(
            most * max(_local_steps(cfg, n) for n in sizes), "async local rounds x local steps"
        )
    else:
        _check_steps(
            f.rounds * max(_local_steps(cfg, n) for n in sizes), "federation.rounds x local steps"
        )
    model = _check_model(cfg, task, data, p.enabled and p.level == "sample")
    if f.strategy in LORA_STRATEGIES:
        _check_lora_strategy(cfg, task, model)
    if not (p.enabled and p.target_epsilon is not None):
        return
    if p.level == "user" and f.mode == "async":
        _calibrate(cfg, 1.0, most, "the busiest client of DP-FedBuff (no subsampling)")
        return
    if p.level == "user":
        _calibrate(cfg, f.fraction, f.rounds, "the server (user-level DP-FedAvg)")
        return
    seen: set[tuple[float, int]] = set()
    for pid, n in enumerate(sizes):  # what each client will calibrate at its first round
        plan = calibration_plan(cfg, n, pid)
        if plan not in seen:
            seen.add(plan)
            _calibrate(cfg, plan[0], plan[1], f"client {pid} ({n} records)")
