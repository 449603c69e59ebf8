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

Supported natively: Linear, transformers' Conv1D (GPT-2), Conv1d/2d/3d (any padding mode,
groups), Embedding (padding_idx), LayerNorm, GroupNorm. Opacus' registered per-sample gradient
function is used for RNNLinear (DPLSTM / DPGRU / DPRNN), SequenceBias (DPMultiheadAttention),
EmbeddingBag, InstanceNorm, RMSNorm; any other module with trainable parameters (LlamaRMSNorm,
custom layers) gets exact per-sample gradients by ``vmap(grad)`` of its own forward. A parameter
used by several modules or calls (tied weights) is handled by summing instantiated per-sample
grads. What these rules assume (batch-first layers, no mixing across records, parameters used
only inside their modules) is checked by :mod:`dpfl.privacy.boundaries`.

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
from dpfl.privacy.boundaries import alias_holder

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


def _wants(cache: dict, p: Tensor | None) -> bool:
    """Whether ``p`` is one of the call's trainable parameters (frozen ones cost nothing)."""
    return p is not None and id(p) in cache["own"]


class _Linear:
    """``nn.Linear`` (weight ``[out, in]``); ``transposed`` handles transformers' ``Conv1D``
    (GPT-2), the same layer with its weight stored as ``[in, out]``."""

    transposed = False
    first_input_only = True

    @classmethod
    def _matrix(cls, a3: Tensor, b3: Tensor) -> Tensor:
        """Per-sample weight gradients ``[B, *weight.shape]``."""
        if cls.transposed:
            return torch.bmm(a3.transpose(1, 2), b3)
        return torch.bmm(b3.transpose(1, 2), a3)

    @classmethod
    def norms2(cls, m: nn.Module, a: Tensor, b: Tensor, cache: dict) -> dict:
        a3, b3 = _flat3(a, b)
        _, t, d_in = a3.shape
        out: dict = {}
        if _wants(cache, m.weight):
            if t == 1 or 2 * t * t <= d_in * b3.shape[-1]:
                if t == 1:
                    out[m.weight] = _sq_norms(a3) * _sq_norms(b3)
                else:
                    gram_a = torch.bmm(a3, a3.transpose(1, 2))
                    out[m.weight] = (gram_a * torch.bmm(b3, b3.transpose(1, 2))).sum((1, 2))
                cache["a3"], cache["b3"] = a3, b3
            else:
                g = cls._matrix(a3, b3)
                cache["g"] = g
                out[m.weight] = _sq_norms(g)
        if _wants(cache, m.bias):
            bias = b3.sum(1)
            cache["bias"] = bias
            out[m.bias] = bias.pow(2).sum(1)
        return out

    @classmethod
    def clipped(cls, m: nn.Module, f: dict, cache: dict) -> dict:
        out: dict = {}
        if m.weight in f:
            if "g" in cache:
                out[m.weight] = torch.einsum("b,b...->...", f[m.weight], cache["g"])
            else:
                b3 = cache["b3"] * f[m.weight][:, None, None]
                w = b3.flatten(0, 1).T @ cache["a3"].flatten(0, 1)
                out[m.weight] = w.T if cls.transposed else w
        if m.bias is not None and m.bias in f:
            out[m.bias] = f[m.bias] @ cache["bias"]
        return out

    @classmethod
    def per_sample(cls, m: nn.Module, args: list, b: Tensor) -> dict:
        a3, b3 = _flat3(args[0], b)
        out = {m.weight: cls._matrix(a3, b3)}
        if m.bias is not None:
            out[m.bias] = b3.sum(1)
        return out


class _TransposedLinear(_Linear):
    transposed = True


