"""Round records (why replies were dropped) and exports of one run."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3

import pytest

from dpfl.errors import ConfigError
from dpfl.store import RunStore, export_run, run_to_dict

DROPPED = [
    {"node": 3, "participant": "client-2", "reason": "malformed reply: no arrays"},
    {"node": 7, "participant": None, "reason": "no reply (timeout or lost)"},
]


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def dropped_run(store_path):
    with RunStore(store_path) as store, store.run("simulate", {}) as run:
        run.start_round(1)
        run.end_round(1, "completed", {"sampled": 3, "dropped": DROPPED, "norm": math.nan})
        run.start_round(2)
        run.end_round(
            2, "skipped", {"sampled": 1, "dropped": DROPPED[1:], "reason": "no valid reply"}
        )
        run.end_round(3, "completed", {"sampled": 2, "dropped": []})
    return run.run_id


def test_round_info_is_stored_as_strict_json(store_path, dropped_run):
    with sqlite3.connect(store_path) as c:
        raw = [r[0] for r in c.execute("SELECT info FROM rounds ORDER BY round")]
    infos = [_strict(text) for text in raw]
    assert infos[0]["dropped"] == DROPPED and infos[0]["norm"] is None


def test_round_info_written_as_a_python_repr_is_still_read(store_path, dropped_run):
    with sqlite3.connect(store_path) as c:
        c.execute(
            "UPDATE rounds SET info=? WHERE round=1",
            (repr({"sampled": 3, "dropped": DROPPED}),),
        )
    with RunStore(store_path) as store:
        assert store.rounds(dropped_run)[0]["info"] == {"sampled": 3, "dropped": DROPPED}


def test_unreadable_round_info_is_kept_as_text(store_path, dropped_run):
    with sqlite3.connect(store_path) as c:
        c.execute("UPDATE rounds SET info='{broken' WHERE round=1")
    with RunStore(store_path) as store:
        assert store.rounds(dropped_run)[0]["info"] == "{broken"
        assert [d["round"] for d in store.dropped_replies(dropped_run)] == [2]


def test_dropped_replies_flattened_per_round(store_path, dropped_run):
    with RunStore(store_path) as store:
        rows = store.dropped_replies(dropped_run)
        doc = run_to_dict(store, dropped_run)
    assert rows == [
        {"round": 1, **DROPPED[0]},
        {"round": 1, **DROPPED[1]},
        {"round": 2, **DROPPED[1]},
    ]
    assert doc["dropped"] == rows


def test_csv_rounds_info_is_json_not_a_repr(store_path, dropped_run):
    with RunStore(store_path) as store:
        text = export_run(store, dropped_run, "csv", "rounds")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert _strict(rows[0]["info"])["dropped"] == DROPPED
    assert _strict(rows[1]["info"])["reason"] == "no valid reply"


def test_csv_dropped_table(store_path, dropped_run):
    with RunStore(store_path) as store:
        text = export_run(store, dropped_run, "csv", "dropped")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["round"], r["node"], r["participant"], r["reason"]) for r in rows] == [
        ("1", "3", "client-2", "malformed reply: no arrays"),
        ("1", "7", "", "no reply (timeout or lost)"),
        ("2", "7", "", "no reply (timeout or lost)"),
    ]


def test_json_export_of_one_table(store_path, dropped_run):
    with RunStore(store_path) as store:
        doc = _strict(export_run(store, dropped_run, "json", "rounds"))
        full = _strict(export_run(store, dropped_run, "json"))
    assert set(doc) == {"run", "table", "rows"}
    assert doc["run"] == dropped_run and doc["table"] == "rounds"
    assert [r["round"] for r in doc["rows"]] == [1, 2, 3]
    assert doc["rows"][0]["info"]["dropped"] == DROPPED
    assert {"run", "rounds", "metrics", "privacy_events", "epsilon", "dropped"} <= set(full)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_unknown_table_is_an_error_in_every_format(store_path, dropped_run, fmt):
    with (
        RunStore(store_path) as store,
        pytest.raises(ConfigError, match="unknown export table 'foo'; valid: metrics"),
    ):
        export_run(store, dropped_run, fmt, "foo")


def test_csv_without_a_table_is_the_metrics(store_path, dropped_run):
    with RunStore(store_path) as store:
        assert export_run(store, dropped_run, "csv").startswith("round,step,scope,name,value")
