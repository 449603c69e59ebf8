"""Flower's Ray engine, isolated: the same results as the in-process engine, and not one new
listening socket on this machine's network while it runs."""

import math
from pathlib import Path

import pytest

from dpfl.config import load_config
from dpfl.simulation.runner import simulate
from dpfl.store import RunStore

SETS = [
    "data.name='digits'",
    "federation.num-clients=3",
    "federation.rounds=2",
    "federation.local-steps=2",
    "data.batch-size=32",
]


def host_listening() -> set[tuple[str, str]]:
    """Listening TCP / bound UDP (local address, table) in this process's network namespace."""
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == ("0A" if table.startswith("tcp") else "07"):
                found.add((table, cols[1]))
    return found


@pytest.mark.slow
def test_ray_engine_matches_inprocess_and_opens_no_door(tmp_path):
    try:
        from dpfl.simulation.ray_backend import enter_private_network  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("no ray")
    before = host_listening()
    during = []
    cfg_ray = load_config(None, [*SETS, "federation.backend='ray'"])
    with (
        RunStore(tmp_path / "ray.sqlite") as store,
        store.run("simulate", cfg_ray.to_dict()) as run,
    ):
        ray = simulate(cfg_ray, run, on_round=lambda r, row: during.append(host_listening()))
        events = store.privacy_events(run.run_id)
    cfg = load_config(None, SETS)
    local = simulate(cfg)
    assert ray.rounds_completed == 2 and math.isfinite(ray.accuracy)
    assert ray.accuracy == local.accuracy
    assert ray.epsilon == pytest.approx(local.epsilon, rel=1e-12)
    assert {e["participant"] for e in events} == {"client-0", "client-1", "client-2"}
    assert len(during) == 2 and all(d - before == set() for d in during)
