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
from dataclasses import dataclass

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


@dataclass
class _Call:
    module: nn.Module
    a: Tensor
    b: Tensor | None = None


# -- per-layer math ------------------------------------------------------------------------------
# Each handler maps one call's (a, b) (b already per-sample: scaled for loss_reduction="mean") to
#   norms2(m, a, b)        -> {param: [B] squared per-sample norms}, plus a cache for clipped()
#   clipped(m, a, b, f)    -> {param: sum_i f[param]_i G_i}
#   per_sample(m, a, b)    -> {param: [B, *shape]} (tied parameters, Opacus fallback)


def _flat3(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])


class _Linear:
    @staticmethod
    def norms2(m: nn.Linear, a: Tensor, b: Tensor, cache: dict) -> dict:
        a3, b3 = _flat3(a, b)
        _, t, d_in = a3.shape
        out: dict = {}
        if t == 1:
            out[m.weight] = a3.pow(2).sum((1, 2)) * b3.pow(2).sum((1, 2))
        elif 2 * t * t <= d_in * b3.shape[-1]:
            out[m.weight] = (
                torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(b3, b3.transpose(1, 2))
            ).sum((1, 2))
        else:
            g = torch.bmm(b3.transpose(1, 2), a3)
            cache["g"] = g
            out[m.weight] = g.pow(2).sum((1, 2))
        if m.bias is not None:
            out[m.bias] = b3.sum(1).pow(2).sum(1)
        return out

    @staticmethod
    def clipped(m: nn.Linear, a: Tensor, b: Tensor, f: dict, cache: dict) -> dict:
        a3, b3 = _flat3(a, b)
        out: dict = {}
        if m.weight in f:
            if "g" in cache:
                out[m.weight] = torch.einsum("b,boi->oi", f[m.weight], cache["g"])
            else:
                out[m.weight] = torch.einsum("bto,bti->oi", b3 * f[m.weight][:, None, None], a3)
        if m.bias is not None and m.bias in f:
            out[m.bias] = torch.einsum("b,bo->o", f[m.bias], b3.sum(1))
        return out

    @staticmethod
    def per_sample(m: nn.Linear, a: Tensor, b: Tensor) -> dict:
        a3, b3 = _flat3(a, b)
        out = {m.weight: torch.bmm(b3.transpose(1, 2), a3)}
        if m.bias is not None:
            out[m.bias] = b3.sum(1)
        return out


