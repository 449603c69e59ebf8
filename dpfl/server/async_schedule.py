"""The virtual clock of asynchronous federation: which clients aggregate when, and with what weight.

Fraboni, Vidal, Kameni, Lorenzi (JMLR 2023; ../shared/algorithms/dp_and_fl.md section 4): client i
needs tau_i units of simulated time per local round, trains on the last global model it was sent,
and the server applies ``theta += lr_g * sum_{i in S_n} d_i (theta_i - theta_sent(i))`` at each
aggregation n. The schedule depends only on the tau_i, the scheme and the horizon, never on the
model, so it is computed up front, exactly (times are kept as :class:`fractions.Fraction` of the
decimal values given, so ``3 x 0.2`` equals ``0.6`` and ties are ties), and a simulation replays it
bit for bit while the work itself runs as fast as the machine allows.

Schemes (the spec's table 4.3):

* ``sync``: FedAvg; every ``max_j tau_j``, all clients, on the current model, d_i = p_i;
* ``fedfix``: at ``dt, 2 dt, ...`` every client whose return time is inside the window;
  they restart at the window's end; d_i = ceil(tau_i / dt) p_i; a window without returns still
  counts (an aggregation with no participant: the model is unchanged);
* ``fedasync``: every return of the earliest client (ties: the smaller index first);
  d_i = (sum_j 1 / tau_j) tau_i p_i (``weight``) or 1 (``identical``);
* ``fedbuff``: when the ``c`` earliest-returning clients are back (the clock jumps to the last of
  them); d_i = 1 / c (``identical``) or p_i / f_i (``weight``), f_i = the fraction of all
  aggregations of the schedule that contain client i.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from dpfl.errors import ConfigError

if TYPE_CHECKING:
    from dpfl.config import Config

__all__ = [
    "MAX_AGGREGATIONS",
    "SCHEMES",
    "Aggregation",
    "client_times",
    "parse_speeds",
    "participations",
    "plan",
    "plan_of",
    "schedule",
]

#: a schedule with more aggregations than this is refused (it would not finish)
MAX_AGGREGATIONS = 200_000

SCHEMES = ("sync", "fedfix", "fedasync", "fedbuff")


def _exact(x: float | int | str) -> Fraction:
    """The decimal value as written (``0.2`` is 1/5, not the nearest binary float)."""
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


def client_times(scenario: str, num_clients: int) -> list[float]:
    """tau_i of the spec's ``F-X`` model: ``1 - i (X / 100) / (M - 1)``; client 0 is the slowest
    (tau = 1), client M - 1 is X % faster. ``F-0``: every tau is 1."""
    if not scenario.startswith("F-"):
        raise ConfigError(f"client-speed scenario must be F-X (e.g. F-0, F-80), got {scenario!r}")
    try:
        x = _exact(scenario[2:])
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"client-speed scenario must be F-X with X a number, got {scenario!r}"
        ) from None
    if not 0 <= x < 100:
        raise ConfigError(f"{scenario}: X must be in [0, 100) (a client needs some time)")
    if num_clients < 1:
        raise ConfigError(f"need at least one client, got {num_clients}")
    if num_clients == 1:
        return [1.0]
    return [float(1 - i * (x / 100) / (num_clients - 1)) for i in range(num_clients)]


def parse_speeds(text: str, num_clients: int) -> list[float]:
    """``federation.client-speeds``: ``F-X`` or one comma-separated time (> 0) per client."""
    text = str(text).strip()
    if text.startswith("F-"):
        return client_times(text, num_clients)
    try:
        times = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"federation.client-speeds must be F-X (e.g. F-80) or one comma-separated time per "
            f"client, got {text!r}"
        ) from None
    if len(times) != num_clients:
        raise ConfigError(
            f"federation.client-speeds lists {len(times)} times for {num_clients} clients"
        )
    if not all(math.isfinite(t) and t > 0 for t in times):
        raise ConfigError(f"federation.client-speeds: every time must be finite and > 0: {text!r}")
    return times


def plan(cfg: Config) -> list[Aggregation]:
    """The schedule of an async run (``federation.mode = "async"``), from its config alone: the
    server replays it, and each client computes from it how often it will train."""
    f = cfg.federation
    user_dp = cfg.privacy.enabled and cfg.privacy.level == "user"
    return list(
        plan_of(
            f.async_scheme, f.client_speeds, f.num_clients, f.horizon, f.async_window,
            f.async_buffer, f.async_weights, user_dp,
        )
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def plan_of(
    scheme: str,
    speeds: str,
    num_clients: int,
    horizon: float,
    window: float,
    buffer: int,
    weights: str,
    user_dp: bool,
) -> tuple[Aggregation, ...]:
    """:func:`plan` from the config values it depends on (cached: the server and every client
    of a run ask for the same schedule)."""
    taus = parse_speeds(speeds, num_clients)
    # an estimate before building it: every client returns about horizon / tau_i times
    returns = sum(horizon / t for t in taus)
    expected = {
        "fedasync": returns,
        "fedbuff": returns / max(1, buffer),
        "fedfix": horizon / window,
        "sync": horizon / max(taus),
    }[scheme]
    if expected > MAX_AGGREGATIONS:
        raise ConfigError(
            f"federation.horizon {horizon:g} gives about {expected:,.0f} aggregations (more "
            f"than {MAX_AGGREGATIONS:,}): shorten it"
        )
    # under user-level DP each aggregation's noise covers c updates of weight 1 / c each
    return tuple(
        schedule(
            scheme,
            taus,
            horizon,
            dt=window,
            buffer=buffer,
            policy="identical" if user_dp else weights,
        )
    )


def participations(aggregations: list[Aggregation], num_clients: int) -> list[int]:
    """How many aggregations each client's update enters (= its local rounds: a client is only
    sent work it returns within the horizon)."""
    counts = [0] * num_clients
    for a in aggregations:
        for i in a.participants:
            counts[i] += 1
    return counts


@dataclass(frozen=True)
class Aggregation:
    """Aggregation ``index`` (1-based) at simulated ``time``: each participant's update, taken
    against model version ``sent_versions[k]`` (0: the initial model; version v is the model
    after aggregation v), enters with weight ``weights[k]``."""

    index: int
    time: float
    participants: tuple[int, ...]
    weights: tuple[float, ...]
    sent_versions: tuple[int, ...]

    @property
    def staleness(self) -> tuple[int, ...]:
        """Aggregations each participant's model missed since it was sent."""
        return tuple(self.index - 1 - v for v in self.sent_versions)


