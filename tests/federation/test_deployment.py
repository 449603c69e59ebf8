"""The same Flower App on Flower's Deployment Engine: a SuperLink and two SuperNodes on
127.0.0.1 (insecure, local only), 2 rounds, the run recorded in the store."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dpfl.store import RunStore

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def run_on_deployment_engine(tmp_path, node_configs: list[str], run_config: str) -> Path:
    """A SuperLink and one SuperNode per node config on 127.0.0.1, then ``flwr run`` of the
    dpfl app with ``run_config``; returns the run store."""
    link, node_ports = free_port(), [free_port() for _ in node_configs]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n"
    )
    store = tmp_path / "runs.sqlite"
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "DPFL_STORE": str(store),
    }
    logs = []

    def start(*cmd):
        log = open(tmp_path / f"{len(logs)}.log", "w")  # noqa: SIM115
        logs.append(log)
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    procs = [
        start(
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link),
            "--disable-runtime-dependency-installation",
        )
    ]
    try:
        wait_for_port(link)
        for node_config, port in zip(node_configs, node_ports, strict=True):
            procs.append(
                start(
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    node_config,
                )
            )
        # Execute
        run = subprocess.run(
            ["flwr", "run", str(ROOT), "test", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        (tmp_path / "flwr-run.log").write_text(run.stdout + run.stderr)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    return store


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr CLI not installed")
def test_two_supernodes_run_two_rounds_of_the_dpfl_app(tmp_path):
    store = run_on_deployment_engine(
        tmp_path,
        [f"partition-id={i} num-partitions=2" for i in range(2)],
        "data.name='digits' federation.num-clients=2 federation.rounds=2 "
        "federation.local-steps=2 data.batch-size=32",
    )
    # Assert: `flwr run` exit status is not trusted (flwrlabs/flower#7953): check the store
    with RunStore(store) as s:
        (row,) = s.list_runs()
        assert row["status"] == "completed" and row["summary"]["rounds"] == 2
        assert {e["participant"] for e in s.privacy_events(row["id"])} == {"client-0", "client-1"}
        assert [r["status"] for r in s.rounds(row["id"])] == ["completed", "completed"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr CLI not installed")
def test_async_fedbuff_on_supernodes_of_different_speeds_aggregates_in_arrival_order(tmp_path):
    # Prepare: two fast nodes and one that replies SLOW seconds late; FedBuff with c = 2 on the
    # real clock, sample-level DP
    slow = 12
    store = run_on_deployment_engine(
        tmp_path,
        [
            "partition-id=0 num-partitions=3",
            "partition-id=1 num-partitions=3",
            f"partition-id=2 num-partitions=3 delay-seconds={slow}",
        ],
        "data.name='digits' federation.num-clients=3 federation.local-steps=2 "
        "data.batch-size=32 privacy.target-epsilon='none' privacy.noise-multiplier=1.0 "
        "federation.mode='async' "
        "federation.async-scheme='fedbuff' federation.async-buffer=2 "
        "federation.async-weights='identical' federation.clock='real' "
        f"federation.horizon={slow + 30}",  # a fresh ClientApp process per message: ~15 s
    )
    with RunStore(store) as s:
        (row,) = s.list_runs()
        rounds = s.rounds(row["id"])
        events = s.privacy_events(row["id"])
    assert row["status"] == "completed", row
    infos = [r["info"] for r in rounds]
    times = [i["time"] for i in infos]
    # Assert: aggregations in time order, c = 2 replies each; the two fast nodes fill the first
    # buffers while the slow node is still out
    assert times == sorted(times) and all(len(i["participants"]) == 2 for i in infos)
    assert sorted(infos[0]["participants"]) == ["client-0", "client-1"]
    with_slow = [(k, i) for k, i in enumerate(infos, start=1) if "client-2" in i["participants"]]
    assert len(with_slow) >= 1 and with_slow[0][0] >= 2, infos
    # its reply was computed on the initial model: stale by every aggregation before it
    k, info = with_slow[0]
    assert info["staleness"][info["participants"].index("client-2")] == k - 1
    assert info["time"] >= slow
    # every reply's privacy is on record, each client's under its own name
    assert {e["participant"] for e in events} == {"client-0", "client-1", "client-2"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="flwr CLI not installed")
def test_flwr_run_dot_on_the_local_simulation_superlink(tmp_path):
    # `flwr run .` starts a detached local SuperLink (simulation mode); the environment variable
    # keeps it from installing [project].dependencies (a CUDA torch) with uv
    home = tmp_path / "flwr-home"
    home.mkdir()
    store = tmp_path / "runs.sqlite"
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "DPFL_STORE": str(store),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    try:
        run = subprocess.run(
            [
                "flwr",
                "run",
                str(ROOT),
                "--stream",
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2",
                "--run-config",
                "data.name='digits' federation.num-clients=2 federation.rounds=2 "
                "federation.local-steps=2 data.batch-size=32",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    finally:  # the local SuperLink outlives `flwr run`: stop the one under this FLWR_HOME
        subprocess.run(["pkill", "-f", str(home)], check=False)
    with RunStore(store) as s:
        (row,) = s.list_runs()
        assert row["status"] == "completed" and row["summary"]["rounds"] == 2
