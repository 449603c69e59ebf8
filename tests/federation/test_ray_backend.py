"""Flower's Ray engine, isolated: the same results as the in-process engine, bit for bit (losses,
privacy, the final model), and not one new listening socket on this machine's network while it
runs.

The config is one where a wrong node naming shows: seed 3 samples all four clients in round 1
(the order of the float sums matters) and partitions 0 and 3 in round 2 (which clients are
sampled matters), from the in-process engine's node names 1..4.
"""

import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from dpfl.clients.client_app import app
from dpfl.config import load_config
from dpfl.federation_messages import HISTORY
from dpfl.server.loop import load_checkpoint, run_rounds, sample_clients
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.simulation.ray_backend import PartitionGrid, ray_client_app
from dpfl.simulation.runner import resume_state, simulate
from dpfl.store import RunStore

SETS = [
    "seed=3",
    "data.name='digits'",
    "federation.num-clients=4",
    "federation.fraction=0.5",
    "federation.rounds=2",
    "federation.local-steps=2",
    "data.batch-size=32",
]


def test_the_config_is_one_where_node_names_matter():
    cfg = load_config(None, SETS)
    assert sample_clients(cfg, [1, 2, 3, 4], 1) == [1, 2, 3, 4]
    assert sample_clients(cfg, [1, 2, 3, 4], 2) == [1, 4]


def final_state(store: RunStore, run_id: str) -> dict[str, torch.Tensor]:
    checkpoints = [a for a in store.artifacts(run_id, with_data=True) if a["kind"] == "checkpoint"]
    return load_checkpoint(max(checkpoints, key=lambda a: a["round"])["data"])["global_state"]


def run_stored(cfg, path: Path, grid: Grid | None = None, on_round=None):
    """(result, final global model, privacy events) of one recorded run."""
    with RunStore(path) as store, store.run("simulate", cfg.to_dict()) as run:
        if grid is None:
            result = simulate(cfg, run, on_round=on_round)
        else:
            result = run_rounds(grid, cfg, run)
        return result, final_state(store, run.run_id), store.privacy_events(run.run_id)


def assert_identical(a, b):
    (res_a, state_a, events_a), (res_b, state_b, events_b) = a, b
    assert res_a.rounds_completed == res_b.rounds_completed == 2
    assert [h["loss"] for h in res_a.history] == [h["loss"] for h in res_b.history]
    assert (res_a.loss, res_a.accuracy) == (res_b.loss, res_b.accuracy)
    assert res_a.epsilon == res_b.epsilon
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert ledger(events_a) == ledger(events_b)