class _Conv:
    """Conv1d / Conv2d / Conv3d. Per-sample weight gradients come from ONE grouped
    weight-gradient convolution (the batch folded into the groups), which runs at about the cost
    of the ordinary weight gradient it replaces; for 2-D convolutions without groups the ghost
    norm (Gram matrices of unfolded patches) is used instead when it is smaller in memory
    (2 L^2 <= D O, L output positions, D = C_in k k, O = C_out).

    Padding other than zeros (circular, reflect, replicate) and string padding ("same") are
    applied explicitly to the recorded input with ``F.pad``, exactly as the layer's forward does,
    and the convolution is then taken without padding: the gradient is the layer's own.
    """

    first_input_only = True
    _WEIGHT_GRAD = {
        1: torch.nn.grad.conv1d_weight,
        2: torch.nn.grad.conv2d_weight,
        3: torch.nn.grad.conv3d_weight,
    }

    @staticmethod
    def _padded(m: nn.Module, a: Tensor) -> tuple[Tensor, Any]:
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return a, m.padding
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(a, m._reversed_padding_repeated_twice, mode=mode), 0

    @staticmethod
    def _ghost(m: nn.Module, b: Tensor) -> bool:
        if b.dim() != 4 or m.groups != 1:
            return False
        length = b.shape[2] * b.shape[3]
        return 2 * length * length <= m.weight[0].numel() * m.out_channels

    @staticmethod
    def _instantiate(m: nn.Module, a: Tensor, b: Tensor) -> Tensor:
        a, padding = _Conv._padded(m, a)
        n = a.shape[0]
        g = _Conv._WEIGHT_GRAD[a.dim() - 2](
            a.reshape(1, n * a.shape[1], *a.shape[2:]),
            (n * m.out_channels, *m.weight.shape[1:]),
            b.reshape(1, n * b.shape[1], *b.shape[2:]),
            stride=m.stride,
            padding=padding,
            dilation=m.dilation,
            groups=n * m.groups,
        )
        return g.reshape(n, *m.weight.shape)

    @staticmethod
    def _bias(b: Tensor) -> Tensor:
        return b.sum(tuple(range(2, b.dim())))

    @staticmethod
    def norms2(m: nn.Module, a: Tensor, b: Tensor, cache: dict) -> dict:
        out: dict = {}
        if _wants(cache, m.weight):
            if _Conv._ghost(m, b):
                a, padding = _Conv._padded(m, a)
                u = F.unfold(
                    a, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride
                )
                b3 = b.reshape(b.shape[0], b.shape[1], -1)
                gram = torch.bmm(u.transpose(1, 2), u) * torch.bmm(b3.transpose(1, 2), b3)
                out[m.weight] = gram.sum((1, 2))
                cache["u"], cache["b3"] = u, b3
            else:
                g = _Conv._instantiate(m, a, b)
                cache["g"] = g
                out[m.weight] = _sq_norms(g)
        if _wants(cache, m.bias):
            bias = _Conv._bias(b)
            cache["bias"] = bias
            out[m.bias] = bias.pow(2).sum(1)
        return out

    @staticmethod
    def clipped(m: nn.Module, f: dict, cache: dict) -> dict:
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
    def per_sample(m: nn.Module, args: list, b: Tensor) -> dict:
        out = {m.weight: _Conv._instantiate(m, args[0], b)}
        if m.bias is not None:
            out[m.bias] = _Conv._bias(b)
        return out


class _Embedding:
    first_input_only = True

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
    def per_sample(m: nn.Embedding, args: list, b: Tensor) -> dict:
        ids, b3 = _Embedding._masked(m, args[0], b)
        out = torch.zeros(ids.shape[0], *m.weight.shape, dtype=b3.dtype, device=b3.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, b3.shape[-1]), b3)
        return {m.weight: out}


