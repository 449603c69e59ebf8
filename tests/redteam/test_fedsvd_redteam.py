"""Red team of FedSVD / FFA-LoRA / LoRA-FedAvg under sample-level DP (commit 00daabe).

What is attacked, each against a closed form or a brute force (never against the code itself):

* the private step a client builds with its strategy's :class:`ClientBehaviour`: the released
  clipped sum (noise multiplier 0) equals the sum of per-record gradients clipped to C, each
  computed alone by autograd over exactly the parameters that should train (B and the head
  under ffa-lora / fedsvd; A too under lora-fedavg); removing one record moves the release by
  exactly ``min(C, ||g_j||)``; A gets no gradient and does not move, and is frozen BEFORE the
  solver and the private step see the model;
* what leaves a client under DP: the reply's records, arrays (no A under ffa-lora / fedsvd) and
  metrics (only the privacy report);
* the server: a fedsvd reply with a NaN B, a wrong-shaped B, a smuggled A or a missing B is
  dropped with its reason (its privacy still recorded) and the run finishes; the new global
  ``B A`` is the mean of the valid replies' B times the A the server sent, with A orthonormal;
* the worst-case calibration: sigma = calibrate_noise(eps, delta, q, rounds x local steps), its
  epsilon checked with Opacus' own RDP accountant, and a client sampled in every round stays
  within its budget (while the ``expected`` plan does not).

The tiny random BERT of tests/tasks/test_text_classification.py (2 layers, hidden 16, r = 4, no
dropout): seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from dpfl.accountants import calibrate_noise
from dpfl.clients import federated
from dpfl.clients.client_app import train as dpfl_train
from dpfl.clients.federated import client_datasets, run_client_round
from dpfl.config import load_config
from dpfl.errors import ConfigError
from dpfl.federation_messages import PRIVACY_REPORT_METRICS
from dpfl.lora import refactorize_state
from dpfl.preflight import check_simulate
from dpfl.privacy import make_private
from dpfl.server.loop import load_checkpoint, run_rounds
from dpfl.server.strategies import client_behaviour
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.store import RunStore
from dpfl.tasks import get_task
from tests.tasks.test_text_classification import sets as text_sets
from tests.tasks.test_text_classification import tiny  # noqa: F401 - the fixture

A_MARK, B_MARK = ".lora_A.", ".lora_B."
FROZEN_A = ("ffa-lora", "fedsvd")


def _cfg(tiny, strategy, *extra):  # noqa: F811
    return load_config(None, text_sets(tiny, f"federation.strategy='{strategy}'", *extra))


def _setup(cfg):
    task = get_task(cfg)
    data = task.load_data()
    torch.manual_seed(0)
    model = task.build_model(data)
    return task, data, model


def _sent_state(task, model, seed=1):
    """A global state as a server sends it a few rounds in: B far from 0 (so a trainable A would
    get a gradient), A with orthonormal rows (FedSVD's), the head perturbed."""
    g = torch.Generator().manual_seed(seed)
    state = task.trainable_state(model)
    moved = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return refactorize_state(moved)


def _should_train(strategy, state):
    """The parameters that train, by the papers: B and the head (ffa-lora, fedsvd), A too
    (lora-fedavg). Written from the names, not from the code's freezing."""
    if strategy in FROZEN_A:
        return {k for k in state if A_MARK not in k}
    return set(state)


# -- 1. one record's influence on the private step --------------------------------------------
def _fresh(cfg, task, data, sent):
    torch.manual_seed(0)
    model = task.build_model(data)
    task.load_trainable_state(model, sent)
    return model


def _released_sum(cfg, task, data, sent, records, clip, grad_sample_mode="bk"):
    """One private step as run_client_round builds it (behaviour.prepare, the client's solver,
    make_private), noise multiplier 0, on the fixed batch ``records``: returns (the released
    clipped SUM per parameter = p.grad * B, the model after the step)."""
    model = _fresh(cfg, task, data, sent)
    client_behaviour(cfg).prepare(model)
    opt = federated._optimizer(cfg, model, sent)
    batch_size = cfg.data.batch_size
    pt = make_private(
        model,
        opt,
        DataLoader(data.train, batch_size=batch_size),
        noise_multiplier=0.0,
        clip_norm=clip,
        grad_sample_mode=grad_sample_mode,
        seed=0,
        participant="client-0",
    )
    x, y = default_collate([data.train[i] for i in records])
    try:
        pt.train_step(x, y, task.per_sample_loss)
    finally:
        pt.detach()
    assert pt.expected_batch_size == pytest.approx(batch_size)
    released = {
        n.removeprefix("_module."): p.grad.detach().double() * batch_size
        for n, p in pt.model.named_parameters()
        if p.grad is not None
    }
    return released, model


def _per_record_grads(cfg, task, data, sent, records, names):
    """Each record's gradient alone (batch of 1, plain autograd) w.r.t. ``names``."""
    model = _fresh(cfg, task, data, sent)
    model.train()
    params = dict(model.named_parameters())
    out = []
    for i in records:
        x, y = default_collate([data.train[i]])
        loss = task.per_sample_loss(model(**x), y).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        out.append({n: g.double() for n, g in zip(names, grads, strict=True)})
    return out


def _norm(d):
    return math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))


