"""Where the private step meets the user's model: what is refused, what is checked every step.

The per-sample backends are exact *inside* their assumptions; this module turns each assumption
into a check (DESIGN.md 2b), so a model that would break the guarantee is refused with a message
that names the module and the way out, instead of silently releasing a sum whose per-record
sensitivity is above C.

Refused when attached (:func:`validate_model`):

* modules that mix records across the batch: BatchNorm in train mode, BatchNorm without running
  statistics (it normalizes with batch statistics even in eval mode), BatchNorm with trainable
  affine parameters; InstanceNorm that tracks running statistics (updated from the batch and
  released with the model); ``nn.Embedding(scale_grad_by_freq=True)`` (a record's gradient
  depends on the other records' tokens); ``nn.Embedding(max_norm=...)`` (renormalizes the rows a
  batch touches in place: the released weights move with the batch, outside any gradient);
* modules whose parameters are used by fused kernels no per-sample rule covers:
  ``nn.MultiheadAttention``, ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (Opacus' DP drop-ins exist);
* per backend, what its norms get wrong (see :func:`backend_refusals`).

A frozen BatchNorm in eval mode with running statistics is record-independent (a fixed affine
map); it is accepted and *pinned* in eval mode: ``model.train()`` leaves it in eval, and a forward
that finds it in train mode anyway is refused.

Checked at run time (:class:`BatchGuard`, forward hooks on the model and on every module that
owns a trainable parameter):

* every forward: the set of trainable parameters is the one the private step was built for (a
  parameter unfrozen later would be stepped with its raw gradient); each such module's first
  tensor input and its output have the batch's number of records as leading dimension;
* every step: the number of per-sample rows a backend produced equals the number of records in
  the forward and the number of per-sample losses;
* once, at the first training forward (the probe): the model is run again, in eval mode without
  gradients, on the batch and on the batch without its last record (every input tensor whose
  leading dimension is the batch size is sliced). Each layer's leading dimension must follow
  the batch (a time-first layer keeps its length when a record goes: caught even when T == B),
  and the outputs of the other records must not change (no mixing across records). During the
  full-batch probe pass a torch function mode records every operation that reads a trainable
  parameter outside the forward of a module that owns it (``F.linear(h, emb.weight)``): such a
  use is not covered by any per-sample rule and is refused. The probe also records how often
  each module is called and the rank of its inputs (ghost clipping's conditions).

Handled (rather than refused): an embedding whose ids are broadcast over the batch (``[1, T]``
position ids of Hugging Face models, opacus#841) is given ``[B, T]`` contiguous ids, so each
record gets its own per-sample gradient; non-contiguous ids are made contiguous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dpfl.errors import DpflError, IncompatibleModelError

__all__ = [
    "BatchGuard",
    "alias_holder",
    "backend_errors",
    "backend_refusals",
    "drop_last_record",
    "owned_parameters",
    "validate_model",
]

Tensor = torch.Tensor

_DP_REPLACEMENTS = {
    nn.MultiheadAttention: "opacus.layers.DPMultiheadAttention(..., batch_first=True)",
    nn.LSTM: "opacus.layers.DPLSTM(..., batch_first=True)",
    nn.GRU: "opacus.layers.DPGRU(..., batch_first=True)",
    nn.RNN: "opacus.layers.DPRNN(..., batch_first=True)",
}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _trainable(m: nn.Module, recurse: bool = False) -> list[nn.Parameter]:
    return [p for p in m.parameters(recurse=recurse) if p.requires_grad]


def alias_holder(m: nn.Module, own: list[nn.Parameter]) -> bool:
    """Whether every one of ``own`` is also owned by a descendant of ``m`` (Opacus' DPLSTM
    registers its cells' RNNLinear weights on itself): the descendant's calls cover them."""
    return all(
        any(d is not m and any(q is p for q in d.parameters(recurse=False)) for d in m.modules())
        for p in own
    )


def owned_parameters(model: nn.Module) -> dict[int, list[str]]:
    """For each trainable parameter (by id), the names of the modules that own it directly
    (alias holders left out)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        own = _trainable(m)
        if own and alias_holder(m, own):
            continue
        for p in own:
            owners.setdefault(id(p), []).append(name or type(m).__name__)
    return owners


def _label(name: str, m: nn.Module) -> str:
    return f"module '{name or '<model>'}' ({type(m).__name__})"


def validate_model(model: nn.Module) -> list[nn.Module]:
    """Refuses modules that break per-record sensitivity (see the module docstring).

    Returns the frozen eval-mode BatchNorm modules to pin in eval mode.
    """
    pinned = []
    for name, m in model.named_modules():
        what = _label(name, m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            fix = (
                "replace it with GroupNorm (opacus.validators.ModuleValidator.fix(model) does "
                "this), or freeze it in eval mode with running statistics (m.eval(); "
                "m.requires_grad_(False)), where it is a fixed per-record affine map"
            )
            if m.running_mean is None:
                raise IncompatibleModelError(
                    f"{what} has no running statistics, so it normalizes with the statistics of "
                    f"the batch in every mode: each record's output depends on the other "
                    f"records; {fix}"
                )
            if m.training:
                raise IncompatibleModelError(
                    f"{what} is in train mode: it normalizes with batch statistics (mixing "
                    f"records across the batch) and updates its running statistics from them; "
                    f"{fix}"
                )
            if _trainable(m):
                raise IncompatibleModelError(
                    f"{what} has trainable affine parameters, for which no per-sample rule "
                    f"exists; freeze them (m.requires_grad_(False)) or {fix.split(', or')[0]}"
                )
            pinned.append(m)
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise IncompatibleModelError(
                f"{what} tracks running statistics, which are updated from the batch and "
                "released with the model; use track_running_stats=False"
            )
        elif isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.max_norm is not None:
            raise IncompatibleModelError(
                f"{what} has max_norm: its forward renormalizes the rows a batch uses in place, "
                "so the released weights move with the batch outside any clipped gradient; "
                "use max_norm=None"
            )
        elif type(m) in _DP_REPLACEMENTS and _trainable(m, recurse=True):
            raise IncompatibleModelError(
                f"{what} runs its parameters through a fused kernel that no per-sample rule "
                f"covers; replace it with {_DP_REPLACEMENTS[type(m)]} "
                "(opacus.validators.ModuleValidator.fix(model) does this), or freeze it"
            )
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and _trainable(m):
            if m.scale_grad_by_freq:
                raise IncompatibleModelError(
                    f"{what} has scale_grad_by_freq=True: a record's gradient is divided by "
                    "token counts over the whole batch (records mix); use False"
                )
            if m.sparse:
                raise IncompatibleModelError(f"{what} has sparse=True; use sparse gradients off")
    return pinned


def backend_refusals(model: nn.Module, backend: str) -> None:
    """What a backend's norms get wrong, refused before training (the rest is in the probe)."""
    for name, m in model.named_modules():
        if not _trainable(m):
            continue
        what = _label(name, m)
        if backend in ("hooks", "ghost") and isinstance(m, _CONVS) and m.padding_mode != "zeros":
            raise IncompatibleModelError(
                f"{what} has padding_mode={m.padding_mode!r}, which Opacus' {backend} per-sample "
                "rule ignores (wrong norms and gradients); use grad-sample-mode bk or functorch"
            )
        if backend != "bk" and isinstance(m, nn.EmbeddingBag):
            raise IncompatibleModelError(
                f"{what}: Opacus' {backend} rule needs the 1-D input + offsets form, whose "
                "leading dimension is not the batch; use grad-sample-mode bk with a 2-D "
                "[batch, bag] input"
            )
        if backend != "bk" and _is_time_first_sequence_bias(m):
            raise IncompatibleModelError(
                f"{what} (DPMultiheadAttention(add_bias_kv=True)) runs time-first inside the "
                f"attention, which Opacus' {backend} rule mistakes for batch-first; use "
                "grad-sample-mode bk, or add_bias_kv=False"
            )
        if isinstance(m, nn.EmbeddingBag) and m.mode == "max":
            raise IncompatibleModelError(
                f"{what} has mode='max', for which no per-sample rule exists; use sum or mean"
            )
    if backend == "ghost":
        owners = owned_parameters(model)
        tied = [names for names in owners.values() if len(names) > 1]
        if tied:
            raise IncompatibleModelError(
                f"trainable parameter shared by modules {', '.join(tied[0])}: ghost clipping "
                "adds per-module norms, which is not the norm of the shared gradient; use "
                "grad-sample-mode bk (or freeze the shared parameter)"
            )


def _opacus_rules() -> set:
    from opacus.grad_sample import GradSampleModule

    return set(GradSampleModule.GRAD_SAMPLERS)


def _is_time_first_sequence_bias(m: nn.Module) -> bool:
    t = type(m)
    return (
        t.__name__ == "SequenceBias"
        and t.__module__.startswith("opacus")
        and not getattr(m, "batch_first", True)
    )


def _batch_dim(m: nn.Module) -> int:
    """The dimension of ``m``'s input and output that holds the records."""
    return 1 if _is_time_first_sequence_bias(m) else 0


@contextlib.contextmanager
def backend_errors(backend: str):
    """A per-sample backend failing inside on a model it accepted is a refusal, not a
    traceback: any non-dpfl error becomes :class:`IncompatibleModelError` naming the backend."""
    try:
        yield
    except DpflError:
        raise
    except (
        RuntimeError,
        TypeError,
        ValueError,
        IndexError,
        KeyError,
        AttributeError,
        NotImplementedError,
    ) as e:
        raise IncompatibleModelError(
            f"the {backend} per-sample backend cannot handle this model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); try grad-sample-mode "
            f"{'functorch' if backend == 'bk' else 'bk'}, or simplify the layer named in the error"
        ) from e


# -- the run-time guard --------------------------------------------------------------------------
def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _first_tensor(*objs: Any) -> Tensor | None:
    for obj in objs:
        for t in _tensors(obj):
            return t
    return None


def batch_length(obj: Any) -> int:
    """Records in a batch: the leading dimension of its first tensor (tensors, dicts, tuples,
    ModelOutputs); 0 for a batch that holds no tensor (Opacus' empty fallback)."""
    if isinstance(obj, Tensor):
        return int(obj.shape[0]) if obj.dim() > 0 else 1
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    for item in items:
        if isinstance(item, Tensor | dict | list | tuple):
            return batch_length(item)
    return 0


def slice_records(obj: Any, n: int, start: int, stop: int) -> Any:
    """Records ``start:stop`` of a batch of ``n`` records (every tensor with leading dim n)."""
    if start == 0 and stop >= n:
        return obj
    return _map_batch(obj, n, lambda t: t[start:stop])


def drop_last_record(obj: Any, n: int) -> Any:
    """``obj`` (tensors, tuples, dicts, ModelOutputs) without the last of its ``n`` records."""
    return _map_batch(obj, n, lambda t: t[:-1])


def _map_batch(obj: Any, n: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor whose leading dimension is ``n``."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(_map_batch(o, n, fn) for o in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_map_batch(o, n, fn) for o in obj)
    if isinstance(obj, dict):
        out = {k: _map_batch(v, n, fn) for k, v in obj.items()}
        try:
            return type(obj)(**out)  # transformers' ModelOutput and other dataclass-like dicts
        except TypeError:
            return out
    return obj


class _UseRecorder(TorchFunctionMode):
    """The probe's torch function mode: records operations that read a trainable parameter
    anywhere but in the forward of a module owning it (the innermost module running must be an
    owner: a closure or child module reading a parent's parameter is not covered by the
    parent's per-sample rule), and makes dropout the identity so that the train-mode passes
    are deterministic (other randomness then shows up as mixing and is refused)."""

    def __init__(self, owners: dict[int, set[int]], stack: list[int]) -> None:
        super().__init__()
        self.owners, self.stack = owners, stack
        self.record = True
        self.outside: list[tuple[int, str, int | None]] = []  # (param id, op, enclosing module)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention and kwargs.get("dropout_p"):
            kwargs = {**kwargs, "dropout_p": 0.0}
        result = func(*args, **kwargs)
        if not self.record or _first_tensor(result) is None or _gradient_free(func):
            return result  # metadata (dtype, shape) or a detached view: no gradient flows
        top = self.stack[-1] if self.stack else None
        for t in _tensors((args, kwargs)):
            owners = self.owners.get(id(t))
            if owners is not None and top not in owners:
                op = getattr(func, "__name__", str(func))
                if op == "__get__":
                    op = f".{getattr(getattr(func, '__self__', None), '__name__', '?')}"
                self.outside.append((id(t), op, top))
        return result


_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.nn.functional.dropout,
}
_NO_GRADIENT_ATTRIBUTES = {"data", "grad", "detach", "detach_"}


def _gradient_free(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: Tensor.data carries no gradient, Tensor.T does
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _NO_GRADIENT_ATTRIBUTES


def _digest(t: Tensor) -> Tensor:
    """Per-record summary (sum and sum of squares) of a tensor, to locate mixing cheaply."""
    flat = t.detach().reshape(t.shape[0], -1).double()
    return torch.stack([flat.sum(1), flat.pow(2).sum(1)], 1)


class BatchGuard:
    """Run-time checks of the batch dimension, the trainable set and parameter use.

    Args:
        model: the user's model (hooks are attached to it and removed by :meth:`detach`).
        params: the trainable parameters the private step was built for.
        pinned: frozen eval-mode BatchNorm modules to keep in eval mode.
        backend: the backend name (ghost's extra conditions are checked after the probe).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        pinned: list[nn.Module] = (),
        backend: str = "bk",
    ) -> None:
        self.model, self.backend = model, backend
        self._param_ids = {id(p) for p in params}
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._module_names = {id(m): n for n, m in model.named_modules()}
        owners: dict[int, set[int]] = {}
        self._checked: list[nn.Module] = []
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in self._param_ids]
            for p in own:
                owners.setdefault(id(p), set()).add(id(m))
            if own:
                self._checked.append(m)
        # a module holding only aliases of parameters owned by a descendant (Opacus' DPLSTM)
        # runs them through that descendant: its own inputs need not be batch-first
        self._aliases = {
            id(m)
            for m in self._checked
            if alias_holder(m, [p for p in m.parameters(recurse=False) if id(p) in self._param_ids])
        }
        self._owners = owners
        self._pinned = list(pinned)
        self.batch: int | None = None  # records in the current (last) training forward
        self.losses: int | None = None  # per-sample losses given to backward
        self._in_forward = False
        self._probing = False
        self._probed_full = False
        self._probed_slices = False
        self.calls: dict[int, int] = {}
        self.input_ranks: dict[int, int] = {}
        self._trace: list[tuple[int, Tensor]] = []
        self._sizes: list[tuple[int, list]] = []
        self._forwarded = False
        self._handles = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward),
        ]
        for m in self._checked:
            self._handles.append(m.register_forward_hook(self._check_rows, with_kwargs=True))
        for m in model.modules():
            if isinstance(m, nn.Embedding | nn.EmbeddingBag) and any(
                id(p) in self._param_ids for p in m.parameters(recurse=False)
            ):
                self._handles.append(m.register_forward_pre_hook(self._embedding_ids))
        for m in self._pinned:
            self._handles.append(m.register_forward_pre_hook(self._check_pinned))

    # -- names for messages -----------------------------------------------------------------------
    def _module(self, m: nn.Module | int | None) -> str:
        if m is None:
            return "the model's own forward"
        key = m if isinstance(m, int) else id(m)
        name = self._module_names.get(key, "?")
        return f"'{name or '<model>'}'"

    # -- hooks ------------------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        if (
            self._probing
            or not torch.is_grad_enabled()
            or module is not self.model  # a copy (Opacus' functorch deep-copies modules)
            or torch._C._current_graph_task_id() != -1  # re-run during a backward (vmap rule)
        ):
            return None
        self._forwarded = True
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        if trainable != self._param_ids:
            added = [self._names.get(i, "?") for i in trainable - self._param_ids]
            removed = [self._names.get(i, "?") for i in self._param_ids - trainable]
            change = (
                f"parameter(s) {', '.join(added[:3])} became trainable"
                if added
                else f"parameter(s) {', '.join(removed[:3])} were frozen"
            )
            raise IncompatibleModelError(
                f"{change} after make_private: the private step only clips and noises the "
                "parameters it was built for (an unfrozen one would be stepped with its raw "
                "gradient); call make_private again after changing which parameters train"
            )
        for m in self._pinned:
            m.training = False  # model.train() does not unpin a frozen eval-mode BatchNorm
        first = _first_tensor(args, kwargs)
        self.batch = None if first is None or first.dim() == 0 else int(first.shape[0])
        self.losses = None
        if not self._probed_full or (
            not self._probed_slices and self.batch is not None and self.batch >= 2
        ):
            self._probe(module, args, kwargs)
        self._in_forward = True
        return None

    def _post_forward(self, module, args, output):
        if self._probing or not self._in_forward:
            return None
        self._in_forward = False
        out = _first_tensor(output)
        if (
            self.batch is not None
            and out is not None
            and out.dim() > 0
            and out.shape[0] != self.batch
        ):
            raise IncompatibleModelError(
                f"the model's output has leading dimension {out.shape[0]} for a batch of "
                f"{self.batch} records: per-sample losses must follow the batch (batch-first "
                "inputs and outputs)"
            )
        return None

    def _check_rows(self, module, args, kwargs, output):
        if not (self._in_forward or self._probing) or id(module) in self._aliases:
            return None
        if self._probing:
            self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        n = self.batch
        inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        first = inputs[0] if inputs else None
        if first is not None and self._probing:
            self.input_ranks[id(module)] = max(self.input_ranks.get(id(module), 0), first.dim())
            self._sizes.append((id(module), [t.shape[0] if t.dim() else None for t in inputs]))
            if first.is_floating_point() and first.dim() > 0 and first.shape[0] == n:
                self._trace.append((id(module), _digest(first)))
            if self.backend != "bk" and len(inputs) > 1 and type(module) not in _opacus_rules():
                raise IncompatibleModelError(
                    f"{self._module(module)} ({type(module).__name__}) takes {len(inputs)} tensor "
                    f"inputs; Opacus' {self.backend} rule for modules without a rule of their "
                    "own uses the first only; use grad-sample-mode bk"
                )
        if n is None:
            return None
        dim = _batch_dim(module)
        for kind, t in (("input", first), ("output", _first_tensor(output))):
            if t is not None and (t.dim() <= dim or t.shape[dim] != n):
                rows = "a scalar" if t.dim() == 0 else f"dimension {dim} of size {t.shape[dim]}"
                raise IncompatibleModelError(
                    f"{self._module(module)} ({type(module).__name__}) gets an {kind} with "
                    f"{rows} for a batch of {n} records: every backend clips along the leading "
                    "dimension, so it must be the batch (time-first layers such as "
                    "MultiheadAttention / DPMultiheadAttention / DPLSTM need batch_first=True; "
                    "a layer applied to a reshaped [B*T, ...] tensor must see [B, T, ...])"
                )
        return None

    def _embedding_ids(self, module, args):
        ids = args[0] if args else None
        if not isinstance(ids, Tensor) or ids.dim() == 0:
            return None
        n = self.batch
        if (self._in_forward or self._probing) and n is not None and ids.shape[0] == 1 and n > 1:
            # broadcast ids (Hugging Face position ids [1, T]): one row of ids per record, so
            # each record gets its own per-sample gradient (opacus#841)
            ids = ids.expand(n, *ids.shape[1:])
        if not ids.is_contiguous():
            ids = ids.contiguous()
        if ids is args[0]:
            return None
        return (ids, *args[1:])

    def _check_pinned(self, module, args):
        if module.training:
            raise IncompatibleModelError(
                f"{self._module(module)} ({type(module).__name__}) was accepted as a frozen "
                "eval-mode BatchNorm but is in train mode now (batch statistics mix records); "
                "keep it in eval mode"
            )

    # -- the probe --------------------------------------------------------------------------------
    def _probe(self, model: nn.Module, args, kwargs) -> None:
        n = self.batch
        modes = {m: m.training for m in model.modules()}
        stack: list[int] = []
        hooks = []

        def enter(mod, inputs) -> None:
            stack.append(id(mod))

        def leave(mod, inputs, output) -> None:
            stack.pop()

        for m in model.modules():
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave))
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        state = [*model.named_parameters(), *model.named_buffers()]
        versions = {name: t._version for name, t in state}
        self._probing = True
        try:
            # the probe runs in the modes the model trains in (frozen BatchNorm stays pinned
            # in eval), dropout made the identity, without gradients
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.calls, self.input_ranks, self._trace, self._sizes = {}, {}, [], []
                recorder = _UseRecorder(self._owners, stack)
                with recorder:
                    full = model(*args, **kwargs)
                    self._check_state(state, versions)
                    if recorder.outside:
                        pid, op, where = recorder.outside[0]
                        owners = ", ".join(self._module(o) for o in self._owners[pid])
                        raise IncompatibleModelError(
                            f"trainable parameter '{self._names.get(pid, '?')}' is used outside "
                            f"the forward of its module {owners} (by {op} in "
                            f"{self._module(where)}): per-sample gradients cover what the "
                            "owning module computes itself, so that part of its gradient would "
                            "be missing; call the module instead (for tied weights, a module "
                            "whose weight is the shared parameter), or freeze it"
                        )
                    self._check_ghost()
                    self._probed_full = True
                    if n is not None and n >= 2:
                        recorder.record = False
                        stack.clear()
                        full_trace, self._trace = self._trace, []
                        full_sizes, self._sizes = self._sizes, []
                        self.batch = n - 1
                        fewer = model(*drop_last_record(args, n), **drop_last_record(kwargs, n))
                        self._check_sizes(full_sizes, n)
                        self._compare(full, fewer, n, full_trace)
                        self._probed_slices = True
        except IncompatibleModelError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the probe is a refusal
            raise IncompatibleModelError(
                "the batch probe (the model run on the batch without its last record) failed: "
                f"{type(e).__name__}: {e}; every input tensor whose leading dimension is the "
                "batch size is treated as per-record"
            ) from None
        finally:
            self._probing = False
            self.batch = n
            for h in hooks:
                h.remove()
            for m, mode in modes.items():
                m.training = mode

    def _check_state(self, state: list, versions: dict) -> None:
        """A forward that writes parameters or buffers in place (running statistics, EMA
        buffers, ``p.data.add_``) changes released state outside any clipped gradient."""
        for name, t in state:
            if t._version != versions[name]:
                owner = name.rsplit(".", 1)[0] if "." in name else "<model>"
                raise IncompatibleModelError(
                    f"the forward writes '{name}' in place (in module '{owner}'): state updated "
                    "from the batch is released with the model outside any clipped gradient, "
                    "and mixes records; compute it without writing, or freeze the module in "
                    "eval mode"
                )

    def _check_sizes(self, full: list, n: int) -> None:
        """Inputs whose leading dimension equals the batch size by coincidence (a [B, d]
        buffer when T == B) would be taken for per-record ones."""
        for (mod, sizes), (mod2, sizes2) in zip(full, self._sizes, strict=False):
            if mod != mod2:
                break
            for k, (s, s2) in enumerate(zip(sizes, sizes2, strict=False)):
                if s == n and s2 != n - 1:
                    raise IncompatibleModelError(
                        f"{self._module(mod)} gets an input (#{k + 1}) whose leading dimension "
                        f"equals the batch size ({n}) but does not follow the batch: it would be "
                        "taken for a per-record input; give it another shape (e.g. [1, ...])"
                    )

    def _compare(self, full: Any, fewer: Any, n: int, trace: list) -> None:
        a = [t for t in _tensors(full) if t.dim() > 0 and t.shape[0] == n]
        b = [t for t in _tensors(fewer) if t.dim() > 0 and t.shape[0] == n - 1]
        if len(a) != len(b):
            raise IncompatibleModelError(
                f"the model's outputs do not follow the batch: {len(a)} output tensor(s) have "
                f"{n} rows for {n} records but {len(b)} have {n - 1} rows for {n - 1} records"
            )
        for x, y in zip(a, b, strict=True):
            if x.shape[1:] != y.shape[1:]:
                raise IncompatibleModelError(
                    "the model's output shape changes with the batch size beyond the batch "
                    f"dimension ({tuple(x.shape)} vs {tuple(y.shape)})"
                )
            if not x.is_floating_point() or not x.numel():
                continue
            gap = float((x[:-1].double() - y.double()).abs().max())
            if gap > _tolerance(x):
                raise IncompatibleModelError(
                    "removing one record changed the outputs of the others (max difference "
                    f"{gap:.3g}): the model mixes records across the batch{self._mixing(trace)}, "
                    "so one record's influence is not bounded by its own clipped gradient (a "
                    "layer using batch statistics, or a time-first layer fed batch-first data)"
                )

    def _mixing(self, trace: list) -> str:
        """Names the first parameterized module whose input already depends on other records."""
        for (m_full, d_full), (m_less, d_less) in zip(trace, self._trace, strict=False):
            if m_full != m_less:
                break
            scale = max(1.0, float(d_full.abs().max()))
            if float((d_full[:-1] - d_less).abs().max()) > 1e-4 * scale:
                return f" before {self._module(m_full)} (its input changed)"
        return ""

    def _check_ghost(self) -> None:
        if self.backend != "ghost":
            return
        for m in self._checked:
            if self.calls.get(id(m), 0) > 1:
                raise IncompatibleModelError(
                    f"{self._module(m)} ({type(m).__name__}) is called {self.calls[id(m)]} "
                    "times per forward: ghost clipping adds per-call norms, which is not the "
                    "norm of the summed gradient; use grad-sample-mode bk"
                )
            if isinstance(m, nn.Linear) and self.input_ranks.get(id(m), 0) > 3:
                raise IncompatibleModelError(
                    f"{self._module(m)} (Linear) gets a {self.input_ranks[id(m)]}-D input, which "
                    "Opacus' ghost norm does not handle; use grad-sample-mode bk"
                )

    # -- per step ---------------------------------------------------------------------------------
    def note_losses(self, count: int) -> None:
        if self.batch is not None and count != self.batch:
            raise IncompatibleModelError(
                f"{count} per-sample losses for a forward of {self.batch} records: give one "
                "loss per record (reduction='none', batch-first)"
            )
        self.losses = count

    def check_rows(self, rows: int) -> None:
        """The backend produced ``rows`` per-sample rows for the last backward."""
        forwarded, self._forwarded = self._forwarded, False
        if not forwarded:
            raise IncompatibleModelError(
                "per-sample gradients arrived without a forward of the model itself (were its "
                "submodules called directly?): the checks run on the model's forward; call "
                "the model (pt.model(...)) and put the rest in its forward"
            )
        for what, n in (("records in the forward", self.batch), ("per-sample losses", self.losses)):
            if n is not None and rows != n:
                raise IncompatibleModelError(
                    f"the per-sample backend produced {rows} rows for {n} {what}: a layer does "
                    "not keep the batch as its leading dimension"
                )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _tolerance(x: Tensor) -> float:
    """What batch-size-dependent rounding may change in ``x`` (float32: 1e-4 relative)."""
    return max(1e-4, 64 * torch.finfo(x.dtype).eps) * max(1.0, float(x.abs().max()))