class _EmbeddingBag:
    """``nn.EmbeddingBag`` on a 2-D ``[batch, bag]`` input, modes sum and mean, optional
    ``per_sample_weights`` and ``padding_idx``: bag i's output is ``sum_l w_il E[id_il]``, so its
    gradient puts ``w_il b_i`` on row ``id_il``. Norms by the same-id Gram identity (no
    ``[B, V, D]`` tensor): ``||G_i||^2 = ||b_i||^2 sum_{l,l'} w_il w_il' [id_il = id_il']``."""

    @staticmethod
    def _weights(m: nn.EmbeddingBag, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
        ids = args[0]
        if ids.dim() != 2:
            raise IncompatibleModelError(
                "EmbeddingBag with a 1-D input and offsets does not keep the batch as its "
                "leading dimension; pass a 2-D [batch, bag] input (pad with padding_idx)"
            )
        psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        w = torch.ones(ids.shape, dtype=torch.get_default_dtype()) if psw is None else psw
        if m.padding_idx is not None:
            w = w * (ids != m.padding_idx).to(w.dtype)
        if m.mode == "mean":
            w = (
                w / (ids != m.padding_idx).sum(1, keepdim=True).clamp_min(1).to(w.dtype)
                if (m.padding_idx is not None)
                else w / ids.shape[1]
            )
        return ids, w

    @staticmethod
    def norms2(m: nn.EmbeddingBag, a: Tensor, b: Tensor, cache: dict) -> dict:
        ids, w = _EmbeddingBag._weights(m, cache["args"], cache["kwargs"])
        w = w.to(b.dtype)
        cache["ids"], cache["w"], cache["b"] = ids, w, b
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(b.dtype)
        mass = torch.einsum("bl,blk,bk->b", w, same, w)
        return {m.weight: mass * b.pow(2).sum(1)}

    @staticmethod
    def clipped(m: nn.EmbeddingBag, f: dict, cache: dict) -> dict:
        ids, w, b = cache["ids"], cache["w"], cache["b"]
        rows = (w * f[m.weight][:, None]).unsqueeze(-1) * b.unsqueeze(1)  # [B, L, D]
        out = torch.zeros_like(m.weight)
        out.index_add_(0, ids.reshape(-1), rows.reshape(-1, b.shape[-1]))
        return {m.weight: out}

    @staticmethod
    def per_sample(m: nn.EmbeddingBag, args: list, b: Tensor, kwargs: dict | None = None) -> dict:
        ids, w = _EmbeddingBag._weights(m, tuple(args), kwargs or {})
        rows = w.to(b.dtype).unsqueeze(-1) * b.unsqueeze(1)
        out = torch.zeros(ids.shape[0], *m.weight.shape, dtype=b.dtype, device=b.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, b.shape[-1]), rows)
        return {m.weight: out}


class _SequenceBias:
    """Opacus' ``SequenceBias`` (``DPMultiheadAttention(add_bias_kv=True)``): appends the bias
    as one more position; record i's gradient is the output gradient at that position. Inside
    DPMultiheadAttention it runs time-first ``[T, B, E]`` even with ``batch_first=True``, which
    Opacus' own rule (``backprops[:, -1]``) gets wrong; the batch dimension is read from the
    module here."""

    @staticmethod
    def per_sample(m: nn.Module, args: list, b: Tensor) -> dict:
        return {m.bias: b[:, -1] if m.batch_first else b[-1]}


class _Affine:
    """LayerNorm / GroupNorm: per-sample grads are small ([B, C]); always instantiated."""

    @staticmethod
    def per_sample(m: nn.Module, args: list, b: Tensor) -> dict:
        a = args[0]
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
            dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
        else:
            xhat = F.group_norm(a, m.num_groups, eps=m.eps)
            shape = (a.shape[0], a.shape[1], -1)
            xhat, b = xhat.reshape(shape), b.reshape(shape)
            dims = (2,)
        out = {}
        if m.weight is not None and m.weight.requires_grad:
            out[m.weight] = (b * xhat).sum(dims) if dims else b * xhat
        if m.bias is not None and m.bias.requires_grad:
            out[m.bias] = b.sum(dims) if dims else b
        return out


class _OpacusFallback:
    """Opacus' registered per-sample gradient function for the module type (instantiated):
    RNNLinear (inside DPLSTM / DPGRU / DPRNN), SequenceBias, EmbeddingBag, InstanceNorm,
    RMSNorm."""

    @staticmethod
    def per_sample(m: nn.Module, args: list, b: Tensor) -> dict:
        fn = GradSampleModule.GRAD_SAMPLERS[type(m)]
        return {p: g for p, g in fn(m, args, b).items() if p.requires_grad}


