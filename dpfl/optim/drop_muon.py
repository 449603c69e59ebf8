"""Drop-Muon: Muon that updates only a random suffix of the layers each step (Gruntkowska et al.,
arXiv 2510.02239; spec ``optimizers.md`` 7.3; official code not found).

Randomized progressive training: the trainable tensors, in model order, form blocks 1..b; each
step a cut-off s is drawn uniformly from {1..b} with a generator seeded by ``(seed, step)`` (so
every client of a round draws the same), and only blocks s..b are updated; the others keep their
weights AND their optimizer state. Updated blocks follow :class:`MuonHybrid` (Muon on hidden
matrices, AdamW elsewhere). Under DP the per-sample gradients are still computed for every layer
(no backward saving here): skipping updates of some noisy coordinates is post-processing.
"""

from __future__ import annotations

import torch

from dpfl.optim.muon import MuonHybrid

__all__ = ["DropMuon"]


class DropMuon(MuonHybrid):
    def __init__(self, params, *, seed: int = 0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.seed = seed
        self.step_count = 0
        self.last_cutoff = 0

    def blocks(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def before_step(self) -> None:
        blocks = self.blocks()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_count)
        self.last_cutoff = int(torch.randint(len(blocks), (1,), generator=gen))
        self._frozen = {id(p) for p in blocks[: self.last_cutoff]}
        self.step_count += 1

    def skip(self, p: torch.Tensor) -> bool:
        return id(p) in self._frozen

    def state_dict(self):  # type: ignore[override]
        return super().state_dict() | {"drop_muon": {"step_count": self.step_count}}

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        self.step_count = state_dict.pop("drop_muon", {"step_count": 0})["step_count"]
        super().load_state_dict(state_dict)
