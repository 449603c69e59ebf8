"""Flower's Ray simulation engine, for scale-out (``federation.backend = "ray"``).

Ray, as Flower starts it, listens on every network interface (gcs_server, raylet, actors bind
``*``; ``_node_ip_address`` does not change it; notes/flower.md). A simulation on one machine must
not open doors, so dpfl runs the Ray engine in a child process that first moves into a private
network namespace holding only a loopback interface (``unshare(CLONE_NEWNET)``, then ``lo`` up):
whatever Ray binds there is unreachable from any other host or namespace, and Ray's probe of
8.8.8.8 fails fast. This needs CAP_SYS_ADMIN (root, as on these machines); without it the backend
refuses to start rather than listen on the network.

The child runs the same ServerApp loop (``run_rounds``) and ClientApp through Flower's
``run_simulation``, writes to the same run store, and streams one line per round back to the
parent for progress.

Same results as the in-process engine, bit for bit (losses, privacy, the final model). Two
things differ on Ray and are undone here:

* node ids: Flower's Ray engine gives its SuperNodes random 64-bit ids (new ones every run),
  while the in-process engine names node ``partition-id + 1``. The round loop samples clients
  and orders the aggregation by node id, so on raw Ray ids a Poisson sample picks other
  partitions in every run and the float sums run in another order. :class:`PartitionGrid` asks
  each node its partition once (a ``query`` message) and shows the loop the in-process names;
  checkpoints (which key clients by node) then also mean the same thing in both engines;
* threads: Ray sets a client actor's ``OMP_NUM_THREADS`` to the CPUs it reserves (one, before),
  while the in-process engine trains with this process's torch intra-op thread count, and
  parallel reductions (matrix products) give other bits with another thread count. Every
  process of the Ray run uses the caller's count (``torch.get_num_threads()``), and each client
  actor reserves that many CPUs, so the machine is not oversubscribed: ``cpu_count // threads``
  clients train at once (with ``OMP_NUM_THREADS=1``, one per CPU, and the in-process engine then
  also uses one thread).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from dpfl.config import Config
from dpfl.errors import ConfigError, DpflError
from dpfl.server.loop import FederationResult, ResumeState
from dpfl.store import RunHandle

__all__ = ["PartitionGrid", "enter_private_network", "ray_client_app", "simulate_on_ray"]

CLONE_NEWNET = 0x40000000
_ROUND = "DPFL-ROUND "
_RESULT = "DPFL-RESULT "
#: the query action by which :class:`PartitionGrid` learns a node's partition
IDENTIFY = "dpfl_partition"


def _identify(msg: Message, context: Context) -> Message:
    """A node's answer to :data:`IDENTIFY`: its partition id, from its node config."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"dpfl": ConfigRecord({"partition-id": pid})}), reply_to=msg)


class _PinThreads:
    """A ClientApp mod: torch's intra-op thread count, set before every message is handled
    (Ray sets an actor's ``OMP_NUM_THREADS`` to the CPUs it reserves; this does not rely on it)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return call_next(msg, context)


class _Delegate:
    def __init__(self, app: ClientApp) -> None:
        self.app = app

    def __call__(self, msg: Message, context: Context) -> Message:
        return self.app(msg, context)


def ray_client_app(threads: int) -> ClientApp:
    """dpfl's simulation ClientApp with ``threads`` torch threads, and the :data:`IDENTIFY`
    query that :class:`PartitionGrid` asks."""
    from dpfl.clients.client_app import simulation_app

    app = ClientApp(mods=[_PinThreads(threads)])
    app.train()(_Delegate(simulation_app()))
    app.query(IDENTIFY)(_identify)
    return app


def _wait_for_nodes(grid: Grid, num_nodes: int, wait: float) -> list[int]:
    """The grid's node ids once all ``num_nodes`` are registered (the engine registers them
    while the ServerApp starts)."""
    end = time.monotonic() + wait
    while len(real := sorted(grid.get_node_ids())) < num_nodes:
        if time.monotonic() > end:
            raise DpflError(f"only {len(real)} of {num_nodes} nodes came up in {wait:.0f} s")
        time.sleep(0.05)
    return real


class PartitionGrid(Grid):
    """``grid`` with its nodes named as the in-process engine names them: ``partition-id + 1``.

    Flower's Ray engine draws random node ids; the round loop samples clients and orders their
    replies by node id, so the same run would sample and sum other partitions in another order.
    On construction each node is asked its partition (one ``query.dpfl_partition`` message);
    then messages go out to the real node of a name and replies come back under the name.
    """

    def __init__(
        self, grid: Grid, num_nodes: int, timeout: float | None = None, wait: float = 300.0
    ) -> None:
        self._grid = grid
        real = _wait_for_nodes(grid, num_nodes, wait)
        asks = [
            Message(
                RecordDict(),
                dst_node_id=n,
                message_type=f"{MessageType.QUERY}.{IDENTIFY}",
                group_id="dpfl-identify",
            )
            for n in real
        ]
        names: dict[int, int] = {}
        for reply in grid.send_and_receive(asks, timeout=timeout):
            if reply.has_error():
                raise DpflError(f"a node did not say its partition: {reply.error.reason}")
            names[reply.metadata.src_node_id] = (
                int(reply.content.config_records["dpfl"]["partition-id"]) + 1
            )
        if set(names) != set(real) or sorted(names.values()) != list(range(1, len(real) + 1)):
            raise DpflError(
                f"the {len(real)} nodes did not report partitions 0..{len(real) - 1} "
                f"(answers: {sorted(names.values())})"
            )
        self._name = names
        self._real = {v: r for r, v in names.items()}

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._real)

    def _out(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for msg in messages:
            name = msg.metadata.dst_node_id
            if name not in self._real:
                raise DpflError(f"no node {name} in this federation")
            msg.metadata.dst_node_id = self._real[name]
            out.append(msg)
        return out

    def _in(self, replies: Iterable[Message]) -> list[Message]:
        back = []
        for reply in replies:
            meta = reply.metadata.__dict__
            meta["_src_node_id"] = self._name.get(meta["_src_node_id"], meta["_src_node_id"])
            back.append(reply)
        return back

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._out(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._in(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return self._in(self._grid.send_and_receive(self._out(messages), timeout=timeout))


def enter_private_network() -> None:
    """Moves this process into a new network namespace with only ``lo``, brought up."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise ConfigError(
            "the ray backend runs in a private network namespace so that Ray listens on no "
            f"network interface, and this process may not create one ({os.strerror(err)}); "
            "use federation.backend='inprocess' (no sockets at all) or run as root"
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, siocgifflags, ifreq))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))
    finally:
        sock.close()


