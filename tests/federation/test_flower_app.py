"""The Flower App wiring: pyproject's [tool.flwr.app] points at working apps, and its config
is dpfl simulate's embedded default."""

import sys
from pathlib import Path

from flwr.app import Context, RecordDict

from dpfl.cli.simulate import DEFAULT_CONFIG
from dpfl.config import Config, load_config
from dpfl.store import RunStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def pyproject_app():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]


def test_flower_run_config_is_the_embedded_default_with_every_key():
    import dataclasses

    run_config = flatten(pyproject_app()["config"])
    assert Config.from_flat(run_config) == load_config(DEFAULT_CONFIG)
    # `flwr run --run-config` can only override keys that exist there
    every = {"name", "seed", "task"} | {
        f"{section}.{f.name.replace('_', '-')}"
        for section in (
            "privacy",
            "optimizer",
            "data",
            "model",
            "training",
            "federation",
            "lora",
            "store",
        )
        for f in dataclasses.fields(getattr(Config(), section))
    }
    assert set(run_config) == every


def test_components_are_the_apps_and_run_a_federation(store_path, monkeypatch):
    # Prepare: the ServerApp as Flower calls it, with a run_config like `flwr run -c ...` makes
    import importlib

    components = pyproject_app()["components"]
    mod, _, attr = components["serverapp"].partition(":")
    server_app = getattr(importlib.import_module(mod), attr)
    mod, _, attr = components["clientapp"].partition(":")
    client_app = getattr(importlib.import_module(mod), attr)
    run_config = flatten(pyproject_app()["config"]) | {
        "data.name": "digits",
        "federation.num-clients": 3,
        "federation.rounds": 2,
        "federation.local-steps": 2,
        "data.batch-size": 32,
    }
    from dpfl.simulation.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, 3)
    monkeypatch.setenv("DPFL_STORE", str(store_path))
    # Execute
    server_app(
        grid,
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    # Assert
    with RunStore(store_path) as store:
        (run,) = store.list_runs()
        assert run["status"] == "completed" and run["summary"]["rounds"] == 2
        assert {e["participant"] for e in store.privacy_events(run["id"])} == {
            "client-0",
            "client-1",
            "client-2",
        }


def test_check_state_names_every_kind_of_malformed_update():
    import torch

    from dpfl.server.aggregation import check_state

    ref = {"w": torch.zeros(2, 3), "n": torch.zeros(1, dtype=torch.long)}
    assert check_state(ref, {"w": torch.ones(2, 3), "n": torch.ones(1, dtype=torch.long)}) is None
    assert "wrong keys" in check_state(ref, {"w": torch.ones(2, 3)})
    assert "wrong shape for w" in check_state(ref, {"w": torch.ones(3, 2), "n": ref["n"]})
    assert "wrong dtype for w" in check_state(ref, {"w": torch.ones(2, 3).double(), "n": ref["n"]})
    bad = torch.ones(2, 3)
    bad[0, 0] = float("inf")
    assert "non-finite" in check_state(ref, {"w": bad, "n": ref["n"]})
