import json
import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from dpfl.errors import ConfigError, RunNotFoundError, StoreError
from dpfl.store import RunStore, export_run, run_to_dict


def test_run_lifecycle_and_records(store_path):
    # Prepare / Execute
    with RunStore(store_path) as store:
        with store.run("train", {"privacy": {"delta": 1e-5}}, name="demo", seed=3) as run:
            run.start_round(1)
            run.log_metrics({"accuracy": 0.5, "loss": math.nan}, round=1, scope="server")
            run.record_privacy_event(
                {
                    "seq": 0,
                    "participant": "central",
                    "mechanism": "subsampled-gaussian",
                    "noise_multiplier": 1.0,
                    "sample_rate": 0.1,
                    "steps": 10,
                    "accountant": "rdp",
                    "delta": 1e-5,
                    "epsilon_after": 1.5,
                }
            )
            run.end_round(1, info={"clients": 3})
            run.add_artifact("plot", "acc.png", b"\x89PNG", media_type="image/png")
        # Assert
        r = store.get_run(run.run_id[:6])
        assert r["status"] == "completed" and r["name"] == "demo" and r["seed"] == 3
        assert r["config"] == {"privacy": {"delta": 1e-5}}
        assert "torch" in r["versions"] and "python" in r["versions"]
        metrics = {m["name"]: m["value"] for m in store.metrics(run.run_id)}
        assert metrics["accuracy"] == 0.5 and math.isnan(metrics["loss"])
        assert store.rounds(run.run_id)[0]["info"] == {"clients": 3}
        assert store.artifacts(run.run_id, with_data=True)[0]["data"] == b"\x89PNG"
        assert run_to_dict(store, run.run_id)["epsilon"] == {"central": 1.5}


