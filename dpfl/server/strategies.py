"""Server strategies by name: how valid client replies become the next global model.

* ``fedavg``: mean of client models weighted by their number of examples (McMahan et al. 2017)
  without DP; UNWEIGHTED (each client weight 1) under DP (our choice): a client under DP does
  not send its exact number of examples, and weights drawn from the records would make the
  aggregate depend on something the guarantee does not cover;
* ``fedprox``: the same aggregation; clients add the proximal term (``federation.proximal-mu``);
* ``median`` / ``trimmed-mean``: coordinate-wise robust aggregation (Yin et al. 2018);
* ``dp-fedavg``: user-level DP (McMahan et al. 2018; spec 6.3-6.4): clients send updates
  clipped to S; the server re-clips them (so a misbehaving client cannot raise the
  sensitivity), sums them UNWEIGHTED, adds N(0, (z_g S)^2) from a seeded generator, divides by the
  expected number of clients m = q K and steps theta += eta_s * mean. Adaptive clipping tracks the
  target unclipped quantile with a privatized count of unclipped updates (sensitivity 1/2 after
  centering, sigma_b = m / 20), moving S UP when most updates are clipped (Flower's own wrapper
  moves it the other way); the noise split z_g = (z^-2 - (2 sigma_b)^-2)^-1/2 keeps the pair of
  releases one Gaussian mechanism of multiplier z, which is what the server accountant records
  (participant ``server``, sampling rate q, one event per round, before the release).
  The unclipped bit of each update is the one its client reports (``unclipped``): a client-clipped
  update has norm S up to rounding, so the server cannot tell clipped from unclipped by the norm
  (it still counts an update it had to re-clip as clipped). The server is the trusted curator:
  it uses the bits, but publishes (``summary``) only the noisy fraction, the clip and the next
  clip. With ``privacy.secure-mode`` both noises come from the OS CSPRNG; otherwise from a
  generator seeded by the run seed (reproducible, so whoever knows the seed, which the run
  store records, can subtract the noise).

* ``lora-fedavg``: FedAvg on a LoRA model's adapters: clients train A and B, the server averages
  each separately (what Flower's FlowerTune does);
* ``ffa-lora``: A frozen at its (shared) random init on every client, clients train and send only
  B (and the head), the server averages B (Sun et al., ICLR 2024);
* ``fedsvd``: as ffa-lora on the clients; the server then re-factorizes every layer's averaged
  ``B A`` into ``A = V^T`` (orthonormal rows) and ``B = U S`` (:func:`dpfl.lora.refactorize`) and
  sends both (Lee et al., NeurIPS 2025; every ``federation.svd-period`` rounds after
  ``federation.svd-warmup``; period 0 is ffa-lora).

Each strategy declares once what its clients do (:class:`ClientBehaviour`: what to freeze, what
to send, how to wrap the solver); the client asks :func:`client_behaviour` and never tests the
strategy's name.

Sample-level DP (``privacy.level = "sample"``) needs nothing from the strategy: the clients'
releases are already private and any aggregation of them (averaging, FedSVD's SVD) is
post-processing, charged nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dpfl.accountants import PrivacyLedger
from dpfl.config import CLIP_LR_PER_ROUND, Config
from dpfl.errors import ConfigError
from dpfl.lora import is_lora_a, refactorize_state
from dpfl.privacy.noise import gaussian_like
from dpfl.registry import Registry
from dpfl.server.aggregation import (
    State,
    add_scaled,
    coordinate_median,
    flat_clip,
    trimmed_mean,
    weighted_average,
)

__all__ = [
    "STRATEGIES",
    "ClientBehaviour",
    "Reply",
    "Strategy",
    "client_behaviour",
    "create_strategy",
]


@dataclass(frozen=True)
class ClientBehaviour:
    """What a strategy asks of each client: a pure description, applied by the client.

    ``freeze_lora_a``: every LoRA A stays as received (requires_grad off before the solver and
    the private step are built), and the reply leaves the A tensors out (the server keeps its
    own); ``proximal_mu``: FedProx's proximal term on the solver.
    """

    freeze_lora_a: bool = False
    proximal_mu: float = 0.0

    def prepare(self, model: torch.nn.Module) -> None:
        if self.freeze_lora_a:
            for name, p in model.named_parameters():
                if is_lora_a(name):
                    p.requires_grad_(False)

    def sends(self, key: str) -> bool:
        return not (self.freeze_lora_a and is_lora_a(key))

    def reply(self, state: State) -> State:
        """The part of a client's trainable state its reply carries."""
        return {k: v for k, v in state.items() if self.sends(k)}

    def wrap_optimizer(
        self, opt: torch.optim.Optimizer, model: torch.nn.Module, global_state: State
    ) -> torch.optim.Optimizer:
        if self.proximal_mu <= 0:
            return opt
        from dpfl.clients.proximal import ProximalOptimizer

        anchor = [
            global_state[n].to(p.device) for n, p in model.named_parameters() if p.requires_grad
        ]
        return ProximalOptimizer(opt, anchor, self.proximal_mu)