@pytest.mark.parametrize(
    "strategy,mode",
    [("fedsvd", "bk"), ("ffa-lora", "bk"), ("fedsvd", "hooks"), ("lora-fedavg", "bk")],
)
def test_released_clipped_sum_is_the_brute_force_one_and_a_never_moves(tiny, strategy, mode):  # noqa: F811
    cfg = _cfg(tiny, strategy, "data.batch-size=16", "optimizer.lr=0.5")
    task, data, model = _setup(cfg)
    sent = _sent_state(task, model)
    names = sorted(_should_train(strategy, sent))
    records = list(range(8))
    per = _per_record_grads(cfg, task, data, sent, records, names)
    norms = [_norm(g) for g in per]
    assert min(norms) > 0
    clip = sorted(norms)[len(norms) // 2]  # some records clipped, some not
    expected = {
        n: sum(min(1.0, clip / nr) * g[n] for g, nr in zip(per, norms, strict=True)) for n in names
    }
    released, trained = _released_sum(cfg, task, data, sent, records, clip, mode)
    # exactly the parameters that should train carry a release: no A under ffa-lora / fedsvd
    assert set(released) == set(names)
    scale = max(float(v.abs().max()) for v in expected.values())
    for n in names:
        assert torch.allclose(released[n], expected[n], rtol=1e-4, atol=1e-6 * scale), n
    # and the sum of clipped gradients has norm <= |records| C (each record at most C)
    assert _norm(released) <= len(records) * clip * (1 + 1e-6)

    after = dict(trained.named_parameters())
    a_keys = [k for k in sent if A_MARK in k]
    if strategy in FROZEN_A:
        for k in a_keys:  # frozen, no gradient, exactly the sent A after the step
            assert not after[k].requires_grad and after[k].grad is None
            assert torch.equal(after[k].detach(), sent[k])
    else:
        assert any(not torch.equal(after[k].detach(), sent[k]) for k in a_keys)
    b_keys = [k for k in sent if B_MARK in k]
    assert all(not torch.equal(after[k].detach(), sent[k]) for k in b_keys)

    # neighbouring batches (record j removed): the release moves by min(C, ||g_j||) exactly,
    # over everything that is released (B and the head together)
    for j in (0, 5):
        fewer, _ = _released_sum(cfg, task, data, sent, [i for i in records if i != j], clip, mode)
        diff = _norm({n: released[n] - fewer[n] for n in names})
        assert diff == pytest.approx(min(clip, norms[j]), rel=1e-4)
        assert diff <= clip * (1 + 1e-4)


@pytest.mark.parametrize("strategy", FROZEN_A)
def test_a_is_frozen_before_the_solver_and_private_step_exist(tiny, strategy, monkeypatch):  # noqa: F811
    """Inside run_client_round (DP on, noise on): when make_private is called, no A requires a
    gradient and the solver holds no A; after the round the trained model's A is the sent A."""
    cfg = _cfg(
        tiny, strategy, "data.batch-size=16", "optimizer.lr=0.5", "federation.num-clients=3",
        "federation.local-steps=2", "privacy.noise-multiplier=0.7",
    )  # fmt: skip
    task, data, model = _setup(cfg)
    sent = _sent_state(task, model)
    seen = {}
    real = federated.make_private

    def spy(m, opt, loader, **kw):
        named = dict(m.named_parameters())
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        seen["grad"] = {n for n, p in named.items() if p.requires_grad}
        seen["opt"] = {n for n, p in named.items() if id(p) in in_opt}
        pt = real(m, opt, loader, **kw)
        seen["model"] = m
        return pt

    monkeypatch.setattr(federated, "make_private", spy)
    result = run_client_round(cfg, 0, sent, 1, {})
    assert result.status == "trained"
    want = _should_train(strategy, sent)
    assert seen["grad"] == want and seen["opt"] == want
    after = dict(seen["model"].named_parameters())
    for k in (k for k in sent if A_MARK in k):
        assert torch.equal(after[k].detach(), sent[k]) and after[k].grad is None
    assert set(result.arrays) == want


# -- 2. what a reply carries under DP -------------------------------------------------------------
def _recording_app(log, corrupt=None):
    """dpfl's ClientApp; records (sent state, reply) per call; ``corrupt(state, sent)`` alters
    partition 0's reply arrays."""
    client = ClientApp()

    @client.train()
    def _train(msg, context):
        sent = msg.content.array_records["arrays"].to_torch_state_dict()
        reply = dpfl_train(msg, context)
        pid = context.node_config["partition-id"]
        if corrupt is not None and pid == 0 and "arrays" in reply.content.array_records:
            state = reply.content.array_records["arrays"].to_torch_state_dict()
            reply.content.array_records["arrays"] = ArrayRecord(corrupt(state, sent))
        log.append((int(msg.content["config"]["dpfl.round"]), pid, sent, reply))
        return reply

    return client


DP_FED = (
    "data.batch-size=16", "optimizer.lr=0.5", "privacy.noise-multiplier=0.6",
    "federation.num-clients=3", "federation.local-steps=1",
)  # fmt: skip


@pytest.mark.parametrize("strategy", ["fedsvd", "ffa-lora", "lora-fedavg"])
def test_a_dp_reply_holds_the_reference_tensors_and_only_the_privacy_report(tiny, strategy):  # noqa: F811
    cfg = _cfg(tiny, strategy, *DP_FED, "federation.rounds=1")
    log = []
    result = run_rounds(InProcessGrid(_recording_app(log), 3), cfg)
    assert result.rounds_completed == 1 and result.history[0]["dropped"] == 0
    assert len(log) == 3
    for _, pid, sent, reply in log:
        c = reply.content
        assert set(c.array_records) == {"arrays"}
        assert set(c.metric_records) == {"metrics"}
        assert set(c.config_records) == {"dpfl"}
        assert set(c.config_records["dpfl"]) == {"status", "participant", "phases"}
        assert c.config_records["dpfl"]["status"] == "trained"
        # every privacy-report metric, and nothing computed on the records
        assert set(c.metric_records["metrics"]) == set(PRIVACY_REPORT_METRICS)
        assert c.metric_records["metrics"]["partition-id"] == pid
        arrays = c.array_records["arrays"].to_torch_state_dict()
        a_keys = {k for k in sent if A_MARK in k}
        assert a_keys
        if strategy in FROZEN_A:
            assert set(arrays) == set(sent) - a_keys
            # no sent A under another name either
            for a in (sent[k] for k in a_keys):
                assert not any(v.shape == a.shape and torch.equal(v, a) for v in arrays.values())
        else:
            assert set(arrays) == set(sent)
            assert any(not torch.equal(arrays[k], sent[k]) for k in a_keys)  # A trained
        for k, v in arrays.items():
            assert v.shape == sent[k].shape and v.dtype == sent[k].dtype
        assert any(not torch.equal(arrays[k], sent[k]) for k in arrays if B_MARK in k)


# -- 3. the server under fedsvd -------------------------------------------------------------------
def _nan_b(state, sent):
    k = sorted(k for k in state if B_MARK in k)[0]
    state[k] = state[k].clone()
    state[k][0, 0] = float("nan")
    return state


def _wrong_shape_b(state, sent):
    k = sorted(k for k in state if B_MARK in k)[-1]
    state[k] = torch.zeros(state[k].shape[0], state[k].shape[1] + 1)
    return state


def _extra_a(state, sent):
    state.update({k: v * 2 for k, v in sent.items() if A_MARK in k})
    return state


def _missing_b(state, sent):
    del state[sorted(k for k in state if B_MARK in k)[0]]
    return state


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (_nan_b, "non-finite"),
        (_wrong_shape_b, "wrong shape"),
        (_extra_a, "wrong keys"),
        (_missing_b, "wrong keys"),
    ],
)
def test_fedsvd_server_drops_bad_replies_and_refactorizes_the_good(tiny, tmp_path, corrupt, reason):  # noqa: F811
    cfg = _cfg(tiny, "fedsvd", *DP_FED, "federation.rounds=2")
    log = []
    grid = InProcessGrid(_recording_app(log, corrupt), 3)
    with RunStore(tmp_path / "s.sqlite") as store, store.run("simulate", cfg.to_dict()) as run:
        result = run_rounds(grid, cfg, run)
        dropped = store.dropped_replies(run.run_id)
        checkpoints = {
            a["round"]: load_checkpoint(a["data"])["global_state"]
            for a in store.artifacts(run.run_id, with_data=True)
            if a["kind"] == "checkpoint"
        }
    assert result.rounds_completed == 2, result.message
    assert [row["clients"] for row in result.history] == [2, 2]
    assert [(d["round"], d["participant"]) for d in dropped] == [(1, "client-0"), (2, "client-0")]
    assert all(reason in d["reason"] for d in dropped), dropped
    assert "client-0" in result.epsilon  # its privacy is recorded although its update is dropped
    for r in (1, 2):
        sent = next(s for rr, _, s, _ in log if rr == r)
        good = [
            rep.content.array_records["arrays"].to_torch_state_dict()
            for rr, pid, _, rep in log
            if rr == r and pid != 0
        ]
        new = checkpoints[r]
        assert set(new) == set(sent)
        for a_key in (k for k in sent if A_MARK in k):
            b_key = a_key.replace(A_MARK, B_MARK)
            a_new, b_new = new[a_key].double(), new[b_key].double()
            eye = a_new @ a_new.T
            assert torch.allclose(eye, torch.eye(eye.shape[0], dtype=torch.float64), atol=1e-5)
            mean_b = sum(g[b_key].double() for g in good) / len(good)
            p = mean_b @ sent[a_key].double()
            assert torch.linalg.matrix_norm(b_new @ a_new - p) < 1e-5 * torch.linalg.matrix_norm(p)
        for k in (k for k in sent if "lora_" not in k):  # the head: the plain mean
            assert torch.allclose(new[k], sum(g[k] for g in good) / len(good), atol=1e-6)
    # round 2 was sent round 1's aggregate
    sent2 = next(s for rr, _, s, _ in log if rr == 2)
    assert all(torch.equal(sent2[k], checkpoints[1][k]) for k in sent2)


