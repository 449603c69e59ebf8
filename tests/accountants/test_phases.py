import pytest

from dpfl.accountants import Phase, merge_phases, phases_from_records, steps_for_epochs
from dpfl.errors import ConfigError


@pytest.mark.parametrize(
    "epochs,q,steps",
    [(90, 0.04, 2250), (1, 0.1, 10), (3, 0.3, 10), (1, 0.3, 4), (0.5, 1.0, 1), (10, 1 / 3, 30)],
)
def test_steps_for_epochs_rounds_up_unless_integral(epochs, q, steps):
    assert steps_for_epochs(epochs, q) == steps


def test_merge_drops_empty_and_joins_equal_neighbours():
    merged = merge_phases(
        [
            Phase(1.0, 0.1, 2),
            Phase(1.0, 0.1, 3),
            Phase(1.0, 0.1, 0),
            Phase(2.0, 0.1, 1),
            Phase(1.0, 0.1, 1),
        ]
    )
    assert merged == [Phase(1.0, 0.1, 5), Phase(2.0, 0.1, 1), Phase(1.0, 0.1, 1)]


def test_merge_keeps_phases_apart_that_differ_in_sample_rate_or_noise_only():
    phases = [Phase(1.0, 0.1, 2), Phase(1.0, 0.2, 3), Phase(2.0, 0.2, 1), Phase(2.0, 0.2, 4)]
    assert merge_phases(phases) == [Phase(1.0, 0.1, 2), Phase(1.0, 0.2, 3), Phase(2.0, 0.2, 5)]


def test_phases_from_records_accepts_aliases_and_epochs():
    phases = phases_from_records(
        [
            {"noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 5},
            {"sigma": 2, "sample_rate": 0.5, "epochs": 2},
        ]
    )
    assert phases == [Phase(1.0, 0.1, 5), Phase(2.0, 0.5, 4)]


@pytest.mark.parametrize(
    "record,match",
    [
        ({"sigma": 1.0, "sample-rate": 0.1}, "one of steps or epochs"),
        ({"sigma": 1.0, "sample-rate": 0.1, "steps": 1, "epochs": 1}, "one of steps or epochs"),
        ({"sample-rate": 0.1, "steps": 1}, "needs noise-multiplier"),
        ({"sigma": 1.0, "sample-rate": 0.1, "steps": 1, "clip": 1}, "unknown key 'clip'"),
        ({"sigma": -1.0, "sample-rate": 0.1, "steps": 1}, "phase 1: noise multiplier"),
        ({"sigma": 1.0, "sample-rate": 0.1, "epochs": -2}, "phase 1: epochs"),
        ("not a table", "must be a table"),
    ],
)
def test_phases_from_records_errors(record, match):
    with pytest.raises(ConfigError, match=match):
        phases_from_records([record])
