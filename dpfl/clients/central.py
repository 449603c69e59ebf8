"""Centralized private training from a :class:`~dpfl.config.Config` (``dpfl train``)."""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from dpfl.accountants import PrivacyLedger, steps_for_epochs
from dpfl.clients.local_train import (
    LocalTrainResult,
    train_non_private,
    train_private,
)
from dpfl.clients.monitor import TrainingMonitor
from dpfl.config import CLIP_LR_PER_STEP, Config
from dpfl.device import resolve_device
from dpfl.errors import ConfigError, StoreError
from dpfl.optim import create_optimizer
from dpfl.optim.schedule import LRSchedule
from dpfl.privacy import PrivateTraining, make_private
from dpfl.store import RunHandle
from dpfl.tasks import get_task

__all__ = [
    "CentralResult",
    "CentralResume",
    "central_resume_state",
    "privacy_kwargs",
    "train_central",
]


def privacy_kwargs(cfg: Config) -> dict[str, Any]:
    """make_private keyword arguments from the ``[privacy]`` section."""
    p = cfg.privacy
    return {
        "noise_multiplier": p.noise_multiplier,
        "target_epsilon": p.target_epsilon,
        "delta": p.delta,
        "clip_norm": p.clip_norm,
        "clipping": p.clipping,
        "grad_sample_mode": p.grad_sample_mode,
        "accountant": p.accountant,
        "poisson_sampling": p.poisson_sampling,
        "secure_mode": p.secure_mode,
        "clip_options": {
            "gamma": p.automatic_gamma,
            "target_quantile": p.target_quantile,
            "clip_lr": CLIP_LR_PER_STEP if p.clip_lr is None else p.clip_lr,
            "count_noise_std": p.count_noise_std,
        },
        "dicesgd_options": {
            "c2": p.clip_norm if p.dicesgd_c2 is None else p.dicesgd_c2,
            "c2_units": p.dicesgd_c2_units,
            "residual_rule": p.dicesgd_residual_rule,
        },
    }


@dataclass
class CentralResult:
    accuracy: float
    test_loss: float
    epsilon: float
    delta: float
    noise_multiplier: float | None
    train: LocalTrainResult
    steps_planned: int
    lr: float | None = None  # the learning rate used (the solver's default unless set)
    initial_metric: float | None = None  # the task's metric of the model before training