def schedule(
    scheme: str,
    taus: list[float],
    horizon: float,
    *,
    dt: float | None = None,
    buffer: int | None = None,
    policy: str = "weight",
    importances: list[float] | None = None,
) -> list[Aggregation]:
    """Every aggregation of ``scheme`` up to simulated time ``horizon`` (see the module docstring).

    ``taus``: each client's time per local round (> 0); ``dt``: FedFix's window; ``buffer``:
    FedBuff's c; ``policy``: ``weight`` or ``identical`` (fedasync, fedbuff); ``importances``:
    p_i (default uniform 1 / M).
    """
    m = len(taus)
    if m == 0:
        raise ConfigError("need at least one client")
    tau = [_exact(t) for t in taus]
    if any(t <= 0 for t in tau):
        raise ConfigError(f"every client time must be > 0, got {taus}")
    end = _exact(horizon)
    if end <= 0:
        raise ConfigError(f"the horizon must be > 0, got {horizon}")
    p = [1.0 / m] * m if importances is None else [float(x) for x in importances]
    if len(p) != m or any(x < 0 for x in p):
        raise ConfigError("importances: one non-negative value per client")
    if policy not in ("weight", "identical"):
        raise ConfigError(f"policy must be 'weight' or 'identical', got {policy!r}")
    if scheme == "sync":
        events = _sync(tau, end)
        return _finish(events, lambda i: p[i])
    if scheme == "fedfix":
        if dt is None or _exact(dt) <= 0:
            raise ConfigError(f"fedfix needs a window dt > 0, got {dt}")
        window = _exact(dt)
        events = _fedfix(tau, end, window)
        return _finish(events, lambda i: math.ceil(tau[i] / window) * p[i])
    if scheme == "fedasync":
        events = _buffered(tau, end, 1)
        total = sum(1 / t for t in tau)
        if policy == "identical":
            return _finish(events, lambda i: 1.0)
        return _finish(events, lambda i: float(total * tau[i]) * p[i])
    if scheme == "fedbuff":
        if buffer is None or not 1 <= buffer <= m:
            raise ConfigError(f"fedbuff needs a buffer c in [1, {m}], got {buffer}")
        events = _buffered(tau, end, buffer)
        if policy == "identical":
            return _finish(events, lambda i: 1.0 / buffer)
        counts = [0] * m
        for _, members, _ in events:
            for i in members:
                counts[i] += 1
        n = len(events)
        # a client in no aggregation gets no weight (it never contributes)
        return _finish(events, lambda i: p[i] / (counts[i] / n) if counts[i] else 0.0)
    raise ConfigError(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")


_Event = tuple[Fraction, list[int], list[int]]  # (time, participants, sent versions)


def _sync(tau: list[Fraction], end: Fraction) -> list[_Event]:
    period = max(tau)
    events, n = [], 1
    while n * period <= end:
        events.append((n * period, list(range(len(tau))), [n - 1] * len(tau)))
        n += 1
    return events


def _fedfix(tau: list[Fraction], end: Fraction, window: Fraction) -> list[_Event]:
    ret = list(tau)
    sent = [0] * len(tau)
    events: list[_Event] = []
    n = 0
    while (n + 1) * window <= end:
        t = (n + 1) * window
        members = [i for i in range(len(tau)) if ret[i] <= t]
        events.append((t, members, [sent[i] for i in members]))
        for i in members:
            ret[i], sent[i] = t + tau[i], n + 1
        n += 1
    return events


def _buffered(tau: list[Fraction], end: Fraction, c: int) -> list[_Event]:
    """The c earliest returns (ties: smaller index) aggregate when the last of them is back."""
    ret = list(tau)
    sent = [0] * len(tau)
    events: list[_Event] = []
    while True:
        members = sorted(sorted(range(len(tau)), key=lambda i: (ret[i], i))[:c])
        t = max(ret[i] for i in members)
        if t > end:
            return events
        events.append((t, members, [sent[i] for i in members]))
        for i in members:
            ret[i], sent[i] = t + tau[i], len(events)


def _finish(events: list[_Event], weight) -> list[Aggregation]:
    return [
        Aggregation(
            index=n,
            time=float(t),
            participants=tuple(members),
            weights=tuple(float(weight(i)) for i in members),
            sent_versions=tuple(versions),
        )
        for n, (t, members, versions) in enumerate(events, start=1)
    ]
