import math

import pytest

from dpfl.accountants import Phase, PrivacyLedger, compute_epsilon
from dpfl.errors import ConfigError, PrivacyBudgetError
from dpfl.store import RunStore


def test_each_participant_has_its_own_growing_history():
    # Prepare
    ledger = PrivacyLedger("rdp", 1e-5)
    # Execute
    for _ in range(3):
        ledger.record("client-0", 1.0, 0.05, 10)
    ledger.record("client-1", 2.0, 0.05, 10)
    ledger.record("client-0", 1.5, 0.1, 5)
    # Assert
    assert ledger.history("client-0") == [Phase(1.0, 0.05, 30), Phase(1.5, 0.1, 5)]
    assert ledger.epsilon("client-0") == compute_epsilon(ledger.history("client-0"), 1e-5)
    assert ledger.epsilon("client-1") == compute_epsilon([Phase(2.0, 0.05, 10)], 1e-5)
    assert ledger.epsilon("nobody") == 0.0
    assert [e.seq for e in ledger.events] == [0, 1, 2, 3, 4]
    assert ledger.max_epsilon() == max(ledger.spent().values())


def test_budget_stops_before_the_step_that_would_exceed_it():
    # Prepare
    target = 2.0
    ledger = PrivacyLedger("rdp", 1e-5, target_epsilon=target)
    steps = 0
    # Execute: release one step at a time until refused
    with pytest.raises(PrivacyBudgetError, match="budget"):
        while True:
            ledger.record("central", 1.0, 0.02, 1)
            steps += 1
    # Assert: the refused step was not recorded; the spend is within the budget, one more is not
    assert ledger.history("central") == [Phase(1.0, 0.02, steps)]
    assert ledger.epsilon("central") <= target
    assert compute_epsilon([Phase(1.0, 0.02, steps + 1)], 1e-5) > target
    assert not ledger.can_afford("central", Phase(1.0, 0.02, 1))
    assert ledger.can_afford("other", Phase(1.0, 0.02, 1))


def test_sink_failure_leaves_the_ledger_unchanged():
    # Durable first: if the event cannot be persisted, the release must not count as admitted
    def broken_sink(event):
        raise OSError("disk full")

    ledger = PrivacyLedger("rdp", 1e-5, sink=broken_sink)
    with pytest.raises(OSError):
        ledger.record("central", 1.0, 0.1, 1)
    assert ledger.events == [] and ledger.epsilon("central") == 0.0


def test_refused_release_never_reaches_the_sink():
    seen = []
    ledger = PrivacyLedger("rdp", 1e-5, target_epsilon=0.5, sink=seen.append)
    with pytest.raises(PrivacyBudgetError):
        ledger.record("central", 0.5, 0.5, 100)
    assert seen == []


def test_gdp_cannot_enforce_a_budget():
    with pytest.raises(ConfigError, match="can underestimate"):
        PrivacyLedger("gdp", 1e-5, target_epsilon=1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"participant": ""}, "participant"),
        ({"mechanism": "laplace"}, "unknown mechanism"),
        ({"noise_multiplier": -1.0}, "noise multiplier"),
        ({"sample_rate": 2.0}, "sample rate"),
    ],
)
def test_invalid_records(kwargs, match):
    args = {"participant": "c", "noise_multiplier": 1.0, "sample_rate": 0.1} | kwargs
    with pytest.raises(ConfigError, match=match):
        PrivacyLedger().record(**args)


def test_zero_noise_release_is_recorded_as_infinite_epsilon():
    ledger = PrivacyLedger()
    ledger.record("central", 0.0, 0.1, 1)
    assert ledger.epsilon("central") == math.inf