def simulate_on_ray(
    cfg: Config,
    run: RunHandle | None,
    *,
    resume: ResumeState | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> FederationResult:
    """Runs the federation on Flower's Ray engine in an isolated child process."""
    if run is None:
        raise ConfigError("the ray backend records through the run store; give it a run")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        payload = os.path.join(tmp, "payload.json")
        with open(payload, "w") as f:
            json.dump(
                {
                    "config": cfg.to_dict(),
                    "store": str(run.store.path),
                    "run_id": run.run_id,
                    "resume": resume is not None,
                    # the in-process engine's count: the same reductions, the same bits
                    "threads": torch.get_num_threads(),
                },
                f,
            )
        proc = subprocess.Popen(
            [sys.executable, "-m", "dpfl.simulation.ray_backend", payload],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        result = None
        assert proc.stdout is not None  # noqa: S101 - created with PIPE above
        for line in proc.stdout:
            if line.startswith(_ROUND) and on_round is not None:
                r, row = json.loads(line[len(_ROUND) :])
                on_round(int(r), row)
            elif line.startswith(_RESULT):
                result = json.loads(line[len(_RESULT) :])
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.wait() != 0 or result is None:
            last = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or ["no output"]
            raise DpflError(f"the ray simulation failed: {last[0]}")
    return FederationResult(**result)


def _child(payload_path: str) -> None:
    with open(payload_path) as f:
        payload = json.load(f)
    enter_private_network()
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from dataclasses import asdict

    import torch
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from dpfl.server.loop import run_rounds
    from dpfl.simulation.runner import resume_state
    from dpfl.store import RunStore

    cpus = os.cpu_count() or 1
    threads = max(1, min(int(payload["threads"]), cpus))
    torch.set_num_threads(threads)  # the server's evaluation and aggregation
    cfg = Config.from_dict(payload["config"])
    store = RunStore(payload["store"])
    run = RunHandle(store, payload["run_id"])
    kind = store.get_run(run.run_id)["kind"]  # simulate, or finetune-federated
    resume = resume_state(store, run.run_id, kinds=(kind,))[1] if payload["resume"] else None
    out: dict = {}

    def report(r: int, row: dict) -> None:
        print(_ROUND + json.dumps([r, row]), flush=True)

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        named = PartitionGrid(
            grid, cfg.federation.num_clients, timeout=cfg.federation.reply_timeout
        )
        out["result"] = run_rounds(named, cfg, run, resume=resume, on_round=report)

    run_simulation(
        server_app=server_app,
        client_app=ray_client_app(threads),
        num_supernodes=cfg.federation.num_clients,
        backend_name="ray",
        backend_config={
            # an actor trains with `threads` threads: it reserves as many CPUs
            "client_resources": {"num_cpus": threads, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cpus,
                "include_dashboard": False,
                "log_to_driver": False,
            },
        },
    )
    if "result" not in out:
        raise DpflError("the ServerApp did not finish")
    print(_RESULT + json.dumps(asdict(out["result"])), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
