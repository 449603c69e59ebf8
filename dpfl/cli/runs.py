"""``dpfl runs list | show | export | plot``: reading the run store."""

from __future__ import annotations

import datetime as dt
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from dpfl.cli.common import DEFAULT_STORE, StoreOption, console, fmt_eps, fmt_float
from dpfl.cli.main import app
from dpfl.errors import ConfigError, StoreError
from dpfl.jsonutil import dumps
from dpfl.store import RUN_STATUSES, UNCOVERED_PREFIX, RunStore, export_run, run_to_dict
from dpfl.store.export import EXPORT_TABLES

runs_app = typer.Typer(help="Inspect and export recorded runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


class ExportFormat(str, Enum):
    csv = "csv"
    json = "json"


def _open(store: Path) -> RunStore:
    if not store.exists():
        raise StoreError(f"no run store at {store} (use --store PATH or run a command first)")
    return RunStore(store)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _duration(run: dict) -> str:
    end = run.get("ended_at") or run.get("updated_at")
    if end is None:
        return "-"
    return f"{end - run['created_at']:.1f}s"


@runs_app.command("list")
def list_runs(
    kind: Annotated[str | None, typer.Option("--kind", help="Only runs of this kind.")] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help=f"Only runs with this status ({', '.join(RUN_STATUSES)})."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Recorded runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise ConfigError(f"--status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    with _open(store) as s:
        runs = s.list_runs(kind=kind, status=status, limit=limit)
    if as_json:
        console.print(dumps({"runs": runs}), markup=False)
        return
    table = Table(title=f"runs in {store}")
    for col in ("id", "kind", "name", "status", "created", "duration"):
        table.add_column(col)
    for r in runs:
        table.add_row(
            r["id"], r["kind"], r["name"] or "", r["status"], _when(r["created_at"]), _duration(r)
        )
    console.print(table)


@runs_app.command("show")
def show_run(
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """One run: status, config, last metrics and privacy spent per participant."""
    with _open(store) as s:
        data = run_to_dict(s, run)
    if as_json:
        console.print(dumps(data), markup=False)
        return
    r = data["run"]
    console.print(f"[bold]run {r['id']}[/bold]  kind={r['kind']}  status={r['status']}")
    console.print(f"created {_when(r['created_at'])}, duration {_duration(r)}, seed={r['seed']}")
    if r.get("error"):
        console.print(f"error: {r['error']}", markup=False)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(r["versions"].items()))
    console.print(f"versions: {versions}", markup=False)
    console.print(f"config: {dumps(r['config'])}", markup=False)
    if data["rounds"]:
        _print_rounds(data["rounds"])
    last: dict[tuple[str, str], dict] = {}
    uncovered: dict[tuple[str, str], dict] = {}
    for m in data["metrics"]:
        into = uncovered if m["name"].startswith(UNCOVERED_PREFIX) else last
        into[(m["scope"], m["name"])] = m
    for title, rows in (
        ("metrics (last value)", last),
        (
            "client diagnostics (last value): NOT covered by the privacy guarantee "
            "(computed on clients' records, sent un-noised)",
            uncovered,
        ),
    ):
        if not rows:
            continue
        table = Table(title=title)
        for col in ("scope", "name", "value", "round", "step"):
            table.add_column(col)
        for (scope, name), m in sorted(rows.items()):
            table.add_row(
                scope, name, fmt_float(m["value"], 6), fmt_float(m["round"]), fmt_float(m["step"])
            )
        console.print(table)
    if uncovered:
        console.print(
            f"WARNING: {len({n for _, n in uncovered})} metric name(s) starting with "
            f"{UNCOVERED_PREFIX!r} are not covered by the privacy guarantee "
            "(federation.client-diagnostics = true)",
            markup=False,
        )
    if data["epsilon"]:
        events = data["privacy_events"]
        table = Table(title=f"privacy spent (delta={events[-1]['delta']:g})")
        for col in ("participant", "epsilon", "steps", "events", "accountant"):
            table.add_column(col)
        for who, eps in sorted(data["epsilon"].items()):
            mine = [e for e in events if e["participant"] == who]
            table.add_row(
                who,
                fmt_eps(eps),
                str(sum(e["steps"] for e in mine)),
                str(len(mine)),
                mine[-1]["accountant"],
            )
        console.print(table)


def _round_span(rounds: list[int]) -> str:
    return str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"


def _compact(names: list[str]) -> str:
    """``node 1..node 10`` for a run of numbered names, else the names; with the count."""
    numbered: dict[str, list[int]] = {}
    plain: list[str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if m:
            numbered.setdefault(m.group(1), []).append(int(m.group(2)))
        else:
            plain.append(name)
    parts = sorted(set(plain))
    for prefix, numbers in sorted(numbered.items()):
        numbers = sorted(set(numbers))
        start = prev = numbers[0]
        for n in [*numbers[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            if prev - start >= 2:
                parts.append(f"{prefix}{start}..{prefix}{prev}")
            else:
                parts += [f"{prefix}{k}" for k in range(start, prev + 1)]
            if n is not None:
                start = prev = n
    text = ", ".join(parts)
    return f"{text} ({len(names)})" if len(names) > 1 else text


def _merged(per_round: list[tuple[int, object]]) -> list[tuple[str, object]]:
    """Consecutive rounds with equal content as one span: [("2-3", content), ...]."""
    spans: list[tuple[list[int], object]] = []
    for r, content in per_round:
        if spans and spans[-1][1] == content and spans[-1][0][-1] == r - 1:
            spans[-1][0].append(r)
        else:
            spans.append(([r], content))
    return [(_round_span(rounds), content) for rounds, content in spans]


def _print_rounds(rounds: list[dict]) -> None:
    """Counts per status, rounds that did not complete (and why), replies dropped (and why)."""
    counts: dict[str, int] = {}
    for x in rounds:
        counts[x["status"]] = counts.get(x["status"], 0) + 1
    others = ", ".join(
        f"{n} {status}" for status, n in sorted(counts.items()) if status != "completed"
    )
    line = f"rounds: {len(rounds)} recorded, {counts.get('completed', 0)} completed"
    console.print(line + (f", {others}" if others else ""), markup=False)
    infos = [(x["round"], x["info"] if isinstance(x["info"], dict) else {}) for x in rounds]
    unfinished = _merged(
        [
            (x["round"], (x["status"], str(info.get("reason", "-"))))
            for x, (_, info) in zip(rounds, infos, strict=True)
            if x["status"] != "completed"
        ]
    )
    if unfinished:
        table = Table(title="rounds not completed")
        for col in ("round", "status", "reason"):
            table.add_column(col)
        for span, (status, reason) in unfinished:
            table.add_row(span, status, Text(reason))
        console.print(table)
    per_round = []
    total = 0
    for r, info in infos:
        dropped = info.get("dropped")
        groups: dict[str, list[str]] = {}
        for d in dropped if isinstance(dropped, list) else []:
            if not isinstance(d, dict):
                continue
            who = d.get("participant") or f"node {d.get('node')}"
            groups.setdefault(str(d.get("reason")), []).append(str(who))
            total += 1
        if groups:
            per_round.append((r, tuple((reason, _compact(w)) for reason, w in groups.items())))
    if not per_round:
        return
    table = Table(title=f"dropped replies ({total}), not aggregated")
    for col in ("round", "replies", "reason"):
        table.add_column(col)
    for span, groups in _merged(per_round):
        for reason, who in groups:
            table.add_row(span, Text(who), Text(reason))
    console.print(table)


@runs_app.command("export")
def export(
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="csv or json.")
    ] = ExportFormat.json,
    table: Annotated[
        str | None,
        typer.Option(
            "--table",
            help=f"One table: {', '.join(EXPORT_TABLES)} (csv default: metrics; json default: "
            "everything, with --table: {run, table, rows}).",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write to this file instead of stdout.", dir_okay=False
        ),
    ] = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """A run as JSON (everything, or one table) or one of its tables as CSV."""
    with _open(store) as s:
        text = export_run(s, run, fmt.value, table)
    if output is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {output}: {e.strerror or e}") from None
    console.print(f"wrote {output}", markup=False)


@runs_app.command("plot")
def plot(
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    metric: Annotated[
        list[str] | None, typer.Option("--metric", "-m", help="Metric to plot (repeatable).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="A .png, .svg or .pdf file (default RUN.png).", dir_okay=False
        ),
    ] = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Plot of a run's metrics per epoch (train) or round (simulate) and the epsilon spent."""
    from dpfl.store.plot import check_plot_path, plot_run

    if output is not None:
        check_plot_path(output)
    with _open(store) as s:
        data = run_to_dict(s, run)
    path = plot_run(data, output or Path(f"{data['run']['id']}.png"), metric or None)
    console.print(f"wrote {path}", markup=False)
