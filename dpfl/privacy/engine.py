"""``make_private``: one learner's private training, close to Opacus' ``make_private``.

    pt = make_private(model, optimizer, train_loader, noise_multiplier=1.1, clip_norm=1.0)
    for x, y in pt.data_loader:
        pt.train_step(x, y, loss_fn)   # or: forward, pt.backward(losses), pt.optimizer.step()
    pt.epsilon()

Differences from Opacus, on purpose:

* the loader samples each record independently with probability q = batch_size / N (Poisson,
  what the accountant assumes) from a seeded generator, and B = q N normalizes the noisy sum;
* ``train_step`` splits a logical batch into physical batches of at most ``physical_batch_size``
  (virtual steps) and handles empty Poisson batches (noise is still released and accounted);
* the per-sample losses are passed explicitly (``pt.backward(losses)``): no ``criterion``
  wrapper, one call for every backend;
* accounting is a :class:`~dpfl.accountants.PrivacyLedger` (persisted, per participant, with an
  optional budget), not an optimizer hook that user hooks can overwrite (Opacus' single slot).
"""

from __future__ import annotations

import copy
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from dpfl.accountants import PrivacyLedger, calibrate_noise, steps_for_epochs
from dpfl.accountants.ledger import Sink
from dpfl.config import CLIP_LR_PER_STEP
from dpfl.device import to_device
from dpfl.errors import ConfigError, IncompatibleModelError
from dpfl.privacy.boundaries import (
    BatchGuard,
    backend_errors,
    backend_refusals,
    batch_length,
    drop_last_record,
    slice_records,
    validate_model,
)
from dpfl.privacy.clipping import (
    AdaptiveClip,
    AutomaticClip,
    ClipPolicy,
    FlatClip,
    GroupClip,
    PerLayerClip,
)
from dpfl.privacy.dicesgd import ErrorFeedback
from dpfl.privacy.norms.bk import BookKeepingBackend
from dpfl.privacy.norms.opacus_backends import GhostBackend, HooksBackend
from dpfl.privacy.optimizer import DPOptimizer
from dpfl.validation import check_delta, check_epsilon, positive

__all__ = ["PrivateTraining", "make_backend", "make_clip_policy", "make_private"]

NON_POISSON_NOTE = "fixed-size shuffled batches accounted as Poisson sampling (approximation)"
BACKENDS = ("hooks", "functorch", "ghost", "bk")
CLIPPINGS = ("flat", "per-layer", "adaptive", "automatic", "per-group", "dicesgd")


def make_backend(name: str, model: nn.Module, loss_reduction: str = "mean"):
    """A per-sample norm backend attached to ``model``."""
    if loss_reduction not in ("mean", "sum"):
        raise ConfigError(f"loss reduction must be mean or sum, got {loss_reduction!r}")
    if name == "hooks":
        return HooksBackend(model, loss_reduction)
    if name == "functorch":
        return HooksBackend(model, loss_reduction, functorch=True)
    if name == "ghost":
        return GhostBackend(model, loss_reduction)
    if name == "bk":
        return BookKeepingBackend(model, loss_reduction)
    raise ConfigError(f"unknown grad-sample mode {name!r}; valid: {', '.join(BACKENDS)}")


def make_clip_policy(
    clipping: str, clip_norm: float, num_params: int, **options: Any
) -> ClipPolicy:
    """The clip policy named ``clipping`` (``dicesgd`` clips flat; its feedback is separate)."""
    if clipping in ("flat", "dicesgd"):
        return FlatClip(clip_norm)
    if clipping == "automatic":
        return AutomaticClip(clip_norm, gamma=options.get("gamma", 0.01))
    if clipping == "per-layer":
        thresholds = options.get("thresholds")
        if thresholds is None:
            return PerLayerClip.even_split(clip_norm, num_params)
        return PerLayerClip(thresholds)
    if clipping == "per-group":
        thresholds = options.get("thresholds") or [clip_norm / num_params**0.5] * num_params
        return GroupClip(thresholds)
    if clipping == "adaptive":
        return AdaptiveClip(
            clip_norm,
            target_quantile=options.get("target_quantile", 0.5),
            lr=options.get("clip_lr", CLIP_LR_PER_STEP),
            count_noise_std=options.get("count_noise_std"),
        )
    raise ConfigError(f"unknown clipping {clipping!r}; valid: {', '.join(CLIPPINGS)}")


