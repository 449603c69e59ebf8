"""Red team of the asynchronous federation (dpfl.server.async_loop, async_schedule, replies,
clients.federated.calibration_plan): attacks on the privacy guarantee and the fail-closed
behaviour that the code resists (DESIGN 2b: enforce the guarantee, never assume it).

References never come from the code under test: epsilons from Opacus' RDP analysis directly,
the sensitivity from a brute-force pair of runs (with and without one client's contribution,
the server's noise zeroed), the initial model rebuilt from the seed, the stored values compared
with what the clients actually sent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import types
from collections.abc import Callable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from dpfl.clients.client_app import train as dpfl_train
from dpfl.clients.federated import client_datasets
from dpfl.config import load_config
from dpfl.server import async_loop
from dpfl.server.async_schedule import participations, plan
from dpfl.server.loop import load_checkpoint, run_rounds
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.store import RunStore
from dpfl.tasks import get_task

BASE = [
    "data.name='digits'",
    "federation.num-clients=4",
    "data.batch-size=32",
    "federation.local-steps=3",
    "federation.mode='async'",
    "federation.client-speeds='F-80'",
]
TARGET = 2.0
SCHEMES = {
    "fedasync": ["federation.async-scheme='fedasync'"],
    "fedbuff": ["federation.async-scheme='fedbuff'", "federation.async-buffer=2"],
    "fedfix": ["federation.async-scheme='fedfix'", "federation.async-window=0.5"],
    "sync": ["federation.async-scheme='sync'"],
}
DP_FEDBUFF = [
    "privacy.level='user'",
    "federation.strategy='dp-fedavg'",
    "optimizer.lr=0.05",
    "federation.async-scheme='fedbuff'",
    "federation.async-buffer=2",
    "federation.server-lr=1.0",
]
#: what the async loop may store per aggregation under DP (functions of the schedule, the
#: released model on the server's own data and the privacy history)
SERVER_METRICS = {"virtual-time", "time", "clients", "dropped", "staleness-max", "accuracy",
                  "loss", "epsilon-max"}  # fmt: skip
ROUND_INFO = {"time", "participants", "weights", "staleness", "dropped", "bytes-up", "reason"}


def cfg_with(*extra):
    return load_config(None, [*BASE, *extra])


def _app(fn) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context):
        return fn(msg, context)

    return app


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def _run(store_path, cfg, app, grid=None):
    """(result, [state after each aggregation], rounds, privacy events, metrics)."""
    grid = grid or InProcessGrid(app, cfg.federation.num_clients)
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(grid, cfg, run)
        cks = [a for a in store.artifacts(run.run_id, with_data=True) if a["kind"] == "checkpoint"]
        states = {a["round"]: load_checkpoint(a["data"]) for a in cks}
        rounds = store.rounds(run.run_id)
        events = store.privacy_events(run.run_id)
        metrics = store.metrics(run.run_id)
    return result, states, rounds, events, metrics


def _initial_state(cfg):
    """The model before any aggregation, rebuilt from the seed as the server builds it."""
    task = get_task(cfg)
    torch.manual_seed(cfg.seed)
    return task.trainable_state(task.build_model(task.load_data()))


class Spy:
    """dpfl's ClientApp, counting per client what it was sent and what it answered.
    ``fresh``: every message meets an empty Context.state (a new client process each time)."""

    def __init__(self, fresh: bool = False, extra_metrics: dict | None = None) -> None:
        self.fresh, self.extra_metrics = fresh, extra_metrics
        self.log: list[tuple[int, str]] = []  # (pid, status of its reply), in delivery order
        self.sent_metrics: list[dict] = []
        self.steps: dict[int, int] = {}  # local DP-SGD steps each client reported, in all

    def __call__(self, msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        if self.fresh:
            ctx = Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config,
                          state=RecordDict(), run_config={})  # fmt: skip
        reply = dpfl_train(msg, ctx)
        if self.extra_metrics is not None and "metrics" in reply.content.metric_records:
            reply.content["metrics"] = MetricRecord(
                dict(reply.content["metrics"]) | self.extra_metrics
            )
        self.log.append((pid, str(reply.content["dpfl"]["status"])))
        phases = json.loads(str(reply.content["dpfl"]["phases"]))
        self.steps[pid] = self.steps.get(pid, 0) + sum(int(p[2]) for p in phases)
        self.sent_metrics.append(dict(reply.content["metrics"]))
        return reply

    def app(self) -> ClientApp:
        return _app(self)


def _longer_plan(monkeypatch, cfg, horizon: float):
    """The server replays the schedule of a longer horizon than the one every client
    calibrated its noise for (the clients compute theirs from dpfl.server.async_schedule)."""
    federation = dataclasses.replace(cfg.federation, horizon=horizon)
    longer = dataclasses.replace(cfg, federation=federation)
    replayed = plan(longer)
    monkeypatch.setattr(async_loop, "plan", lambda c: replayed)
    return replayed


def _assert_stopped_by_its_guard(spy, planned, sent_plan, result, events):
    """Every recorded epsilon <= target (and is Opacus' on the recorded phases); a client sent
    more local rounds than it calibrated for ends with budget-exhausted; after that reply it is
    sent nothing more."""
    for who, eps in result.epsilon.items():
        mine = [e for e in events if e["participant"] == who]
        (sigma,), (q,) = {e["noise_multiplier"] for e in mine}, {e["sample_rate"] for e in mine}
        steps = sum(e["steps"] for e in mine)
        assert steps == spy.steps[int(who.split("-")[1])]  # all it reported, recorded
        reference = opacus_epsilon(sigma, q, steps)
        assert eps == pytest.approx(reference, rel=1e-9), who
        assert reference <= TARGET, (who, reference, steps)
    over = [i for i in range(4) if sent_plan[i] > planned[i]]
    assert over, "the attack must send some client more work than it calibrated for"
    for i in range(4):
        statuses = [s for pid, s in spy.log if pid == i]
        if i in over:
            assert "budget-exhausted" in statuses, (i, statuses)
        if "budget-exhausted" in statuses:  # the server never sends it work again
            assert statuses.index("budget-exhausted") == len(statuses) - 1, (i, statuses)
        assert len(statuses) <= sent_plan[i]


# -- 1. sample-level DP: a client sent more work than it calibrated for -------------------------
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_more_work_than_planned_is_stopped_by_the_client_and_then_not_sent(
    store_path, monkeypatch, scheme
):
    cfg = cfg_with(f"privacy.target-epsilon={TARGET}", *SCHEMES[scheme], "federation.horizon=2")
    planned = participations(plan(cfg), 4)
    replayed = _longer_plan(monkeypatch, cfg, 4.0)
    spy = Spy()
    result, _, _, events, _ = _run(store_path, cfg, spy.app())
    _assert_stopped_by_its_guard(spy, planned, participations(replayed, 4), result, events)


@pytest.mark.parametrize("history", ["fresh-process", "server-drops-last-phase", "no-history"])
def test_a_history_that_differs_from_the_clients_own_does_not_lift_its_budget(
    store_path, monkeypatch, history
):
    """The server's copy of a client's history is shorter than the client's own (a lost
    record), absent, or the only one the client has (a new process each message)."""
    cfg = cfg_with(f"privacy.target-epsilon={TARGET}", *SCHEMES["fedasync"], "federation.horizon=2")
    planned = participations(plan(cfg), 4)
    replayed = _longer_plan(monkeypatch, cfg, 4.0)
    recorded = async_loop._Server._history
    if history == "server-drops-last-phase":

        def shorter(self, node):
            real = recorded(self, node)
            if not real:
                return real
            last = real[-1]
            cut = dataclasses.replace(last, steps=max(0, last.steps - 3))
            return [*real[:-1], cut]

        monkeypatch.setattr(async_loop._Server, "_history", shorter)
    elif history == "no-history":
        monkeypatch.setattr(async_loop._Server, "_history", lambda self, node: None)
    spy = Spy(fresh=history == "fresh-process")
    result, _, _, events, _ = _run(store_path, cfg, spy.app())
    _assert_stopped_by_its_guard(spy, planned, participations(replayed, 4), result, events)


def test_a_peer_that_reports_cheap_steps_under_an_honest_clients_name_lifts_no_budget(
    store_path, monkeypatch
):
    """Client 3 replies as 'client-0' with a million near-free steps (noise multiplier 1e4),
    in the same aggregations as client-0 (sync scheme: so the fake phase is the last one the
    server recorded for 'client-0' when client-0 is sent work): the server's copy of client-0's
    history then has more steps than client-0's own, but it still holds every phase client-0
    reported, so client-0's guard counts all it spent."""
    cfg = cfg_with(f"privacy.target-epsilon={TARGET}", *SCHEMES["sync"], "federation.horizon=2")
    planned = participations(plan(cfg), 4)
    replayed = _longer_plan(monkeypatch, cfg, 4.0)
    spy = Spy()
    own_phases: list[list] = []

    def fn(msg, ctx):
        reply = spy(msg, ctx)
        pid = int(ctx.node_config["partition-id"])
        meta = dict(reply.content["dpfl"])
        if pid == 0:
            own_phases.extend(json.loads(str(meta["phases"])))
        if pid == 3 and meta["status"] == "trained":
            q = json.loads(str(meta["phases"]))[0][1]
            reply.content["dpfl"] = ConfigRecord(
                meta | {"participant": "client-0", "phases": json.dumps([[1e4, q, 10**6]])}
            )
        return reply

    result, _, _, events, _ = _run(store_path, cfg, _app(fn))
    assert any(e["steps"] == 10**6 for e in events if e["participant"] == "client-0")
    (sigma,), (q,) = {p[0] for p in own_phases}, {p[1] for p in own_phases}
    spent = opacus_epsilon(sigma, q, sum(p[2] for p in own_phases))  # what client-0 really spent
    assert spent <= TARGET
    statuses = [s for pid, s in spy.log if pid == 0]
    assert replayed and participations(replayed, 4)[0] > planned[0]
    assert statuses[-1] == "budget-exhausted" and statuses.count("budget-exhausted") == 1


