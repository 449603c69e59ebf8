"""Parameter roles for hybrid local solvers: ``hidden``, ``embedding``, ``head``, ``vector``.

Memory-efficient optimizers treat parameter classes differently (Muon/SWAN/SinkGD/SCALE act on
hidden matrices; embeddings, the output layer and 1-D gains/biases get AdamW or momentum), and the
private step wraps ONE optimizer, so every such optimizer is one ``torch.optim.Optimizer`` whose
param groups carry a ``"role"`` (spec ``optimizers.md`` 0.2). Roles come from module types, never
from module names (name matching silently misclassifies non-LLaMA models, spec 2.5):

* ``vector``: trainable tensors with at most one dimension;
* ``embedding``: weights of ``nn.Embedding`` / ``nn.EmbeddingBag``;
* ``head``: the weight of the LAST trainable ``nn.Linear`` in module order (a classifier or LM
  head; in a peft model, the ``modules_to_save`` copy of the classifier); ours, for models
  without explicit roles;
* ``hidden``: every other trainable tensor with 2+ dimensions (linear and conv weights, LoRA A/B).

``overrides`` maps parameter names to roles for anything the rule gets wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dpfl.errors import ConfigError

__all__ = ["ROLES", "assign_roles", "role_param_groups"]

ROLES = ("hidden", "embedding", "head", "vector")


def assign_roles(model: nn.Module, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{parameter name: role}`` for every trainable parameter of ``model``."""
    overrides = dict(overrides or {})
    for name, role in overrides.items():
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r} for {name}; valid: {', '.join(ROLES)}")
    embedding_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.weight.requires_grad
    }
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    head_id = id(linears[-1].weight) if linears else None
    roles: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in overrides:
            roles[name] = overrides[name]
        elif p.dim() <= 1:
            roles[name] = "vector"
        elif id(p) in embedding_ids:
            roles[name] = "embedding"
        elif id(p) == head_id:
            roles[name] = "head"
        else:
            roles[name] = "hidden"
    unknown = set(overrides) - set(roles)
    if unknown:
        raise ConfigError(
            f"role overrides name no trainable parameter: {', '.join(sorted(unknown))}"
        )
    return roles


def role_param_groups(
    model: nn.Module,
    overrides: Mapping[str, str] | None = None,
    **per_role: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One param group per non-empty role, ``{"params": [...], "role": role, **per_role[role]}``."""
    roles = assign_roles(model, overrides)
    named = dict(model.named_parameters())
    groups = []
    for role in ROLES:
        params = [named[n] for n, r in roles.items() if r == role]
        if params:
            groups.append({"params": params, "role": role, **dict(per_role.get(role, {}))})
    return groups
