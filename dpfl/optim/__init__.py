"""Local solvers: plain ``torch.optim.Optimizer`` s, looked up by name."""

from dpfl.optim.registry import DESCRIPTIONS, OPTIMIZERS, create_optimizer
from dpfl.optim.roles import ROLES, assign_roles, role_param_groups

__all__ = [
    "DESCRIPTIONS",
    "OPTIMIZERS",
    "ROLES",
    "assign_roles",
    "create_optimizer",
    "role_param_groups",
]