def test_real_clock_clients_that_train_more_often_than_planned_stop_on_their_budget(
    store_path, monkeypatch
):
    # the real-clock loop on a clock that advances 10 ms per reading (no sleeps): replies are
    # instant in process, so every client is back far more often than the virtual schedule of
    # the same horizon (its calibration) says, whatever the machine's load
    ticks = iter(range(10**9))
    clock = types.SimpleNamespace(
        monotonic=lambda: next(ticks) * 0.01, sleep=lambda s: None, perf_counter=time.perf_counter
    )
    monkeypatch.setattr(async_loop, "time", clock)
    cfg = cfg_with(
        f"privacy.target-epsilon={TARGET}", *SCHEMES["fedasync"], "federation.clock='real'",
        "federation.async-weights='identical'", "federation.horizon=1.5",
    )  # fmt: skip
    spy = Spy()
    result, _, rounds, events, _ = _run(store_path, cfg, spy.app())
    assert len(rounds) >= 10
    planned = participations(plan(cfg), 4)
    sent = [sum(1 for pid, _ in spy.log if pid == i) for i in range(4)]
    _assert_stopped_by_its_guard(spy, planned, sent, result, events)


# -- 2. user-level DP-FedBuff: sensitivity and fail-closed ------------------------------------
def _update_app(update_of: Callable, *, status="trained", phases="[]", meta=None):
    """A dp-fedavg client whose reply is update_of(pid, k, reference) for its k-th message
    (None: it raises); ``meta(pid, k)`` may replace its dpfl record (None: no record)."""
    calls: dict[int, int] = {}

    def fn(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        calls[pid] = k = calls.get(pid, 0) + 1
        state = msg.content["arrays"].to_torch_state_dict()
        ref = {n: v for n, v in state.items() if v.is_floating_point()}
        update = update_of(pid, k, ref)
        if update is Exception:
            raise RuntimeError("disk on fire")
        content = RecordDict(
            {"metrics": MetricRecord({"partition-id": float(pid), "unclipped": 0.0})}
        )
        record = {"status": status, "participant": f"client-{pid}", "phases": phases}
        record = record if meta is None else meta(pid, k, record)
        if record is not None:
            content["dpfl"] = ConfigRecord(record)
        if update is not None:
            content["arrays"] = ArrayRecord(update)
        return Message(content, reply_to=msg)

    return _app(fn)


def _honest(pid, k, ref):
    g = torch.Generator().manual_seed(100 * pid + k)
    return {n: 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in ref.items()}


def _norm(a, b=None) -> float:
    return math.sqrt(sum(float((a[k].double() - (0 if b is None else b[k].double())).pow(2).sum())
                         for k in a))  # fmt: skip


def _released_sums(monkeypatch) -> list[torch.Tensor]:
    """Zeroes DP-FedBuff's noise and keeps what it would have been added to (one tensor of
    the pre-noise sum per key and aggregation, in release order)."""
    calls: list[torch.Tensor] = []

    def capture(v, std, generator, secure):
        calls.append(v.detach().double().clone())
        return torch.zeros_like(v)

    monkeypatch.setattr(async_loop, "gaussian_like", capture)
    return calls


@pytest.mark.parametrize("attack", ["huge-everywhere", "one-huge-coordinate", "nearly-clip"])
def test_dp_fedbuff_one_clients_update_moves_each_released_sum_by_at_most_the_clip(
    store_path, tmp_path, monkeypatch, attack
):
    clip = 0.05
    cfg = cfg_with(*DP_FEDBUFF, "privacy.noise-multiplier=1.0", f"privacy.clip-norm={clip}",
                   "federation.horizon=2")  # fmt: skip
    n_keys = len(_initial_state(cfg))

    def malicious(pid, k, ref):
        if pid != 3:
            return _honest(pid, k, ref)
        if attack == "huge-everywhere":
            return {n: torch.full_like(v, 1e30) for n, v in ref.items()}
        out = {n: torch.zeros_like(v) for n, v in ref.items()}
        first = next(iter(out))
        out[first].view(-1)[0] = 1e30 if attack == "one-huge-coordinate" else clip * 1.001
        return out

    def removed(pid, k, ref):  # client 3's contribution to every sum: nothing
        if pid != 3:
            return _honest(pid, k, ref)
        return {n: torch.zeros_like(v) for n, v in ref.items()}

    runs = []
    for path, fn in ((store_path, malicious), (tmp_path / "b.sqlite", removed)):
        calls = _released_sums(monkeypatch)
        _run(path, cfg, _update_app(fn))
        assert len(calls) % n_keys == 0
        runs.append([dict(enumerate(calls[i : i + n_keys])) for i in range(0, len(calls), n_keys)])
    with_3, without_3 = runs
    aggs = plan(cfg)
    assert len(with_3) == len(without_3) == len(aggs)  # every aggregation released a sum
    in_3 = 0
    for a, sa, sb in zip(aggs, with_3, without_3, strict=True):
        moved = _norm(sa, sb)
        if 3 in a.participants:
            in_3 += 1
            assert moved <= clip * (1 + 1e-6), (a.index, moved)
            assert moved >= clip * (1 - 1e-5), (a.index, moved)  # the attacker got its full C
        else:
            assert moved == 0.0, (a.index, moved)
        # every honest client's share is clipped too: the sum is at most c C
        assert _norm(sa) <= cfg.federation.async_buffer * clip * (1 + 1e-6)
    assert in_3 >= 3


def _drop_first_reply_of(node: int):
    class LossyGrid(InProcessGrid):
        dropped = False

        def push_messages(self, messages):
            ids = list(super().push_messages(messages))
            for mid, msg in zip(ids, messages, strict=True):
                if msg.metadata.dst_node_id == node and not LossyGrid.dropped:
                    LossyGrid.dropped = True
                    self._replies.pop(mid)  # lost in transit
            return ids

    return LossyGrid


def _bad(kind):
    """Client 3's first reply (it is in aggregation 1), made unusable in one way."""

    def update_of(pid, k, ref):
        if pid != 3 or k != 1:
            return _honest(pid, k, ref)
        up = _honest(pid, k, ref)
        first = next(iter(up))
        if kind == "nan":
            up[first].view(-1)[0] = math.nan
        elif kind == "inf":
            up[first].view(-1)[0] = -math.inf
        elif kind == "missing-key":
            del up[first]
        elif kind == "extra-key":
            up["sneaky.weight"] = torch.zeros(3)
        elif kind == "wrong-dtype":
            up[first] = up[first].double()
        elif kind == "wrong-shape":
            up[first] = up[first].flatten()[:-1]
        elif kind == "no-arrays":
            return None
        elif kind == "client-error":
            return Exception
        return up

    def meta(pid, k, record):
        if pid == 3 and k == 1:
            if kind == "no-dpfl-record":
                return None
            if kind == "malformed-phases":
                return record | {"phases": "not json"}
        return record

    return update_of, meta


FAIL_CLOSED = [
    "nan", "inf", "missing-key", "extra-key", "wrong-dtype", "wrong-shape", "no-arrays",
    "client-error", "no-dpfl-record", "malformed-phases", "lost-reply",
]  # fmt: skip


@pytest.mark.parametrize("kind", FAIL_CLOSED)
def test_dp_fedbuff_skips_a_buffer_with_one_unusable_reply_and_releases_nothing(store_path, kind):
    cfg = cfg_with(*DP_FEDBUFF, "privacy.noise-multiplier=1.0", "privacy.clip-norm=0.05",
                   "federation.horizon=1", "federation.reply-timeout=0.2")  # fmt: skip
    aggs = plan(cfg)
    assert 3 in aggs[0].participants and len(aggs) >= 2
    update_of, meta = _bad(kind)
    app = _update_app(update_of, meta=meta)
    grid = None
    if kind == "lost-reply":
        grid = _drop_first_reply_of(4)(app, 4)  # node 4 is partition 3
    result, states, rounds, events, _ = _run(store_path, cfg, app, grid)
    first = rounds[0]
    assert first["round"] == 1 and first["status"] == "skipped"
    assert first["info"]["reason"].startswith("fail closed"), first["info"]
    assert [d["node"] for d in first["info"]["dropped"]] == [4]
    assert not [e for e in events if e["round"] == 1]  # nothing charged for it
    initial = _initial_state(cfg)
    after = states[1]["global_state"]
    assert all(torch.equal(after[k], initial[k]) for k in initial)  # nothing released
    # the federation goes on: later buffers of valid replies are aggregated and charged
    later = [r for r in rounds[1:] if r["status"] == "completed"]
    assert later and {e["round"] for e in events} == {r["round"] for r in later}
    assert result.stopped != "failed"


def test_dp_fedbuff_under_calibrated_noise_is_stopped_by_the_servers_budget(
    store_path, monkeypatch
):
    """The server's noise is calibrated for half each client's real participations: its
    per-client ledger must stop the run before any client passes the target, charging no one
    for the aggregation it refuses and releasing nothing in it."""
    cfg = cfg_with(*DP_FEDBUFF, "privacy.target-epsilon=4.0", "privacy.clip-norm=0.05",
                   "federation.horizon=2")  # fmt: skip
    counts = participations(plan(cfg), 4)
    monkeypatch.setattr(
        async_loop, "participations", lambda aggs, m: [max(1, n // 2) for n in counts]
    )
    result, states, rounds, events, _ = _run(store_path, cfg, _update_app(_honest))
    assert result.stopped == "budget", result.message
    z = result.noise_multiplier
    for who, eps in result.epsilon.items():
        mine = [e for e in events if e["participant"] == who]
        assert all(e["noise_multiplier"] == z and e["sample_rate"] == 1.0 for e in mine)
        reference = opacus_epsilon(z, 1.0, len(mine))
        assert eps == pytest.approx(reference, rel=1e-9) and reference <= 4.0
    last = rounds[-1]
    assert last["status"] == "skipped" and last["info"]["reason"].startswith("privacy budget")
    assert not [e for e in events if e["round"] == last["round"]]
    done = [r["round"] for r in rounds if r["status"] == "completed"]
    before = states[max(done)]["global_state"]
    assert all(torch.equal(states[last["round"]]["global_state"][k], v) for k, v in before.items())


# -- 3. what the server stores from the replies -------------------------------------------------
def _stored_numbers(rounds, metrics) -> list[float]:
    out = [float(m["value"]) for m in metrics]

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, int | float):
            out.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for r in rounds:
        walk(r["info"])
    return out


@pytest.mark.parametrize("level", ["sample", "user"])
def test_the_async_store_holds_no_value_computed_from_client_records(store_path, level):
    # diagnostics on, plus un-noised values a client should never send, made recognisable
    privacy = (
        [f"privacy.target-epsilon={TARGET}", *SCHEMES["fedbuff"]]
        if level == "sample"
        else [*DP_FEDBUFF, "privacy.target-epsilon=8.0", "privacy.clip-norm=0.01"]
    )
    cfg = cfg_with(*privacy, "federation.horizon=2", "federation.client-diagnostics=true")
    planted = {"train-loss": 1234.5678, "num-examples": 4321.0, "local-test-accuracy": 0.98765}
    spy = Spy(extra_metrics=planted)
    result, states, rounds, events, metrics = _run(store_path, cfg, spy.app())
    assert result.rounds_completed == len(plan(cfg)) and spy.sent_metrics
    assert {m["name"] for m in metrics} <= SERVER_METRICS
    assert {m["scope"] for m in metrics} == {"server"}
    assert all(set(r["info"]) <= ROUND_INFO for r in rounds)
    # no stored number is any diagnostic a client sent (nor the planted ones)
    sent = set(planted.values())
    for s in spy.sent_metrics:
        sent |= {v for k, v in s.items() if k in ("update-norm", "train-loss")}
    numbers = _stored_numbers(rounds, metrics)
    assert not [x for x in numbers if any(abs(x - v) <= 1e-9 * max(1, abs(v)) for v in sent)]
    # the checkpoints hold the released model, the strategy and the async bookkeeping only
    for ck in states.values():
        assert set(ck) <= {"round", "global_state", "strategy", "participants", "async"}
        assert set(ck["async"]) == {"versions", "retired", "time", "generator"}
    # ... and each client's epsilon is Opacus' on what the ledger recorded for it
    for who, eps in result.epsilon.items():
        mine = [e for e in events if e["participant"] == who]
        (sigma,), (q,) = {e["noise_multiplier"] for e in mine}, {e["sample_rate"] for e in mine}
        steps = sum(e["steps"] for e in mine)
        assert eps == pytest.approx(opacus_epsilon(sigma, q, steps), rel=1e-9)
        assert eps <= (TARGET if level == "sample" else 8.0)
        if level == "user":  # one Gaussian release per aggregation it is in, no amplification
            pid = int(who.split("-")[1])
            assert (q, steps) == (1.0, participations(plan(cfg), 4)[pid])
        else:
            assert q == pytest.approx(32 / len(client_datasets(cfg, int(who[7:]))[0]))