class _Functorch:
    """Any other module: exact per-sample gradients of its own trainable parameters by
    ``vmap(grad)`` of its forward on each record (inputs whose leading dimension is the batch
    are mapped, the others are shared), the other parameters and buffers held fixed.

    Written here rather than Opacus' functorch fallback, which passes the first input only and
    deep-copies the module; this covers RMSNorm-like modules of any library (LlamaRMSNorm) and
    custom layers holding raw parameters. Its exactness needs the module to treat records
    independently and to use its parameters inside its own forward: both are checked by the
    batch guard's probe (:mod:`dpfl.privacy.boundaries`)."""

    @staticmethod
    def per_sample(m: nn.Module, args: tuple, b: Tensor, kwargs: dict | None = None) -> dict:
        own = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
        fixed = {n: p.detach() for n, p in m.named_parameters() if n not in own}
        fixed.update(dict(m.named_buffers()))
        keys = list(kwargs or {})
        inputs = [*args, *((kwargs or {})[k] for k in keys)]
        batch = b.shape[0]
        dims = tuple(
            0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else None
            for a in inputs
        )
        n_args = len(args)

        def loss(own_values, grad_out, *sample):
            call = [s.unsqueeze(0) if d == 0 else s for s, d in zip(sample, dims, strict=True)]
            kw = dict(zip(keys, call[n_args:], strict=True))
            out = torch.func.functional_call(m, {**own_values, **fixed}, tuple(call[:n_args]), kw)
            return (out * grad_out.unsqueeze(0)).sum()

        detached = {n: p.detach() for n, p in own.items()}
        try:
            with torch.enable_grad():
                grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, *dims))(
                    detached, b, *inputs
                )
        except RuntimeError as e:
            if "random" not in str(e):
                raise
            raise IncompatibleModelError(
                f"{type(m).__name__} is random in train mode (dropout inside a module without a "
                "per-sample rule of its own): its per-sample gradients would be taken under "
                "other random draws than the forward's; move the dropout out of the module "
                "(into an nn.Dropout of its own)"
            ) from None
        return {own[n]: g for n, g in grads.items()}


def _is_transformers_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers")


def _handler(m: nn.Module):
    t = type(m)
    if t is nn.Linear:
        return _Linear
    if _is_transformers_conv1d(m):
        return _TransposedLinear
    if t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return _Conv
    if t is nn.Embedding:
        return _Embedding
    if t is nn.EmbeddingBag:
        return _EmbeddingBag
    if t in (nn.LayerNorm, nn.GroupNorm):
        return _Affine
    if t.__name__ == "SequenceBias" and t.__module__.startswith("opacus"):
        return _SequenceBias
    if t in GradSampleModule.GRAD_SAMPLERS:
        return _OpacusFallback
    return _Functorch


#: handlers that reduce (a, b) to norms during the backward and form the clipped sum from a
#: cache; the others instantiate per-sample gradients (small, or from another library)
_NATIVE = (_Linear, _TransposedLinear, _Conv, _Embedding, _EmbeddingBag)


