"""dpfl's Flower ServerApp: read the config, open the run store, run the round loop.

Under ``flwr run`` the config is ``context.run_config`` (``[tool.flwr.app.config]`` of
pyproject.toml plus ``--run-config`` overrides; flat kebab-case keys, ``"none"`` unsets an
optional key). The run store is ``store.path`` of the config, or ``$DPFL_STORE``.
"""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfl.config import Config
from dpfl.server.loop import run_rounds
from dpfl.store import RunStore

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = Config.from_flat(dict(context.run_config))
    store_path = os.environ.get("DPFL_STORE", cfg.store.path)
    with (
        RunStore(store_path) as store,
        store.run("simulate", cfg.to_dict(), name=cfg.name, seed=cfg.seed) as run,
    ):
        result = run_rounds(grid, cfg, run)
        failed = result.stopped in ("failed", "diverged", "no-progress")
        run.finish(
            "failed" if failed else "completed",
            error=result.message if failed else None,
            summary={
                "accuracy": result.accuracy,
                "rounds": result.rounds_completed,
                "stopped": result.stopped,
                "epsilon": result.epsilon,
                "engine": "flower",
            },
        )
