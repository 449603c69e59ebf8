"""An in-process Flower ``Grid``: every virtual SuperNode is a ``Context`` in a dict, and a
message is delivered by calling the real ClientApp object in this process.

Why: Flower's Ray simulation costs 17-31 s of start-up and ~1.3 GB per run on these machines
(notes/flower.md), 4-6x a plain loop. Here a round costs the clients' work plus the records'
(de)serialization, and a node costs only its context (its state), so 1,000 clients do not
need 1,000 resident models. The same ServerApp loop and ClientApp run on Ray or the Deployment
Engine unchanged.

Delivery is sequential and synchronous; a ClientApp exception becomes an error reply, as the
Flower runtimes report it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from dpfl.clients.client_app import TRUSTED_SIMULATION

__all__ = ["InProcessGrid"]

SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    """Nodes ``1..num_nodes`` with ``partition-id = node_id - 1``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # Messages take their run and sender from the process's task identity, which Flower's
        # runtimes set for the ServerApp process; this process plays the ServerApp.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID
        self._contexts = {
            n: Context(
                run_id=run_id,
                node_id=n,
                node_config={
                    "partition-id": n - 1,
                    "num-partitions": num_nodes,
                    TRUSTED_SIMULATION: True,  # one process, one trust domain: reproducible
                },
                state=RecordDict(),
                run_config={},
            )
            for n in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def context(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            meta = msg.metadata.__dict__
            meta["_message_id"] = uuid.uuid4().hex
            meta["_run_id"] = self._run.run_id
            meta["_src_node_id"] = SERVER_NODE_ID
            meta["_delivered_at"] = str(time.time())
            ids.append(msg.metadata.message_id)
            self._replies[msg.metadata.message_id] = self._deliver(msg)
        return ids

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts.get(msg.metadata.dst_node_id)
        if context is None:
            return Message(
                Error(code=404, reason=f"no node {msg.metadata.dst_node_id}"), reply_to=msg
            )
        try:
            reply = self.client_app(msg, context)
        except Exception as e:  # noqa: BLE001 - a failing client is a reply, not a crash
            return Message(Error(code=500, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))
