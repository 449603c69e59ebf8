"""``dpfl optimizers``: the local solvers, their measured state size per role, and what they do."""

from __future__ import annotations

import torch
from rich.table import Table

from dpfl.cli.common import JsonOption, console
from dpfl.cli.main import app
from dpfl.jsonutil import dumps


@app.command("optimizers")
def list_optimizers(as_json: JsonOption = False) -> None:
    """Solver names for optimizer.name, with optimizer-state bytes per parameter (measured
    on a probe model after 10 steps)."""
    from dpfl.config import OptimizerConfig
    from dpfl.optim import DESCRIPTIONS, OPTIMIZERS, create_optimizer
    from dpfl.optim.state_size import ProbeModel, state_bytes_per_param

    rows = {}
    for name in OPTIMIZERS.names():
        torch.manual_seed(0)
        model = ProbeModel()
        opt = create_optimizer(OptimizerConfig(name=name, lr=1e-3, momentum=0.9), model)
        for _ in range(
            10
        ):  # block-sampling solvers (frugal, drop-muon) fill their state over steps
            opt.zero_grad()
            model(torch.randint(0, 20, (4, 3))).sum().backward()
            opt.step()
        rows[name] = {
            "state_bytes_per_param": state_bytes_per_param(opt, model),
            "description": DESCRIPTIONS.get(name, ""),
        }
    if as_json:
        console.print(dumps(rows), markup=False)
        return
    table = Table(title="local solvers (optimizer.name): fp32 state bytes per parameter")
    for col in ("name", "hidden", "embedding", "head", "vector", "description"):
        table.add_column(
            col, justify="right" if col in ("hidden", "embedding", "head", "vector") else "left"
        )
    for name, row in rows.items():
        b = row["state_bytes_per_param"]
        table.add_row(
            name,
            *(f"{b.get(r, 0):g}" for r in ("hidden", "embedding", "head", "vector")),
            row["description"],
        )
    console.print(table)
