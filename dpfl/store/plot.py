"""PNG plots of a recorded run: metrics against round (or step) and epsilon spent per participant.

Reads only the exported run document (:func:`dpfl.store.run_to_dict`), so it plots any run kind.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from dpfl.errors import ConfigError
from dpfl.plotting import pyplot, save_figure

__all__ = ["plot_run"]

MAX_LEGEND = 10


def _series(metrics: list[dict[str, Any]], names: list[str] | None):
    """{(name, scope): [(x, value)]}, x being the round, else the step, else the order."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for i, m in enumerate(metrics):
        if names is not None and m["name"] not in names:
            continue
        x = m["round"] if m["round"] is not None else m["step"] if m["step"] is not None else i
        out[(m["name"], m["scope"])].append((x, m["value"]))
    return out


def plot_run(data: dict[str, Any], path: str | Path, metrics: list[str] | None = None) -> Path:
    """Writes a PNG with one panel per metric name and one for epsilon; returns its path.

    Raises:
        ConfigError: the run has nothing to plot, or a requested metric does not exist.
    """
    plt = pyplot()

    known = sorted({m["name"] for m in data["metrics"]})
    if metrics:
        missing = [m for m in metrics if m not in known]
        if missing:
            raise ConfigError(
                f"run has no metric {', '.join(missing)}; recorded: {', '.join(known) or 'none'}"
            )
    series = _series(data["metrics"], metrics)
    names = sorted({name for name, _ in series})
    events = data["privacy_events"]
    panels = names + (["epsilon"] if events else [])
    if not panels:
        raise ConfigError(f"run {data['run']['id']} has no metrics or privacy events to plot")

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, name in zip(axes[:, 0], panels, strict=True):
        if name == "epsilon":
            by_who: dict[str, list[tuple[int, float]]] = defaultdict(list)
            steps: dict[str, int] = defaultdict(int)
            for e in events:
                steps[e["participant"]] += e["steps"]
                eps = e["epsilon_after"]
                by_who[e["participant"]].append((steps[e["participant"]], eps))
            for i, (who, pts) in enumerate(sorted(by_who.items())):
                finite = [(x, y) for x, y in pts if y is not None and not math.isinf(y)]
                if finite:
                    ax.plot(*zip(*finite, strict=True), label=who if i < MAX_LEGEND else None)
            ax.set_xlabel("noisy steps")
            ax.set_ylabel(f"epsilon (delta={events[-1]['delta']:g})")
        else:
            for i, ((_, scope), pts) in enumerate(
                sorted((k, v) for k, v in series.items() if k[0] == name)
            ):
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    ms=3,
                    label=scope if i < MAX_LEGEND else None,
                )
            ax.set_xlabel("round / step")
            ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    run = data["run"]
    fig.suptitle(f"run {run['id']} ({run['kind']}, {run['status']})", fontsize=10)
    return save_figure(fig, path)
