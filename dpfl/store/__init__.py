"""SQLite run store: runs, rounds, metrics, privacy ledger, artifacts."""

from dpfl.store.export import export_run, run_to_dict
from dpfl.store.run_store import (
    RUN_STATUSES,
    UNCOVERED_PREFIX,
    RunHandle,
    RunStore,
    software_versions,
)

__all__ = [
    "RUN_STATUSES",
    "UNCOVERED_PREFIX",
    "RunHandle",
    "RunStore",
    "export_run",
    "run_to_dict",
    "software_versions",
]