@pytest.mark.parametrize(
    "exc,status", [(RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")]
)
def test_failed_and_interrupted_runs_are_marked(store_path, exc, status):
    with RunStore(store_path) as store:
        with pytest.raises(type(exc)), store.run("train", {}) as run:
            raise exc
        assert store.get_run(run.run_id)["status"] == status


def test_transaction_rolls_back_on_error(store_path):
    with RunStore(store_path) as store:
        run = store.create_run("train", {})
        with pytest.raises(ZeroDivisionError), store.transaction() as c:
            c.execute(
                "INSERT INTO metrics (run_id, scope, name, value, recorded_at)"
                " VALUES (?, 'run', 'x', 1, 0)",
                (run.run_id,),
            )
            1 / 0  # noqa: B018
        assert store.metrics(run.run_id) == []


def test_prefix_resolution(store_path):
    with RunStore(store_path) as store:
        ids = [store.create_run("epsilon", {}).run_id for _ in range(40)]
        assert store.resolve_run_id(ids[0]) == ids[0]
        with pytest.raises(RunNotFoundError, match="no run"):
            store.resolve_run_id("zzzz")
        # with 40 random hex ids some one-character prefix is shared by several
        shared = max("0123456789abcdef", key=lambda ch: sum(i.startswith(ch) for i in ids))
        with pytest.raises(RunNotFoundError, match="ambiguous"):
            store.resolve_run_id(shared)
        with pytest.raises(RunNotFoundError):
            store.resolve_run_id("%")


def test_writes_to_unknown_runs_and_bad_statuses_are_refused(store_path):
    with RunStore(store_path) as store:
        with pytest.raises(RunNotFoundError):
            store.add_metrics("nope", {"a": 1.0})
        run = store.create_run("x", {})
        with pytest.raises(ConfigError, match="final run status"):
            run.finish("running")
        with pytest.raises(ConfigError, match="round status"):
            run.end_round(1, "weird")
        with pytest.raises(ConfigError, match="must be a number"):
            run.log_metrics({"a": "high"})


def test_not_a_database_and_newer_schema(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open run store"):
        RunStore(junk)
    newer = tmp_path / "newer.sqlite"
    sqlite3.connect(newer).execute("PRAGMA user_version=99").connection.close()
    with pytest.raises(StoreError, match="newer than this dpfl"):
        RunStore(newer)


def test_store_uses_wal(store_path):
    RunStore(store_path).close()
    mode = sqlite3.connect(store_path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_exports(store_path):
    with RunStore(store_path) as store, store.run("train", {}) as run:
        run.log_metrics({"acc": 0.25}, round=2)
    with RunStore(store_path) as store:
        csv_text = export_run(store, run.run_id, "csv", "metrics")
        assert csv_text.splitlines()[0] == "round,step,scope,name,value,recorded_at"
        assert csv_text.splitlines()[1].startswith("2,,run,acc,0.25,")
        doc = json.loads(export_run(store, run.run_id, "json"))
        assert doc["run"]["id"] == run.run_id and doc["metrics"][0]["value"] == 0.25
        with pytest.raises(ConfigError, match="unknown export table"):
            export_run(store, run.run_id, "csv", "weights")
        with pytest.raises(ConfigError, match="unknown export format"):
            export_run(store, run.run_id, "xml")


# -- crash safety: a child process killed with SIGKILL -------------------------------------------
def _spawn(script: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_inside_a_transaction_leaves_no_partial_rows(store_path):
    # Prepare: the child holds an open transaction with rows written but not committed
    child = _spawn(
        f"""
        import time
        from dpfl.store import RunStore
        store = RunStore({str(store_path)!r})
        run = store.create_run("train", {{}})
        run.log_metrics({{"committed": 1.0}}, round=1)
        with store.transaction() as c:
            for i in range(5):
                c.execute(
                    "INSERT INTO metrics (run_id, round, scope, name, value, recorded_at)"
                    " VALUES (?, 2, 'run', 'partial', ?, 0)", (run.run_id, i))
            print(run.run_id, flush=True)
            time.sleep(120)
        """
    )
    run_id = child.stdout.readline().strip()
    # Execute
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    # Assert
    with RunStore(store_path) as store:
        assert [m["name"] for m in store.metrics(run_id)] == ["committed"]
        assert store.get_run(run_id)["status"] == "killed"
        assert store._query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"


def test_kill_during_a_write_loop_keeps_every_committed_round_whole(store_path):
    # Prepare: the child writes rounds of 5 metrics + 1 ledger event as fast as it can
    child = _spawn(
        f"""
        from dpfl.store import RunStore
        store = RunStore({str(store_path)!r})
        run = store.create_run("train", {{}})
        print(run.run_id, flush=True)
        for r in range(10**6):
            with store.transaction() as c:
                c.executemany(
                    "INSERT INTO metrics (run_id, round, scope, name, value, recorded_at)"
                    " VALUES (?, ?, 'run', ?, ?, 0)",
                    [(run.run_id, r, f"m{{i}}", float(i)) for i in range(5)])
                c.execute(
                    "INSERT INTO privacy_events (run_id, seq, participant, mechanism,"
                    " noise_multiplier, sample_rate, steps, accountant, delta, epsilon_after,"
                    " round, recorded_at) VALUES (?, ?, 'c', 'subsampled-gaussian', 1, 0.1, 1,"
                    " 'rdp', 1e-5, 1.0, ?, 0)", (run.run_id, r, r))
        """
    )
    run_id = child.stdout.readline().strip()
    deadline = time.time() + 30
    with RunStore(store_path) as store:
        while len(store.metrics(run_id)) < 100 and time.time() < deadline:
            time.sleep(0.05)
    # Execute
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    # Assert
    with RunStore(store_path) as store:
        per_round: dict[int, int] = {}
        for m in store.metrics(run_id):
            per_round[m["round"]] = per_round.get(m["round"], 0) + 1
        events = store.privacy_events(run_id)
        assert len(per_round) >= 20
        assert set(per_round.values()) == {5}
        assert sorted(per_round) == list(range(len(per_round)))
        assert [e["round"] for e in events] == sorted(per_round)
        assert store.get_run(run_id)["status"] == "killed"
