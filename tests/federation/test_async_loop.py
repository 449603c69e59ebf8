"""The asynchronous server loop (dpfl.server.async_loop) on the in-process engine.

References are independent of the loop: the synchronous round loop (FedFix with F-0 and dt = 1
is FedAvg), a float64 replay of the schedule by hand for clients whose update is a known
constant, the accountant on each client's recorded steps, and the closed-form noise std.
"""

import io
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dpfl.accountants import Phase, compute_epsilon
from dpfl.clients.client_app import train as dpfl_train
from dpfl.config import load_config
from dpfl.errors import ConfigError
from dpfl.server.async_schedule import participations, plan
from dpfl.server.loop import load_checkpoint, run_rounds
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.simulation.runner import resume_state, simulate
from dpfl.store import RunStore
from dpfl.tasks import get_task
from tests.federation.test_simulation import _wrapped

BASE = [
    "data.name='digits'",
    "federation.num-clients=4",
    "data.batch-size=32",
    "federation.local-steps=3",
]
ASYNC = ["federation.mode='async'"]


def cfg_with(*extra):
    return load_config(None, [*BASE, *extra])


def _run(store_path, cfg, app=None, **kwargs):
    """(result, final global state, rounds, privacy events) of a run recorded in a store."""
    grid = InProcessGrid(app or _wrapped(dpfl_train), cfg.federation.num_clients)
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(grid, cfg, run, **kwargs)
        checkpoints = [
            a for a in store.artifacts(run.run_id, with_data=True) if a["kind"] == "checkpoint"
        ]
        final = load_checkpoint(max(checkpoints, key=lambda a: a["round"])["data"])
        rounds = store.rounds(run.run_id)
        events = store.privacy_events(run.run_id)
    return result, final["global_state"], rounds, events


def _same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- the spec's identity: FedFix with F-0 and dt = 1 is synchronous FedAvg -------------------------
@pytest.mark.parametrize(
    "privacy", [["privacy.noise-multiplier=1.0"], ["privacy.target-epsilon=4.0"]], ids=str
)
def test_fedfix_f0_dt1_is_sync_fedavg_bit_for_bit(tmp_path, privacy):
    sync = cfg_with(*privacy, "federation.rounds=3")
    fedfix = cfg_with(
        *privacy, *ASYNC, "federation.async-scheme='fedfix'", "federation.async-window=1.0",
        "federation.client-speeds='F-0'", "federation.horizon=3",
    )  # fmt: skip
    r_sync, s_sync, _, e_sync = _run(tmp_path / "s.sqlite", sync)
    r_fix, s_fix, rounds, e_fix = _run(tmp_path / "a.sqlite", fedfix)
    _same_bits(s_sync, s_fix)
    assert r_fix.rounds_completed == 3 and r_fix.loss == r_sync.loss
    assert r_fix.epsilon == r_sync.epsilon
    key = lambda e: (e["participant"], e["round"], e["noise_multiplier"], e["steps"])  # noqa: E731
    assert sorted(map(key, e_fix)) == sorted(map(key, e_sync))
    assert [r["info"]["participants"] for r in rounds] == [[f"client-{i}" for i in range(4)]] * 3


# -- updates against the model each client was sent -----------------------------------------------
def _output_bias(state):
    """The classifier's bias: a shift of every logit by one constant leaves the loss as is, so
    large known updates there never trip the divergence monitor."""
    key = [k for k, v in state.items() if v.is_floating_point()][-1]
    assert key.endswith("bias") and state[key].ndim == 1
    return key


def _constant_update_app(delta_of, *, poison=None):
    """A client whose 'training' adds delta_of(pid) to the output bias of the model it was sent
    (so theta_i - theta_sent(i) = delta there and 0 elsewhere, whatever the staleness);
    ``poison(pid, k)`` makes its k-th reply NaN."""
    calls: dict[int, int] = {}

    def fn(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        calls[pid] = calls.get(pid, 0) + 1
        state = msg.content["arrays"].to_torch_state_dict()
        bad = poison is not None and poison(pid, calls[pid])
        out = dict(state)
        out[_output_bias(state)] = state[_output_bias(state)] + delta_of(pid)
        if bad:
            out = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                   for k, v in out.items()}  # fmt: skip
        content = RecordDict(
            {
                "arrays": ArrayRecord(out),
                "metrics": MetricRecord({"partition-id": float(pid)}),
                "dpfl": ConfigRecord(
                    {"status": "trained", "participant": f"client-{pid}", "phases": "[]"}
                ),
            }
        )
        return Message(content, reply_to=msg)

    return _wrapped(fn)


