"""Flower's Ray simulation engine, for scale-out (``federation.backend = "ray"``).

Ray, as Flower starts it, listens on every network interface (gcs_server, raylet, actors bind
``*``; ``_node_ip_address`` does not change it; notes/flower.md). A simulation on one machine must
not open doors, so dpfl runs the Ray engine in a child process that first moves into a private
network namespace holding only a loopback interface (``unshare(CLONE_NEWNET)``, then ``lo`` up):
whatever Ray binds there is unreachable from any other host or namespace, and Ray's probe of
8.8.8.8 fails fast. This needs CAP_SYS_ADMIN (root, as on these machines); without it the backend
refuses to start rather than listen on the network.

The child runs the same ServerApp loop (``run_rounds``) and ClientApp through Flower's
``run_simulation`` with the machine's CPUs and one CPU per client actor, writes to the same run
store, and streams one line per round back to the parent for progress.
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
from collections.abc import Callable

from dpfl.config import Config
from dpfl.errors import ConfigError, DpflError
from dpfl.server.loop import FederationResult, ResumeState
from dpfl.store import RunHandle

__all__ = ["enter_private_network", "simulate_on_ray"]

CLONE_NEWNET = 0x40000000
_ROUND = "DPFL-ROUND "
_RESULT = "DPFL-RESULT "


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
    with tempfile.TemporaryDirectory() as tmp:
        payload = os.path.join(tmp, "payload.json")
        with open(payload, "w") as f:
            json.dump(
                {
                    "config": cfg.to_dict(),
                    "store": str(run.store.path),
                    "run_id": run.run_id,
                    "resume": resume is not None,
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

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from dpfl.clients.client_app import simulation_app
    from dpfl.server.loop import run_rounds
    from dpfl.simulation.runner import resume_state
    from dpfl.store import RunStore

    cfg = Config.from_dict(payload["config"])
    store = RunStore(payload["store"])
    run = RunHandle(store, payload["run_id"])
    resume = resume_state(store, run.run_id)[1] if payload["resume"] else None
    out: dict = {}

    def report(r: int, row: dict) -> None:
        print(_ROUND + json.dumps([r, row]), flush=True)

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        out["result"] = run_rounds(grid, cfg, run, resume=resume, on_round=report)

    run_simulation(
        server_app=server_app,
        client_app=simulation_app(),
        num_supernodes=cfg.federation.num_clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 1,
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
