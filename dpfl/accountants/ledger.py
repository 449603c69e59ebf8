"""The privacy ledger: every noisy release, per participant, persisted before it is used.

A participant is whoever a DP guarantee is about: ``"central"`` for centralized training,
``"client-7"`` for sample-level DP on client 7 (its records are protected by its own accountant
across all rounds), ``"server"`` for user-level DP-FedAvg. Each participant has one history of
phases that only grows; it is never recreated per round.

:meth:`PrivacyLedger.record` is the one place a release is admitted:

1. the epsilon after the release is computed on a copy of the history (dry run, fresh accountant);
2. if a budget is set and that epsilon would exceed it, :class:`PrivacyBudgetError` is raised and
   nothing is recorded: the caller must not release;
3. the event is handed to the sink (the run store writes it in a committed transaction);
4. only then is the in-memory history extended, and the event returned.

So a crash between 3 and the release overstates, never understates, the privacy spent, and a
resumed run rebuilt with :meth:`PrivacyLedger.from_events` continues from the recorded spend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dpfl.accountants.epsilon import ACCOUNTANTS, BOUNDING_ACCOUNTANTS, compute_epsilon
from dpfl.accountants.phases import Phase, merge_phases
from dpfl.errors import ConfigError, PrivacyBudgetError
from dpfl.validation import check_delta, check_epsilon

__all__ = ["MECHANISMS", "PrivacyEvent", "PrivacyLedger"]

#: Mechanisms the accountants compose. Each event is ``steps`` releases of it.
MECHANISMS = ("subsampled-gaussian",)


@dataclass(frozen=True)
class PrivacyEvent:
    """One ledger entry: ``steps`` releases by ``participant`` and the epsilon spent after them."""

    seq: int
    participant: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon_after: float | None
    round: int | None = None
    note: str | None = None

    def phase(self) -> Phase:
        return Phase(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Sink = Callable[[PrivacyEvent], None]
Window = tuple[tuple[float, float], int]


class PrivacyLedger:
    """Per-participant privacy histories with optional budget enforcement.

    Args:
        accountant: ``rdp``, ``prv`` or ``pld`` to enforce a budget; ``gdp`` only for reporting.
        delta: the delta every epsilon is reported at.
        target_epsilon: optional budget per participant; releases that would exceed it are refused.
        sink: called with each event before it takes effect
            (e.g. ``RunHandle.record_privacy_event``).
    """

    def __init__(
        self,
        accountant: str = "rdp",
        delta: float = 1e-5,
        *,
        target_epsilon: float | None = None,
        sink: Sink | None = None,
    ) -> None:
        ACCOUNTANTS.get(accountant)
        check_delta("delta", delta)
        if target_epsilon is not None:
            check_epsilon("target epsilon", target_epsilon)
            if accountant not in BOUNDING_ACCOUNTANTS:
                raise ConfigError(
                    f"a privacy budget needs an accountant that bounds epsilon "
                    f"({', '.join(BOUNDING_ACCOUNTANTS)}); {accountant} can underestimate it"
                )
        self.accountant = accountant
        self.delta = delta
        self.target_epsilon = target_epsilon
        self._sink = sink
        self._histories: dict[str, list[Phase]] = {}
        self._epsilons: dict[str, float] = {}
        self._events: list[PrivacyEvent] = []
        self._windows: dict[str, Window] = {}

    def enforce_budget(self, target_epsilon: float) -> None:
        """Enforces ``target_epsilon`` from now on, keeping the stricter budget if one is set
        (a caller's budget is never dropped because the ledger it continues had none)."""
        check_epsilon("target epsilon", target_epsilon)
        if self.accountant not in BOUNDING_ACCOUNTANTS:
            raise ConfigError(
                f"a privacy budget needs an accountant that bounds epsilon "
                f"({', '.join(BOUNDING_ACCOUNTANTS)}); {self.accountant} can underestimate it"
            )
        if self.target_epsilon is None or target_epsilon < self.target_epsilon:
            self.target_epsilon = float(target_epsilon)
            self._windows.clear()  # verified for the old budget only

    # -- recording --------------------------------------------------------------------------------
    def epsilon_if(self, participant: str, phase: Phase) -> float:
        """Epsilon of ``participant`` if ``phase`` were released next (dry run)."""
        return compute_epsilon([*self.history(participant), phase], self.delta, self.accountant)

    def can_afford(self, participant: str, phase: Phase) -> bool:
        """Whether releasing ``phase`` keeps ``participant`` within the budget (True if none)."""
        return (
            self.target_epsilon is None
            or self.epsilon_if(participant, phase) <= self.target_epsilon
        )

    def record(
        self,
        participant: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int = 1,
        *,
        mechanism: str = "subsampled-gaussian",
        round: int | None = None,
        note: str | None = None,
    ) -> PrivacyEvent:
        """Admits ``steps`` releases by ``participant`` (see the module docstring for the order).

        ``epsilon_after`` of the returned event is always computed with ``rdp`` (cheap); with
        ``prv``, ``pld`` or ``gdp`` it is computed when the budget check needed it and is None
        otherwise (:meth:`epsilon` computes it on demand).

        Raises:
            PrivacyBudgetError: the releases would exceed ``target_epsilon``; nothing recorded.
        """
        if not isinstance(participant, str) or not participant:
            raise ConfigError(f"participant must be a non-empty string, got {participant!r}")
        if mechanism not in MECHANISMS:
            raise ConfigError(f"unknown mechanism {mechanism!r}; valid: {', '.join(MECHANISMS)}")
        phase = Phase(noise_multiplier, sample_rate, steps)
        eps_after, window = None, None
        if self.target_epsilon is not None:
            eps_after, window = self._check_budget(participant, phase)
        if eps_after is None and self.accountant == "rdp":
            eps_after = self.epsilon_if(participant, phase)
        event = PrivacyEvent(
            seq=len(self._events),
            participant=participant,
            mechanism=mechanism,
            noise_multiplier=phase.noise_multiplier,
            sample_rate=phase.sample_rate,
            steps=phase.steps,
            accountant=self.accountant,
            delta=self.delta,
            epsilon_after=eps_after,
            round=round,
            note=note,
        )
        if self._sink is not None:
            self._sink(event)
        self._commit(event, window)
        return event

    def _check_budget(self, participant: str, phase: Phase) -> tuple[float | None, Window | None]:
        """Raises if ``phase`` would exceed the budget. Returns the epsilon after it (None when a
        verified window already covers it) and the window left after it.

        A window ``((sigma, q), n)`` records that ``n`` more steps at ``(sigma, q)`` were verified
        to fit in the budget (epsilon is monotone in steps), so a training loop that accounts
        every step computes epsilon O(log T) times in all, not T times (PRV and PLD take 0.01-1 s
        a call).
        """
        key = (phase.noise_multiplier, phase.sample_rate)
        window = self._windows.get(participant)
        if window is not None and window[0] == key and phase.steps <= window[1]:
            return None, (key, window[1] - phase.steps)
        eps = self.epsilon_if(participant, phase)
        if eps > self.target_epsilon:  # type: ignore[operator]
            raise PrivacyBudgetError(
                f"{participant}: {phase.steps} more step(s) at noise multiplier "
                f"{phase.noise_multiplier:g}, q={phase.sample_rate:g} would spend epsilon "
                f"{eps:.4g} > budget {self.target_epsilon:g} (spent so far "
                f"{self.epsilon(participant):.4g})"
            )
        after = [*self.history(participant), phase]

        def fits(n: int) -> bool:
            extra = Phase(phase.noise_multiplier, phase.sample_rate, n)
            return (
                compute_epsilon([*after, extra], self.delta, self.accountant) <= self.target_epsilon
            )

        ahead = max(phase.steps, sum(p.steps for p in after))
        if not fits(ahead):  # largest n < ahead that fits, by bisection
            lo, hi = 0, ahead
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            ahead = lo
        return eps, (key, ahead)

    def _commit(self, event: PrivacyEvent, window: Window | None = None) -> None:
        history = self._histories.setdefault(event.participant, [])
        history[:] = merge_phases([*history, event.phase()])
        if event.epsilon_after is not None:
            self._epsilons[event.participant] = event.epsilon_after
        else:
            self._epsilons.pop(event.participant, None)  # computed on demand
        if window is not None:
            self._windows[event.participant] = window
        self._events.append(event)

    # -- reading ----------------------------------------------------------------------------------
    def history(self, participant: str) -> list[Phase]:
        return list(self._histories.get(participant, ()))

    def epsilon(self, participant: str) -> float:
        """Epsilon spent by ``participant`` so far (0 if it never released)."""
        if participant not in self._epsilons:
            self._epsilons[participant] = compute_epsilon(
                self.history(participant), self.delta, self.accountant
            )
        return self._epsilons[participant]

    def spent(self) -> dict[str, float]:
        """Epsilon per participant."""
        return {p: self.epsilon(p) for p in self.participants}

    def max_epsilon(self) -> float:
        return max(self.spent().values(), default=0.0)

    @property
    def events(self) -> list[PrivacyEvent]:
        return list(self._events)

    @property
    def participants(self) -> list[str]:
        return sorted(self._histories)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and Flower-ConfigRecord-friendly after ``json.dumps``) from which
        :meth:`from_state_dict` rebuilds an identical ledger."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "events": [e.to_dict() for e in self._events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces this ledger's contents (not its sink) with a saved state."""
        restored = self.from_state_dict(state)
        self.accountant, self.delta = restored.accountant, restored.delta
        self.target_epsilon = restored.target_epsilon
        self._histories, self._events = restored._histories, restored._events
        self._epsilons, self._windows = {}, {}

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], *, sink: Sink | None = None
    ) -> PrivacyLedger:
        try:
            return cls.from_events(
                state["events"],
                state["accountant"],
                state["delta"],
                target_epsilon=state.get("target_epsilon"),
                sink=sink,
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed privacy ledger state: {e!r}") from None

    # -- restoring --------------------------------------------------------------------------------
    @classmethod
    def from_events(
        cls,
        events: Iterable[PrivacyEvent | Mapping[str, Any]],
        accountant: str = "rdp",
        delta: float = 1e-5,
        *,
        target_epsilon: float | None = None,
        sink: Sink | None = None,
    ) -> PrivacyLedger:
        """Rebuilds a ledger from recorded events (e.g. a resumed run's store rows).

        Epsilons are recomputed from the histories with this ledger's accountant and delta, so a
        ledger restored with another accountant reports consistently.
        """
        ledger = cls(accountant, delta, target_epsilon=target_epsilon, sink=sink)
        for raw in sorted(
            (e if isinstance(e, PrivacyEvent) else _event_from_mapping(e) for e in events),
            key=lambda e: e.seq,
        ):
            ledger._histories.setdefault(raw.participant, [])
            ledger._histories[raw.participant] = merge_phases(
                [*ledger._histories[raw.participant], raw.phase()]
            )
            ledger._events.append(raw)
        return ledger


def _event_from_mapping(row: Mapping[str, Any]) -> PrivacyEvent:
    fields = PrivacyEvent.__dataclass_fields__
    kwargs = {k: row[k] for k in fields if k in row}
    kwargs.setdefault("epsilon_after", None)
    return PrivacyEvent(**kwargs)
