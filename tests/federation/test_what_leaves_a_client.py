"""What leaves a client, and what the server stores (DESIGN 2b, README "What leaves a client /
what the server publishes").

Expected values here never come from the code under test: epsilons from Opacus' RDP analysis
directly, the noise split from its closed form, counts and fractions from the replies as the
clients sent them.
"""

import json
import math

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from typer.testing import CliRunner

from dpfl.cli.main import app as cli_app
from dpfl.clients.client_app import train as dpfl_train
from dpfl.clients.federated import client_datasets
from dpfl.clients.local_train import evaluate
from dpfl.config import load_config
from dpfl.data import load_dataset
from dpfl.models import create_model
from dpfl.server.loop import load_checkpoint, run_rounds
from dpfl.server.strategies import DPFedAvg, Reply, create_strategy
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.store import RunStore

BASE = [
    "data.name='digits'",
    "federation.num-clients=4",
    "federation.rounds=2",
    "data.batch-size=32",
    "federation.local-steps=3",
]
SAMPLE = ["privacy.noise-multiplier=1.0"]
USER_ADAPTIVE = [
    "privacy.level='user'",
    "federation.strategy='dp-fedavg'",
    "privacy.clipping='adaptive'",
    "privacy.noise-multiplier=0.3",
    "privacy.count-noise-std=0.5",
    "optimizer.lr=0.1",
]
# what the server may store under DP, besides uncovered/ diagnostics
COVERED = {"accuracy", "loss", "clients", "dropped", "epsilon-max", "bytes-down", "bytes-up"}
COVERED_USER = COVERED | {"clip", "next-clip", "noisy-unclipped-fraction"}
DIAGNOSTICS = {"train-loss", "local-test-accuracy", "num-examples", "local-steps"}


def cfg_with(*extra):
    return load_config(None, [*BASE, *extra])


def _app(fn):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context):
        return fn(msg, context)

    return app