def train_central(
    cfg: Config,
    run: RunHandle | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    output: Path | None = None,
    *,
    resume: CentralResume | None = None,
    on_batch: Callable[[Any], None] | None = None,
    progress: Callable[[Callable[[], float]], None] | None = None,
) -> CentralResult:
    """Trains ``cfg.model`` on ``cfg.data`` with the configured privacy; records to ``run``.

    ``on_step(step, planned, loss)`` reports progress, ``on_epoch(epoch, metrics)`` the held-out
    evaluation after each epoch (``test_accuracy``, ``test_loss``, ``epsilon``). A run that
    diverges stops early and one that makes no progress is reported as such
    (``result.train.stopped``, see :mod:`dpfl.clients.monitor`). ``output``: a directory the
    trained model is exported to (the task's format: a peft adapter for LoRA); the run store
    keeps the same files as artifacts.

    With a ``run``, a checkpoint (the trainable state, the optimizer with its clip state and
    noise generator, the sampler's generator) replaces the previous one after every epoch;
    ``resume`` (:func:`central_resume_state`) continues from it. ``on_batch(x)`` sees every
    training batch as it is drawn (the CLI counts tokens); ``progress(epsilon)`` is handed, once,
    a function that returns the epsilon spent so far.
    """
    torch.manual_seed(cfg.seed)
    task = get_task(cfg)
    data = task.load_data()
    model = task.build_model(data)
    model.to(resolve_device(cfg.training.device))
    if resume is not None:
        task.load_trainable_state(model, resume.trainable)
    optimizer = create_optimizer(cfg.optimizer, model, private=cfg.privacy.enabled)
    planned = planned_steps(cfg, len(data.train))
    schedule = LRSchedule(optimizer, cfg.optimizer.schedule, planned, cfg.optimizer.warmup_steps)
    observed = None if on_batch is None else _Observed(on_batch)
    loader = DataLoader(
        data.train, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=observed
    )
    done = 0 if resume is None else resume.steps
    epochs_done = 0 if resume is None else resume.epoch
    if resume is None:
        first = task.evaluate(model, data.test)
        initial, initial_acc = first["loss"], first.get("accuracy")
        initial_metric = first[task.metric]
    else:
        initial, initial_acc = resume.initial_loss, resume.initial_accuracy
        initial_metric = resume.initial_metric
    monitor = TrainingMonitor(initial, lr=schedule.base[0], initial_accuracy=initial_acc)
    pt: PrivateTraining | None = None

    def checkpoint(epoch: int, steps: int) -> None:
        # DiceSGD's residual buffer is built from un-noised private gradients and its guarantee
        # needs it hidden: such runs are not checkpointed (and cannot be resumed)
        if run is None or (cfg.privacy.enabled and cfg.privacy.clipping == "dicesgd"):
            return
        state = {
            "epoch": epoch,
            "steps": steps,
            "trainable": task.trainable_state(model),
            "initial_loss": monitor.initial_loss,
            "initial_accuracy": monitor.initial_accuracy,
            "initial_metric": initial_metric,
            # torch's global generator: the non-private loader's order and dropout masks
            "torch_rng": torch.get_rng_state(),
        }
        if pt is not None:
            state["optimizer"] = pt.optimizer.state_dict()
            state["noise_multiplier"] = pt.noise_multiplier
            # secure mode seeds the sampler from the OS so that nobody knows the batches: its
            # state is not stored (a secure-mode resume draws fresh batches)
            if pt.sampler_generator is not None and not cfg.privacy.secure_mode:
                state["sampler_generator"] = pt.sampler_generator.get_state()
        else:
            state["optimizer"] = optimizer.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        run.add_artifact(
            "checkpoint", f"epoch-{epoch}.pt", buf.getvalue(), round=epoch, replace=True
        )

    def log_epoch(epoch: int, model_: torch.nn.Module, eps: float) -> None:
        epoch += epochs_done
        m = task.evaluate(model_, data.test)  # (its loader draws from torch's generator)
        # the checkpoint before anything about this epoch is stored or shown: its metrics are
        # released once, from the checkpointed state, even if the process dies in between
        checkpoint(epoch, done)
        loss, acc = m["loss"], m[task.metric]
        if run is not None:
            metrics = {f"test_{task.metric}": acc, "test_loss": loss}
            if cfg.privacy.enabled:
                metrics["epsilon"] = eps
            run.log_metrics(metrics, round=epoch)
        if on_epoch is not None:
            on_epoch(epoch, {"test_accuracy": acc, "test_loss": loss, "epsilon": eps, **m})
        monitor.check_loss(loss, f"epoch {epoch}")

    def step_hook(step: int, loss: float) -> None:
        nonlocal done
        done += 1
        schedule.apply(done)
        monitor.check_parameters(model, done)
        if on_step is not None:
            on_step(done, planned, loss)

    if resume is not None and not cfg.privacy.enabled:
        optimizer.load_state_dict(resume.optimizer)
    schedule.apply(done)
    remaining = planned - done
    if not cfg.privacy.enabled:
        if progress is not None:
            progress(lambda: math.inf)
        if observed is not None:
            observed.armed = True
        if resume is not None:
            torch.set_rng_state(resume.torch_rng)  # last: nothing after may draw from it
        result = train_non_private(
            model,
            optimizer,
            loader,
            remaining,
            step_hook,
            lambda e: log_epoch(e, model, math.inf),
            loss_fn=task.per_sample_loss,
        )
        result.steps = done
        out = _finish(cfg, task, model, data, run, monitor, result, math.inf, None, planned, output)
        out.initial_metric = initial_metric
        return out

    kwargs = privacy_kwargs(cfg)
    ledger = None
    if resume is not None:
        # the spend of every step recorded, the killed attempt's steps after the checkpoint
        # included; the plan's noise is kept (not re-calibrated) and the budget still enforced
        kwargs["noise_multiplier"] = resume.noise_multiplier
        ledger = PrivacyLedger.from_events(
            resume.events,
            cfg.privacy.accountant,
            cfg.privacy.delta,
            target_epsilon=cfg.privacy.target_epsilon,
            sink=None if run is None else run.record_privacy_event,
        )
    pt = make_private(
        model,
        optimizer,
        loader,
        steps=planned,
        physical_batch_size=cfg.data.physical_batch_size,
        seed=cfg.seed,
        ledger=ledger,
        ledger_sink=None if run is None else run.record_privacy_event,
        **kwargs,
    )
    if resume is not None:
        pt.optimizer.load_state_dict(resume.optimizer)
        schedule.apply(done)  # the loaded groups hold the checkpoint's rate
        if pt.sampler_generator is not None and resume.sampler_generator is not None:
            pt.sampler_generator.set_state(resume.sampler_generator)
    if progress is not None:
        progress(pt.epsilon)
    if observed is not None:
        observed.armed = True
    if resume is not None:
        torch.set_rng_state(resume.torch_rng)  # last: nothing after may draw from it
    try:
        result = (
            train_private(
                pt,
                max_steps=remaining,
                loss_fn=task.per_sample_loss,
                on_step=step_hook,
                on_epoch=lambda e: log_epoch(e, pt.model, pt.epsilon()),
            )
            if remaining > 0
            else LocalTrainResult(0, "completed", math.nan, pt.epsilon(), 0.0)
        )
    finally:
        pt.detach()
    result.steps = done
    out = _finish(
        cfg,
        task,
        model,
        data,
        run,
        monitor,
        result,
        pt.epsilon(),
        pt.noise_multiplier,
        planned,
        output,
    )
    out.initial_metric = initial_metric
    return out


