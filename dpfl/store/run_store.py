"""The SQLite run store: runs, rounds, metrics, the privacy ledger and artifacts.

One file (default ``./dpfl-runs.sqlite``), stdlib ``sqlite3`` in WAL mode with
``synchronous=FULL``: each write is one transaction, committed before the call returns, so a
process killed at any point leaves only whole transactions behind. A run records the host, pid and
the pid's start time; a run still marked ``running`` whose process is gone is shown (and marked)
as ``killed`` the next time the store is read.

Metric values that are NaN are stored as NULL (SQLite cannot hold NaN) and read back as NaN.
A metric whose name starts with ``uncovered/`` (:data:`UNCOVERED_PREFIX`) is not covered by the
run's privacy guarantee; ``dpfl runs show`` lists those apart.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import platform
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from dpfl.errors import ConfigError, RunNotFoundError, StoreError
from dpfl.jsonutil import dumps, jsonable
from dpfl.store.schema import SCHEMA, SCHEMA_VERSION

__all__ = ["RUN_STATUSES", "UNCOVERED_PREFIX", "RunHandle", "RunStore", "software_versions"]

RUN_STATUSES = ("running", "completed", "failed", "interrupted", "killed")
#: prefix of the name of every metric that the run's privacy guarantee does NOT cover (client
#: diagnostics computed on private records and sent un-noised, ``federation.client-diagnostics``)
UNCOVERED_PREFIX = "uncovered/"
_FINAL = ("completed", "failed", "interrupted")


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages a run's results depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("dpfl", "torch", "opacus", "flwr", "numpy", "peft", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against pid reuse); None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start is not None:
        return _proc_start_time(pid) == start
    return True


def _to_sql_float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class RunStore:
    """A handle on one store file. Cheap to open; safe to share between threads.

    Args:
        path: the SQLite file; created (with its folder) if missing.
    """

    def __init__(self, path: str | os.PathLike = "dpfl-runs.sqlite") -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open run store {self.path}: {e}") from None

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"run store {self.path} has schema version {version}, newer than this dpfl "
                f"({SCHEMA_VERSION}); upgrade dpfl"
            )
        if version < SCHEMA_VERSION:
            with self.transaction() as c:
                # statement by statement: executescript() would COMMIT the open transaction
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"cannot write to run store {self.path}: {e}") from None
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as e:
                    self._conn.execute("ROLLBACK")
                    raise StoreError(f"cannot commit to run store {self.path}: {e}") from None

    def _query(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return [dict(r) for r in self._conn.execute(sql, params).fetchall()]
            except sqlite3.Error as e:
                raise StoreError(f"cannot read run store {self.path}: {e}") from None

    # -- runs -------------------------------------------------------------------------------------
    def create_run(
        self,
        kind: str,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        seed: int | None = None,
        parent: str | None = None,
    ) -> RunHandle:
        """Records a new run with status ``running`` and returns a handle to write to it."""
        run_id = uuid.uuid4().hex[:12]
        pid = os.getpid()
        now = time.time()
        try:
            config_json = json.dumps(config, sort_keys=True, allow_nan=True, default=str)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"run config is not serializable: {e}") from None
        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs (id, kind, name, status, config, seed, versions, host, pid,"
                " pid_start, parent, created_at, updated_at) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    kind,
                    name,
                    config_json,
                    seed,
                    json.dumps(software_versions(), sort_keys=True),
                    socket.gethostname(),
                    pid,
                    _proc_start_time(pid),
                    parent,
                    now,
                    now,
                ),
            )
        return RunHandle(self, run_id)

    @contextmanager
    def run(self, kind: str, config: Mapping[str, Any], **kwargs) -> Iterator[RunHandle]:
        """Context manager: a new run that ends ``completed``, ``failed`` (exception) or
        ``interrupted`` (Ctrl-C); the exception is re-raised."""
        with self.tracking(self.create_run(kind, config, **kwargs)) as handle:
            yield handle

    @contextmanager
    def tracking(self, handle: RunHandle) -> Iterator[RunHandle]:
        """Marks ``handle``'s run failed or interrupted if the block raises, completed if it
        ends while the run is still marked running."""
        try:
            yield handle
        except KeyboardInterrupt:
            handle.finish("interrupted", error="interrupted by the user")
            raise
        except BaseException as e:
            handle.finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        else:
            if handle.status() == "running":
                handle.finish("completed")

    def finish_run(
        self,
        run_id: str,
        status: str,
        *,
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        if status not in _FINAL:
            raise ConfigError(
                f"final run status must be one of {', '.join(_FINAL)}, got {status!r}"
            )
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status=?, error=?, summary=COALESCE(?, summary), ended_at=?,"
                " updated_at=? WHERE id=?",
                (
                    status,
                    error,
                    None if summary is None else json.dumps(summary, default=str),
                    now,
                    now,
                    run_id,
                ),
            )

    def reopen_run(self, run_id: str) -> RunHandle:
        """Marks a killed, failed or interrupted run as running again (``--resume``) in this
        process; its records are kept and new ones are appended."""
        pid = os.getpid()
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE runs SET status='running', error=NULL, ended_at=NULL, pid=?, pid_start=?,"
                " host=?, updated_at=? WHERE id=? AND status != 'running'",
                (pid, _proc_start_time(pid), socket.gethostname(), time.time(), run_id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"run {run_id} is still running; it cannot be resumed twice")
        return RunHandle(self, run_id)

    def mark_killed_runs(self) -> list[str]:
        """Marks ``running`` runs of this host whose process is gone as ``killed``."""
        host = socket.gethostname()
        dead = [
            r["id"]
            for r in self._query(
                "SELECT id, pid, pid_start FROM runs WHERE status='running' AND host=?", (host,)
            )
            if r["pid"] is not None and not _process_alive(r["pid"], r["pid_start"])
        ]
        if dead:
            with self.transaction() as c:
                c.executemany(
                    "UPDATE runs SET status='killed', error='process ended without finishing the"
                    " run', ended_at=updated_at WHERE id=? AND status='running'",
                    [(d,) for d in dead],
                )
        return dead

    def resolve_run_id(self, ref: str) -> str:
        """The full id of the run whose id is ``ref`` or starts with it (unique prefix)."""
        ref = ref.strip()
        if not ref:
            raise RunNotFoundError("empty run id")
        rows = self._query(
            "SELECT id FROM runs WHERE id = ? OR id LIKE ? ESCAPE '\\' LIMIT 3",
            (ref, ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"),
        )
        ids = sorted({r["id"] for r in rows})
        if ref in ids:
            return ref
        if not ids:
            raise RunNotFoundError(f"no run {ref!r} in {self.path}")
        if len(ids) > 1:
            raise RunNotFoundError(f"run id {ref!r} is ambiguous: {', '.join(ids)}, ...")
        return ids[0]

    def get_run(self, ref: str) -> dict[str, Any]:
        self.mark_killed_runs()
        run_id = self.resolve_run_id(ref)
        row = self._query("SELECT * FROM runs WHERE id=?", (run_id,))[0]
        return _decode_run(row)

    def list_runs(
        self, *, kind: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        self.mark_killed_runs()
        sql, params = "SELECT * FROM runs WHERE 1=1", []
        if kind is not None:
            sql, params = sql + " AND kind=?", [*params, kind]
        if status is not None:
            sql, params = sql + " AND status=?", [*params, status]
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql, params = sql + " LIMIT ?", [*params, int(limit)]
        return [_decode_run(r) for r in self._query(sql, params)]

    # -- per-run records --------------------------------------------------------------------------
    def _touch(self, c: sqlite3.Connection, run_id: str) -> None:
        cur = c.execute("UPDATE runs SET updated_at=? WHERE id=?", (time.time(), run_id))
        if cur.rowcount != 1:
            raise RunNotFoundError(f"no run {run_id!r} in {self.path}")

    def add_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        *,
        round: int | None = None,
        step: int | None = None,
        scope: str = "run",
    ) -> None:
        """Adds several metrics in one transaction."""
        now = time.time()
        rows = []
        for name, value in metrics.items():
            try:
                v = _to_sql_float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"metric {name!r} must be a number, got {value!r}") from None
            rows.append((run_id, round, step, scope, name, v, now))
        with self.transaction() as c:
            self._touch(c, run_id)
            c.executemany(
                "INSERT INTO metrics (run_id, round, step, scope, name, value, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def add_privacy_event(self, run_id: str, event: Mapping[str, Any]) -> None:
        """Appends one ledger event (a :class:`~dpfl.accountants.PrivacyEvent` as a mapping)."""
        with self.transaction() as c:
            self._touch(c, run_id)
            c.execute(
                "INSERT INTO privacy_events (run_id, seq, participant, mechanism,"
                " noise_multiplier, sample_rate, steps, accountant, delta, epsilon_after, round,"
                " note, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    event["seq"],
                    event["participant"],
                    event["mechanism"],
                    event["noise_multiplier"],
                    event["sample_rate"],
                    event["steps"],
                    event["accountant"],
                    event["delta"],
                    _to_sql_float(event.get("epsilon_after")),
                    event.get("round"),
                    event.get("note"),
                    time.time(),
                ),
            )

    def start_round(self, run_id: str, round: int) -> None:
        with self.transaction() as c:
            self._touch(c, run_id)
            c.execute(
                "INSERT INTO rounds (run_id, round, status, started_at) VALUES (?, ?, 'running', ?)"
                " ON CONFLICT(run_id, round) DO UPDATE SET status='running',"
                " started_at=excluded.started_at, ended_at=NULL",
                (run_id, round, time.time()),
            )

    def end_round(
        self, run_id: str, round: int, status: str = "completed", info: Mapping | None = None
    ) -> None:
        """Ends round ``round``; ``info`` (what happened: sampled clients, dropped replies with
        their reasons, why a round was skipped) is stored as strict JSON (``jsonutil.dumps``)."""
        if status not in ("completed", "skipped", "failed"):
            raise ConfigError(f"round status must be completed, skipped or failed, got {status!r}")
        with self.transaction() as c:
            self._touch(c, run_id)
            c.execute(
                "INSERT INTO rounds (run_id, round, status, started_at, ended_at, info)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id, round) DO UPDATE SET"
                " status=excluded.status, ended_at=excluded.ended_at, info=excluded.info",
                (
                    run_id,
                    round,
                    status,
                    time.time(),
                    time.time(),
                    None if info is None else dumps(info),
                ),
            )

    def add_artifact(
        self,
        run_id: str,
        kind: str,
        name: str,
        data: bytes,
        *,
        round: int | None = None,
        media_type: str = "application/octet-stream",
        replace: bool = False,
    ) -> int:
        """Stores a blob (checkpoint, plot) inside the store; returns its id. ``replace``: the
        run's earlier artifacts of this ``kind`` are deleted in the same transaction (a central
        run keeps only its latest checkpoint, which for full fine-tuning is hundreds of MB)."""
        with self.transaction() as c:
            self._touch(c, run_id)
            if replace:
                c.execute("DELETE FROM artifacts WHERE run_id=? AND kind=?", (run_id, kind))
            cur = c.execute(
                "INSERT INTO artifacts (run_id, kind, name, round, media_type, data, sha256,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    kind,
                    name,
                    round,
                    media_type,
                    data,
                    hashlib.sha256(data).hexdigest(),
                    time.time(),
                ),
            )
            return int(cur.lastrowid)

    # -- reading per-run records ------------------------------------------------------------------
    def metrics(self, run_id: str, name: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT round, step, scope, name, value, recorded_at FROM metrics WHERE run_id=?"
        params: list[Any] = [run_id]
        if name is not None:
            sql, params = sql + " AND name=?", [*params, name]
        rows = self._query(sql + " ORDER BY id", params)
        for r in rows:
            if r["value"] is None:
                r["value"] = math.nan
        return rows

    def privacy_events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, participant, mechanism, noise_multiplier, sample_rate, steps, accountant,"
            " delta, epsilon_after, round, note, recorded_at FROM privacy_events WHERE run_id=?"
            " ORDER BY seq",
            (run_id,),
        )
        return rows  # epsilon_after None: not computed when recorded (see PrivacyLedger.record)

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT round, status, started_at, ended_at, info FROM rounds WHERE run_id=?"
            " ORDER BY round",
            (run_id,),
        )
        for r in rows:
            r["info"] = _decode_info(r["info"])
        return rows

    def dropped_replies(self, run_id: str) -> list[dict[str, Any]]:
        """Every reply the server dropped, in round order: round, node, participant (None when
        the reply did not name one) and reason."""
        out = []
        for r in self.rounds(run_id):
            info = r["info"]
            dropped = info.get("dropped") if isinstance(info, dict) else None
            for d in dropped if isinstance(dropped, list) else []:
                if isinstance(d, dict):
                    out.append(
                        {
                            "round": r["round"],
                            "node": d.get("node"),
                            "participant": d.get("participant"),
                            "reason": d.get("reason"),
                        }
                    )
        return out

    def artifacts(self, run_id: str, *, with_data: bool = False) -> list[dict[str, Any]]:
        cols = "id, kind, name, round, media_type, sha256, created_at, length(data) AS size"
        if with_data:
            cols += ", data"
        return self._query(f"SELECT {cols} FROM artifacts WHERE run_id=? ORDER BY id", (run_id,))


def _decode_info(text: str | None) -> Any:
    """A round's info: JSON (as written since the store exists); a Python literal (a repr, as a
    hand-edited or foreign row may hold) is read too; anything else is returned as the text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return jsonable(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _decode_run(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("config", "versions", "summary"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


class RunHandle:
    """Writes to one run. Every method is one committed transaction."""

    def __init__(self, store: RunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        *,
        round: int | None = None,
        step: int | None = None,
        scope: str = "run",
    ) -> None:
        self.store.add_metrics(self.run_id, metrics, round=round, step=step, scope=scope)

    def record_privacy_event(self, event: Any) -> None:
        """A :class:`~dpfl.accountants.PrivacyLedger` sink."""
        self.store.add_privacy_event(
            self.run_id, event.to_dict() if hasattr(event, "to_dict") else event
        )

    def start_round(self, round: int) -> None:
        self.store.start_round(self.run_id, round)

    def end_round(self, round: int, status: str = "completed", info: Mapping | None = None) -> None:
        self.store.end_round(self.run_id, round, status, info)

    def add_artifact(self, kind: str, name: str, data: bytes, **kwargs) -> int:
        return self.store.add_artifact(self.run_id, kind, name, data, **kwargs)

    def status(self) -> str:
        return self.store._query("SELECT status FROM runs WHERE id=?", (self.run_id,))[0]["status"]

    def finish(
        self, status: str = "completed", *, error: str | None = None, summary: Mapping | None = None
    ) -> None:
        self.store.finish_run(self.run_id, status, error=error, summary=summary)