# -- 4. calibration -------------------------------------------------------------------------------
CAL = (
    "data.batch-size=16", "optimizer.lr=0.5", "privacy.target-epsilon=3.0",
    "federation.num-clients=4", "federation.rounds=4", "federation.fraction=0.5",
    "federation.local-steps=2", "federation.local-epochs=5",
)  # fmt: skip


def _opacus_epsilon(sigma, q, steps, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def test_worst_case_calibration_plans_every_round_and_opacus_agrees(tiny):  # noqa: F811
    rounds, local, eps, delta, fraction = 4, 2, 3.0, 1e-5, 0.5
    worst = _cfg(tiny, "fedsvd", *CAL)
    assert worst.federation.calibration == "worst-case"  # the default
    assert worst.privacy.delta == delta
    n = len(client_datasets(worst, 0)[0])
    q = 16 / n
    assert 5 / q > local  # local-steps (2), not the 5 epochs (5 / q steps), bounds a round
    sigma_worst = calibrate_noise(eps, delta, q, rounds * local).noise_multiplier
    sigma_expected = calibrate_noise(
        eps, delta, q, math.ceil(rounds * fraction) * local
    ).noise_multiplier
    assert sigma_expected < sigma_worst

    state = {}
    first = run_client_round(worst, 0, _sent_state(*_setup(worst)[::2]), 1, state)
    assert first.metrics["noise-multiplier"] == sigma_worst
    assert first.phases[0].sample_rate == pytest.approx(q)
    # Opacus' own RDP accountant: a client sampled in all rounds ends within the target
    assert _opacus_epsilon(sigma_worst, q, rounds * local, delta) <= eps
    # and the calibration is not wastefully loose
    assert _opacus_epsilon(sigma_worst, q, rounds * local, delta) > 0.95 * eps

    expected = _cfg(tiny, "fedsvd", *CAL, "federation.calibration='expected'")
    other = run_client_round(expected, 0, _sent_state(*_setup(expected)[::2]), 1, {})
    assert other.metrics["noise-multiplier"] == sigma_expected


def test_a_client_sampled_every_round_stays_within_budget_only_under_worst_case(tiny):  # noqa: F811
    eps, delta = 3.0, 1e-5
    outcomes = {}
    for plan in ("worst-case", "expected"):
        cfg = _cfg(tiny, "ffa-lora", *CAL, f"federation.calibration='{plan}'")
        task, _, model = _setup(cfg)
        sent, state, statuses = _sent_state(task, model), {}, []
        for r in range(1, 5):  # client 0 sampled in every one of the 4 rounds
            res = run_client_round(cfg, 0, sent, r, state)
            statuses.append(res.status)
            if res.arrays is not None:
                sent = {**sent, **res.arrays}
        steps = sum(s for _, _, s in state["phases"])
        (sigma,) = {s for s, _, _ in state["phases"]}
        (q,) = {qq for _, qq, _ in state["phases"]}
        outcomes[plan] = (statuses, steps, _opacus_epsilon(sigma, q, steps, delta))
    statuses, steps, spent = outcomes["worst-case"]
    assert statuses == ["trained"] * 4 and steps == 8 and spent <= eps
    statuses, steps, spent = outcomes["expected"]
    assert "budget-exhausted" in statuses and steps < 8 and spent <= eps


# -- found: an Embedding layer's LoRA A is not frozen ---------------------------------------------
# fixed: preflight refuses Embedding adapters under ffa-lora / fedsvd (peft starts their A at
# 0), and is_lora_a freezes a lora_embedding_A anyway
@pytest.mark.parametrize("strategy", FROZEN_A)
def test_every_lora_a_is_frozen_also_an_embedding_adapters(tiny, strategy):  # noqa: F811
    cfg = _cfg(
        tiny, strategy, "privacy.enabled=false", "data.batch-size=16", "optimizer.lr=0.5",
        "federation.num-clients=3", "federation.local-steps=2",
        "lora.target-modules='word_embeddings,query'",
    )  # fmt: skip
    task, _, model = _setup(cfg)
    sent = task.trainable_state(model)
    a_keys = {k for k in sent if "lora_A" in k or "lora_embedding_A" in k}
    assert any("lora_embedding_A" in k for k in a_keys)  # peft's name for an Embedding's A
    with pytest.raises(ConfigError, match="Embedding"):
        check_simulate(cfg)
    result = run_client_round(cfg, 0, sent, 1, {})  # a client reached anyway freezes it
    assert result.status == "trained"
    assert not a_keys & set(result.arrays)