@dataclass
class Reply:
    """A validated client reply."""

    node_id: int
    participant: str
    arrays: State
    num_examples: int
    metrics: dict[str, float]


class Strategy:
    name = ""
    #: clients send their clipped update instead of their model
    sends_updates = False

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Strategy:
        return cls()

    @classmethod
    def client_behaviour(cls, cfg: Config) -> ClientBehaviour:
        """What this strategy's clients do (declared once, per strategy)."""
        return ClientBehaviour()

    def reply_reference(self, global_state: State, cfg: Config) -> State:
        """The tensors a valid reply holds (names, shapes, dtypes), given the global state."""
        keep = self.client_behaviour(cfg).sends
        if self.sends_updates:
            return {k: v for k, v in global_state.items() if v.is_floating_point() and keep(k)}
        return {k: v for k, v in global_state.items() if keep(k)}

    def client_config(self) -> dict[str, Any]:
        """Extra per-round values sent to every sampled client."""
        return {}

    def aggregate(self, global_state: State, replies: list[Reply], server_round: int) -> State:
        raise NotImplementedError

    def summary(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, weighted: bool = True) -> None:
        #: weight by num-examples (no DP) or not (DP: each client weight 1, our choice)
        self.weighted = weighted

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Strategy:
        return cls(weighted=not cfg.privacy.enabled)

    def aggregate(self, global_state, replies, server_round):
        weights = [r.num_examples if self.weighted else 1 for r in replies]
        # what the replies leave out (ffa-lora's frozen A) stays as the server has it
        return {**global_state, **weighted_average([r.arrays for r in replies], weights)}


class FedProx(FedAvg):
    name = "fedprox"

    @classmethod
    def client_behaviour(cls, cfg: Config) -> ClientBehaviour:
        return ClientBehaviour(proximal_mu=cfg.federation.proximal_mu)


class LoraFedAvg(FedAvg):
    """FedAvg of a LoRA model's adapters: A and B trained and averaged separately."""

    name = "lora-fedavg"


class FFALoRA(FedAvg):
    """FFA-LoRA: A frozen at its shared init, only B (and the head) trained, sent, averaged."""

    name = "ffa-lora"

    @classmethod
    def client_behaviour(cls, cfg: Config) -> ClientBehaviour:
        return ClientBehaviour(freeze_lora_a=True)


class FedSVD(FFALoRA):
    """FedSVD: FFA-LoRA's clients; the server re-factorizes each averaged ``B A`` by SVD."""

    name = "fedsvd"

    def __init__(self, weighted: bool, period: int, warmup: int) -> None:
        super().__init__(weighted)
        self.period, self.warmup = period, warmup

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Strategy:
        f = cfg.federation
        return cls(not cfg.privacy.enabled, f.svd_period, f.svd_warmup)

    def refactorizes(self, server_round: int) -> bool:
        """Whether round ``server_round``'s aggregate is re-factorized (the official code's
        rule: every ``period`` rounds, after ``warmup`` rounds; never with period 0)."""
        return self.period > 0 and server_round % self.period == 0 and server_round > self.warmup

    def aggregate(self, global_state, replies, server_round):
        # B_{t+1/2} = mean of the clients' B (= B_t + mean delta B: every client started at B_t)
        half = super().aggregate(global_state, replies, server_round)
        return refactorize_state(half) if self.refactorizes(server_round) else half


class Median(Strategy):
    name = "median"

    def aggregate(self, global_state, replies, server_round):
        return {**global_state, **coordinate_median([r.arrays for r in replies])}


class TrimmedMean(Strategy):
    name = "trimmed-mean"

    def __init__(self, trim_fraction: float) -> None:
        self.trim_fraction = trim_fraction

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Strategy:
        return cls(cfg.federation.trim_fraction)

    def aggregate(self, global_state, replies, server_round):
        return {**global_state, **trimmed_mean([r.arrays for r in replies], self.trim_fraction)}