@dataclass
class PrivateTraining:
    """Everything one learner needs to train privately (see :func:`make_private`)."""

    model: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    ledger: PrivacyLedger
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: float
    physical_batch_size: int | None
    planned_steps: int | None
    target_epsilon: float | None
    participant: str
    backend: Any
    sampler_generator: torch.Generator | None = None
    guard: BatchGuard | None = None
    _loss_probed: bool = False

    def backward(self, losses: torch.Tensor) -> None:
        """Backpropagates per-sample losses ``[b]`` of one physical batch."""
        if losses.dim() != 1:
            raise ConfigError(
                f"backward expects per-sample losses of shape [batch], got {tuple(losses.shape)} "
                "(use reduction='none')"
            )
        if self.guard is not None:
            self.guard.note_losses(int(losses.shape[0]))
        with warnings.catch_warnings(), backend_errors(self.backend.name):
            # Opacus' module backward hooks on a first layer whose input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if isinstance(self.backend, GhostBackend):
                self.backend.backward(losses)
            elif self.backend.loss_reduction == "mean":
                losses.mean().backward()
            else:
                losses.sum().backward()

    def train_step(
        self,
        x: Any,
        y: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
    ) -> float:
        """One logical step on the batch ``(x, y)``; ``loss_fn(output, y)`` returns per-sample
        losses ``[B]``.

        ``x`` is a tensor (the model is called as ``model(x)``) or a dict of tensors with the
        batch first (``model(**x)``: Hugging Face models' ``input_ids``, ``attention_mask``);
        ``y`` a tensor or a dict / tuple of them. Returns the mean training loss of the batch
        (NaN for an empty batch). The loss is a statistic of private data: log it only where
        that is acceptable (it is not privatized).
        """
        self.model.train()
        self.optimizer.zero_grad()
        device = _model_device(self.model)
        x, y = to_device(x, device), to_device(y, device)
        n = batch_length(x)
        size = self.physical_batch_size or max(n, 1)
        total = 0.0
        for start in range(0, n, size):
            xb, yb = (
                slice_records(x, n, start, start + size),
                slice_records(y, n, start, start + size),
            )
            out = self.model(**xb) if isinstance(xb, Mapping) else self.model(xb)
            losses = loss_fn(out, yb)
            if not self._loss_probed and min(size, n - start) >= 2:
                self._probe_loss(out, yb, losses, loss_fn)
            self.backward(losses)
            total += float(losses.detach().sum())
            self.optimizer.accumulate()
        self.optimizer.step()
        return total / n if n else float("nan")

    def _probe_loss(self, out, y, losses, loss_fn) -> None:
        """Once: a record's loss must not depend on the other records (in-batch negatives,
        a loss normalized over the batch): the loss of the batch without its last record must
        leave the others' losses unchanged."""
        n = int(losses.shape[0])
        try:
            with torch.no_grad():  # outputs may be ModelOutputs, targets dicts: slice what follows
                fewer = loss_fn(drop_last_record(out, n), drop_last_record(y, n))
        except Exception as e:  # noqa: BLE001 - an unprobeable loss is refused, not skipped
            raise IncompatibleModelError(
                f"the loss could not be evaluated without the batch's last record "
                f"({type(e).__name__}: {e}); give outputs and targets with the batch first"
            ) from None
        if fewer.shape != losses[:-1].shape or not torch.allclose(
            fewer.double(), losses[:-1].detach().double(), rtol=1e-4, atol=1e-6
        ):
            raise IncompatibleModelError(
                "the per-sample losses change when another record leaves the batch: the loss "
                "mixes records (in-batch negatives, normalization over the batch), so one "
                "record's influence is not bounded by its own clipped gradient; use a loss "
                "computed from each record alone"
            )
        self._loss_probed = True

    def epsilon(self, accountant: str | None = None) -> float:
        """Epsilon spent so far by this learner (with another accountant if given)."""
        if accountant is None or accountant == self.ledger.accountant:
            return self.ledger.epsilon(self.participant)
        from dpfl.accountants import compute_epsilon

        return compute_epsilon(self.ledger.history(self.participant), self.ledger.delta, accountant)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer (inner state, clip state, DiceSGD buffer, noise RNG), sampler RNG and
        ledger: restoring it makes the next steps bit-identical."""
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            # torch optimizers hand out their live state tensors: copy them
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "sampler_generator": None
            if self.sampler_generator is None
            else self.sampler_generator.get_state(),
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sampler_generator is not None and state.get("sampler_generator") is not None:
            self.sampler_generator.set_state(state["sampler_generator"])
        self.ledger.load_state_dict(state["ledger"])

    def detach(self) -> None:
        """Removes the per-sample hooks and the batch guard from the model."""
        self.backend.detach()
        if self.guard is not None:
            self.guard.detach()


def _prime_empty_batches(loader: DataLoader, dataset, collate_fn) -> None:
    """A Poisson batch can be empty. Opacus builds an empty batch from the structure of the
    first non-empty one, and, when the very first is empty, falls back to tensors shaped like
    the first record's top-level items, which fails for dict records (HF-style
    ``{"input_ids": ..., "attention_mask": ...}``). Give it the structure up front: one record
    collated (only its structure is used: the empty batch has zero rows)."""
    wrapper = loader.collate_fn
    if getattr(wrapper, "first_batch", True) is not None or len(dataset) == 0:
        return
    collate = collate_fn or default_collate
    wrapper.first_batch = copy.deepcopy(collate([dataset[0]]))


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return torch.device("cpu") if p is None else p.device


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    epochs: float | None = None,
    steps: int | None = None,
    clip_norm: float = 1.0,
    clipping: str = "flat",
    grad_sample_mode: str = "bk",
    accountant: str = "rdp",
    poisson_sampling: bool = True,
    physical_batch_size: int | None = None,
    loss_reduction: str = "mean",
    seed: int | None = None,
    secure_mode: bool = False,
    participant: str = "central",
    ledger: PrivacyLedger | None = None,
    ledger_sink: Sink | None = None,
    clip_options: dict[str, Any] | None = None,
    dicesgd_options: dict[str, Any] | None = None,
) -> PrivateTraining:
    """Makes ``model`` / ``optimizer`` / ``data_loader`` train with DP-SGD.

    Args:
        model: the model (trainable parameters are those with ``requires_grad``).
        optimizer: any optimizer over the model's trainable parameters.
        data_loader: a loader over the training set; its ``batch_size`` is the expected batch
            size B, and q = B / N.
        noise_multiplier: sigma; or give ``target_epsilon`` and ``epochs``/``steps`` instead to
            calibrate sigma for that plan (fresh accountant; the plan is the budget).
        target_epsilon: the budget. With ``noise_multiplier`` too, sigma is kept and training
            just stops before exceeding the budget.
        delta: delta of the guarantee.
        epochs, steps: the planned length (needed to calibrate).
        clip_norm: C (for adaptive clipping, C_0).
        clipping: ``flat``, ``per-layer``, ``adaptive``, ``automatic``, ``per-group``, ``dicesgd``.
        grad_sample_mode: ``bk`` (one backward, dpfl), ``hooks``, ``functorch``, ``ghost`` (Opacus).
        accountant: ``rdp`` or ``prv`` (``gdp`` cannot enforce a budget).
        poisson_sampling: Poisson batches (default). False keeps the loader's own batches and
            accounts them as if Poisson-sampled, which is only an approximation (noted in the
            ledger).
        physical_batch_size: largest batch put through the model at once (virtual steps).
        loss_reduction: how ``loss.backward()`` reduced the batch when not using ``backward()``.
        seed: seeds the noise and sampling generators (None: nondeterministic).
        secure_mode: noise from the OS CSPRNG, and the Poisson sampler seeded from it (the
            seed then only fixes what is not secret).
        participant: ledger participant name.
        ledger: an existing ledger to continue (a client across rounds); else a new one.
        ledger_sink: where a new ledger persists events (e.g. ``RunHandle.record_privacy_event``).
        clip_options: policy options (``gamma``; ``thresholds``; ``target_quantile``, ``clip_lr``,
            ``count_noise_std``).
        dicesgd_options: ``c2``, ``c2_units``, ``residual_rule`` (for ``clipping="dicesgd"``).
    """
    check_delta("delta", delta)
    positive("clip norm", clip_norm)
    dataset = data_loader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    batch_size = data_loader.batch_size
    if not batch_size:
        raise ConfigError("the data loader needs a batch_size (the expected logical batch size)")
    if n == 0:
        raise ConfigError("the training set is empty")
    sample_rate = min(batch_size / n, 1.0)
    expected_batch_size = sample_rate * n
    if physical_batch_size is not None and physical_batch_size < 1:
        raise ConfigError(f"physical batch size must be >= 1, got {physical_batch_size}")

    planned = None
    if epochs is not None or steps is not None:
        if epochs is not None and steps is not None:
            raise ConfigError("give epochs or steps, not both")
        planned = steps if steps is not None else steps_for_epochs(epochs, sample_rate)
        if planned < 1:
            raise ConfigError(f"steps must be >= 1, got {planned}")
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ConfigError("give noise_multiplier or target_epsilon")
        check_epsilon("target epsilon", target_epsilon)
        if planned is None:
            raise ConfigError("target_epsilon needs the planned epochs or steps to calibrate")
        prior = ledger.history(participant) if ledger is not None else []
        noise_multiplier = calibrate_noise(
            target_epsilon, delta, sample_rate, planned, accountant, prior=prior
        ).noise_multiplier

    if ledger is None:
        ledger = PrivacyLedger(accountant, delta, target_epsilon=target_epsilon, sink=ledger_sink)
    elif ledger.delta != delta or ledger.accountant != accountant:
        raise ConfigError("the given ledger uses another accountant or delta")
    elif target_epsilon is not None:
        # a given budget is always enforced: the ledger keeps the stricter of its own and this
        ledger.enforce_budget(target_epsilon)

    noise_gen = sampler_gen = None
    if seed is not None:
        noise_gen = torch.Generator().manual_seed(seed)
        sampler_gen = torch.Generator().manual_seed(seed + 1)
    if secure_mode:
        # who knows the seed knows which records each batch holds, and the amplification by
        # sampling that the accountant assumes is gone: the sampler's seed comes from the OS
        # (ours: a torch generator seeded with 63 secret bits; Opacus uses torchcsprng)
        sampler_gen = torch.Generator().manual_seed(secrets.randbits(63))
    if poisson_sampling:
        loader: DataLoader = DPDataLoader(
            dataset,
            sample_rate=sample_rate,
            collate_fn=data_loader.collate_fn,
            generator=sampler_gen,
        )
        _prime_empty_batches(loader, dataset, data_loader.collate_fn)
    else:
        loader = data_loader

    if grad_sample_mode not in BACKENDS:
        raise ConfigError(
            f"unknown grad-sample mode {grad_sample_mode!r}; valid: {', '.join(BACKENDS)}"
        )
    # the guarantee is enforced, not assumed (boundaries.py): refuse what breaks it, then guard
    # every forward; the guard's hooks go first, so they see the model as the user left it
    pinned = validate_model(model)
    backend_refusals(model, grad_sample_mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise IncompatibleModelError("the model has no trainable parameter")
    guard = BatchGuard(model, trainable, pinned, grad_sample_mode)
    try:
        backend = make_backend(grad_sample_mode, model, loss_reduction)
    except BaseException:
        guard.detach()
        raise
    policy = make_clip_policy(clipping, clip_norm, len(backend.params), **(clip_options or {}))
    feedback = None
    if clipping == "dicesgd":
        opts = dict(dicesgd_options or {})
        feedback = ErrorFeedback(
            clip_norm,
            opts.pop("c2", clip_norm),
            opts.pop("c2_units", "sum"),
            opts.pop("residual_rule", "paper"),
        )
        if opts:
            raise ConfigError(f"unknown dicesgd options: {', '.join(sorted(opts))}")
    dp_optimizer = DPOptimizer(
        optimizer,
        backend=backend,
        policy=policy,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        expected_batch_size=expected_batch_size,
        ledger=ledger,
        participant=participant,
        generator=noise_gen,
        secure_mode=secure_mode,
        error_feedback=feedback,
        note=None if poisson_sampling else NON_POISSON_NOTE,
        guard=guard,
    )
    return PrivateTraining(
        model=backend.model,
        optimizer=dp_optimizer,
        data_loader=loader,
        ledger=ledger,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        expected_batch_size=expected_batch_size,
        physical_batch_size=physical_batch_size,
        planned_steps=planned,
        target_epsilon=target_epsilon,
        participant=participant,
        backend=backend,
        sampler_generator=sampler_gen,
        guard=guard,
    )
