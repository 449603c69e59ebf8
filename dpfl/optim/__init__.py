"""Local solvers: plain ``torch.optim.Optimizer`` s, looked up by name."""

from dpfl.optim.registry import OPTIMIZERS, create_optimizer

__all__ = ["OPTIMIZERS", "create_optimizer"]