@dataclass
class CentralResume:
    """What a central run continues from (see :func:`central_resume_state`)."""

    epoch: int
    steps: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    initial_loss: float
    torch_rng: torch.Tensor
    initial_accuracy: float | None = None
    initial_metric: float | None = None
    noise_multiplier: float | None = None
    sampler_generator: torch.Tensor | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def central_resume_state(
    store, run_id: str, kinds: tuple[str, ...]
) -> tuple[Config, CentralResume | None]:
    """The config of central run ``run_id`` and its last checkpoint (None: it had not finished
    an epoch and spent nothing, so it starts over)."""
    row = store.get_run(run_id)
    if row["kind"] not in kinds:
        raise ConfigError(f"run {run_id} is a {row['kind']} run, not a {' or '.join(kinds)} run")
    if row["status"] == "completed":
        raise ConfigError(f"run {run_id} already completed; nothing to resume")
    cfg = Config.from_dict(row["config"])
    checkpoints = [a for a in store.artifacts(run_id, with_data=True) if a["kind"] == "checkpoint"]
    events = store.privacy_events(run_id)
    if not checkpoints:
        if events and cfg.privacy.enabled and cfg.privacy.clipping == "dicesgd":
            raise StoreError(
                f"run {run_id} uses DiceSGD, whose residual buffer must stay hidden, so it is "
                "never checkpointed and cannot be resumed: start a new run"
            )
        if events:
            raise StoreError(
                f"run {run_id} spent privacy before its first checkpoint (the end of its first "
                "epoch); it cannot be resumed: start a new run"
            )
        return cfg, None
    last = max(checkpoints, key=lambda a: a["round"])
    ck = torch.load(io.BytesIO(last["data"]), weights_only=False)
    return cfg, CentralResume(
        epoch=int(ck["epoch"]),
        steps=int(ck["steps"]),
        trainable=ck["trainable"],
        optimizer=ck["optimizer"],
        initial_loss=float(ck["initial_loss"]),
        initial_accuracy=ck.get("initial_accuracy"),
        initial_metric=ck.get("initial_metric"),
        torch_rng=ck["torch_rng"],
        noise_multiplier=ck.get("noise_multiplier"),
        sampler_generator=ck.get("sampler_generator"),
        events=events,
    )


class _Observed:
    """The default collate, showing each training batch to ``on_batch`` (DP loaders reuse the
    loader's collate function, so Poisson batches are seen too). Off until :attr:`armed`: the
    set-up collates one record to learn the batch structure, which is not a training batch."""

    def __init__(self, on_batch: Callable[[Any], None]) -> None:
        self.on_batch, self.armed = on_batch, False

    def __call__(self, records):
        batch = default_collate(records)
        if self.armed:
            self.on_batch(batch)
        return batch


def export(task, model, run: RunHandle | None, output: Path | None) -> None:
    """The trained model, in the task's format: to ``output`` and as the run's artifacts."""
    if output is None and run is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) if output is None else Path(output)
        files = task.export(model, directory)
        if run is not None:
            for f in files:
                run.add_artifact("model", str(f.relative_to(directory)), f.read_bytes())


def planned_steps(cfg: Config, n_train: int) -> int:
    """Logical steps of a central run: ``training.epochs / q`` (capped by ``max-steps``)."""
    q = min(cfg.data.batch_size / n_train, 1.0)
    planned = steps_for_epochs(cfg.training.epochs, q)
    if cfg.training.max_steps is not None:
        planned = min(planned, cfg.training.max_steps)
    return planned


def _finish(
    cfg, task, model, data, run, monitor, result, eps, sigma, planned, output
) -> CentralResult:
    export(task, model, run, output)
    m = task.evaluate(model, data.test)
    loss, acc = m["loss"], m[task.metric]
    if result.stopped == "completed":
        one_epoch = math.ceil(len(data.train) / cfg.data.batch_size)
        verdict = monitor.final(loss, judged=result.steps >= one_epoch, accuracy=m.get("accuracy"))
        if verdict is not None:
            result.stopped, result.budget_message = verdict
    if run is not None:
        final = {f"test_{task.metric}": acc, "test_loss": loss, "steps": result.steps}
        if cfg.privacy.enabled:
            final["epsilon"] = eps
        run.log_metrics(final, scope="final")
    lr = monitor.lr
    return CentralResult(acc, loss, eps, cfg.privacy.delta, sigma, result, planned, lr)
