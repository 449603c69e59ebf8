"""A simulation on one machine must not listen on the network: the in-process engine opens no
socket at all. (Flower's Ray engine binds every interface: notes/flower.md.)"""

import os
from pathlib import Path

from dpfl.config import load_config
from dpfl.simulation.runner import simulate


def listening_sockets_of(pid: int) -> list[str]:
    """'addr:port' of every TCP/UDP socket in LISTEN (or unconnected UDP) state owned by pid."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            listening = cols[3] == "0A" if table.startswith("tcp") else cols[3] == "07"
            if listening and cols[9] in inodes:
                found.append(f"{table} {cols[1]}")
    return found


def test_inprocess_simulation_listens_on_nothing():
    seen = []
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "federation.num-clients=3",
            "federation.rounds=2",
            "federation.local-steps=1",
        ],
    )
    simulate(cfg, on_round=lambda r, row: seen.append(listening_sockets_of(os.getpid())))
    assert seen == [[], []]


def test_the_socket_probe_sees_a_listening_socket():
    # the probe itself must be able to fail
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert listening_sockets_of(os.getpid())
    finally:
        s.close()
