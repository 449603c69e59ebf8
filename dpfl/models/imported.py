"""Users' own models: a factory named by an import string, or a checkpoint file.

* ``model.path = "package.module:factory"`` (Flower's form for app components): the factory (a
  function or an ``nn.Module`` class) is called with those of the keyword arguments
  ``channels=``, ``image_size=``, ``num_classes=`` that it accepts (all of them if it takes
  ``**kwargs``, none if it takes none) and must return a ``torch.nn.Module`` whose output for a
  batch of records ``[B, channels, image_size, image_size]`` is logits ``[B, num_classes]`` (checked
  on a batch of zeros, in eval mode, before training). The module must be importable from where
  dpfl runs (installed, or on ``PYTHONPATH``); dpfl does not add directories to the import path.
* ``model.path = "weights.pt"``: a ``state_dict`` saved with ``torch.save(model.state_dict(), f)``,
  loaded with ``torch.load(weights_only=True)`` (no code from the file runs) into the built-in model
  ``model.name``. A dict holding it under ``state_dict`` / ``model_state_dict`` is accepted, and the
  ``_module.`` prefix of an Opacus ``GradSampleModule`` (or ``module.`` of ``DataParallel``) is
  removed. Every key and shape must match.

Either way the model then goes through the private step's validation like a built-in one
(BatchNorm and other layers that mix records are refused). Weights loaded from a checkpoint are
taken as public: weights trained on the same private records without DP void the guarantee.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from dpfl.errors import ConfigError, DpflError

__all__ = ["build_from_factory", "load_checkpoint"]

_SHAPE_ARGS = ("channels", "image_size", "num_classes")


def _fail(spec: str, problem: str) -> ConfigError:
    return ConfigError(f"model.path {spec!r}: {problem}")


def _import(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            top = module_name.split(".")[0]
            here = os.path.exists(f"{top}.py") or os.path.isdir(top)
            hint = (
                f" ({top} is in the current directory, which is not on Python's import path: "
                "run with PYTHONPATH=$PWD, or install it)"
                if here
                else " (install it, or put its folder on PYTHONPATH)"
            )
            raise _fail(spec, f"no module named {missing!r}{hint}") from None
        raise _fail(spec, f"importing {module_name} failed: {e}") from None
    except Exception as e:  # a user module's own error on import (SyntaxError, ...)
        raise _fail(spec, f"importing {module_name} failed: {type(e).__name__}: {e}") from None
    try:
        return functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise _fail(spec, f"module {module_name} has no attribute {attr!r}") from None


def _shape_kwargs(spec: str, factory, shape: Mapping[str, int]) -> dict[str, int]:
    """The keyword arguments of ``shape`` that ``factory`` accepts."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): call it bare
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(shape)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in shape
    ]
    if required:
        raise _fail(
            spec,
            f"the factory requires {', '.join(map(repr, required))}, which dpfl cannot give (it "
            f"passes only {', '.join(_SHAPE_ARGS)}): give them defaults, or wrap it",
        )
    return {k: v for k, v in shape.items() if k in named}


def _check_output(spec: str, model: nn.Module, channels: int, image_size: int, k: int) -> None:
    """One forward of two zero records: the model must map them to logits ``[2, k]``."""
    try:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        x = torch.zeros(2, channels, image_size, image_size, device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            model.train(was_training)
    except DpflError:
        raise
    except Exception as e:
        raise _fail(
            spec,
            f"the model fails on a batch of records [{channels}, {image_size}, {image_size}] "
            f"(float32), as dpfl feeds them: {type(e).__name__}: {e}",
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, k):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(
            spec,
            f"the model must return logits [batch, num_classes] = [2, {k}] for 2 records, got "
            f"{got}",
        )


def build_from_factory(spec: str, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Imports ``package.module:factory``, calls it, and checks that it returns a usable model.

    Raises:
        ConfigError: the module does not import, the attribute is missing or not callable, the
            factory raises or needs other arguments, or what it returns is no ``nn.Module`` with
            logits ``[B, num_classes]``.
    """
    factory = _import(spec)
    if not callable(factory):
        raise _fail(spec, f"{type(factory).__name__} is not callable (name a function or class)")
    shape = {"channels": channels, "image_size": image_size, "num_classes": num_classes}
    kwargs = _shape_kwargs(spec, factory, shape)
    try:
        model = factory(**kwargs)
    except DpflError:
        raise
    except Exception as e:
        raise _fail(spec, f"the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise _fail(spec, f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    _check_output(spec, model, channels, image_size, num_classes)
    return model


def _unwrap(state: object) -> object:
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                return state[key]
    return state


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in ("_module.", "module."):
        if state and not set(state) & expected and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _keys(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """Loads the ``state_dict`` at ``path`` into ``model`` (the built-in ``name``), strictly.

    Raises:
        ConfigError: the file does not load as a tensor dict (weights only), or its keys or
            shapes do not match the model's.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise _fail(
                path,
                "not a torch.save file; save the weights with torch.save(model.state_dict(), path)",
            ) from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it holds a {found.group(1)})" if found else ""
        raise _fail(
            path,
            f"holds objects besides tensors{what}, which dpfl does not unpickle "
            "(torch.load(weights_only=True)); save the weights with "
            "torch.save(model.state_dict(), path)",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _fail(
            path,
            f"not a torch.save file ({type(e).__name__}: {first}); save the weights with "
            "torch.save(model.state_dict(), path)",
        ) from None
    state = _unwrap(state)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _fail(
            path,
            f"holds a {type(state).__name__}, not a state_dict of tensors; save it with "
            "torch.save(model.state_dict(), path)",
        )
    own = model.state_dict()
    state = _strip_prefix(dict(state), set(own))
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    shapes = sorted(
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"keys the model has and the file lacks: {_keys(missing)}")
    if unexpected:
        problems.append(f"keys the model lacks: {_keys(unexpected)}")
    if shapes:
        problems.append(f"shapes (file vs model) differ: {_keys(shapes, 3)}")
    if problems:
        raise _fail(
            path,
            f"does not fit model {name!r} for this data ({'; '.join(problems)}); the checkpoint "
            "must be a state_dict of the same model.name on data of the same shape and classes",
        )
    model.load_state_dict(state, strict=True)
