"""Plots of a recorded run: one panel per metric that changes, one panel of privacy spent.

Reads only the exported run document (:func:`dpfl.store.run_to_dict`), so it plots any run kind.

* The x axis is the run's own unit: ``epoch`` for ``train`` (metrics logged per epoch; the ledger
  as expected passes over the data, noisy steps x sample rate), ``round`` for ``simulate``, and
  for an asynchronous federation the time of each aggregation (its ``virtual-time``, or ``time``
  in seconds on the real clock), for the metrics and the ledger alike.
* Values recorded without a position (``train``'s ``final`` scope) are a marker at the end of
  training on their metric's panel, or a line of text when the metric has no series.
* A metric whose value never changes is a line of text, not a panel.
* Epsilon is drawn once, from the privacy ledger (the ``epsilon`` / ``epsilon-max`` metrics repeat
  it). Many participants are shown as their distribution (min-max band and median), or as one line
  with a note when they are all equal.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from dpfl.errors import ConfigError
from dpfl.plotting import pyplot, save_figure

__all__ = ["PLOT_SUFFIXES", "build_figure", "check_plot_path", "plot_run"]

#: file types a plot can be written as (matplotlib's Agg, SVG and PDF writers)
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
#: metrics that repeat what the privacy ledger's panel shows
EPSILON_METRICS = ("epsilon", "epsilon-max")
#: metric panels drawn first, in this order (the rest follow by name)
FIRST = ("accuracy", "test_accuracy", "loss", "test_loss")
#: more series than this in one panel are drawn as their min-max band and median
MAX_LINES = 5
#: at most this many of a participant's events without a recorded epsilon are recomputed
MAX_RECOMPUTED = 40
UNCOVERED_PREFIX = "uncovered/"  # as dpfl.store.UNCOVERED_PREFIX (not imported: no cycle)


def check_plot_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if a plot can be written there: a suffix of :data:`PLOT_SUFFIXES`
    (any case), an existing writable folder, not a directory itself.

    Raises:
        ConfigError: naming the allowed suffixes, or what is wrong with the folder.
    """
    out = Path(path)
    allowed = ", ".join(PLOT_SUFFIXES[:-1]) + " or " + PLOT_SUFFIXES[-1]
    if out.suffix.lower() not in PLOT_SUFFIXES:
        got = f"got {out.suffix!r}" if out.suffix else "it has none"
        raise ConfigError(f"plot file {out} must end in {allowed} ({got})")
    if out.is_dir():
        raise ConfigError(f"plot file {out} is a directory")
    folder = out.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write plot {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write plot {out}: folder {folder} is not writable")
    return out


def plot_run(
    data: dict[str, Any], path: str | os.PathLike, metrics: list[str] | None = None
) -> Path:
    """Writes the plot of run document ``data`` to ``path`` (.png, .svg or .pdf); returns it.

    Raises:
        ConfigError: bad ``path`` (:func:`check_plot_path`), nothing to plot, or a requested
            metric does not exist.
    """
    out = check_plot_path(path)
    return save_figure(build_figure(data, metrics), out)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def _same(values: list[float]) -> bool:
    """All equal (NaN equal to NaN; floats within a relative 1e-9)."""
    first = values[0]
    for v in values[1:]:
        if math.isnan(first) or math.isnan(v):
            if not (math.isnan(first) and math.isnan(v)):
                return False
        elif not math.isclose(v, first, rel_tol=1e-9, abs_tol=0.0):
            return False
    return True


class _Metric:
    """One metric name: its series per scope (x, value) and its values without a position."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.unplaced: dict[str, float] = {}
        self.by_step = False  # x is the step (no round recorded)

    def values(self) -> list[float]:
        return [v for pts in self.series.values() for _, v in pts] + list(self.unplaced.values())


def _collect(rows: list[dict[str, Any]]) -> dict[str, _Metric]:
    out: dict[str, _Metric] = {}
    for m in rows:
        metric = out.setdefault(m["name"], _Metric(m["name"]))
        if m["round"] is not None:
            metric.series[m["scope"]].append((m["round"], m["value"]))
        elif m["step"] is not None:
            metric.series[m["scope"]].append((m["step"], m["value"]))
            metric.by_step = True
        else:
            metric.unplaced[m["scope"]] = m["value"]  # the last one recorded
    return out


def _epsilon_histories(
    events: list[dict[str, Any]], by_round: bool
) -> dict[str, list[tuple[float, float]]]:
    """Each participant's (x, epsilon after) per event: x is the round, else the expected number
    of passes over the data (noisy steps x sample rate, summed).

    An event recorded without its epsilon (accountants other than rdp compute it on demand) is
    recomputed from the participant's history up to it, for at most MAX_RECOMPUTED of its events
    (the last always); the others are left out.
    """
    from dpfl.accountants import Phase

    points: dict[str, list[list[Any]]] = defaultdict(list)
    phases: dict[str, list[Phase]] = defaultdict(list)
    passes: dict[str, float] = defaultdict(float)
    for e in events:
        who = e["participant"]
        passes[who] += e["steps"] * e["sample_rate"]
        phases[who].append(Phase(e["noise_multiplier"], e["sample_rate"], e["steps"]))
        x = e["round"] if by_round else passes[who]
        points[who].append([x, e["epsilon_after"], len(phases[who]), e["accountant"], e["delta"]])
    cache: dict[tuple, float | None] = {}
    out: dict[str, list[tuple[float, float]]] = {}
    for who, pts in points.items():
        missing = [i for i, p in enumerate(pts) if p[1] is None]
        if missing:
            stride = max(1, math.ceil(len(missing) / MAX_RECOMPUTED))
            for i in {*missing[::stride], missing[-1]}:
                _, _, n, accountant, delta = pts[i]
                pts[i][1] = _recomputed(phases[who][:n], accountant, delta, cache)
        out[who] = [(p[0], p[1]) for p in pts if p[1] is not None]
    return out


def _aggregation_times(rows: list[dict[str, Any]]) -> tuple[str | None, dict[int, float]]:
    """(the clock's metric name, aggregation -> time) of an async federation, else (None, {})."""
    for clock in ("virtual-time", "time"):
        times = {m["round"]: m["value"] for m in rows if m["name"] == clock and m["round"]}
        if times:
            return clock, times
    return None, {}


def _recomputed(history, accountant: str, delta: float, cache: dict) -> float | None:
    from dpfl.accountants import compute_epsilon, merge_phases
    from dpfl.errors import DpflError

    merged = tuple(merge_phases(history))
    key = (merged, accountant, delta)
    if key not in cache:
        try:
            cache[key] = compute_epsilon(list(merged), delta, accountant)
        except DpflError:
            cache[key] = None
    return cache[key]


def _on_grid(
    histories: dict[str, list[tuple[float, float]]],
) -> tuple[list[float], dict[str, list[float]]]:
    """Every participant's epsilon at every x of any participant: its last value at or before x
    (0 before its first release: it had spent nothing; inf stays inf)."""
    grid = sorted({x for pts in histories.values() for x, _ in pts})
    values: dict[str, list[float]] = {}
    for who, pts in histories.items():
        known = sorted(pts)
        row, i, last = [], 0, 0.0
        for x in grid:
            while i < len(known) and known[i][0] <= x:
                last = known[i][1]
                i += 1
            row.append(last)
        values[who] = row
    return grid, values


def _drawable(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def _band(ax, grid: list[float], columns: list[list[float]], what: str) -> None:
    """Median line and min-max band of ``columns`` (one list of values per x; non-finite values
    left out, a column with none left is a gap)."""
    finite = [[v for v in c if math.isfinite(v)] for c in columns]
    lo = [min(c) if c else math.nan for c in finite]
    hi = [max(c) if c else math.nan for c in finite]
    mid = [statistics.median(c) if c else math.nan for c in finite]
    ax.fill_between(grid, lo, hi, alpha=0.25, label=f"min-max over {what}")
    ax.plot(grid, mid, marker="o", ms=3, label=f"median of {what}")


def _label_end(ax, x: float, y: float, text: str) -> None:
    if math.isfinite(y):
        ax.annotate(
            text, (x, y), xytext=(5, 0), textcoords="offset points", fontsize=8, va="center"
        )


def _epsilon_panel(ax, histories: dict[str, list[tuple[float, float]]], last_event) -> None:
    grid, values = _on_grid(histories)
    n = len(values)
    if n == 1:
        ((who, row),) = values.items()
        ax.plot(grid, _drawable(row), label=who)
        _label_end(ax, grid[-1], row[-1], _fmt(row[-1]))
    else:
        columns = [list(col) for col in zip(*values.values(), strict=True)]
        kind = "clients" if all(w.startswith("client") for w in values) else "participants"
        if all(_same(col) for col in columns):
            row = [c[0] for c in columns]
            ax.plot(grid, _drawable(row), marker="o", ms=3, label=f"all {n} {kind} equal")
            _label_end(ax, grid[-1], row[-1], _fmt(row[-1]))
        else:
            _band(ax, grid, columns, f"{n} {kind}")
            top = max((v for v in columns[-1] if math.isfinite(v)), default=math.nan)
            _label_end(ax, grid[-1], top, f"max {_fmt(top)}")
    ax.set_ylabel(f"epsilon (delta={last_event['delta']:g})")
    ax.set_title(f"privacy spent ({last_event['accountant']})", fontsize=9)


def _metric_panel(ax, metric: _Metric, end: float | None, x_label: str) -> None:
    scopes = sorted(metric.series)
    if len(scopes) <= MAX_LINES:
        for scope in scopes:
            pts = sorted(metric.series[scope])
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=scope if len(scopes) > 1 else None)
    else:
        by_x: dict[float, list[float]] = defaultdict(list)
        for pts in metric.series.values():
            for x, y in pts:
                by_x[x].append(y)
        grid = sorted(by_x)
        _band(ax, grid, [by_x[x] for x in grid], f"{_scope_kind(scopes)} reporting")
    last_x = max(x for pts in metric.series.values() for x, _ in pts)
    x_end = last_x if end is None else max(end, last_x)
    for scope, value in sorted(metric.unplaced.items()):
        ax.plot([x_end], [value], marker="*", ms=10, ls="none", color="black", label=scope)
        ax.annotate(
            _fmt(value),
            (x_end, value),
            xytext=(5, 0),
            textcoords="offset points",
            fontsize=8,
            va="center",
        )
    ax.set_ylabel(metric.name)
    ax.set_xlabel("step" if metric.by_step else x_label)
    if metric.name.startswith(UNCOVERED_PREFIX):
        ax.set_title("NOT covered by the privacy guarantee (client diagnostic)", fontsize=9)


def _scope_kind(scopes: list[str]) -> str:
    return "clients" if all(s.startswith("client") for s in scopes) else "scopes"


def _note(metric: _Metric, every: str) -> str:
    values = metric.values()
    if metric.series:
        return f"{metric.name} = {_fmt(values[0])} (every {every})"
    if len(metric.unplaced) == 1:
        ((scope, value),) = metric.unplaced.items()
        where = "" if scope == "run" else f" ({scope})"
        return f"{metric.name}{where} = {_fmt(value)}"
    return f"{metric.name}: " + ", ".join(
        f"{scope} {_fmt(v)}" for scope, v in sorted(metric.unplaced.items())
    )


def _train_end(run: dict[str, Any], events: list[dict[str, Any]]) -> float | None:
    """Where a train run ended, in epochs: the ledger's expected passes over the data (noisy
    steps x sample rate), else (no ledger: non-private) the planned epochs scaled by the steps
    done / planned from the run's summary; None if neither is known."""
    if events:
        passes: dict[str, float] = defaultdict(float)
        for e in events:
            passes[e["participant"]] += e["steps"] * e["sample_rate"]
        return max(passes.values())
    summary = run.get("summary") or {}
    training = (run.get("config") or {}).get("training") or {}
    try:
        steps, planned = float(summary["steps"]), float(summary["steps_planned"])
        epochs = float(training["epochs"])
    except (KeyError, TypeError, ValueError):
        return None
    if planned > 0 and math.isfinite(epochs) and epochs > 0:
        return epochs * steps / planned
    return None


def _round_notes(rounds: list[dict], dropped: list[dict], run_id: str) -> list[str]:
    """A line on rounds that did not complete and replies that were dropped (none if all well)."""
    notes = []
    incomplete = [r for r in rounds if r["status"] != "completed"]
    if incomplete:
        counts: dict[str, int] = defaultdict(int)
        for r in incomplete:
            counts[r["status"]] += 1
        done = len(rounds) - len(incomplete)
        notes.append(
            f"rounds: {len(rounds)} recorded, {done} completed, "
            + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        )
    if dropped:
        notes.append(f"replies dropped: {len(dropped)} (all of them: dpfl runs show {run_id})")
        reasons: dict[str, int] = defaultdict(int)
        for d in dropped:
            reasons[str(d.get("reason"))] += 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]:
            notes.append(f"  {n} x {reason if len(reason) <= 90 else reason[:87] + '...'}")
    return notes


def build_figure(data: dict[str, Any], metrics: list[str] | None = None):
    """The matplotlib Figure of run document ``data`` (see the module docstring); ``metrics``
    limits the metric panels to these names (the privacy panel is always drawn).

    Raises:
        ConfigError: a requested metric does not exist, or the run has nothing to plot.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    run = data["run"]
    known = sorted({m["name"] for m in data["metrics"]})
    if metrics:
        missing = [m for m in metrics if m not in known]
        if missing:
            raise ConfigError(
                f"run has no metric {', '.join(missing)}; recorded: {', '.join(known) or 'none'}"
            )
    events = data["privacy_events"]
    by_round = bool(events) and all(e["round"] is not None for e in events)
    x_label = "epoch" if run["kind"] == "train" else "round"
    eps_x = "round" if by_round else "epoch" if run["kind"] == "train" else "passes over the data"
    histories = _epsilon_histories(events, by_round) if events else {}
    notes: list[str] = []
    infinite = [w for w, pts in histories.items() if any(math.isinf(y) for _, y in pts)]
    if infinite:
        notes.append(f"epsilon infinite (no privacy) for {len(infinite)} of {len(histories)}")
    if events and not any(math.isfinite(y) for pts in histories.values() for _, y in pts):
        if not infinite:
            notes.append("epsilon: not recorded and not computable from the ledger")
        histories = {}  # nothing finite to draw
    end = _train_end(run, events) if run["kind"] == "train" and not by_round else None

    privacy = (run.get("config") or {}).get("privacy") or {}
    if not events and privacy.get("enabled") is False:
        notes.append("epsilon = inf (privacy.enabled = false: no privacy)")
    notes += _round_notes(data.get("rounds") or [], data.get("dropped") or [], run["id"])
    rows = [m for m in data["metrics"] if metrics is None or m["name"] in metrics]
    if events:
        rows = [m for m in rows if m["name"] not in EPSILON_METRICS]
    clock, time_of = (
        _aggregation_times(data["metrics"]) if run["kind"] == "simulate" else (None, {})
    )
    if time_of:  # async federation: everything against the time of its aggregation
        x_label = eps_x = "simulated time" if clock == "virtual-time" else "time (s)"
        rows = [
            m | {"round": time_of.get(m["round"], m["round"])}
            for m in rows
            if m["name"] != clock and m["round"] is not None
        ]
        histories = {
            who: [(time_of.get(x, x), y) for x, y in pts] for who, pts in histories.items()
        }
    collected = _collect(rows)
    order = sorted(
        collected,
        key=lambda n: (
            n.startswith(UNCOVERED_PREFIX),
            n not in FIRST,
            FIRST.index(n) if n in FIRST else 0,
            n,
        ),
    )
    panels: list[_Metric] = []
    for name in order:
        metric = collected[name]
        if metric.series and not _same(metric.values()):
            panels.append(metric)
        else:
            notes.append(
                _note(metric, "step" if metric.by_step else "aggregation" if time_of else x_label)
            )
    n_axes = len(panels) + (1 if histories else 0)
    if not n_axes and not notes:
        raise ConfigError(f"run {run['id']} has nothing to plot (no metrics, no privacy events)")

    heights = [2.4] * n_axes + ([0.35 + 0.2 * len(notes)] if notes else [])
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(7, 0.6 + sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    axes = list(axes[:, 0])
    for ax, metric in zip(axes, panels, strict=False):
        _metric_panel(ax, metric, end, x_label)
    if histories:
        ax = axes[len(panels)]
        _epsilon_panel(ax, histories, events[-1])
        ax.set_xlabel(eps_x)
    drawn = axes[:n_axes]
    leaders: dict[str, Any] = {}  # one x range per unit, room on the right for the end labels
    for ax in drawn:
        leader = leaders.setdefault(ax.get_xlabel(), ax)
        if leader is not ax:
            ax.sharex(leader)
    for ax in drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=not time_of))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in leaders.values():
        ax.autoscale_view()
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.08 * (hi - lo))
    if notes:
        text_ax = axes[-1]
        text_ax.axis("off")
        text_ax.text(
            0.0,
            1.0,
            "\n".join(notes),
            fontsize=8,
            va="top",
            family="monospace",
            transform=text_ax.transAxes,
        )
    title = f"run {run['id']} ({run['kind']}, {run['status']})"
    if run.get("name"):
        title += f": {run['name']}"
    fig.suptitle(title, fontsize=10)
    return fig
