"""Book-keeping (BK) per-sample clipping in ONE backward pass (Bu et al., fastDP; spec 6.1).

During the forward pass each supported layer keeps its input ``a``; its output is routed through
a tiny autograd function that records the output gradient ``b`` during the backward pass. The
layer's own weight gradient is never computed by autograd (its parameters are switched to
``requires_grad=False`` for the duration of the forward, so autograd only propagates input
gradients). After the backward pass, from the book-kept ``(a, b)``:

* per-sample norms ``||G_i||`` with the ghost-norm identity where it is cheaper
  (``||b_i^T a_i||_F^2 = <a_i a_i^T, b_i b_i^T>``, chosen iff ``2 T^2 <= d_in d_out``: fastDP's
  mixed ghost norm), else by instantiating ``G_i``;
* the clipped sum ``sum_i f_i G_i`` as one einsum with the factors folded into ``b``.

So the private step costs the non-private forward and backward plus the norms: no second
backward (Opacus' ghost clipping), no ``[B, *param]`` buffers for the big layers (Opacus' hooks).

Supported natively: Linear, Conv2d (zeros padding, groups=1), Embedding, LayerNorm, GroupNorm.
Any other module with trainable parameters uses Opacus' registered per-sample gradient function
for its type (instantiated), and a module with none is refused when attached. A parameter used
by several modules or calls (tied weights) is handled by summing instantiated per-sample grads.

Written here, not taken from Opacus: Opacus has no one-pass clipping (its ghost mode runs two
backward passes, #683), and fastDP is not a dependency and patches modules globally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn

from dpfl.errors import IncompatibleModelError

__all__ = ["BookKeepingBackend"]

Tensor = torch.Tensor


class _Record(torch.autograd.Function):
    """Identity on the layer output that stores the output gradient on the backward pass.

    ``trigger`` is a leaf that requires grad: it makes the output part of the graph even though
    the layer's own parameters were detached for the forward.
    """

    @staticmethod
    def forward(ctx, output: Tensor, trigger: Tensor, sink: Callable[[Tensor], None]) -> Tensor:
        ctx.sink = sink
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.sink(grad.detach())
        return grad, None, None


# -- per-layer math ------------------------------------------------------------------------------
# Each handler maps one call's (a, b) (b already per-sample: scaled for loss_reduction="mean") to
#   norms2(m, a, b)        -> {param: [B] squared per-sample norms}, plus a cache for clipped()
#   clipped(m, a, b, f)    -> {param: sum_i f[param]_i G_i}
#   per_sample(m, a, b)    -> {param: [B, *shape]} (tied parameters, Opacus fallback)


def _flat3(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])


def _sq_norms(g: Tensor) -> Tensor:
    """Squared L2 norm of each sample's slice ``g[i]`` (no squared copy of ``g``)."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).pow(2)


class _Linear:
    @staticmethod
    def norms2(m: nn.Linear, a: Tensor, b: Tensor, cache: dict) -> dict:
        a3, b3 = _flat3(a, b)
        _, t, d_in = a3.shape
        out: dict = {}
        if t == 1 or 2 * t * t <= d_in * b3.shape[-1]:
            if t == 1:
                out[m.weight] = _sq_norms(a3) * _sq_norms(b3)
            else:
                gram_a = torch.bmm(a3, a3.transpose(1, 2))
                out[m.weight] = (gram_a * torch.bmm(b3, b3.transpose(1, 2))).sum((1, 2))
            cache["a3"], cache["b3"] = a3, b3
        else:
            g = torch.bmm(b3.transpose(1, 2), a3)
            cache["g"] = g
            out[m.weight] = _sq_norms(g)
        if m.bias is not None:
            bias = b3.sum(1)
            cache["bias"] = bias
            out[m.bias] = bias.pow(2).sum(1)
        return out

    @staticmethod
    def clipped(m: nn.Linear, f: dict, cache: dict) -> dict:
        out: dict = {}
        if m.weight in f:
            if "g" in cache:
                out[m.weight] = torch.einsum("b,boi->oi", f[m.weight], cache["g"])
            else:
                b3 = cache["b3"] * f[m.weight][:, None, None]
                out[m.weight] = b3.flatten(0, 1).T @ cache["a3"].flatten(0, 1)
        if m.bias is not None and m.bias in f:
            out[m.bias] = f[m.bias] @ cache["bias"]
        return out

    @staticmethod
    def per_sample(m: nn.Linear, a: Tensor, b: Tensor) -> dict:
        a3, b3 = _flat3(a, b)
        out = {m.weight: torch.bmm(b3.transpose(1, 2), a3)}
        if m.bias is not None:
            out[m.bias] = b3.sum(1)
        return out