class _Conv2d:
    @staticmethod
    def supports(m: nn.Conv2d) -> bool:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)

    @staticmethod
    def _unfold(m: nn.Conv2d, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return u, b.reshape(b.shape[0], b.shape[1], -1)  # [B, D, L], [B, O, L]

    @staticmethod
    def norms2(m: nn.Conv2d, a: Tensor, b: Tensor, cache: dict) -> dict:
        u, b3 = _Conv2d._unfold(m, a, b)
        cache["u"] = u
        length, d, o = u.shape[2], u.shape[1], b3.shape[1]
        out: dict = {}
        if 2 * length * length <= d * o:
            gram_u = torch.bmm(u.transpose(1, 2), u)
            gram_b = torch.bmm(b3.transpose(1, 2), b3)
            out[m.weight] = (gram_u * gram_b).sum((1, 2))
        else:
            g = torch.bmm(b3, u.transpose(1, 2))
            cache["g"] = g
            out[m.weight] = g.pow(2).sum((1, 2))
        if m.bias is not None:
            out[m.bias] = b3.sum(2).pow(2).sum(1)
        return out

    @staticmethod
    def clipped(m: nn.Conv2d, a: Tensor, b: Tensor, f: dict, cache: dict) -> dict:
        u = cache.get("u")
        if u is None:
            u, b3 = _Conv2d._unfold(m, a, b)
        b3 = b.reshape(b.shape[0], b.shape[1], -1)
        out: dict = {}
        if m.weight in f:
            if "g" in cache:
                w = torch.einsum("b,bod->od", f[m.weight], cache["g"])
            else:
                w = torch.einsum("bol,bdl->od", b3 * f[m.weight][:, None, None], u)
            out[m.weight] = w.reshape(m.weight.shape)
        if m.bias is not None and m.bias in f:
            out[m.bias] = torch.einsum("b,bo->o", f[m.bias], b3.sum(2))
        return out

    @staticmethod
    def per_sample(m: nn.Conv2d, a: Tensor, b: Tensor) -> dict:
        u, b3 = _Conv2d._unfold(m, a, b)
        out = {m.weight: torch.bmm(b3, u.transpose(1, 2)).reshape(b.shape[0], *m.weight.shape)}
        if m.bias is not None:
            out[m.bias] = b3.sum(2)
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
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(b3.dtype)
        return {m.weight: (same * torch.bmm(b3, b3.transpose(1, 2))).sum((1, 2))}

    @staticmethod
    def clipped(m: nn.Embedding, a: Tensor, b: Tensor, f: dict, cache: dict) -> dict:
        ids, b3 = _Embedding._masked(m, a, b)
        out = torch.zeros_like(m.weight)
        out.index_add_(
            0, ids.reshape(-1), (b3 * f[m.weight][:, None, None]).reshape(-1, b3.shape[-1])
        )
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

    Args:
        model: any module whose trainable parameters live in supported layers.
        loss_reduction: ``"mean"`` if the backpropagated loss is the mean over the physical batch
            (backprops are then rescaled to per-sample gradients), ``"sum"`` otherwise.
    """

    name = "bk"
    scalar_factors_only = False

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        self.model = model
        self.loss_reduction = loss_reduction
        self.params = [p for p in model.parameters() if p.requires_grad]
        owners: dict[int, int] = {}
        self._modules: list[nn.Module] = []
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
            self._modules.append(m)
        self._tied = {pid for pid, n in owners.items() if n > 1}
        self._calls: list[_Call] = []
        self._trigger = torch.zeros((), requires_grad=True)
        self._handles = [m.register_forward_hook(self._capture) for m in self._modules]
        self._handles.append(model.register_forward_pre_hook(self._detach_params))
        self._handles.append(model.register_forward_hook(self._restore_params))
        self._detached = False

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
        call = _Call(module, args[0].detach())
        self._calls.append(call)

        def sink(grad: Tensor, call: _Call = call) -> None:
            call.b = grad if call.b is None else call.b + grad

        return _Record.apply(output, self._trigger, sink)

    def detach(self) -> None:
        """Removes every hook; the model is left as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls = []

    # -- after backward ---------------------------------------------------------------------------
    def has_pending(self) -> bool:
        return any(c.b is not None for c in self._calls)

    def clear(self) -> None:
        self._calls = []

    def _ready_calls(self) -> list[_Call]:
        calls = [c for c in self._calls if c.b is not None]
        for c in calls:
            if self.loss_reduction == "mean":
                c.b = c.b * c.a.shape[0]
        return calls

    def clip_and_accumulate(
        self,
        factor_fn: Callable[[Tensor], Tensor],
        clipped_out: list[Tensor],
        raw_out: list[Tensor] | None = None,
    ) -> Tensor:
        """Computes norms ``[B, P]``, factors ``factor_fn(norms)``, and adds the clipped sums to
        ``clipped_out`` (and the unclipped sums to ``raw_out`` if given). Returns the norms."""
        calls = self._ready_calls()
        self._calls = []
        if not calls:
            raise IncompatibleModelError(
                "no per-sample gradients were recorded: call backward first"
            )
        batch = calls[0].a.shape[0]
        index = {p: i for i, p in enumerate(self.params)}
        norms2 = torch.zeros(batch, len(self.params), dtype=calls[0].b.dtype)
        seen = torch.zeros(len(self.params), dtype=torch.bool)
        per_param_calls: dict[int, list[_Call]] = {}
        for c in calls:
            for p in c.module.parameters(recurse=False):
                if p.requires_grad:
                    per_param_calls.setdefault(id(p), []).append(c)
        shared = {pid for pid, cs in per_param_calls.items() if len(cs) > 1} | self._tied
        caches: list[dict] = []
        instantiated: dict[int, Tensor] = {}
        for c in calls:
            cache: dict = {}
            caches.append(cache)
            h = _handler(c.module)
            own = [p for p in c.module.parameters(recurse=False) if p.requires_grad]
            if h in (_Affine, _OpacusFallback) or any(id(p) in shared for p in own):
                cache["ps"] = h.per_sample(c.module, c.a, c.b)
                for p, g in cache["ps"].items():
                    instantiated[id(p)] = (
                        g if id(p) not in instantiated else instantiated[id(p)] + g
                    )
            else:
                for p, n2 in h.norms2(c.module, c.a, c.b, cache).items():
                    norms2[:, index[p]] += n2
                    seen[index[p]] = True
        for p in self.params:
            if id(p) in instantiated:
                g = instantiated[id(p)]
                norms2[:, index[p]] += g.reshape(batch, -1).pow(2).sum(1)
                seen[index[p]] = True
        if not bool(seen.all()):
            missing = [i for i, s in enumerate(seen.tolist()) if not s]
            raise IncompatibleModelError(
                f"{len(missing)} trainable parameter tensor(s) got no per-sample gradient (is a "
                "module used without calling its forward, e.g. inside nn.MultiheadAttention?); "
                "use grad-sample-mode hooks"
            )
        norms = norms2.clamp_min(0).sqrt()
        factors = factor_fn(norms)  # [B, P]
        f_by_param = {p: factors[:, index[p]] for p in self.params}
        ones = torch.ones(batch, dtype=norms.dtype)
        for c, cache in zip(calls, caches, strict=True):
            if "ps" in cache:
                continue
            h = _handler(c.module)
            own = [p for p in c.module.parameters(recurse=False) if p.requires_grad]
            for p, g in h.clipped(
                c.module, c.a, c.b, {p: f_by_param[p] for p in own}, cache
            ).items():
                clipped_out[index[p]].add_(g)
            if raw_out is not None:
                for p, g in h.clipped(c.module, c.a, c.b, {p: ones for p in own}, cache).items():
                    raw_out[index[p]].add_(g)
        for p in self.params:
            if id(p) in instantiated:
                g = instantiated[id(p)]
                clipped_out[index[p]].add_(torch.einsum("b,b...->...", f_by_param[p], g))
                if raw_out is not None:
                    raw_out[index[p]].add_(g.sum(0))
        return norms
