"""The wire format between dpfl's ServerApp and ClientApp (Flower records), in one place.

Server -> client (train): ``arrays`` (ArrayRecord, the global model) and ``config``
(ConfigRecord: the flat run config plus ``dpfl.round``, ``dpfl.clip`` for dp-fedavg and
``dpfl.history``, the client's recorded privacy history as JSON, for restored clients).
Client -> server: ``arrays`` (the new model, or the clipped update; absent when the client did
not train), ``metrics`` (MetricRecord) and ``dpfl`` (ConfigRecord: ``status``, ``participant``,
``phases``: the privacy spent this round as JSON).

What ``metrics`` holds depends on the privacy mode (what leaves a client, README):

* always: ``partition-id`` (the node's identity, as ``participant``);
* sample-level DP, the privacy report: ``epsilon``, ``noise-multiplier``, ``budget-exhausted``
  (functions of the config and the client's privacy history);
* user-level DP (dp-fedavg), for the trusted server only: ``unclipped`` (1 when the update was
  not clipped: the bit adaptive clipping counts; the server releases only a noisy count);
* :data:`DIAGNOSTIC_METRICS`, computed on the client's records and NOT covered by any guarantee:
  only with ``federation.client-diagnostics = true``, or without DP (then always, and FedAvg
  weights by ``num-examples``).
"""

from __future__ import annotations

import json
from typing import Any

from dpfl.accountants import Phase

__all__ = [
    "CONFIG_KEYS",
    "DIAGNOSTIC_METRICS",
    "PRIVACY_REPORT_METRICS",
    "PROTOCOL_METRICS",
    "decode_phases",
    "encode_phases",
    "split_config",
]

ROUND, CLIP, HISTORY = "dpfl.round", "dpfl.clip", "dpfl.history"
CONFIG_KEYS = (ROUND, CLIP, HISTORY)

#: reply metrics that are functions of the public config and the privacy history
PRIVACY_REPORT_METRICS = ("partition-id", "epsilon", "noise-multiplier", "budget-exhausted")
#: reply metrics the (trusted) server needs to run the protocol; never stored
PROTOCOL_METRICS = ("unclipped",)
#: reply metrics computed on the client's records, un-noised: opt-in under DP, never covered
DIAGNOSTIC_METRICS = (
    "train-loss",
    "local-test-accuracy",
    "num-examples",
    "local-steps",
    "update-norm",
)


def encode_phases(phases: list[Phase]) -> str:
    return json.dumps([list(p.as_tuple()) for p in phases])


def decode_phases(text: str) -> list[Phase]:
    return [Phase(float(s), float(q), int(t)) for s, q, t in json.loads(text)]


def split_config(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run config keys, dpfl per-round keys) of a received ConfigRecord."""
    extra = {k: flat[k] for k in CONFIG_KEYS if k in flat}
    return {k: v for k, v in flat.items() if k not in CONFIG_KEYS}, extra
