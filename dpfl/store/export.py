"""Exports of one run: a JSON document of everything, or one table as CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

from dpfl.errors import ConfigError
from dpfl.jsonutil import dumps
from dpfl.store.run_store import RunStore

__all__ = ["EXPORT_TABLES", "epsilon_by_participant", "export_run", "run_to_dict"]

EXPORT_TABLES = ("metrics", "ledger", "rounds")


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
    """The run, its rounds, metrics, privacy ledger and artifact list (without blobs)."""
    run = store.get_run(ref)
    run_id = run["id"]
    events = store.privacy_events(run_id)
    return {
        "run": run,
        "rounds": store.rounds(run_id),
        "metrics": store.metrics(run_id),
        "privacy_events": events,
        "epsilon": epsilon_by_participant(events),
        "artifacts": store.artifacts(run_id),
    }


def export_run(store: RunStore, ref: str, fmt: str = "json", table: str = "metrics") -> str:
    """Serializes run ``ref``: ``json`` (everything) or ``csv`` (one of EXPORT_TABLES)."""
    if fmt == "json":
        return dumps(run_to_dict(store, ref), indent=2)
    if fmt != "csv":
        raise ConfigError(f"unknown export format {fmt!r}; valid: csv, json")
    if table not in EXPORT_TABLES:
        raise ConfigError(f"unknown export table {table!r}; valid: {', '.join(EXPORT_TABLES)}")
    run_id = store.get_run(ref)["id"]
    rows = {
        "metrics": store.metrics,
        "ledger": store.privacy_events,
        "rounds": store.rounds,
    }[table](run_id)
    columns = {
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
    }[table]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()