def test_restored_ledger_continues_exactly_like_an_uninterrupted_one(store_path):
    # Prepare: a run that records to the store, then "crashes"
    with RunStore(store_path) as store:
        run = store.create_run("train", {})
        ledger = PrivacyLedger("rdp", 1e-5, sink=run.record_privacy_event)
        ledger.record("client-0", 1.0, 0.05, 10, round=1)
        ledger.record("client-1", 1.2, 0.05, 10, round=1)
        ledger.record("client-0", 1.0, 0.05, 10, round=2)
        run_id = run.run_id
    # Execute: restore from the store rows and continue
    with RunStore(store_path) as store:
        restored = PrivacyLedger.from_events(store.privacy_events(run_id), "rdp", 1e-5)
        restored.record("client-0", 1.0, 0.05, 10, round=3)
    uninterrupted = PrivacyLedger("rdp", 1e-5)
    for who, sigma, rnd in [
        ("client-0", 1.0, 1),
        ("client-1", 1.2, 1),
        ("client-0", 1.0, 2),
        ("client-0", 1.0, 3),
    ]:
        uninterrupted.record(who, sigma, 0.05, 10, round=rnd)
    # Assert
    assert restored.spent() == pytest.approx(uninterrupted.spent(), rel=1e-12)
    assert restored.events[-1].seq == 3
    assert [e.to_dict() | {"epsilon_after": 0} for e in restored.events] == [
        e.to_dict() | {"epsilon_after": 0} for e in uninterrupted.events
    ]


def test_state_dict_round_trip_is_exact():
    # Prepare
    import json

    ledger = PrivacyLedger("prv", 1e-6, target_epsilon=5.0)
    ledger.record("a", 1.0, 0.01, 100, round=1, note="n")
    ledger.record("b", 2.0, 0.02, 50)
    # Execute
    restored = PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    # Assert
    assert restored.events == ledger.events
    assert restored.spent() == pytest.approx(ledger.spent(), rel=1e-12)
    assert restored.target_epsilon == 5.0 and restored.accountant == "prv"
    with pytest.raises(ConfigError, match="malformed privacy ledger state"):
        PrivacyLedger.from_state_dict({"events": []})


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_per_step_budget_checks_compute_epsilon_rarely(monkeypatch, accountant):
    # Prepare: count the accountant evaluations the ledger makes
    import dpfl.accountants.ledger as ledger_module

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return compute_epsilon(*args, **kwargs)

    monkeypatch.setattr(ledger_module, "compute_epsilon", counting)
    ledger = PrivacyLedger(accountant, 1e-5, target_epsilon=1.0)
    # Execute: one event per step until the budget refuses
    steps = 0
    with pytest.raises(PrivacyBudgetError):
        while True:
            ledger.record("central", 2.0, 0.02, 1)
            steps += 1
    # Assert: exact stop, and O(log T) evaluations instead of T
    assert compute_epsilon([Phase(2.0, 0.02, steps)], 1e-5, accountant) <= 1.0
    assert compute_epsilon([Phase(2.0, 0.02, steps + 1)], 1e-5, accountant) > 1.0
    assert steps > 400
    assert len(calls) <= 4 * steps.bit_length() + (steps if accountant == "rdp" else 0) + 4


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_events_without_budget_compute_epsilon_on_demand(accountant):
    ledger = PrivacyLedger(accountant, 1e-5)
    events = [ledger.record("a", 1.0, 0.01, 100) for _ in range(3)]
    assert all(e.epsilon_after is None for e in events)
    assert ledger.epsilon("a") == compute_epsilon([Phase(1.0, 0.01, 300)], 1e-5, accountant)


def test_equal_noise_at_another_sample_rate_is_a_new_phase():
    # Prepare: same sigma, q rises from 0.01 to 0.2 (e.g. a larger batch)
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from dpfl.accountants.rdp import ORDERS

    ledger = PrivacyLedger("rdp", 1e-5)
    # Execute
    ledger.record("a", 1.0, 0.01, 200)
    ledger.record("a", 1.0, 0.2, 10)
    # Assert: two phases, and epsilon is Opacus' RDP of both (computed here phase by phase)
    assert ledger.history("a") == [Phase(1.0, 0.01, 200), Phase(1.0, 0.2, 10)]
    rdp = compute_rdp(q=0.01, noise_multiplier=1.0, steps=200, orders=ORDERS) + compute_rdp(
        q=0.2, noise_multiplier=1.0, steps=10, orders=ORDERS
    )
    expected, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)
    assert ledger.epsilon("a") == pytest.approx(expected, rel=1e-9)