class Spy:
    """Wraps dpfl's ClientApp; keeps what each client received and sent. ``fresh``: every
    message meets an empty ``Context.state`` (a new client process each round)."""

    def __init__(self, fresh: bool = False) -> None:
        self.fresh = fresh
        self.sent: list[dict] = []  # one per reply: round, pid, metrics, meta keys
        self.received: list[dict] = []  # one per message: round, pid, config

    def __call__(self, msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        config = dict(msg.content["config"])
        r = int(config["dpfl.round"])
        self.received.append({"round": r, "pid": pid, "config": config})
        if self.fresh:
            ctx = Context(
                run_id=ctx.run_id,
                node_id=ctx.node_id,
                node_config=ctx.node_config,
                state=RecordDict(),
                run_config={},
            )
        reply = dpfl_train(msg, ctx)
        self.sent.append(
            {
                "round": r,
                "pid": pid,
                "metrics": dict(reply.content["metrics"]),
                "meta": set(reply.content["dpfl"]),
                "status": str(reply.content["dpfl"]["status"]),
                "arrays": "arrays" in reply.content.array_records,
            }
        )
        return reply

    def grid(self, n=4):
        return InProcessGrid(_app(self), n)


def run_spied(store_path, cfg, spy):
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(spy.grid(cfg.federation.num_clients), cfg, run)
        metrics = store.metrics(run.run_id)
        events = store.privacy_events(run.run_id)
        checkpoints = [
            a for a in store.artifacts(run.run_id, with_data=True) if a["kind"] == "checkpoint"
        ]
        run_id = run.run_id
    return result, metrics, events, checkpoints, run_id


def opacus_epsilon(sigma, q, steps, delta=1e-5):
    """Independent reference: Opacus' RDP analysis of one (sigma, q, steps) phase."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


# -- sample-level DP -----------------------------------------------------------------------------
def test_sample_level_reply_carries_only_the_update_and_the_privacy_report(store_path):
    # Prepare
    cfg = cfg_with(*SAMPLE)
    spy = Spy()
    # Execute
    result, metrics, events, checkpoints, _ = run_spied(store_path, cfg, spy)
    # Assert: every reply: the model, status/participant/phases, metrics of the privacy report
    assert result.rounds_completed == 2 and len(spy.sent) == 8
    for s in spy.sent:
        assert s["arrays"] and s["meta"] == {"status", "participant", "phases"}
        assert set(s["metrics"]) == {
            "partition-id",
            "epsilon",
            "noise-multiplier",
            "budget-exhausted",
        }
        assert not DIAGNOSTICS & set(s["metrics"])
    # ... and the store: only covered server metrics
    assert {m["name"] for m in metrics} == COVERED
    assert {m["scope"] for m in metrics} == {"server"}
    # accuracy and loss are functions of the stored (noisy) model and the server's own data only
    data = load_dataset(cfg.data, cfg.seed)
    model = create_model(
        cfg.model, channels=data.channels, image_size=data.image_size, num_classes=data.num_classes
    )
    for ck in checkpoints:
        model.load_state_dict(load_checkpoint(ck["data"])["global_state"])
        loss, acc = evaluate(model, data.test)
        stored = {m["name"]: m["value"] for m in metrics if m["round"] == ck["round"]}
        assert stored["accuracy"] == acc and stored["loss"] == pytest.approx(loss, rel=1e-12)
        assert stored["clients"] == 4 and stored["dropped"] == 0
    # epsilon-max is the privacy history's (Opacus directly), nothing measured on records
    last = {m["round"]: m["value"] for m in metrics if m["name"] == "epsilon-max"}
    for r, value in last.items():
        eps = []
        for who in {e["participant"] for e in events}:
            mine = [e for e in events if e["participant"] == who and e["round"] <= r]
            (sigma,), (q,) = {e["noise_multiplier"] for e in mine}, {e["sample_rate"] for e in mine}
            eps.append(opacus_epsilon(sigma, q, sum(e["steps"] for e in mine)))
        assert value == pytest.approx(max(eps), rel=1e-9)


def test_sample_level_diagnostics_are_opt_in_and_stored_as_uncovered(store_path):
    # Prepare
    cfg = cfg_with(*SAMPLE, "federation.client-diagnostics=true")
    spy = Spy()
    # Execute
    _, metrics, _, _, run_id = run_spied(store_path, cfg, spy)
    # Assert: the replies carry the diagnostics ...
    for s in spy.sent:
        assert set(s["metrics"]) >= DIAGNOSTICS
        assert s["metrics"]["num-examples"] == len(client_datasets(cfg, s["pid"])[0])
        assert s["metrics"]["local-steps"] == 3
    # ... stored per client under uncovered/ names, with the values the clients sent
    stored = {(m["round"], m["scope"], m["name"]): m["value"] for m in metrics}
    for s in spy.sent:
        for k in DIAGNOSTICS:
            assert stored[(s["round"], f"client-{s['pid']}", f"uncovered/{k}")] == s["metrics"][k]
    names = {m["name"] for m in metrics}
    assert {n for n in names if not n.startswith("uncovered/")} == COVERED
    assert not any(m["scope"] == "server" and m["name"].startswith("uncovered/") for m in metrics)
    # ... and `dpfl runs show` says they are not covered
    out = CliRunner().invoke(cli_app, ["runs", "show", run_id, "--store", str(store_path)])
    assert out.exit_code == 0, out.output
    assert "NOT covered by the privacy guarantee" in out.stdout
    assert "uncovered/train-loss" in out.stdout


def test_non_dp_replies_keep_their_diagnostics():
    spy = Spy()
    cfg = cfg_with("privacy.enabled=false", "optimizer.lr=0.1")
    result = run_rounds(spy.grid(), cfg)
    assert all(set(s["metrics"]) >= DIAGNOSTICS for s in spy.sent)
    assert all("train-loss" in row for row in result.history)


@pytest.mark.parametrize("privacy,weighted", [(SAMPLE, False), (["privacy.enabled=false"], True)])
def test_fedavg_weights_by_examples_only_without_dp(privacy, weighted):
    strategy = create_strategy(cfg_with(*privacy))
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}
    new = strategy.aggregate(
        a, [Reply(1, "client-0", a, 1, {}), Reply(2, "client-1", b, 3, {})], server_round=1
    )
    # weighted: (0 * 1 + 4 * 3) / 4 = 3; unweighted: (0 + 4) / 2 = 2
    assert float(new["w"]) == (3.0 if weighted else 2.0)


# -- user-level DP -------------------------------------------------------------------------------
def test_user_level_reply_carries_only_the_clipped_update_and_the_unclipped_bit():
    spy = Spy()
    run_rounds(spy.grid(), cfg_with(*USER_ADAPTIVE))
    assert len(spy.sent) == 8
    for s in spy.sent:
        assert set(s["metrics"]) == {"partition-id", "unclipped"}
        assert s["metrics"]["unclipped"] in (0.0, 1.0)


def test_user_level_store_has_no_raw_update_norm_or_unclipped_count(store_path):
    # Prepare: diagnostics on, so that the spy sees each client's raw update norm
    cfg = cfg_with(*USER_ADAPTIVE, "federation.client-diagnostics=true")
    spy = Spy()
    # Execute
    result, metrics, _, _, _ = run_spied(store_path, cfg, spy)
    # Assert
    assert result.rounds_completed == 2
    covered = [m for m in metrics if not m["name"].startswith("uncovered/")]
    assert {m["name"] for m in covered} == COVERED_USER
    m_expected = 4 * 1.0  # q K
    for r in (1, 2):
        sent = [s["metrics"] for s in spy.sent if s["round"] == r]
        norms = [s["update-norm"] for s in sent]
        count = sum(s["unclipped"] for s in sent)
        stored = {m["name"]: m["value"] for m in covered if m["round"] == r}
        # no stored value is a raw update norm ...
        for name, value in stored.items():
            assert all(abs(value - x) > 1e-9 for x in norms), (name, value, norms)
        # ... and the released fraction is not the raw count, nor the raw fraction
        released = stored["noisy-unclipped-fraction"]
        for raw in (count, count / m_expected, count / len(sent)):
            assert abs(released - raw) > 1e-9, (released, count)
    # the raw norms are only in uncovered/ per-client rows
    norms = {m["value"] for m in metrics if m["name"] == "uncovered/update-norm"}
    assert norms == {s["metrics"]["update-norm"] for s in spy.sent}


def test_adaptive_clip_grows_in_a_federation_whose_updates_are_all_clipped():
    # A client-clipped update has norm S up to rounding: the server must count it as clipped
    # (by the client's bit), or the clip wanders at random instead of growing.
    cfg = cfg_with(*USER_ADAPTIVE, "privacy.clip-norm=1e-4", "federation.rounds=3")
    spy = Spy()
    result = run_rounds(spy.grid(), cfg)
    assert all(s["metrics"]["unclipped"] == 0.0 for s in spy.sent)
    assert [row["next-clip"] > row["clip"] for row in result.history] == [True] * 3


USER = [
    "privacy.level='user'",
    "federation.strategy='dp-fedavg'",
    "federation.num-clients=50",
    "federation.fraction=0.2",
]


class NullLedger:
    def record(self, *args, **kwargs):
        return None


def _bits_reply(i, bit, size):
    return Reply(i, f"client-{i}", {"w": torch.zeros(size)}, 1, {"unclipped": float(bit)})


def test_released_unclipped_fraction_carries_the_count_noise():
    # Prepare: m = q K = 10, sigma_b = 2; 4 of 10 updates unclipped; a clip that barely moves
    cfg = load_config(
        None,
        [
            *USER,
            "privacy.clipping='adaptive'",
            "privacy.count-noise-std=2.0",
            "privacy.clip-lr=1e-9",
        ],
    )
    s = DPFedAvg(cfg, NullLedger(), 0.5)
    replies = [_bits_reply(i, i < 4, 1) for i in range(10)]
    # Execute
    released = []
    for r in range(1, 4001):
        s.aggregate({"w": torch.zeros(1)}, replies, server_round=r)
        released.append(s.summary()["noisy-unclipped-fraction"])
    # Assert: mean 4/10, std sigma_b / m = 0.2, within 5 standard errors
    x = torch.tensor(released, dtype=torch.float64)
    n = x.numel()
    assert abs(float(x.mean()) - 0.4) < 5 * 0.2 / math.sqrt(n)
    assert abs(float(x.std()) / 0.2 - 1) < 5 / math.sqrt(2 * n)


def test_gradient_noise_std_is_split_multiplier_times_this_rounds_clip_over_m():
    # Prepare: adaptive, z = 1, sigma_b = 2, m = 10; every update reports "clipped", so the clip
    # grows between rounds (clip-lr 3)
    z, sigma_b, m = 1.0, 2.0, 10.0
    z_g = (z**-2 - (2 * sigma_b) ** -2) ** -0.5  # closed form of the split
    cfg = load_config(
        None,
        [
            *USER,
            "privacy.clipping='adaptive'",
            f"privacy.count-noise-std={sigma_b}",
            "privacy.clip-lr=3.0",
            "privacy.clip-norm=1.0",
        ],
    )
    s = DPFedAvg(cfg, NullLedger(), z)
    size = 200_000
    sent_clips = []
    for r in (1, 2):
        # Execute: the clip the clients get this round, then the aggregate of zero updates
        sent = float(s.client_config()["dpfl.clip"])
        sent_clips.append(sent)
        replies = [_bits_reply(i, 0, size) for i in range(7)]
        new = s.aggregate({"w": torch.zeros(size)}, replies, server_round=r)
        # Assert: the new model minus the old is pure noise N(0, (z_g S_t / m)^2)
        noise = new["w"].double()
        expected = z_g * sent / m
        assert abs(float(noise.std()) / expected - 1) < 5 / math.sqrt(2 * size), (r, sent)
    # the test has power: the clip moved far more than 5 standard errors (0.8%) between rounds
    assert sent_clips[0] == 1.0 and abs(sent_clips[1] / sent_clips[0] - 1) > 0.1


def test_secure_mode_server_noise_is_not_the_seeded_one():
    cfg = load_config(None, [*USER, "privacy.secure-mode=true"])
    a, b = DPFedAvg(cfg, NullLedger(), 1.0), DPFedAvg(cfg, NullLedger(), 1.0)
    rs = [_bits_reply(0, 1, 5)]
    ra = a.aggregate({"w": torch.zeros(5)}, rs, 1)["w"]
    rb = b.aggregate({"w": torch.zeros(5)}, rs, 1)["w"]
    assert not torch.equal(ra, rb)


@pytest.mark.parametrize("secure", [False, True])
def test_client_noise_is_reproducible_from_the_config_only_without_secure_mode(secure):
    # the server sends the whole config (seed included) to every client: without secure mode it
    # could regenerate a client's sampling and noise; with it, two identical rounds differ
    from dpfl.clients.federated import run_client_round

    cfg = cfg_with(*SAMPLE, f"privacy.secure-mode={str(secure).lower()}")
    data = load_dataset(cfg.data, cfg.seed)
    torch.manual_seed(0)
    start = create_model(
        cfg.model, channels=data.channels, image_size=data.image_size, num_classes=data.num_classes
    ).state_dict()
    a, b = (run_client_round(cfg, 0, start, 1, {}).arrays for _ in range(2))
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same is (not secure)


# -- the recorded privacy history restores a fresh client ----------------------------------------
def test_a_fresh_client_process_continues_its_epsilon_from_the_recorded_spend(store_path):
    # Prepare: every message meets an empty client state, as a new process would
    cfg = cfg_with("privacy.noise-multiplier=1.1", "federation.rounds=3")
    spy = Spy(fresh=True)
    # Execute
    result, _, events, _, _ = run_spied(store_path, cfg, spy)
    # Assert: the server sends each client its recorded history (3 steps per past round) ...
    assert result.rounds_completed == 3
    for got in spy.received:
        if got["round"] == 1:
            assert "dpfl.history" not in got["config"]
        else:
            history = got["config"]["dpfl.history"]
            assert sum(t for _, _, t in json.loads(history)) == 3 * (got["round"] - 1)
    # ... and the client's reported epsilon is that of all its steps so far (Opacus directly)
    for s in spy.sent:
        n = len(client_datasets(cfg, s["pid"])[0])
        expected = opacus_epsilon(1.1, 32 / n, 3 * s["round"])
        assert s["metrics"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert len(events) == 12


def test_a_fresh_client_process_stops_on_its_budget_in_time(store_path):
    # Prepare: clients calibrate for ceil(3 x 0.34) = 2 participations but are sampled every
    # round, and every message meets an empty client state
    spy = Spy(fresh=True)

    def thinks_rate_is_034(msg, ctx):
        msg.content["config"]["federation.fraction"] = 0.34
        return spy(msg, ctx)

    cfg = cfg_with(
        "privacy.target-epsilon=2.0", "federation.rounds=3", "federation.calibration='expected'"
    )
    # Execute
    with RunStore(store_path) as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(InProcessGrid(_app(thinks_rate_is_034), 4), cfg, run)
        events = store.privacy_events(run.run_id)
    # Assert: round 3 releases nothing, and nobody's recorded spend exceeds epsilon 2
    third = [s for s in spy.sent if s["round"] == 3]
    assert [(s["status"], s["arrays"]) for s in third] == [("budget-exhausted", False)] * 4
    assert result.rounds_completed == 2
    for who in {e["participant"] for e in events}:
        mine = [e for e in events if e["participant"] == who]
        assert {e["round"] for e in mine} == {1, 2}
        (sigma,), (q,) = {e["noise_multiplier"] for e in mine}, {e["sample_rate"] for e in mine}
        assert opacus_epsilon(sigma, q, sum(e["steps"] for e in mine)) <= 2.0


# -- the clients' randomness is not the server's to know -----------------------------------------
def _run_twice(trusted: bool):
    from dpfl.clients.client_app import TRUSTED_SIMULATION
    from dpfl.clients.client_app import app as dpfl_app

    losses = []
    for _ in range(2):
        grid = InProcessGrid(dpfl_app, 4)
        for ctx in grid._contexts.values():
            if not trusted:  # a deployment: the SuperNode's config has no such flag
                del ctx.node_config[TRUSTED_SIMULATION]
        cfg = cfg_with(*SAMPLE, "federation.rounds=1", "federation.local-steps=1")
        losses.append(run_rounds(grid, cfg).loss)
    return losses


def test_outside_a_simulation_the_server_cannot_regenerate_the_clients_noise():
    # the run seed (known to the server) fixes the result only in dpfl's trusted simulations;
    # a deployed client keeps a secret of its own, so the same config gives other noise
    same = _run_twice(trusted=True)
    assert same[0] == same[1]
    other = _run_twice(trusted=False)
    assert other[0] != other[1]