def ledger(events) -> list[tuple]:
    return [(e["participant"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events]


class RayLikeGrid(Grid):
    """What Flower's Ray engine shows a ServerApp: random 64-bit node ids (new each run), listed
    in no order, and replies in any order. Delivers through an in-process grid."""

    def __init__(self, inner: InProcessGrid, seed: int) -> None:
        self.inner, self.rng = inner, random.Random(seed)
        names = list(inner.get_node_ids())
        ids = self.rng.sample(range(1, 2**63), len(names))
        self.to_inner = dict(zip(ids, names, strict=True))
        self.to_outer = {v: k for k, v in self.to_inner.items()}

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self):
        return list(self.to_inner)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            m.metadata.dst_node_id = self.to_inner[m.metadata.dst_node_id]
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for r in replies:
            r.metadata.__dict__["_src_node_id"] = self.to_outer[r.metadata.src_node_id]
        self.rng.shuffle(replies)
        return replies


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process engine's run of SETS: (result, final model, privacy events)."""
    return run_stored(load_config(None, SETS), tmp_path_factory.mktemp("ref") / "ref.sqlite")


def ray_like(seed: int) -> RayLikeGrid:
    return RayLikeGrid(InProcessGrid(ray_client_app(torch.get_num_threads()), 4), seed)


def test_partition_grid_gives_the_inprocess_results_on_random_node_ids(tmp_path, reference):
    cfg = load_config(None, SETS)
    named = PartitionGrid(ray_like(1), 4)
    assert named.get_node_ids() == [1, 2, 3, 4]
    assert_identical(run_stored(cfg, tmp_path / "named.sqlite", named), reference)
    # without the naming, this config samples and sums other partitions (what the Ray backend did)
    raw, _, _ = run_stored(cfg, tmp_path / "raw.sqlite", ray_like(1))
    assert [h["loss"] for h in raw.history] != [h["loss"] for h in reference[0].history]


def test_a_run_resumed_on_new_random_node_ids_sends_each_client_its_history(tmp_path, reference):
    """A resumed Ray run is a new Ray process with new node ids; the checkpoint keys clients by
    node, so only stable names find each client's privacy history (its budget guard needs it)."""
    cfg = load_config(None, SETS)

    def kill_after_one(r, row):
        if r == 1:
            raise KeyboardInterrupt

    with RunStore(tmp_path / "killed.sqlite") as store:
        with pytest.raises(KeyboardInterrupt), store.run("simulate", cfg.to_dict()) as run:
            run_rounds(PartitionGrid(ray_like(1), 4), cfg, run, on_round=kill_after_one)
        cfg, state = resume_state(store, run.run_id)
        assert state is not None and state.round == 1
        second = ray_like(2)
        sent = []
        deliver = second.send_and_receive

        def recording(messages, *, timeout=None):
            messages = list(messages)
            sent.extend(
                dict(m.content["config"])
                for m in messages
                if m.metadata.message_type == MessageType.TRAIN
            )
            return deliver(messages, timeout=timeout)

        second.send_and_receive = recording
        with store.tracking(store.reopen_run(run.run_id)) as again:
            result = run_rounds(PartitionGrid(second, 4), cfg, again, resume=state)
        events = store.privacy_events(run.run_id)
    assert len(sent) == 2 and all(HISTORY in c for c in sent)  # round 2 samples 0 and 3
    assert [h["loss"] for h in result.history] == [reference[0].history[1]["loss"]]
    assert result.epsilon == reference[0].epsilon
    assert ledger(events) == ledger(reference[2])


def test_partition_grid_refuses_nodes_that_do_not_say_their_partition():
    grid = RayLikeGrid(InProcessGrid(app, 3), 0)  # dpfl's plain app has no identify query
    with pytest.raises(Exception, match="did not say its partition"):
        PartitionGrid(grid, 3)


def test_ray_client_app_trains_with_the_callers_thread_count(monkeypatch):
    import dpfl.clients.client_app as client_app

    seen = []

    def spy(msg, context):
        seen.append(torch.get_num_threads())
        return Message(RecordDict(), reply_to=msg)

    monkeypatch.setattr(client_app, "train", spy)
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    ray_app = ray_client_app(wanted)
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 5}, state=RecordDict(), run_config={}
    )
    try:
        msg = Message(
            RecordDict({"config": ConfigRecord({})}),
            dst_node_id=7,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        msg.metadata.__dict__["_message_id"] = "m1"
        ray_app(msg, context)
        ask = Message(
            RecordDict(),
            dst_node_id=7,
            message_type=f"{MessageType.QUERY}.dpfl_partition",
            group_id="0",
        )
        ask.metadata.__dict__["_message_id"] = "m2"
        reply = ray_app(ask, context)
    finally:
        torch.set_num_threads(before)
    assert seen == [wanted]
    assert reply.content.config_records["dpfl"]["partition-id"] == 5


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
def test_ray_engine_is_bit_identical_to_inprocess_and_opens_no_door(tmp_path):
    pytest.importorskip("ray")
    before = host_listening()
    during = []
    cfg_ray = load_config(None, [*SETS, "federation.backend='ray'"])

    def on_ray(i: int):
        return run_stored(
            cfg_ray,
            tmp_path / f"ray{i}.sqlite",
            on_round=lambda r, row: during.append(host_listening()),
        )

    with ThreadPoolExecutor(2) as pool:  # two Ray runs at once: each in its own namespace
        ray_runs = list(pool.map(on_ray, (1, 2)))
    local = run_stored(load_config(None, SETS), tmp_path / "inprocess.sqlite")
    assert math.isfinite(local[0].loss)
    assert_identical(ray_runs[0], ray_runs[1])
    assert_identical(ray_runs[0], local)
    assert {e["participant"] for e in ray_runs[0][2]} == {f"client-{i}" for i in range(4)}
    assert len(during) == 4 and all(d - before == set() for d in during)
