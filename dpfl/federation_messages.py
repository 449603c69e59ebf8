"""The wire format between dpfl's ServerApp and ClientApp (Flower records), in one place.

Server -> client (train): ``arrays`` (ArrayRecord, the global model) and ``config``
(ConfigRecord: the flat run config plus ``dpfl.round``, ``dpfl.clip`` for dp-fedavg and
``dpfl.history``, the client's recorded privacy history as JSON, for restored clients).
Client -> server: ``arrays`` (the new model, or the clipped update; absent when the client did
not train), ``metrics`` (MetricRecord, with ``num-examples``) and ``dpfl`` (ConfigRecord:
``status``, ``participant``, ``phases``: the privacy spent this round as JSON).
"""

from __future__ import annotations

import json
from typing import Any

from dpfl.accountants import Phase

__all__ = ["CONFIG_KEYS", "decode_phases", "encode_phases", "split_config"]

ROUND, CLIP, HISTORY = "dpfl.round", "dpfl.clip", "dpfl.history"
CONFIG_KEYS = (ROUND, CLIP, HISTORY)


def encode_phases(phases: list[Phase]) -> str:
    return json.dumps([list(p.as_tuple()) for p in phases])


def decode_phases(text: str) -> list[Phase]:
    return [Phase(float(s), float(q), int(t)) for s, q, t in json.loads(text)]


def split_config(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run config keys, dpfl per-round keys) of a received ConfigRecord."""
    extra = {k: flat[k] for k in CONFIG_KEYS if k in flat}
    return {k: v for k, v in flat.items() if k not in CONFIG_KEYS}, extra
