"""Per-sample norm backends built on Opacus' grad-sample modules.

* ``hooks``: :class:`opacus.GradSampleModule`, per-sample gradients materialized by hand-written
  grad samplers (``p.grad_sample``, shape ``[B, *p.shape]``).
* ``functorch``: the same module with ``force_functorch=True`` (``vmap(grad)`` per layer).
  Opacus' Embedding grad sampler ignores ``padding_idx``; this backend zeroes that row of the
  per-sample gradients, so norms and sums match autograd.
* ``ghost``: Opacus' ghost clipping (:class:`GradSampleModuleFastGradientClipping`), two backward
  passes: the first computes per-sample norms only, the second backpropagates
  ``sum_i f_i loss_i``, whose gradient is the clipped sum. It needs the per-sample losses
  (:meth:`PrivateTraining.backward`) and a factor that is the same for every parameter of a
  sample (flat, automatic, adaptive clipping).

Known limitation (Opacus 1.6): the ghost Embedding norm sampler also ignores ``padding_idx``,
so ghost norms of models with padded embeddings are overestimated: samples are clipped more than
needed (never less), and the clipped sum itself (autograd's second pass) is exact.

Clip factors always come from dpfl's clip policy, never from Opacus' optimizers, so every backend
clips, noises and accounts identically.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from torch import nn

from dpfl.errors import IncompatibleModelError

__all__ = ["GhostBackend", "HooksBackend"]

Tensor = torch.Tensor


def _wrap(make: Callable[[], nn.Module]) -> nn.Module:
    try:
        return make()
    except NotImplementedError as e:  # opacus' validators raise these for unsupported layers
        raise IncompatibleModelError(f"Opacus cannot compute per-sample gradients: {e}") from None


class HooksBackend:
    """Opacus ``GradSampleModule`` (hooks, or functorch with ``force_functorch``)."""

    scalar_factors_only = False

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", functorch: bool = False):
        self.name = "functorch" if functorch else "hooks"
        self.model = _wrap(
            lambda: GradSampleModule(
                model, batch_first=True, loss_reduction=loss_reduction, force_functorch=functorch
            )
        )
        self.loss_reduction = loss_reduction
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Opacus' Embedding grad sampler ignores padding_idx (autograd gives that row no
        # gradient); its per-sample gradients are corrected here before any norm is taken.
        self._padding_rows = {
            id(m.weight): m.padding_idx
            for m in model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None and m.weight.requires_grad
        }

    def has_pending(self) -> bool:
        return any(getattr(p, "grad_sample", None) is not None for p in self.params)

    def clear(self) -> None:
        for p in self.params:
            p.grad_sample = None

    def detach(self) -> None:
        self.clear()
        self.model._close()

    def clip_and_accumulate(self, factor_fn, clipped_out, raw_out=None) -> Tensor:
        samples = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                raise IncompatibleModelError(
                    "a trainable parameter got no per-sample gradient (unused in the forward, or "
                    "the model is in eval mode; call model.train())"
                )
            if id(p) in self._padding_rows:
                gs[:, self._padding_rows[id(p)]] = 0
            samples.append(gs)
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=1) for g in samples], dim=1)
        factors = factor_fn(norms)
        for j, (p, g) in enumerate(zip(self.params, samples, strict=True)):
            clipped_out[j].add_(torch.einsum("b,b...->...", factors[:, j].to(g.dtype), g))
            if raw_out is not None:
                raw_out[j].add_(g.sum(0))
            p.grad_sample = None
            p.grad = None  # autograd's unclipped gradient: never used, never released
        return norms


class GhostBackend:
    """Opacus ghost clipping: norms in a first backward pass, the clipped sum in a second."""

    name = "ghost"
    scalar_factors_only = True

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        # tied trainable parameters are refused by dpfl.privacy.boundaries.backend_refusals
        self.model = _wrap(
            lambda: GradSampleModuleFastGradientClipping(
                model,
                batch_first=True,
                loss_reduction="sum",
                max_grad_norm=1.0,  # unused: dpfl's policy computes the factors
                use_ghost_clipping=True,
            )
        )
        self.loss_reduction = loss_reduction
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._losses: Tensor | None = None

    def backward(self, losses: Tensor) -> None:
        """First pass: per-sample norms only (the losses are kept for the second pass)."""
        for p in self.params:
            p.grad = None
        losses.sum().backward(retain_graph=True)
        self._losses = losses

    def has_pending(self) -> bool:
        return self._losses is not None

    def clear(self) -> None:
        self._losses = None

    def detach(self) -> None:
        self.clear()
        self.model._close()

    def clip_and_accumulate(self, factor_fn, clipped_out, raw_out=None) -> Tensor:
        if raw_out is not None:
            raise IncompatibleModelError("ghost clipping cannot give the unclipped sum (DiceSGD)")
        if self._losses is None:
            raise IncompatibleModelError(
                "ghost clipping needs the per-sample losses: call PrivateTraining.backward(losses)"
                " instead of loss.backward()"
            )
        norms = torch.stack([p._norm_sample for p in self.params], dim=1)
        factors = factor_fn(norms)[:, 0].detach()
        for p in self.params:
            p.grad = None
        self.model.disable_hooks()
        try:
            with torch.enable_grad(), warnings.catch_warnings():  # the step runs under no_grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (factors.to(self._losses.dtype) * self._losses).sum().backward()
        finally:
            self.model.enable_hooks()
            self._losses = None
        for j, p in enumerate(self.params):
            clipped_out[j].add_(p.grad)
            p.grad = None
        return norms
