"""dpfl's Flower ClientApp: decode the message, run one local round, encode the reply.

All the work is :func:`dpfl.clients.federated.run_client_round` (Flower-free). The client's
persistent state (privacy history, fixed noise multiplier) lives in ``context.state``, so one
accountant covers the whole run. The partition comes from the node config (``partition-id``),
as Flower's simulation and ``flower-supernode --node-config`` set it; ``delay-seconds`` in the
node config makes the node reply that much later (an emulated slow device, for asynchronous
federations).
"""

from __future__ import annotations

import json
import secrets
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl.clients.federated import participant_name, run_client_round
from dpfl.config import Config
from dpfl.errors import ConfigError
from dpfl.federation_messages import (
    CLIP,
    HISTORY,
    ROUND,
    decode_phases,
    encode_phases,
    split_config,
)

__all__ = ["DELAY_KEY", "TRUSTED_SIMULATION", "app", "simulation_app"]

app = ClientApp()


def _trusted(msg: Message, context: Context, call_next) -> Message:
    context.node_config[TRUSTED_SIMULATION] = True
    return call_next(msg, context)


def simulation_app() -> ClientApp:
    """dpfl's ClientApp for engines that simulate the whole federation in one trust domain
    (Flower's Ray engine in ``dpfl simulate --backend ray``): reproducible client randomness."""
    sim = ClientApp(mods=[_trusted])
    sim.train()(train)
    return sim


_STATE_KEY = "dpfl"
#: node-config flag set by dpfl's simulation engines, where server and clients share one trust
#: domain: the clients' randomness then follows the run seed (reproducible runs)
TRUSTED_SIMULATION = "dpfl-trusted-simulation"
#: node-config key: seconds this node waits after its local round before it replies, to emulate
#: a slower device (``flower-supernode --node-config "partition-id=0 delay-seconds=5"``)
DELAY_KEY = "delay-seconds"
_OPTIM_KEY = "dpfl-optimizer"  # the local solver's state, with optimizer.local-state = "persist"


@app.train()
def train(msg: Message, context: Context) -> Message:
    flat, extra = split_config(dict(msg.content["config"]))
    cfg = Config.from_flat(flat)
    if "partition-id" not in context.node_config:
        raise ConfigError("this SuperNode has no partition-id in its node config")
    pid = int(context.node_config["partition-id"])
    record = context.state.config_records.get(_STATE_KEY)
    state = json.loads(str(record["json"])) if record is not None else {}
    if not context.node_config.get(TRUSTED_SIMULATION) and "noise-secret" not in state:
        # the server knows the run seed: noise seeded from it could be regenerated and
        # subtracted; outside dpfl's own simulations the client keeps a secret of its own
        state["noise-secret"] = secrets.randbits(62)
    history = decode_phases(str(extra[HISTORY])) if HISTORY in extra else None
    saved = context.state.config_records.get(_OPTIM_KEY)
    result = run_client_round(
        cfg,
        pid,
        msg.content["arrays"].to_torch_state_dict(),
        int(extra.get(ROUND, 0)),
        state,
        clip=float(extra[CLIP]) if CLIP in extra else None,
        server_history=history,
        optimizer_state=None if saved is None else bytes(saved["blob"]),
    )
    delay = float(context.node_config.get(DELAY_KEY, 0.0))
    if delay > 0:  # an emulated slow node (async federations on the Deployment Engine)
        time.sleep(delay)
    context.state.config_records[_STATE_KEY] = ConfigRecord({"json": json.dumps(state)})
    if result.optimizer_state is not None:
        context.state.config_records[_OPTIM_KEY] = ConfigRecord({"blob": result.optimizer_state})
    content = RecordDict(
        {
            # exactly what may leave this client (dpfl.clients.federated, README)
            "metrics": MetricRecord(result.metrics),
            "dpfl": ConfigRecord(
                {
                    "status": result.status,
                    "participant": participant_name(pid),
                    "phases": encode_phases(result.phases),
                }
            ),
        }
    )
    if result.arrays is not None:
        content["arrays"] = ArrayRecord(result.arrays)
    return Message(content, reply_to=msg)
