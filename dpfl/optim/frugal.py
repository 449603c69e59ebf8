"""FRUGAL: full-rank updates with gradient splitting (Zmushko, Beznosikov, Takac, Horvath, ICML
2025; spec ``optimizers.md`` section 5, following the authors' code).

Each hidden matrix's gradient is split in two parts that together cover every coordinate exactly
once: a state-full part updated by AdamW and a state-free remainder updated by signSGD (``"sign"``),
SGD (``"sgd"``) or not at all (``"none"``), at ``lr * inactive_lr_scale``.

* ``mode="blockwise"`` (the paper's main configuration): every ``update_gap`` steps (and at the
  first), ``round(density * n_hidden)`` hidden tensors become active (fresh Adam state; the others
  drop theirs), chosen by a generator seeded with ``(seed, period)`` so that every client of a
  federation picks the same set (spec 5.6), in ``"random"`` or ``"descending"`` order;
* ``mode="svd"`` / ``"random"``: every ``update_gap`` steps a rank-r projector P on the larger side
  (r = round(density * that side)) from the SVD of the current gradient or a random semi-orthogonal
  matrix; Adam runs on the projected gradient, the residual g - up(down(g)) takes the state-free
  rule.

Non-hidden parameters: AdamW. With DP, prefer blockwise or random projections (DP flattens the
gradient spectrum, so SVD buys little; spec 0.2); Adam parts take DP-AdamBC.
"""

from __future__ import annotations

import torch

from dpfl.errors import ConfigError
from dpfl.optim._common import MatrixOptimizer, adamw_update

__all__ = ["FRUGAL"]


class FRUGAL(MatrixOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        density: float = 0.25,
        update_gap: int = 200,
        mode: str = "blockwise",
        block_order: str = "random",
        inactive_update_rule: str = "sign",
        inactive_lr_scale: float = 1.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adam_lr: float | None = None,
        seed: int = 0,
    ) -> None:
        if not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {density}")
        if update_gap < 1:
            raise ConfigError(f"update_gap must be >= 1, got {update_gap}")
        if mode not in ("blockwise", "svd", "random"):
            raise ConfigError(f"mode must be blockwise, svd or random, got {mode!r}")
        if block_order not in ("random", "descending"):
            raise ConfigError(f"block_order must be random or descending, got {block_order!r}")
        if inactive_update_rule not in ("sign", "sgd", "none"):
            raise ConfigError(
                f"inactive_update_rule must be sign, sgd or none, got {inactive_update_rule!r}"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                adam_lr=lr if adam_lr is None else adam_lr,
            ),
        )
        self.density, self.update_gap, self.mode = density, update_gap, mode
        self.block_order, self.rule = block_order, inactive_update_rule
        self.inactive_lr_scale, self.seed = inactive_lr_scale, seed
        self.step_count = 0
        self.active: set[int] = set()

    def hidden_params(self) -> list[torch.Tensor]:
        return [
            p
            for g in self.param_groups
            if g["role"] in self.matrix_roles
            for p in g["params"]
            if p.dim() >= 2
        ]

    def before_step(self) -> None:
        if self.mode == "blockwise" and self.step_count % self.update_gap == 0:
            hidden = self.hidden_params()
            k = max(1, round(self.density * len(hidden))) if hidden else 0
            period = self.step_count // self.update_gap
            if self.block_order == "random":
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + period)
                order = torch.randperm(len(hidden), generator=gen).tolist()
            else:  # cycle from the last tensor backwards, continuing each period
                order = [
                    (len(hidden) - 1 - (period * k + i)) % len(hidden) for i in range(len(hidden))
                ]
            self.active = {id(hidden[i]) for i in order[:k]}
            for p in hidden:  # reset statistics: inactive tensors hold no state
                self.state[p].clear()
        self.step_count += 1

    def _state_free(self, p, residual, group) -> None:
        lr = group["lr"] * self.inactive_lr_scale
        if self.rule == "sign":
            p.add_(residual.sign(), alpha=-lr)
        elif self.rule == "sgd":
            p.add_(residual, alpha=-lr)

    def _adam(self, p, g, state, group) -> None:
        adamw_update(
            p,
            g,
            state,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=0.0,
            noise_var=group["dp_noise_var"],
        )

    def matrix_step(self, p, grad, state, group) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        if self.mode == "blockwise":
            if id(p) in self.active:
                self._adam(p, grad, state, group)
            else:
                self._state_free(p, grad, group)
            return
        g = grad.reshape(p.shape[0], -1)
        rows, cols = g.shape
        right = (
            rows >= cols
        )  # project the larger dimension's complement: keep state on the small side
        side = cols if right else rows
        r = max(1, round(self.density * side))
        if "projector" not in state or (self.step_count - 1) % self.update_gap == 0:
            state.pop("adam", None)
            if self.mode == "svd":
                u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
                proj = vh[:r] if right else u[:, :r].T
            else:
                gen = torch.Generator().manual_seed(
                    self.seed * 1_000_003 + (self.step_count - 1) // self.update_gap
                )
                q, _ = torch.linalg.qr(torch.randn(side, r, generator=gen))
                proj = q.T
            state["projector"] = proj.to(g.dtype)  # r x side, orthonormal rows
        proj = state["projector"]
        low = g @ proj.T if right else proj @ g  # down(g)
        up = low @ proj if right else proj.T @ low  # up(down(g))
        adam_state = state.setdefault("adam", {})
        delta = torch.zeros_like(low)
        before = delta.clone()
        adamw_update(
            delta,
            low,
            adam_state,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=0.0,
            noise_var=group["dp_noise_var"],
        )
        step_low = delta - before  # the Adam step in the subspace
        p.add_((step_low @ proj if right else proj.T @ step_low).reshape(p.shape))
        self._state_free(p, (g - up).reshape(p.shape), group)

    @staticmethod
    def split(
        g: torch.Tensor, proj: torch.Tensor, right: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected part, residual) of a 2-D gradient: they sum to ``g`` exactly."""
        low = g @ proj.T if right else proj @ g
        up = low @ proj if right else proj.T @ low
        return up, g - up

    def state_dict(self):  # type: ignore[override]
        hidden = self.hidden_params()
        return super().state_dict() | {
            "frugal": {
                "step_count": self.step_count,
                "active": [i for i, p in enumerate(hidden) if id(p) in self.active],
            }
        }

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        extra = state_dict.pop("frugal", {"step_count": 0, "active": []})
        super().load_state_dict(state_dict)
        hidden = self.hidden_params()
        self.step_count = extra["step_count"]
        self.active = {id(hidden[i]) for i in extra["active"]}