def _detached(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, list | tuple):
        return type(obj)(_detached(o) for o in obj)
    return obj


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
            if not own or alias_holder(m, own):
                continue
            if _handler(m) is _Functorch and list(m.buffers(recurse=False)):
                raise IncompatibleModelError(
                    f"module '{name or '<model>'}' ({type(m).__name__}) has trainable parameters "
                    "and buffers but no per-sample rule: its buffers may carry batch state; "
                    "freeze it or replace it with a module without buffers"
                )
            for p in own:
                owners[id(p)] = owners.get(id(p), 0) + 1
            modules.append(m)
        self._tied = {pid for pid, n in owners.items() if n > 1}
        self._trigger = torch.zeros((), requires_grad=True)
        self._handles = [m.register_forward_hook(self._capture, with_kwargs=True) for m in modules]
        self._handles.append(model.register_forward_pre_hook(self._detach_params))
        self._handles.append(model.register_forward_hook(self._restore_params))
        self._detached = False
        self._replaying = False
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
        if torch.is_grad_enabled() and not self._detached and not self._replaying:
            for p in self.params:
                p.requires_grad_(False)
            self._detached = True

    def _restore_params(self, module, args, output) -> None:
        if self._detached and not self._replaying:
            for p in self.params:
                p.requires_grad_(True)
            self._detached = False

    def _capture(self, module: nn.Module, args, kwargs, output):
        if self._replaying:
            return None  # a per-sample rule re-running a forward (vmap fallback)
        if torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled():
            raise IncompatibleModelError(
                f"{type(module).__name__} ran its forward during a backward pass (activation "
                "checkpointing?): bk records each layer once per forward; turn checkpointing "
                "off for private training"
            )
        if not (torch.is_grad_enabled() and self._detached) or not isinstance(output, Tensor):
            return None
        if not args:  # called with keywords only: its first tensor keyword is the input
            args = tuple(v for v in kwargs.values() if isinstance(v, Tensor))[:1]
            kwargs = {k: v for k, v in kwargs.items() if v is not args[0]} if args else kwargs
        for p in module.parameters(recurse=False):
            if id(p) in self._index:
                self._calls_per_param[id(p)] = self._calls_per_param.get(id(p), 0) + 1
        if getattr(_handler(module), "first_input_only", False):
            held = [(args[0].detach(),), {}]
        else:
            held = [_detached(args), {k: _detached(v) for k, v in kwargs.items()}]

        def sink(grad: Tensor) -> None:  # the inputs are released as soon as this ran
            inputs = held.pop(0), held.pop(0)
            self._reduce(module, inputs, grad)

        return _Record.apply(output, self._trigger, sink)

    def _reduce(self, m: nn.Module, inputs: tuple, b: Tensor) -> None:
        """Folds one call's inputs and output gradient ``b`` into the running norms and keeps
        what the clipped sum needs."""
        args, kwargs = inputs
        h = _handler(m)
        batch = b.shape[1] if h is _SequenceBias and not m.batch_first else b.shape[0]
        if self._batch is None:
            self._batch = batch
            self._norms2 = torch.zeros(batch, len(self.params), dtype=b.dtype, device=b.device)
        elif batch != self._batch:
            raise IncompatibleModelError(
                f"layers saw batches of {self._batch} and {batch} samples in one backward; "
                "run one forward per backward"
            )
        own = {id(p) for p in m.parameters(recurse=False) if id(p) in self._index}
        shared = any(k in self._tied or self._calls_per_param.get(k, 0) > 1 for k in own)
        if h not in _NATIVE or shared:
            self._replaying = True
            try:
                if h in (_Functorch, _EmbeddingBag):
                    grads = h.per_sample(m, args, b, kwargs)
                else:
                    grads = h.per_sample(m, list(args), b)
            finally:
                self._replaying = False
            for p, g in grads.items():
                k = id(p)
                if k in own:
                    self._instantiated[k] = (
                        g if k not in self._instantiated else self._instantiated[k] + g
                    )
            return
        cache: dict = {"own": own, "args": args, "kwargs": kwargs}
        for p, n2 in h.norms2(m, args[0], b, cache).items():
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
                "module used without calling its forward, or a module whose output is not a "
                "tensor?); call the module in the forward, or freeze it"
            )
        # a mean-reduced loss recorded b / batch: rescale norms and factors, not the tensors
        scale = float(self._batch) if self.loss_reduction == "mean" else 1.0
        norms = norms2.clamp_min(0).sqrt() * scale
        factors = factor_fn(norms) * scale  # [B, P]
        columns = {k: factors[:, i] for k, i in self._index.items()}
        ones = torch.full((self._batch,), scale, dtype=norms.dtype) if raw_out is not None else None
        for m, h, cache in self._pending:
            own = [p for p in m.parameters(recurse=False) if id(p) in cache["own"]]
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
