"""Exports of one run: a JSON document of everything, or one table (:data:`EXPORT_TABLES`) as
CSV or JSON. In CSV, a cell holding a structure (a round's ``info``) is written as JSON."""

from __future__ import annotations

import csv
import io
from typing import Any

from dpfl.errors import ConfigError
from dpfl.jsonutil import dumps
from dpfl.store.run_store import RunStore

__all__ = ["EXPORT_TABLES", "epsilon_by_participant", "export_run", "run_to_dict"]

#: the tables ``export_run`` writes one at a time; ``dropped`` is one row per dropped reply
EXPORT_TABLES = ("metrics", "ledger", "rounds", "dropped")
_COLUMNS = {
    "metrics": ["round", "step", "scope", "name", "value", "recorded_at"],
    "ledger": [
        "seq",
        "participant",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "accountant",
        "delta",
        "epsilon_after",
        "round",
        "note",
        "recorded_at",
    ],
    "rounds": ["round", "status", "started_at", "ended_at", "info"],
    "dropped": ["round", "node", "participant", "reason"],
}


def epsilon_by_participant(events: list[dict[str, Any]]) -> dict[str, float | None]:
    """Epsilon of each participant after its last event: the recorded value, or (when the ledger
    did not compute it at record time) recomputed from the participant's history."""
    from dpfl.accountants import PrivacyLedger

    out: dict[str, float | None] = {}
    last: dict[str, dict[str, Any]] = {}
    for e in events:
        last[e["participant"]] = e
    for who, e in last.items():
        if e["epsilon_after"] is not None:
            out[who] = e["epsilon_after"]
        else:
            mine = [x for x in events if x["participant"] == who]
            out[who] = PrivacyLedger.from_events(mine, e["accountant"], e["delta"]).epsilon(who)
    return out


def run_to_dict(store: RunStore, ref: str) -> dict[str, Any]:
    """The run, its rounds, the replies dropped in them, metrics, privacy ledger and artifact list
    (without blobs)."""
    run = store.get_run(ref)
    run_id = run["id"]
    events = store.privacy_events(run_id)
    return {
        "run": run,
        "rounds": store.rounds(run_id),
        "dropped": store.dropped_replies(run_id),
        "metrics": store.metrics(run_id),
        "privacy_events": events,
        "epsilon": epsilon_by_participant(events),
        "artifacts": store.artifacts(run_id),
    }


def _table(store: RunStore, run_id: str, table: str) -> list[dict[str, Any]]:
    return {
        "metrics": store.metrics,
        "ledger": store.privacy_events,
        "rounds": store.rounds,
        "dropped": store.dropped_replies,
    }[table](run_id)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return dumps(value)
    return value


def export_run(store: RunStore, ref: str, fmt: str = "json", table: str | None = None) -> str:
    """Serializes run ``ref``.

    ``json`` without ``table``: everything (:func:`run_to_dict`); ``json`` with ``table``: the
    object ``{"run": id, "table": table, "rows": [...]}``; ``csv``: one table (default
    ``metrics``) with a header row.

    Raises:
        ConfigError: unknown format or table (checked before the run is read).
    """
    if fmt not in ("csv", "json"):
        raise ConfigError(f"unknown export format {fmt!r}; valid: csv, json")
    if table is not None and table not in EXPORT_TABLES:
        raise ConfigError(f"unknown export table {table!r}; valid: {', '.join(EXPORT_TABLES)}")
    if fmt == "json" and table is None:
        return dumps(run_to_dict(store, ref), indent=2)
    run_id = store.get_run(ref)["id"]
    table = table or "metrics"
    rows = _table(store, run_id, table)
    if fmt == "json":
        return dumps({"run": run_id, "table": table, "rows": rows}, indent=2)
    columns = _COLUMNS[table]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in columns})
    return buf.getvalue()
