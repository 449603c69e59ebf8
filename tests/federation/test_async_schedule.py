"""The asynchronous schedules against hand-computed 3-client schedules (tau = F-80 for M = 3:
1, 0.6, 0.2), the spec's identities (F-0 with dt = 1: FedFix is sync FedAvg; fedasync with equal
tau: d_i = 1) and bad input."""

from __future__ import annotations

import pytest

from dpfl.server.async_schedule import client_times, schedule

TAUS = [1.0, 0.6, 0.2]


def test_f_x_client_times_follow_the_spec():
    assert client_times("F-80", 3) == pytest.approx([1.0, 0.6, 0.2])
    assert client_times("F-0", 4) == [1.0] * 4
    assert client_times("F-50", 2) == [1.0, 0.5]
    assert client_times("F-80", 3) == TAUS  # exact decimals: 1 - 0.4 is 0.6
    for bad in ("G-80", "F-x", "F-100", "F--5"):
        with pytest.raises(ValueError):
            client_times(bad, 3)


def _rows(aggs):
    return [(a.time, a.participants, a.staleness) for a in aggs]


def test_fedfix_hand_computed():
    # windows at 0.5, 1.0, 1.5, 2.0; client 2 (0.2) is back in every window, clients 0 (1.0) and
    # 1 (0.6) in every second one; all restart at the window's end
    aggs = schedule("fedfix", TAUS, horizon=2.0, dt=0.5)
    assert _rows(aggs) == [
        (0.5, (2,), (0,)),
        (1.0, (0, 1, 2), (1, 1, 0)),
        (1.5, (2,), (0,)),
        (2.0, (0, 1, 2), (1, 1, 0)),
    ]
    # d_i = ceil(tau_i / dt) p_i: ceil(2) / 3, ceil(1.2) / 3, ceil(0.4) / 3
    assert aggs[1].weights == pytest.approx((2 / 3, 2 / 3, 1 / 3))
    assert aggs[1].sent_versions == (0, 0, 1)


def test_fedfix_counts_empty_windows():
    aggs = schedule("fedfix", [1.0, 1.0], horizon=1.0, dt=0.25)
    assert [a.participants for a in aggs] == [(), (), (), (0, 1)]
    assert aggs[-1].weights == pytest.approx((2.0, 2.0))  # ceil(1 / 0.25) * 1/2


def test_fedasync_hand_computed():
    aggs = schedule("fedasync", TAUS, horizon=1.3)
    assert [(a.time, a.participants) for a in aggs] == [
        (0.2, (2,)), (0.4, (2,)), (0.6, (1,)), (0.6, (2,)), (0.8, (2,)),
        (1.0, (0,)), (1.0, (2,)), (1.2, (1,)), (1.2, (2,)),
    ]  # fmt: skip
    # client 1 returns at 0.6 having trained on the initial model (5 aggregations later: 2 missed)
    assert aggs[2].staleness == (2,) and aggs[5].staleness == (5,)
    total = 1 / 1.0 + 1 / 0.6 + 1 / 0.2
    assert aggs[5].weights == pytest.approx((total * 1.0 / 3,))
    assert aggs[0].weights == pytest.approx((total * 0.2 / 3,))
    identical = schedule("fedasync", TAUS, horizon=1.3, policy="identical")
    assert all(a.weights == (1.0,) for a in identical)


def test_fedbuff_hand_computed():
    aggs = schedule("fedbuff", TAUS, horizon=2.0, buffer=2)
    assert [(a.time, a.participants) for a in aggs] == [
        (0.6, (1, 2)), (1.0, (0, 2)), (1.2, (1, 2)), (1.8, (1, 2)), (2.0, (0, 2)),
    ]  # fmt: skip
    # f = (2/5, 3/5, 5/5): d_i = p_i / f_i
    assert aggs[0].weights == pytest.approx(((1 / 3) / 0.6, (1 / 3) / 1.0))
    assert aggs[1].weights == pytest.approx(((1 / 3) / 0.4, 1 / 3))
    assert aggs[1].staleness == (1, 0)
    identical = schedule("fedbuff", TAUS, horizon=2.0, buffer=2, policy="identical")
    assert all(a.weights == (0.5, 0.5) for a in identical)


def test_fedbuff_members_restart_when_the_buffer_is_applied():
    # client 2 is back at 0.45 but waits in the buffer until 0.5 and restarts from there
    aggs = schedule("fedbuff", [1.0, 0.5, 0.45], horizon=2.0, buffer=2, policy="identical")
    assert [(a.time, a.participants) for a in aggs] == [
        (0.5, (1, 2)), (1.0, (0, 2)), (1.45, (1, 2)), (1.95, (1, 2)),
    ]  # fmt: skip


def test_sync_aggregates_everyone_every_slowest_time():
    aggs = schedule("sync", TAUS, horizon=2.0)
    assert _rows(aggs) == [(1.0, (0, 1, 2), (0, 0, 0)), (2.0, (0, 1, 2), (0, 0, 0))]
    assert aggs[0].weights == pytest.approx((1 / 3,) * 3)


def test_fedfix_with_f0_and_dt_1_is_sync_fedavg():
    taus = client_times("F-0", 5)
    fix, sync = schedule("fedfix", taus, 7.0, dt=1.0), schedule("sync", taus, 7.0)
    assert [(a.time, a.participants, a.weights, a.sent_versions) for a in fix] == [
        (a.time, a.participants, a.weights, a.sent_versions) for a in sync
    ]


def test_fedasync_with_equal_times_weighs_each_update_by_one():
    aggs = schedule("fedasync", [0.5] * 4, horizon=2.0)
    assert len(aggs) == 16 and all(a.weights == pytest.approx((1.0,)) for a in aggs)
    # round robin by index at each tie, each client trained on the model of 4 aggregations ago
    assert [a.participants[0] for a in aggs[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all(a.staleness == (3,) for a in aggs[4:])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"scheme": "fedfix"}, "window dt"),
        ({"scheme": "fedfix", "dt": -1.0}, "window dt"),
        ({"scheme": "fedbuff", "buffer": 4}, "buffer c"),
        ({"scheme": "fedasync", "policy": "median"}, "policy"),
        ({"scheme": "fedlol"}, "unknown scheme"),
        ({"scheme": "sync", "horizon": 0.0}, "horizon"),
        ({"scheme": "sync", "taus": [1.0, 0.0]}, "> 0"),
    ],
)
def test_bad_input_is_refused(kwargs, fragment):
    args = {"taus": TAUS, "horizon": 2.0, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        schedule(args.pop("scheme"), args.pop("taus"), args.pop("horizon"), **args)
