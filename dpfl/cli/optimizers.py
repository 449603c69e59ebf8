"""``dpfl optimizers``: the local solvers, their measured state size per role, and what they do."""

from __future__ import annotations

from dpfl.cli.common import JsonOption, console
from dpfl.cli.main import app
from dpfl.jsonutil import dumps


@app.command("optimizers")
def list_optimizers(as_json: JsonOption = False) -> None:
    """Solver names for optimizer.name, with their default learning rates (used unless
    optimizer.lr is set) and optimizer-state bytes per parameter (measured on a probe model
    after 10 steps)."""
    import torch
    from rich.table import Table

    from dpfl.config import OptimizerConfig
    from dpfl.optim import DESCRIPTIONS, OPTIMIZERS, create_optimizer
    from dpfl.optim.defaults import DEFAULT_LR
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
            "default_lr": {"dp": DEFAULT_LR[name][0], "non_private": DEFAULT_LR[name][1]},
            "state_bytes_per_param": state_bytes_per_param(opt, model),
            "description": DESCRIPTIONS.get(name, ""),
        }
    if as_json:
        console.print(dumps(rows), markup=False)
        return
    table = Table(
        title="local solvers (optimizer.name): default lr, fp32 state bytes per parameter"
    )
    numeric = ("lr DP", "lr non-DP", "hidden", "embedding", "head", "vector")
    for col in ("name", *numeric, "description"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for name, row in rows.items():
        b = row["state_bytes_per_param"]
        table.add_row(
            name,
            f"{row['default_lr']['dp']:g}",
            f"{row['default_lr']['non_private']:g}",
            *(f"{b.get(r, 0):g}" for r in ("hidden", "embedding", "head", "vector")),
            row["description"],
        )
    console.print(table)