def _replay_by_hand(cfg, delta_of, skip=frozenset()):
    """float64 theta after the schedule: theta += sum d_i delta_i (skip: (index, client))."""
    task = get_task(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build_model(task.load_data())
    state = {k: v.double() for k, v in task.trainable_state(model).items() if v.is_floating_point()}
    key = _output_bias(state)
    for a in plan(cfg):
        state[key] = state[key] + sum(
            w * delta_of(i)
            for i, w in zip(a.participants, a.weights, strict=True)
            if (a.index, i) not in skip
        )
    return state


@pytest.mark.parametrize(
    "scheme",
    [
        ["federation.async-scheme='fedasync'"],
        ["federation.async-scheme='fedbuff'", "federation.async-buffer=2"],
        ["federation.async-scheme='fedfix'", "federation.async-window=0.5"],
    ],
    ids=lambda s: s[0].split("=")[1],
)
def test_stale_updates_are_applied_against_the_model_each_client_was_sent(store_path, scheme):
    cfg = cfg_with(
        "privacy.enabled=false", *ASYNC, *scheme, "federation.client-speeds='F-80'",
        "federation.horizon=2.5",
    )  # fmt: skip
    aggs = plan(cfg)
    assert any(max(a.staleness) > 0 for a in aggs)  # the schedule has stale replies

    def delta_of(pid):
        return 0.1 * (pid + 1)

    result, state, rounds, _ = _run(store_path, cfg, _constant_update_app(delta_of))
    expected = _replay_by_hand(cfg, delta_of)
    assert result.rounds_completed == len(aggs)
    for k, v in expected.items():  # the output bias moved as replayed; nothing else moved
        torch.testing.assert_close(state[k].double(), v, rtol=0, atol=1e-5)
    # the store has each aggregation's time, participants and staleness, as scheduled
    assert [r["info"]["time"] for r in rounds] == [a.time for a in aggs]
    assert [r["info"]["participants"] for r in rounds] == [
        [f"client-{i}" for i in a.participants] for a in aggs
    ]
    assert [r["info"]["staleness"] for r in rounds] == [list(a.staleness) for a in aggs]


def test_a_nan_reply_is_dropped_with_its_reason_and_the_run_finishes(store_path):
    cfg = cfg_with(
        "privacy.enabled=false", *ASYNC, "federation.async-scheme='fedasync'",
        "federation.client-speeds='F-80'", "federation.horizon=2",
    )  # fmt: skip

    def delta_of(pid):
        return 0.1 * (pid + 1)

    def poison(pid, k):
        return pid == 3 and k == 2

    result, state, rounds, _ = _run(store_path, cfg, _constant_update_app(delta_of, poison=poison))
    aggs = plan(cfg)
    second = [a.index for a in aggs if 3 in a.participants][1]
    expected = _replay_by_hand(cfg, delta_of, skip={(second, 3)})
    # every aggregation ran (the monitor may call a bias-only 'training' no-progress)
    assert result.stopped != "failed" and result.rounds_completed == len(aggs)
    for k, v in expected.items():  # the output bias moved as replayed; nothing else moved
        torch.testing.assert_close(state[k].double(), v, rtol=0, atol=1e-5)
    row = next(r for r in rounds if r["round"] == second)
    assert row["status"] == "skipped"  # its only participant was dropped
    assert row["info"]["dropped"][0]["reason"].startswith("non-finite values (NaN/Inf)")
    later = [r for r in rounds if r["round"] > second and "client-3" in r["info"]["participants"]]
    assert later and all(not r["info"]["dropped"] for r in later)  # client 3 goes on


# -- sample-level DP: per-client accounting --------------------------------------------------------
def test_per_client_epsilon_is_the_accountant_for_its_actual_steps(store_path):
    cfg = cfg_with(
        "privacy.noise-multiplier=1.1", *ASYNC, "federation.async-scheme='fedasync'",
        "federation.client-speeds='F-80'", "federation.horizon=2",
    )  # fmt: skip
    counts = participations(plan(cfg), 4)
    assert counts[3] > counts[0]  # fast clients train more often
    result, _, _, events = _run(store_path, cfg)
    for pid, count in enumerate(counts):
        mine = [e for e in events if e["participant"] == f"client-{pid}"]
        assert sum(e["steps"] for e in mine) == count * 3
        q = mine[0]["sample_rate"]
        expected = compute_epsilon([Phase(1.1, q, count * 3)], 1e-5)
        assert result.epsilon[f"client-{pid}"] == pytest.approx(expected, rel=1e-12)


def test_calibrated_clients_end_within_budget_however_often_they_train(store_path):
    cfg = cfg_with(
        "privacy.target-epsilon=2.0", *ASYNC, "federation.async-scheme='fedasync'",
        "federation.client-speeds='F-80'", "federation.horizon=2",
    )  # fmt: skip
    counts = participations(plan(cfg), 4)
    result, _, _, events = _run(store_path, cfg)
    assert result.stopped == "completed"
    for who, eps in result.epsilon.items():
        mine = [e for e in events if e["participant"] == who]
        # every planned local round ran in full: none stopped early on its budget
        assert sum(e["steps"] for e in mine) == 3 * counts[int(who.split("-")[1])]
        phases = [Phase(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in mine]
        assert eps == pytest.approx(compute_epsilon(phases, 1e-5), rel=1e-9)
        assert 1.9 < eps <= 2.0  # each calibrated for exactly its own participations


# -- user-level DP: DP-FedBuff ---------------------------------------------------------------------
DP_FEDBUFF = [  # a small clip: noise z S / c that 4 clients cannot average away stays small
    "privacy.level='user'", "federation.strategy='dp-fedavg'", "optimizer.lr=0.05",
    "privacy.clip-norm=0.01",
    *ASYNC, "federation.async-scheme='fedbuff'", "federation.async-buffer=2",
    "federation.client-speeds='F-80'",
]  # fmt: skip


def test_dp_fedbuff_charges_each_client_per_aggregation_it_is_in(store_path):
    cfg = cfg_with(*DP_FEDBUFF, "privacy.target-epsilon=8.0", "federation.horizon=3")
    counts = participations(plan(cfg), 4)
    result, _, rounds, events = _run(store_path, cfg)
    z = result.noise_multiplier
    for pid, count in enumerate(counts):
        mine = [e for e in events if e["participant"] == f"client-{pid}"]
        assert len(mine) == count
        assert all(e["sample_rate"] == 1.0 and e["noise_multiplier"] == z for e in mine)
        # no subsampling amplification: the Gaussian mechanism composed `count` times
        assert result.epsilon[f"client-{pid}"] == pytest.approx(
            compute_epsilon([Phase(z, 1.0, count)], 1e-5), rel=1e-9
        )
    assert 7.9 < max(result.epsilon.values()) <= 8.0  # the busiest client, at the target


def test_dp_fedbuff_noise_has_std_z_s_over_c(store_path):
    # clients that send a zero update: each aggregation moves theta by exactly noise / c
    def zero(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        update = {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(update),
                "metrics": MetricRecord({"partition-id": float(pid), "unclipped": 1.0}),
                "dpfl": ConfigRecord(
                    {"status": "trained", "participant": f"client-{pid}", "phases": "[]"}
                ),
            }
        )
        return Message(content, reply_to=msg)

    cfg = cfg_with(
        *DP_FEDBUFF, "privacy.noise-multiplier=1.5", "privacy.clip-norm=0.4",
        "federation.horizon=1", "federation.server-lr=1.0",
    )  # fmt: skip
    states = []
    grid = InProcessGrid(_wrapped(zero), 4)
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        run_rounds(grid, cfg, run)
        for a in sorted(store.artifacts(run.run_id, with_data=True), key=lambda a: a["round"]):
            states.append(load_checkpoint(a["data"])["global_state"])
    diffs = torch.cat(
        [
            torch.cat([(b[k] - a[k]).flatten() for k in a if a[k].is_floating_point()])
            for a, b in zip(states, states[1:], strict=False)
        ]
    ).double()
    n = diffs.numel()
    assert n > 10_000
    expected = 1.5 * 0.4 / 2
    # sample std of n normals: relative standard error 1 / sqrt(2 n); 5 standard errors
    assert abs(float(diffs.std()) / expected - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(diffs.mean())) < 5 * expected / math.sqrt(n)


def test_dp_fedbuff_fails_closed_when_a_buffered_reply_is_missing(store_path):
    def failing(msg, ctx):
        if ctx.node_config["partition-id"] == 3 and ctx.state.config_records.get("x") is None:
            ctx.state.config_records["x"] = ConfigRecord({"failed": 1})
            raise RuntimeError("disk on fire")
        return dpfl_train(msg, ctx)

    cfg = cfg_with(*DP_FEDBUFF, "privacy.noise-multiplier=1.0", "federation.horizon=2")
    result, _, rounds, events = _run(store_path, cfg, _wrapped(failing))
    first = rounds[0]
    assert 3 in plan(cfg)[0].participants
    assert first["status"] == "skipped" and first["info"]["reason"].startswith("fail closed")
    assert not [e for e in events if e["round"] == 1]  # nothing released, nothing charged
    assert result.rounds_completed == len(rounds) and result.stopped == "completed"
    assert any(r["status"] == "completed" for r in rounds[1:])


# -- resume ----------------------------------------------------------------------------------------
def test_resume_continues_an_async_run_bit_for_bit(tmp_path):
    cfg = cfg_with(
        "privacy.target-epsilon=3.0", *ASYNC, "federation.async-scheme='fedbuff'",
        "federation.async-buffer=2", "federation.client-speeds='F-80'", "federation.horizon=2",
    )  # fmt: skip
    with RunStore(tmp_path / "ref.sqlite") as store, store.run("simulate", cfg.to_dict()) as run:
        reference = simulate(cfg, run)
        ref_events = store.privacy_events(run.run_id)
    assert reference.rounds_completed >= 4

    def kill(r, row):
        if r == 3:
            raise KeyboardInterrupt

    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        with pytest.raises(KeyboardInterrupt), store.run("simulate", cfg.to_dict()) as run:
            simulate(cfg, run, on_round=kill)
        run_id = run.run_id
        saved_cfg, state = resume_state(store, run_id)
        with store.tracking(store.reopen_run(run_id)) as again:
            result = simulate(saved_cfg, again, resume=state)
        events = store.privacy_events(run_id)
    assert result.accuracy == reference.accuracy and result.loss == reference.loss
    assert result.epsilon == pytest.approx(reference.epsilon, rel=1e-12)

    def key(e):
        return (e["participant"], e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"])

    assert sorted(map(key, events)) == sorted(map(key, ref_events))


# -- what async mode refuses -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["federation.fraction=0.5"], "every idle client"),
        (["federation.async-scheme='fedbuff'", "federation.async-buffer=9"], "wait forever"),
        (["federation.client-speeds='fast'"], "client-speeds"),
        (["federation.client-speeds='1,2'"], "2 times for 4 clients"),
        (["federation.client-speeds='F-100'"], "[0, 100)"),
    ],
)
def test_bad_async_config_is_refused_with_the_key(extra, fragment):
    with pytest.raises(ConfigError) as e:
        cfg_with(*ASYNC, *extra)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["privacy.enabled=false", "federation.strategy='median'"], "no asynchronous form"),
        (["privacy.enabled=false", "federation.strategy='fedsvd'"], "no asynchronous form"),
        (
            ["privacy.level='user'", "federation.strategy='dp-fedavg'",
             "privacy.noise-multiplier=1.0"],
            "DP-FedBuff",
        ),
        (
            ["privacy.enabled=false", "federation.clock='real'",
             "federation.async-scheme='fedasync'"],
            "identical",
        ),
        (["privacy.noise-multiplier=1.0", "federation.horizon=1e7"], "shorten it"),
    ],
)  # fmt: skip
def test_what_async_mode_cannot_run_is_refused_before_it_starts(extra, fragment):
    cfg = cfg_with(*ASYNC, *extra)
    with pytest.raises(ConfigError) as e:
        simulate(cfg)
    assert fragment in str(e.value)