class _Conv2d:
    """Per-sample conv gradients come from ONE grouped weight-gradient convolution (the batch
    folded into the groups), which runs at about the cost of the ordinary weight gradient it
    replaces; the ghost norm (Gram matrices of unfolded patches) is used instead when it is
    smaller in memory (2 L^2 <= D O, L output positions, D = C_in k k, O = C_out)."""

    @staticmethod
    def supports(m: nn.Conv2d) -> bool:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)

    @staticmethod
    def _ghost(m: nn.Conv2d, b: Tensor) -> bool:
        length = b.shape[2] * b.shape[3]
        d = m.weight[0].numel()
        return 2 * length * length <= d * m.out_channels

    @staticmethod
    def _instantiate(m: nn.Conv2d, a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        g = torch.nn.grad.conv2d_weight(
            a.reshape(1, n * a.shape[1], *a.shape[2:]),
            (n * m.out_channels, *m.weight.shape[1:]),
            b.reshape(1, n * b.shape[1], *b.shape[2:]),
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=n * m.groups,
        )
        return g.reshape(n, *m.weight.shape)

    @staticmethod
    def norms2(m: nn.Conv2d, a: Tensor, b: Tensor, cache: dict) -> dict:
        out: dict = {}
        if m.groups == 1 and _Conv2d._ghost(m, b):
            u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            b3 = b.reshape(b.shape[0], b.shape[1], -1)
            gram = torch.bmm(u.transpose(1, 2), u) * torch.bmm(b3.transpose(1, 2), b3)
            out[m.weight] = gram.sum((1, 2))
            cache["u"], cache["b3"] = u, b3
        else:
            g = _Conv2d._instantiate(m, a, b)
            cache["g"] = g
            out[m.weight] = _sq_norms(g)
        if m.bias is not None:
            bias = b.sum((2, 3))
            cache["bias"] = bias
            out[m.bias] = bias.pow(2).sum(1)
        return out

    @staticmethod
    def clipped(m: nn.Conv2d, f: dict, cache: dict) -> dict:
        out: dict = {}
        if m.weight in f:
            if "g" in cache:
                w = torch.einsum("b,b...->...", f[m.weight], cache["g"])
            else:
                b3 = cache["b3"] * f[m.weight][:, None, None]
                w = torch.einsum("bol,bdl->od", b3, cache["u"]).reshape(m.weight.shape)
            out[m.weight] = w
        if m.bias is not None and m.bias in f:
            out[m.bias] = f[m.bias] @ cache["bias"]
        return out

    @staticmethod
    def per_sample(m: nn.Conv2d, a: Tensor, b: Tensor) -> dict:
        out = {m.weight: _Conv2d._instantiate(m, a, b)}
        if m.bias is not None:
            out[m.bias] = b.sum((2, 3))
        return out


class _Embedding:
    @staticmethod
    def supports(m: nn.Embedding) -> bool:
        return not m.sparse and m.max_norm is None and not m.scale_grad_by_freq

    @staticmethod
    def _masked(m: nn.Embedding, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        ids = a.reshape(a.shape[0], -1)
        b3 = b.reshape(b.shape[0], -1, b.shape[-1])
        if m.padding_idx is not None:
            b3 = b3 * (ids != m.padding_idx).unsqueeze(-1).to(b3.dtype)
        return ids, b3

    @staticmethod
    def norms2(m: nn.Embedding, a: Tensor, b: Tensor, cache: dict) -> dict:
        ids, b3 = _Embedding._masked(m, a, b)
        cache["ids"], cache["b3"] = ids, b3
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(b3.dtype)
        return {m.weight: (same * torch.bmm(b3, b3.transpose(1, 2))).sum((1, 2))}

    @staticmethod
    def clipped(m: nn.Embedding, f: dict, cache: dict) -> dict:
        b3 = cache["b3"] * f[m.weight][:, None, None]
        out = torch.zeros_like(m.weight)
        out.index_add_(0, cache["ids"].reshape(-1), b3.reshape(-1, b3.shape[-1]))
        return {m.weight: out}

    @staticmethod
    def per_sample(m: nn.Embedding, a: Tensor, b: Tensor) -> dict:
        ids, b3 = _Embedding._masked(m, a, b)
        out = torch.zeros(ids.shape[0], *m.weight.shape, dtype=b3.dtype, device=b3.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, b3.shape[-1]), b3)
        return {m.weight: out}


class _Affine:
    """LayerNorm / GroupNorm: per-sample grads are small ([B, C]); always instantiated."""

    @staticmethod
    def per_sample(m: nn.Module, a: Tensor, b: Tensor) -> dict:
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
            dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
        else:
            xhat = F.group_norm(a, m.num_groups, eps=m.eps)
            shape = (a.shape[0], a.shape[1], -1)
            xhat, b = xhat.reshape(shape), b.reshape(shape)
            dims = (2,)
        out = {}
        if m.weight is not None:
            out[m.weight] = (b * xhat).sum(dims) if dims else b * xhat
        if m.bias is not None:
            out[m.bias] = b.sum(dims) if dims else b
        return out


class _OpacusFallback:
    """Opacus' registered per-sample gradient function for the module type (instantiated)."""

    @staticmethod
    def per_sample(m: nn.Module, a: Tensor, b: Tensor) -> dict:
        fn = GradSampleModule.GRAD_SAMPLERS[type(m)]
        return {p: g for p, g in fn(m, [a], b).items() if p.requires_grad}


def _handler(m: nn.Module):
    t = type(m)
    if t is nn.Linear:
        return _Linear
    if t is nn.Conv2d and _Conv2d.supports(m):
        return _Conv2d
    if t is nn.Embedding and _Embedding.supports(m):
        return _Embedding
    if t in (nn.LayerNorm, nn.GroupNorm):
        return _Affine
    if t in GradSampleModule.GRAD_SAMPLERS:
        return _OpacusFallback
    return None


class BookKeepingBackend:
    """Attaches to ``model`` (in place; no wrapper) and computes clipped sums in one backward.

    Each layer's contribution is reduced as soon as its output gradient arrives during the
    backward pass: its per-sample norms are added up, and only what the clipped sum needs is kept
    (the small per-sample gradients of norm layers and convolutions, or ``(a, b)`` for linear
    layers); the rest is freed before the next layer's gradient exists.

    Args:
        model: any module whose trainable parameters live in supported layers.
        loss_reduction: ``"mean"`` if the backpropagated loss is the mean over the physical batch
            (per-sample gradients are then ``batch`` times the recorded ones), ``"sum"`` otherwise.
    """

    name = "bk"
    scalar_factors_only = False

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        self.model = model
        self.loss_reduction = loss_reduction
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[int, int] = {}
        modules: list[nn.Module] = []
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if _handler(m) is None:
                raise IncompatibleModelError(
                    f"module {name or type(m).__name__} ({type(m).__name__}) has trainable "
                    "parameters but no per-sample gradient rule; use grad-sample-mode hooks or "
                    "functorch, or freeze it"
                )
            for p in own:
                owners[id(p)] = owners.get(id(p), 0) + 1
            modules.append(m)
        self._tied = {pid for pid, n in owners.items() if n > 1}
        self._trigger = torch.zeros((), requires_grad=True)
        self._handles = [m.register_forward_hook(self._capture) for m in modules]
        self._handles.append(model.register_forward_pre_hook(self._detach_params))
        self._handles.append(model.register_forward_hook(self._restore_params))
        self._detached = False
        self._reset()

    def _reset(self) -> None:
        self._calls_per_param: dict[int, int] = {}
        self._pending: list[tuple[nn.Module, Any, dict]] = []  # (module, handler, cache)
        self._instantiated: dict[int, Tensor] = {}
        self._norms2: Tensor | None = None
        self._seen: set[int] = set()
        self._batch: int | None = None

    # -- hooks ------------------------------------------------------------------------------------
    def _detach_params(self, module, args) -> None:
        if torch.is_grad_enabled() and not self._detached:
            for p in self.params:
                p.requires_grad_(False)
            self._detached = True

    def _restore_params(self, module, args, output) -> None:
        if self._detached:
            for p in self.params:
                p.requires_grad_(True)
            self._detached = False

    def _capture(self, module: nn.Module, args, output):
        if not (torch.is_grad_enabled() and self._detached) or not isinstance(output, Tensor):
            return None
        for p in module.parameters(recurse=False):
            if id(p) in self._index:
                self._calls_per_param[id(p)] = self._calls_per_param.get(id(p), 0) + 1
        held = [args[0].detach()]  # released as soon as the layer's gradient is reduced

        def sink(grad: Tensor) -> None:
            self._reduce(module, held.pop(), grad)

        return _Record.apply(output, self._trigger, sink)

    def _reduce(self, m: nn.Module, a: Tensor, b: Tensor) -> None:
        """Folds one call's (a, b) into the running norms and keeps what the sum needs."""
        batch = a.shape[0]
        if self._batch is None:
            self._batch = batch
            self._norms2 = torch.zeros(batch, len(self.params), dtype=b.dtype)
        elif batch != self._batch:
            raise IncompatibleModelError(
                f"layers saw batches of {self._batch} and {batch} samples in one backward; "
                "run one forward per backward"
            )
        h = _handler(m)
        own = [p for p in m.parameters(recurse=False) if id(p) in self._index]
        shared = any(id(p) in self._tied or self._calls_per_param.get(id(p), 0) > 1 for p in own)
        if h in (_Affine, _OpacusFallback) or shared:
            for p, g in h.per_sample(m, a, b).items():
                k = id(p)
                self._instantiated[k] = (
                    g if k not in self._instantiated else self._instantiated[k] + g
                )
            return
        cache: dict = {}
        for p, n2 in h.norms2(m, a, b, cache).items():
            self._norms2[:, self._index[id(p)]] += n2
            self._seen.add(id(p))
        self._pending.append((m, h, cache))

    def detach(self) -> None:
        """Removes every hook; the model is left as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._reset()

    # -- after backward ---------------------------------------------------------------------------
    def has_pending(self) -> bool:
        return self._batch is not None

    def clear(self) -> None:
        self._reset()

    def clip_and_accumulate(
        self,
        factor_fn: Callable[[Tensor], Tensor],
        clipped_out: list[Tensor],
        raw_out: list[Tensor] | None = None,
    ) -> Tensor:
        """Per-sample norms ``[B, P]`` -> ``factor_fn`` -> clipped sums added to ``clipped_out``
        (and unclipped sums to ``raw_out`` if given). Returns the norms."""
        if self._batch is None:
            raise IncompatibleModelError(
                "no per-sample gradients were recorded: call backward first"
            )
        norms2 = self._norms2
        for k, g in self._instantiated.items():
            norms2[:, self._index[k]] += _sq_norms(g)
            self._seen.add(k)
        if len(self._seen) != len(self.params):
            missing = len(self.params) - len(self._seen)
            self._reset()
            raise IncompatibleModelError(
                f"{missing} trainable parameter tensor(s) got no per-sample gradient (is a "
                "module used without calling its forward, e.g. inside nn.MultiheadAttention?); "
                "use grad-sample-mode hooks"
            )
        # a mean-reduced loss recorded b / batch: rescale norms and factors, not the tensors
        scale = float(self._batch) if self.loss_reduction == "mean" else 1.0
        norms = norms2.clamp_min(0).sqrt() * scale
        factors = factor_fn(norms) * scale  # [B, P]
        columns = {k: factors[:, i] for k, i in self._index.items()}
        ones = torch.full((self._batch,), scale, dtype=norms.dtype) if raw_out is not None else None
        for m, h, cache in self._pending:
            own = [p for p in m.parameters(recurse=False) if id(p) in self._index]
            for p, g in h.clipped(m, {p: columns[id(p)] for p in own}, cache).items():
                clipped_out[self._index[id(p)]].add_(g)
            if ones is not None:
                for p, g in h.clipped(m, {p: ones for p in own}, cache).items():
                    raw_out[self._index[id(p)]].add_(g)
        for k, g in self._instantiated.items():
            i = self._index[k]
            clipped_out[i].add_(torch.einsum("b,b...->...", columns[k], g))
            if raw_out is not None:
                raw_out[i].add_(g.sum(0) * scale)
        self._reset()
        return norms
