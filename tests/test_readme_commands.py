"""Every command block of the README runs: each ``dpfl ...`` line (syntax lines with their
optional ``[...]`` parts dropped and the first of ``a|b`` alternatives taken; long runs shortened)
exits 0 in a fresh directory, and the runs it records reach a sensible accuracy.

Not run here: the install + pytest blocks (CI runs them), ``flwr run .`` on Ray and the
Deployment Engine recipe (``tests/federation/test_deployment.py`` runs that recipe), and the
development block (tooling)."""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dpfl.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: command -> extra arguments that shorten it (a prefix match on the instantiated command)
SHORTER = {
    "dpfl simulate --set privacy.level": ["--set", "federation.rounds=4"],
    "dpfl simulate --set data.path": [],
    "dpfl simulate --resume": [],
    "dpfl simulate --set federation.mode='async'": ["--set", "federation.horizon=3"],
    "dpfl simulate": ["--set", "federation.rounds=3"],
    "dpfl audit run": ["--set", "training.epochs=1"],
    # MiniLM on 2 cores: a few steps on a few hundred records (runs too short to be judged)
    "dpfl finetune --resume": [],
    "dpfl finetune --federated": [
        "--set", "data.max-records=3000", "--set", "federation.rounds=1",
        "--set", "federation.local-steps=1", "--set", "data.batch-size=32",
    ],
    "dpfl finetune": [
        "--set", "data.max-records=300", "--set", "training.max-steps=2",
        "--set", "data.batch-size=32",
    ],
}  # fmt: skip
#: smallest accuracy a recorded run must reach, by command prefix (after shortening)
FLOORS = {
    "dpfl train --non-private": 0.9,
    "dpfl train --set data.path=mydata.npz --set model.path": 0.9,
    "dpfl train --set data.path": 0.8,
    "dpfl train": 0.85,
    "dpfl simulate --set privacy.level": 0.2,  # 4 of 15 rounds of user-level DP (0.29 here)
    "dpfl simulate --set data.path": 0.8,
    "dpfl simulate --set federation.mode='async'": 0.4,  # FedFix-0.5, F-80, 3 of 30 time units
    "dpfl simulate": 0.5,  # 3 of 15 rounds
}
NOT_RUN = ("pip install", "pytest", "flwr run", "flower-superlink", "ruff", "benchmarks/")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def command_lines(block: str) -> list[str]:
    out, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if not current and line.lstrip().startswith("#"):
            continue
        if not current and out and raw[:1].isspace() and line.strip():  # a syntax line goes on
            out[-1] += " " + re.sub(r"\s+#\s.*$", "", line.strip())
            continue
        current += (" " if current else "") + line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current:
            out.append(re.sub(r"\s+#\s.*$", "", current))
        current = ""
    return out


def instantiate(line: str) -> str:
    line = re.sub(r"\s*\[[^\]]*\]", "", line)  # optional parts
    return re.sub(r"(?<=\s)([\w.-]+)\|[\w.|-]+", r"\1", line)  # first alternative


def readme_blocks() -> list[list[str]]:
    chosen = []
    for block in blocks("bash"):
        lines = command_lines(block)
        if any(any(x in ln for x in NOT_RUN) for ln in lines):
            if any(
                ln.startswith("python3 -m pip install -c constraints.txt -e . && dpfl")
                for ln in lines
            ):
                chosen.append(["dpfl simulate"])  # the main job, after its install
            continue
        chosen.append([instantiate(ln) for ln in lines])
    assert all(chosen), chosen
    return chosen


def _prefix(table: dict, cmd: str):
    for key in sorted(table, key=len, reverse=True):
        if cmd.startswith(key):
            return table[key]
    return None


def _latest(store: Path, kind: str | None = None) -> dict:
    with RunStore(store) as s:
        runs = s.list_runs(kind=kind)
    return max(runs, key=lambda r: (r["created_at"], r["id"]))


def test_the_readme_blocks_are_found():
    found = readme_blocks()
    flat = [c for b in found for c in b]
    assert ["dpfl simulate"] in found  # the set-up command's main job
    assert any(c.startswith("dpfl simulate --resume") for c in flat)
    assert any(c.startswith("dpfl train --set data.path=mydata.npz") for c in flat)
    assert any(c.startswith("dpfl config show") for c in flat)
    assert all("[" not in c and "|" not in c for c in flat)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    for name in ("make_data.py", "mymodels.py"):
        src = next(b for b in blocks("python") if b.startswith(f"# {name}"))
        (tmp_path / name).write_text(src, encoding="utf-8")
    phases = next(b for b in blocks("toml") if "[[phases]]" in b)
    (tmp_path / "phases.toml").write_text(phases, encoding="utf-8")
    store = tmp_path / "dpfl-runs.sqlite"
    env = dict(
        os.environ,
        DPFL_STORE=str(store),
        PYTHONPATH=f"{tmp_path}:{ROOT}",
        OMP_NUM_THREADS="1",
        FLWR_TELEMETRY_ENABLED="0",
    )
    dpfl = [sys.executable, "-m", "dpfl"]
    for block in readme_blocks():
        for cmd in block:
            if cmd.startswith("export "):
                continue
            if cmd.startswith("python3 "):
                argv = [sys.executable, *shlex.split(cmd)[1:]]
            else:
                assert cmd.startswith("dpfl "), cmd
                args = shlex.split(cmd)[1:]
                if "RUN" in args:
                    kind = None
                    if "--resume" in args:
                        kind = (
                            "simulate"
                            if cmd.startswith("dpfl simulate")
                            else ("finetune-federated")
                        )
                    run = _latest(store, kind)
                    if "--resume" in args:  # as if it had been killed after its rounds
                        with sqlite3.connect(store) as db:
                            db.execute("UPDATE runs SET status='killed' WHERE id=?", (run["id"],))
                    args = [run["id"] if a == "RUN" else a for a in args]
                argv = dpfl + args + (_prefix(SHORTER, cmd) or [])
            before = len(RunStore(store).list_runs()) if store.exists() else 0
            out = subprocess.run(
                argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
            assert "Traceback" not in out.stderr, cmd
            floor = _prefix(FLOORS, cmd)
            if floor is not None and "--resume" not in cmd:
                with RunStore(store) as s:
                    runs = s.list_runs()
                assert len(runs) == before + 1, cmd
                run = _latest(store)
                assert run["status"] == "completed", cmd
                assert run["summary"]["accuracy"] >= floor, (cmd, run["summary"]["accuracy"])
