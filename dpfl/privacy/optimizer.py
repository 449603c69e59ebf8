"""The private step: one wrapper around any ``torch.optim.Optimizer``.

One logical step, owned here and nowhere else (DESIGN.md section 3)::

    per-sample norms [B, P]         (backend: Opacus hooks / functorch / ghost, or dpfl's BK)
      -> factors [B, P]              (clip policy; the only thing that differs between variants)
      -> clipped sum S               (accumulated over the physical batches of a logical batch)
      -> v = S (+ clip(E, C2))       (DiceSGD error feedback, if enabled)
      -> ledger event (sigma, q, 1)  (durable; refused if it would exceed the budget)
      -> p.grad = (v + N(0, (sigma_g C_t k)^2)) / B
      -> inner optimizer.step()      (any torch optimizer; it never sees anything un-noised)

with ``C_t`` the sensitivity of the clip actually used this step, ``sigma_g`` the gradient's
share of the noise (``sigma`` itself except under adaptive clipping), ``k`` DiceSGD's inflation
(1 otherwise) and ``B`` the expected batch size ``q N`` (fixed, so the normalization does not
depend on the sampled batch, as in Opacus).

Exactly one ledger event per noisy release, recorded before the noisy gradient exists: if the
budget refuses it, :class:`~dpfl.errors.PrivacyBudgetError` is raised and nothing is released.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from dpfl.accountants import PrivacyLedger
from dpfl.errors import ConfigError, IncompatibleModelError
from dpfl.privacy.boundaries import backend_errors
from dpfl.privacy.clipping import ClipPolicy
from dpfl.privacy.dicesgd import LEDGER_NOTE, ErrorFeedback
from dpfl.privacy.noise import gaussian_like
from dpfl.validation import check_noise_multiplier, check_sample_rate, positive

__all__ = ["DPOptimizer", "StepStats"]


class StepStats(dict):
    """What the last step did: noise std on the sum, clip, fraction clipped, epsilon."""


class DPOptimizer(Optimizer):
    """Differentially private wrapper of ``optimizer``.

    Args:
        optimizer: the inner optimizer over the model's trainable parameters.
        backend: per-sample norm backend attached to the model.
        policy: clip policy.
        noise_multiplier: sigma, the multiplier the accountant is charged.
        sample_rate: Poisson sampling rate q.
        expected_batch_size: B = q N, the normalization of the noisy sum.
        ledger: privacy ledger (one event per step is recorded under ``participant``).
        participant: the ledger participant (``"central"``, ``"client-3"``).
        generator: torch generator for the noise (and the adaptive clip's count noise).
        secure_mode: draw noise from the OS CSPRNG instead (see :mod:`dpfl.privacy.noise`).
        error_feedback: DiceSGD stage, or None.
        note: a note recorded with every ledger event (e.g. an accounting caveat).
        guard: the model's :class:`~dpfl.privacy.boundaries.BatchGuard`, whose record counts
            every backward's per-sample rows are checked against.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        backend: Any,
        policy: ClipPolicy,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        ledger: PrivacyLedger,
        participant: str = "central",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        error_feedback: ErrorFeedback | None = None,
        note: str | None = None,
        guard: Any = None,
    ) -> None:
        check_noise_multiplier("noise multiplier", noise_multiplier)
        check_sample_rate("sample rate", sample_rate)
        positive("expected batch size", expected_batch_size)
        if backend.scalar_factors_only and not policy.scalar_factor:
            raise ConfigError(
                f"{policy.name} clipping needs per-parameter factors; the {backend.name} backend "
                "only applies one factor per sample (use hooks, functorch or bk)"
            )
        if error_feedback is not None and policy.name != "flat":
            raise ConfigError("DiceSGD error feedback is defined on flat clipping only")
        self.original_optimizer = optimizer
        self.backend = backend
        self.policy = policy
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.expected_batch_size = float(expected_batch_size)
        self.ledger = ledger
        self.participant = participant
        self.generator = generator
        self.secure_mode = secure_mode
        self.error_feedback = error_feedback
        notes = [n for n in (note, LEDGER_NOTE if error_feedback is not None else None) if n]
        self.note = "; ".join(notes) or None
        self.guard = guard
        self.params = list(backend.params)
        managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if {id(p) for p in self.params} - managed:
            raise ConfigError("the optimizer must hold every trainable parameter of the model")
        self._clipped = [torch.zeros_like(p) for p in self.params]
        self._raw = [torch.zeros_like(p) for p in self.params] if error_feedback else None
        self._accumulated = 0
        self._samples = 0
        self._clipped_count = 0
        self.steps = 0
        self.last_stats = StepStats()
        if policy.name == "adaptive":
            policy.gradient_multiplier(self.noise_multiplier, self.expected_batch_size)  # validates

    # -- torch.optim.Optimizer plumbing: the inner optimizer's groups and state are the truth -----
    @property
    def param_groups(self):  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, {self.policy.name}, {self.backend.name})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears parameter gradients and any per-sample state of an un-accumulated backward.
        Clipped sums of accumulated physical batches (virtual steps) are kept until step()."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.backend.clear()

    # -- the private step -------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self) -> None:
        """Clips the last backward's per-sample gradients and adds them to the step's sums
        (call between physical batches of one logical batch; step() calls it for the last)."""
        with backend_errors(self.backend.name):
            norms = self.backend.clip_and_accumulate(self.policy.factors, self._clipped, self._raw)
        if self.guard is not None:
            try:
                self.guard.check_rows(int(norms.shape[0]))
            except BaseException:
                self._reset_sums()
                raise
        self.policy.observe(norms, self.expected_batch_size, self.generator)
        total = norms.pow(2).sum(1).sqrt()
        self._samples += int(total.numel())
        self._clipped_count += int((total > self.policy.sensitivity()).sum())
        self._accumulated += 1

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One noisy release and one inner optimizer step (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.backend.has_pending():
            self.accumulate()
        self._refuse_uncovered_gradients()
        sensitivity = self.policy.sensitivity()
        grad_multiplier = self.policy.gradient_multiplier(
            self.noise_multiplier, self.expected_batch_size
        )
        released = self._clipped
        inflation = 1.0
        if self.error_feedback is not None:
            released = self.error_feedback.apply(self._clipped, self._raw, self.expected_batch_size)
            inflation = self.error_feedback.noise_inflation(self.expected_batch_size)
        std = grad_multiplier * sensitivity * inflation
        try:
            event = self.ledger.record(
                self.participant, self.noise_multiplier, self.sample_rate, 1, note=self.note
            )
        except BaseException:
            self._reset_sums()  # nothing is released; the un-noised sums must not linger
            raise
        for p, s in zip(self.params, released, strict=True):
            noise = gaussian_like(s, std, self.generator, self.secure_mode)
            p.grad = (s + noise).div_(self.expected_batch_size).to(p.dtype)
        self.policy.end_step(self.expected_batch_size, self.generator, secure=self.secure_mode)
        # Adam-like inner optimizers correct their second moment for this noise (DP-AdamBC)
        for group in self.original_optimizer.param_groups:
            if "dp_noise_var" in group:
                group["dp_noise_var"] = (std / self.expected_batch_size) ** 2
        self.original_optimizer.step()
        self.last_stats = StepStats(
            noise_std_sum=std,
            clip=sensitivity,
            samples=self._samples,
            clipped_fraction=self._clipped_count / self._samples if self._samples else 0.0,
            physical_batches=self._accumulated,
            epsilon=event.epsilon_after,
        )
        self._reset_sums()
        self.steps += 1
        return loss

    def _refuse_uncovered_gradients(self) -> None:
        """Every parameter the inner optimizer steps must have gone through the private step: a
        gradient on any other one (a parameter unfrozen after make_private, a second model's
        parameters in the same optimizer) is raw, un-noised data. Nothing is released then."""
        covered = {id(p) for p in self.params}
        raw = [
            p
            for group in self.original_optimizer.param_groups
            for p in group["params"]
            if id(p) not in covered and p.grad is not None
        ]
        if raw:
            for p in raw:
                p.grad = None
            self._reset_sums()
            raise IncompatibleModelError(
                f"{len(raw)} parameter tensor(s) held by the optimizer got a gradient but are not "
                "covered by the private step (unfrozen after make_private?); their raw "
                "gradients were discarded and nothing was released. Call make_private again "
                "after changing which parameters train"
            )

    def _reset_sums(self) -> None:
        for buf in self._clipped:
            buf.zero_()
        if self._raw is not None:
            for buf in self._raw:
                buf.zero_()
        self._accumulated = self._samples = self._clipped_count = 0

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "inner": self.original_optimizer.state_dict(),
            "policy": self.policy.state_dict(),
            "error_feedback": None
            if self.error_feedback is None
            else self.error_feedback.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.original_optimizer.load_state_dict(state["inner"])
        self.policy.load_state_dict(state["policy"])
        if self.error_feedback is not None and state.get("error_feedback") is not None:
            self.error_feedback.load_state_dict(state["error_feedback"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
