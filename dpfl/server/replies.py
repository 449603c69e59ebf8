"""What the server sends a client and how it reads the reply: one place for both server loops
(the synchronous rounds of :mod:`dpfl.server.loop` and :mod:`dpfl.server.async_loop`).

Reading a reply is pure (:func:`parse_reply`: who sent it, the privacy it reports, the usable
update or why it is not usable); recording the reported privacy is a separate, explicit step
(:func:`record_spent`), which a loop takes for every parsed report *before* it uses anything of
the reply, even when the update is then dropped: a client that trained has spent its budget
whether or not its update enters an aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from dpfl.accountants import Phase, PrivacyLedger
from dpfl.federation_messages import HISTORY, ROUND, decode_phases, encode_phases
from dpfl.server.aggregation import State, check_state
from dpfl.server.strategies import Reply

__all__ = ["ParsedReply", "parse_reply", "record_spent", "train_message"]


def train_message(
    global_state: State | ArrayRecord,
    flat_config: dict[str, Any],
    extra: dict[str, Any],
    node: int,
    server_round: int,
    *,
    history: list[Phase] | None = None,
    ttl: float | None = None,
) -> Message:
    """The TRAIN message to ``node``: the model (a state, or its ArrayRecord), the run
    config, the round (the client's seed depends on it), the strategy's per-round values
    (``extra``) and, for a client the server has heard from under sample-level DP, its recorded
    privacy history (so a restarted client process keeps one accountant for the whole run)."""
    config = flat_config | {ROUND: server_round, **extra}
    if history is not None:
        config[HISTORY] = encode_phases(history)
    # one ArrayRecord may serve every message of a round (records are read, never mutated)
    arrays = global_state if isinstance(global_state, ArrayRecord) else ArrayRecord(global_state)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(
        content,
        dst_node_id=node,
        message_type=MessageType.TRAIN,
        group_id=str(server_round),
        ttl=ttl,
    )


@dataclass
class ParsedReply:
    """One reply as read: ``participant`` (None when the reply says nothing of who sent it),
    the privacy ``phases`` it reports (to record whatever happens next), and either the usable
    ``reply`` or the ``reason`` it is dropped."""

    node: int
    participant: str | None
    phases: list[Phase] = field(default_factory=list)
    reply: Reply | None = None
    reason: str | None = None


def parse_reply(node: int, message: Message | None, reference: State) -> ParsedReply:
    """Reads ``message`` from ``node`` against ``reference`` (the names, shapes and dtypes a
    valid update holds). Drop reasons: no reply, client error, no dpfl record, malformed privacy
    report, budget spent, no or malformed arrays, wrong keys / shape / dtype, NaN or Inf."""
    if message is None:
        return ParsedReply(node, None, reason="no reply (timeout or lost)")
    if message.has_error():
        return ParsedReply(node, None, reason=f"client error: {message.error.reason}")
    content = message.content
    meta = content.config_records.get("dpfl")
    if meta is None:
        return ParsedReply(node, None, reason="malformed reply: no dpfl record")
    who = str(meta.get("participant", f"node-{node}"))
    try:
        phases = decode_phases(str(meta.get("phases", "[]")))
    except (ValueError, TypeError) as e:
        return ParsedReply(node, who, reason=f"malformed privacy report: {e}")
    out = ParsedReply(node, who, phases)
    if meta.get("status") == "budget-exhausted":
        out.reason = "privacy budget spent: client stopped training"
        return out
    if "arrays" not in content.array_records:
        out.reason = "malformed reply: no arrays"
        return out
    try:
        state = content.array_records["arrays"].to_torch_state_dict()
    except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed reply
        out.reason = f"malformed arrays: {e}"
        return out
    out.reason = check_state(reference, state)
    if out.reason is not None:
        return out
    metrics = {
        k: float(v)
        for k, v in content.metric_records.get("metrics", {}).items()
        if isinstance(v, int | float)
    }
    n = int(metrics.get("num-examples", 1))
    out.reply = Reply(node, who, state, n, metrics)
    return out


def record_spent(ledger: PrivacyLedger, parsed: ParsedReply, server_round: int) -> None:
    """Records the privacy ``parsed`` reports (durably, through the ledger's sink)."""
    if parsed.participant is None:
        return
    for ph in parsed.phases:
        ledger.record(
            parsed.participant, ph.noise_multiplier, ph.sample_rate, ph.steps, round=server_round
        )
