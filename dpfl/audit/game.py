"""The membership-inference audit game on a centrally trained model (``dpfl audit run``).

Several-samples-per-model heuristic (Zanella-Beguelin et al. 2023; spec 5.1, its validation
details were not found): per model, ``canaries`` challenge points are drawn from the training
split and turned into canaries (mislabelled: a seeded random wrong label); each gets an
independent fair coin flip, members are trained on, non-members are not (nor are they anywhere
else in the training set). After training, two attacks guess membership from each canary's loss:

* ``loss``: member iff its loss is at most the model's mean loss on its (non-canary) training data
  (Yeom et al. 2018's threshold);
* ``score``: member iff its loss is below a threshold calibrated on SHADOW canaries: mislabelled
  held-out points that were never trained on; the threshold is their ``shadow-fpr`` quantile, so
  it targets that false-positive rate and never looks at the evaluated guesses.

The (guess, bit) pairs of all models are pooled into counts and turned into a posterior over
epsilon (:mod:`dpfl.audit.posterior`), reported next to Clopper-Pearson.

Degenerate counts (an attack that guesses almost everything "non-member", e.g. TP 0, TN 57, FP 0,
FN 43) are no evidence of leakage: their lower bound is 0, as Clopper-Pearson's (the paper's
posterior gave 0.15 there; see :mod:`dpfl.audit.posterior` for why and what changed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpfl.accountants import steps_for_epochs
from dpfl.audit.posterior import AttackCounts, EpsilonInterval, estimate
from dpfl.clients.central import privacy_kwargs
from dpfl.clients.local_train import train_non_private, train_private
from dpfl.config import Config
from dpfl.device import resolve_device
from dpfl.errors import ConfigError
from dpfl.optim import create_optimizer
from dpfl.privacy import make_private
from dpfl.tasks import get_task

__all__ = ["AuditResult", "run_audit"]


@dataclass
class AuditResult:
    counts: dict[str, AttackCounts]
    intervals: dict[str, EpsilonInterval]
    clopper_pearson: dict[str, EpsilonInterval]
    theoretical_epsilon: float
    models: int
    canaries_per_model: int


def _mislabel(y: torch.Tensor, classes: int, rng: np.random.Generator) -> torch.Tensor:
    shift = torch.tensor(rng.integers(1, classes, size=len(y)))
    return (y + shift) % classes


@torch.no_grad()
def _losses(model, x, y) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").cpu().numpy()
    model.train()
    return out


def run_audit(
    cfg: Config,
    *,
    models: int = 2,
    canaries: int = 100,
    shadow_fpr: float = 0.1,
    alpha: float = 0.05,
) -> AuditResult:
    if models < 1 or canaries < 2:
        raise ConfigError("an audit needs at least 1 model and 2 canaries per model")
    if not 0 < shadow_fpr < 1:
        raise ConfigError(f"shadow-fpr must be in (0, 1), got {shadow_fpr}")
    if cfg.task != "image-classification":
        raise ConfigError(
            f"dpfl audit run plants mislabelled canaries: it needs task image-classification, "
            f"not {cfg.task!r}"
        )
    task = get_task(cfg)
    data = task.load_data()
    x_all, y_all = data.train.tensors
    x_test, y_test = data.test.tensors
    num_classes = data.info["num_classes"]
    if canaries >= len(y_all) // 2:
        raise ConfigError(f"{canaries} canaries per model is too many for {len(y_all)} samples")
    guesses = {"loss": [], "score": []}
    bits: list[bool] = []
    eps_theory = 0.0
    for k in range(models):
        device = resolve_device(cfg.training.device)
        rng = np.random.default_rng([cfg.seed, k])
        idx = rng.choice(len(y_all), size=canaries, replace=False)
        member = rng.random(canaries) < 0.5
        cx, cy = x_all[idx], _mislabel(y_all[idx], num_classes, rng)
        rest = np.setdiff1d(np.arange(len(y_all)), idx)
        train_x = torch.cat([x_all[rest], cx[member]])
        train_y = torch.cat([y_all[rest], cy[member]])
        torch.manual_seed(cfg.seed * 1000 + k)
        model = task.build_model(data).to(device)
        opt = create_optimizer(cfg.optimizer, model, private=cfg.privacy.enabled)
        loader = DataLoader(
            TensorDataset(train_x, train_y), batch_size=cfg.data.batch_size, shuffle=True
        )
        q = min(cfg.data.batch_size / len(train_y), 1.0)
        steps = steps_for_epochs(cfg.training.epochs, q)
        if cfg.privacy.enabled:
            pt = make_private(
                model, opt, loader, steps=steps, seed=cfg.seed * 1000 + k, **privacy_kwargs(cfg)
            )
            train_private(pt, max_steps=steps)
            pt.detach()
            eps_theory = max(eps_theory, pt.epsilon())
        else:
            train_non_private(model, opt, loader, steps)
            eps_theory = float("inf")
        canary_loss = _losses(model, cx, cy)
        train_loss = float(np.mean(_losses(model, x_all[rest][:512], y_all[rest][:512])))
        shadow_idx = rng.choice(len(y_test), size=min(len(y_test), 2 * canaries), replace=False)
        shadow_loss = _losses(
            model, x_test[shadow_idx], _mislabel(y_test[shadow_idx], num_classes, rng)
        )
        threshold = float(np.quantile(shadow_loss, shadow_fpr))
        guesses["loss"].extend((canary_loss <= train_loss).tolist())
        guesses["score"].extend((canary_loss < threshold).tolist())
        bits.extend(member.tolist())
    counts, intervals, cp = {}, {}, {}
    b = np.array(bits)
    for attack, g in guesses.items():
        g = np.array(g)
        c = AttackCounts(
            tp=int((g & b).sum()),
            tn=int((~g & ~b).sum()),
            fp=int((g & ~b).sum()),
            fn=int((~g & b).sum()),
        )
        counts[attack] = c
        intervals[attack] = estimate(c, cfg.privacy.delta, alpha)
        cp[attack] = estimate(c, cfg.privacy.delta, alpha, "beta")
    return AuditResult(counts, intervals, cp, eps_theory, models, canaries)
