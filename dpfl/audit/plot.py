"""PNG of epsilon's posterior with the lower bound and the accountant's epsilon marked.

The posterior has a point mass at 0 (the probability that the attack has no advantage) and a
density above 0; the density curve is the continuous part, the mass is drawn as a bar at 0 with
its probability in the legend."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpfl.audit.posterior import (
    AttackCounts,
    posterior_cdf,
    posterior_density,
    posterior_quantile,
)
from dpfl.plotting import pyplot, save_figure

__all__ = ["plot_posterior"]


def plot_posterior(
    counts: AttackCounts,
    delta: float,
    path: str | Path,
    *,
    lower_bound: float | None = None,
    theoretical: float | None = None,
    title: str = "",
) -> Path:
    plt = pyplot()

    top = posterior_quantile(counts, 0.999, delta)
    top = 10.0 if not math.isfinite(top) else max(top * 1.2, 0.5)
    if theoretical is not None and math.isfinite(theoretical):
        top = max(top, theoretical * 1.1)
    grid = np.linspace(0.0, top, 300)
    dens = posterior_density(counts, grid, delta)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(grid, dens, label="posterior density of epsilon (> 0)")
    p0 = posterior_cdf(counts, 0.0, delta)
    if p0 > 0.0005:
        ax.axvline(
            0.0,
            color="tab:green",
            lw=5,
            alpha=0.5,
            label=f"Pr[epsilon = 0] = {p0:.3f} (attack has no advantage)",
        )
    if lower_bound is not None and math.isfinite(lower_bound):
        what = " (no evidence)" if lower_bound == 0 else ""
        ax.axvline(
            lower_bound, color="tab:orange", ls="--", label=f"lower bound {lower_bound:.3f}{what}"
        )
    if theoretical is not None and math.isfinite(theoretical):
        ax.axvline(theoretical, color="tab:red", label=f"accountant epsilon {theoretical:.3f}")
    ax.set_xlabel(f"epsilon (delta={delta:g})")
    ax.set_ylabel("density")
    ax.set_title(
        title or f"TP={counts.tp} TN={counts.tn} FP={counts.fp} FN={counts.fn}", fontsize=9
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
