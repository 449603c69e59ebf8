"""A folder's experiment runs: ``runs.json`` (one row per finished run, appended under a lock)
and a claim file, so several ``--queue`` workers on one machine each take the next missing run.

Used by experiments/fedsvd/run.py and experiments/async/run.py.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Hashable, Iterable
from contextlib import contextmanager
from pathlib import Path


class RunQueue:
    def __init__(self, folder: Path, key: Callable[[dict], Hashable]) -> None:
        self.folder = folder
        self.key = key  # a finished row -> the job it was (probes: None, never a job)
        self.runs = folder / "runs.json"
        self.claims = folder / ".claims.json"  # delete it to re-run what a killed worker held

    @contextmanager
    def _locked(self):
        with open(self.folder / ".runs.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def rows(self) -> list[dict]:
        return json.loads(self.runs.read_text()) if self.runs.exists() else []

    def append(self, row: dict, on_rows: Callable[[list[dict]], object] | None = None) -> None:
        """Adds ``row`` (printed first), then calls ``on_rows`` with every row (results.json)."""
        print(json.dumps(row), flush=True)
        with self._locked():
            rows = [*self.rows(), row]
            self.runs.write_text(json.dumps(rows, indent=1) + "\n")
            if on_rows is not None:
                on_rows(rows)

    def claim_next(self, jobs: Iterable[tuple]) -> tuple | None:
        """The first of ``jobs`` neither done nor claimed by another worker (and claims it)."""
        with self._locked():
            claimed = (
                [tuple(c) for c in json.loads(self.claims.read_text())]
                if self.claims.exists()
                else []
            )
            done = {self.key(r) for r in self.rows()}
            for job in jobs:
                if job not in done and job not in claimed:
                    self.claims.write_text(json.dumps([*claimed, job]))
                    return job
        return None