def test_checkpoint_keeps_only_the_versions_clients_still_hold(store_path):
    cfg = cfg_with(
        "privacy.enabled=false", *ASYNC, "federation.async-scheme='fedasync'",
        "federation.client-speeds='F-80'", "federation.horizon=1.5",
    )  # fmt: skip
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        simulate(cfg, run)
        blobs = [a["data"] for a in store.artifacts(run.run_id, with_data=True)]
    for blob in blobs:
        ck = torch.load(io.BytesIO(blob), weights_only=False)
        assert 1 <= len(ck["async"]["versions"]) <= 4  # at most one per client (and the current)
    assert len(blobs) == len(plan(cfg))  # eval-interval 0: one checkpoint per aggregation


# -- the command line ------------------------------------------------------------------------------
def test_dpfl_simulate_runs_an_async_federation_and_plots_it_against_virtual_time(tmp_path):
    import json

    from typer.testing import CliRunner

    from dpfl.cli.main import app

    store = tmp_path / "runs.sqlite"
    sets = [*BASE, "privacy.target-epsilon=4.0", *ASYNC, "federation.async-scheme='fedbuff'",
            "federation.async-buffer=2", "federation.client-speeds='F-80'",
            "federation.horizon=1.5"]  # fmt: skip
    args = ["simulate", "--json", "--store", str(store)]
    for s in sets:
        args += ["--set", s]
    out = CliRunner().invoke(app, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    cfg = cfg_with(*sets[len(BASE) :])
    assert summary["rounds"] == len(plan(cfg)) and max(summary["epsilon"].values()) <= 4.0
    plot = tmp_path / "async.png"
    drawn = CliRunner().invoke(
        app, ["runs", "plot", summary["run"][:8], "--store", str(store), "--output", str(plot)]
    )
    assert drawn.exit_code == 0, drawn.output
    assert plot.stat().st_size > 10_000
    from dpfl.store import run_to_dict
    from dpfl.store.plot import build_figure

    with RunStore(store) as s:
        fig = build_figure(run_to_dict(s, summary["run"]))
    labels = {ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()}
    assert labels == {"simulated time"}
    accuracy_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "accuracy")
    xs = list(accuracy_ax.get_lines()[0].get_xdata())
    assert xs == [a.time for a in plan(cfg)]  # each evaluation at its aggregation's time