class DPFedAvg(Strategy):
    """User-level DP-FedAvg (see the module docstring)."""

    name = "dp-fedavg"
    sends_updates = True

    def __init__(self, cfg: Config, ledger: PrivacyLedger, noise_multiplier: float) -> None:
        f, p = cfg.federation, cfg.privacy
        self.noise_multiplier = noise_multiplier
        self.sample_rate = f.fraction
        self.expected_clients = f.fraction * f.num_clients
        self.clip = p.clip_norm
        self.adaptive = p.clipping == "adaptive"
        self.target_quantile = p.target_quantile
        self.clip_lr = CLIP_LR_PER_ROUND if p.clip_lr is None else p.clip_lr
        self.count_std = p.count_noise_std or self.expected_clients / 20
        self.server_lr = f.server_lr
        self.ledger = ledger
        self.secure = p.secure_mode
        self.generator = torch.Generator().manual_seed(cfg.seed + 17)
        self.last_clip = self.clip
        self.last_fraction: float | None = None  # the released (noisy) unclipped fraction
        if self.adaptive and noise_multiplier > 0 and noise_multiplier >= 2 * self.count_std:
            raise ConfigError(
                f"adaptive dp-fedavg needs noise multiplier {noise_multiplier:g} < 2 * count noise "
                f"std = {2 * self.count_std:g}; sample more clients per round or set "
                "privacy.count-noise-std"
            )

    @classmethod
    def from_config(
        cls, cfg: Config, *, ledger: PrivacyLedger, noise_multiplier: float, **_: Any
    ) -> Strategy:
        return cls(cfg, ledger, noise_multiplier)

    def gradient_multiplier(self) -> float:
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        return (z**-2 - (2 * self.count_std) ** -2) ** -0.5

    def client_config(self) -> dict[str, Any]:
        return {"dpfl.clip": self.clip}

    def aggregate(self, global_state, replies, server_round):
        # 1. account the release first (raises PrivacyBudgetError: nothing is released)
        self.ledger.record("server", self.noise_multiplier, self.sample_rate, 1, round=server_round)
        clip = self.clip  # the clip sent to this round's clients (client_config)
        total: State | None = None
        unclipped = 0.0  # private: only its noisy version leaves this method
        for r in replies:
            update, norm = flat_clip(r.arrays, clip)  # defensive re-clip: sensitivity is S
            unclipped += _unclipped_bit(r, norm, clip)
            total = update if total is None else {k: total[k] + update[k] for k in total}
        if total is None:
            raise ConfigError("dp-fedavg cannot aggregate a round without replies")
        std = self.gradient_multiplier() * clip
        mean = {
            k: (v + gaussian_like(v, std, self.generator, self.secure)) / self.expected_clients
            for k, v in total.items()
        }
        self.last_clip = clip
        if self.adaptive:
            noise = self._standard_normal()
            # centred bits b - 1/2 (sensitivity 1/2), noised, then un-centred: the release
            frac = (unclipped - 0.5 * len(replies) + self.count_std * noise) / self.expected_clients
            frac += 0.5
            self.last_fraction = frac
            self.clip = clip * math.exp(
                -self.clip_lr * (min(max(frac, 0.0), 1.0) - self.target_quantile)
            )
        return add_scaled(global_state, mean, self.server_lr)

    def _standard_normal(self) -> float:
        ref = torch.zeros((), dtype=torch.float64)
        return float(gaussian_like(ref, 1.0, self.generator, self.secure))

    def summary(self) -> dict[str, float]:
        """What the server publishes: the clip used, the next clip and (adaptive) the noisy
        unclipped fraction; never the raw count."""
        out = {"clip": self.last_clip, "next-clip": self.clip}
        if self.adaptive and self.last_fraction is not None:
            out["noisy-unclipped-fraction"] = self.last_fraction
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])
        self.generator.set_state(state["generator"])


def _unclipped_bit(reply: Reply, norm: float, clip: float) -> float:
    """1 for an update its client left unclipped, else 0 (always in {0, 1}: sensitivity holds
    whatever a client sends). The client's bit when it reports one; an update the server had to
    re-clip (norm above S beyond rounding) counts as clipped."""
    if norm > clip * (1 + 1e-5):
        return 0.0
    reported = reply.metrics.get("unclipped")
    if reported is None:
        return 1.0 if norm <= clip else 0.0
    return 1.0 if reported == 1.0 else 0.0


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
for _cls in (FedAvg, FedProx, LoraFedAvg, FFALoRA, FedSVD, Median, TrimmedMean, DPFedAvg):
    STRATEGIES.register(_cls.name, _cls)


def create_strategy(cfg: Config, **kwargs: Any) -> Strategy:
    return STRATEGIES.get(cfg.federation.strategy).from_config(cfg, **kwargs)


def client_behaviour(cfg: Config) -> ClientBehaviour:
    """What the configured strategy asks of its clients."""
    return STRATEGIES.get(cfg.federation.strategy).client_behaviour(cfg)
