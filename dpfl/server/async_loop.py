"""The asynchronous server loop (``federation.mode = "async"``), on any Flower ``Grid``, over
``push_messages`` / ``pull_messages``.

Every idle client is sent the current global model and its version; a reply is applied when
its aggregation comes, as an update against the model that client was sent (Fraboni et al.,
JMLR 2023; ../shared/algorithms/dp_and_fl.md section 4):

    theta <- theta + server_lr * sum_{i in S_n} d_i (theta_i - theta_sent(i))

with the participants S_n and weights d_i of the scheme (:mod:`dpfl.server.async_schedule`).
Then every participant is sent the new model and starts again.

Two clocks (``federation.clock``):

* ``virtual`` (simulation): client i returns ``tau_i`` units of simulated time after it was sent
  the model (``federation.client-speeds``); the whole schedule is computed from the config up
  front and replayed exactly, while the work runs as fast as the machine allows (no sleeps). A
  client is sent only work it returns within ``federation.horizon``, so its local rounds are
  exactly its participations in the schedule: a run is reproducible bit for bit and resumable.
* ``real`` (e.g. the Deployment Engine): replies in their arrival order, polled with
  ``pull_messages``; time is seconds since the start, the horizon too. FedFix weighs a reply by
  its measured round trip (``ceil(tau_i / dt)``, tau_i = arrival - send: our choice, the
  schedule's tau being unknown); fedasync and fedbuff need the ``identical`` weights there (the
  ``weight`` policy needs every client's time up front). Replies still in flight at the
  horizon are waited for (up to ``federation.reply-timeout``, else 30 s) only to record the
  privacy they spent; they are not aggregated.

Privacy (README, "Asynchronous federation"):

* sample-level DP: each client's ledger persists across its local rounds; its noise is
  calibrated for its participations in the schedule (every local round it will run, a worst
  case that is exact under the virtual clock: fast clients train more often and get more noise
  per step); on the real clock, a client that is sent more work than planned stops when its
  budget is spent and says so (``budget-exhausted``; it is not sent work again). The weights
  d_i depend only on the config: aggregation is post-processing.
* user-level DP (``dp-fedavg`` with ``fedbuff``: DP-FedBuff): clients send their update clipped
  to S; each aggregation re-clips the c updates, sums them, adds N(0, (z S)^2) once and steps
  ``theta += server_lr * (sum + noise) / c``. Each client is charged one Gaussian release
  (sample rate 1) per aggregation it is in, recorded under its name before the release: an
  arrival-driven selection gives no subsampling amplification, so none is claimed. z is
  calibrated for the largest participation count of the schedule; the report is the max over
  clients. An aggregation with a missing or malformed reply is skipped (fail closed): the noise
  was calibrated for a sum of c clipped updates, so fewer never enter it.

A malformed, missing or NaN reply is dropped with its reason (recorded in the aggregation's
event), its privacy report still recorded; the rest of the aggregation proceeds with their
weights unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from dpfl.accountants import Phase, PrivacyLedger, calibrate_noise
from dpfl.clients.federated import client_datasets
from dpfl.clients.monitor import StopTraining, TrainingMonitor
from dpfl.config import Config
from dpfl.errors import ConfigError, PrivacyBudgetError
from dpfl.privacy.noise import gaussian_like
from dpfl.server.aggregation import State, flat_clip
from dpfl.server.async_schedule import Aggregation, participations, plan
from dpfl.server.replies import ParsedReply, parse_reply, record_spent, train_message
from dpfl.server.strategies import create_strategy
from dpfl.store import RunHandle
from dpfl.tasks import get_task

__all__ = ["ASYNC_STRATEGIES", "check_async", "run_async"]

#: strategies whose aggregation the update rule above generalizes (a weighted mean of models)
ASYNC_STRATEGIES = ("fedavg", "fedprox", "lora-fedavg", "ffa-lora", "dp-fedavg")
#: how long replies in flight at the horizon are waited for on the real clock (seconds)
DRAIN_SECONDS = 30.0
POLL_SECONDS = 0.02


def check_async(cfg: Config) -> None:
    """What the async loop cannot run, refused up front with the way out."""
    f, p = cfg.federation, cfg.privacy
    if f.strategy not in ASYNC_STRATEGIES:
        raise ConfigError(
            f"federation.strategy={f.strategy!r} has no asynchronous form (async mode applies "
            f"updates as they arrive): use one of {', '.join(ASYNC_STRATEGIES)}, or "
            "federation.mode='sync'"
        )
    user_dp = p.enabled and p.level == "user"
    if user_dp and f.async_scheme != "fedbuff":
        raise ConfigError(
            f"user-level DP in async mode is DP-FedBuff: set federation.async-scheme='fedbuff' "
            f"(got {f.async_scheme!r}; a fixed buffer of c updates is what the noise covers)"
        )
    if user_dp and p.clipping != "flat":
        raise ConfigError(
            f"privacy.clipping={p.clipping!r}: DP-FedBuff clips every update to the fixed "
            "privacy.clip-norm; use privacy.clipping='flat'"
        )
    if (
        f.clock == "real"
        and f.async_scheme in ("fedasync", "fedbuff")
        and f.async_weights == "weight"
        and not user_dp
    ):
        raise ConfigError(
            f"federation.async-weights='weight' for {f.async_scheme} needs every client's time "
            "up front (the virtual clock); on the real clock use async-weights='identical'"
        )


@dataclass
class _Sent:
    message_id: str
    version: int
    at: float  # seconds since the start (real clock)


class _Server:
    """The state both clocks share: the global model and its versions still held by a client,
    what is in flight, the ledger, the store, the evaluation."""

    def __init__(self, grid: Grid, cfg: Config, run: RunHandle | None, resume, on_round) -> None:
        self.grid, self.cfg, self.run, self.on_round = grid, cfg, run, on_round
        p, f = cfg.privacy, cfg.federation
        torch.manual_seed(cfg.seed)
        self.task = get_task(cfg)
        self.data = self.task.load_data()
        client_datasets(cfg, 0)  # partitions the data now: a bad split is a config error
        self.model = self.task.build_model(self.data)
        self.user_dp = p.enabled and p.level == "user"
        self.ledger = PrivacyLedger(
            p.accountant,
            p.delta,
            target_epsilon=p.target_epsilon if self.user_dp else None,
            sink=None if run is None else run.record_privacy_event,
        )
        self.aggregations = plan(cfg) if f.clock == "virtual" else None
        self.noise_multiplier = self._server_noise()
        self.strategy = create_strategy(
            cfg, ledger=self.ledger, noise_multiplier=self.noise_multiplier or 0.0
        )
        self.generator = torch.Generator().manual_seed(cfg.seed + 17)
        self.flat_config = cfg.to_flat()
        self.state: State = self.task.trainable_state(self.model)
        self.versions: dict[int, State] = {0: self.state}
        self.version = 0
        self.participants: dict[int, str] = {}
        self.retired: set[int] = set()  # nodes whose budget is spent: sent nothing more
        self.in_flight: dict[int, _Sent] = {}
        self.history: list[dict[str, float]] = []
        self.drops: dict[str, int] = {}
        self.stopped, self.message = "completed", None
        self.last_eval_time: float | None = None
        if resume is not None:
            extra = resume.extra or {}
            if "versions" not in extra:
                raise ConfigError("this checkpoint is not an async run's: resume it in sync mode")
            self.state, self.version = resume.global_state, resume.round
            self.versions = dict(extra["versions"])
            self.retired = set(extra.get("retired", []))
            self.last_eval_time = extra.get("time")
            self.generator.set_state(extra["generator"])
            self.participants = dict(resume.participants)
            restored = PrivacyLedger.from_events(resume.events, p.accountant, p.delta)
            self.ledger.load_state_dict(
                restored.state_dict() | {"target_epsilon": self.ledger.target_epsilon}
            )
        self.loss, self.acc = self._evaluate()
        self.monitor = TrainingMonitor(
            self.loss, initial_accuracy=self.acc if self.task.metric == "accuracy" else None
        )
        self.completed = self.version

    def _server_noise(self) -> float | None:
        p = self.cfg.privacy
        if not self.user_dp:
            return None
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        if self.aggregations is None:
            raise ConfigError(
                "DP-FedBuff on the real clock needs privacy.noise-multiplier (with a target "
                "epsilon the noise is calibrated on the virtual clock's schedule); each client "
                "is still charged per aggregation and the run stops at the target"
            )
        most = max(participations(self.aggregations, self.cfg.federation.num_clients))
        if most == 0:
            return p.noise_multiplier or 1.0
        return calibrate_noise(p.target_epsilon, p.delta, 1.0, most, p.accountant).noise_multiplier

    # -- sending and receiving ---------------------------------------------------------------

    def send(self, nodes: list[int], version: int, now: float = 0.0) -> None:
        nodes = [n for n in nodes if n not in self.retired]
        if not nodes:
            return
        state = ArrayRecord(self.versions[version])  # one record for all of them
        messages = [
            train_message(
                state,
                self.flat_config,
                self.strategy.client_config(),
                n,
                version + 1,  # the aggregation this work is for at the earliest (>= 1)
                history=self._history(n),
                ttl=self.cfg.federation.reply_timeout,
            )
            for n in nodes
        ]
        ids = list(self.grid.push_messages(messages))
        for n, mid in zip(nodes, ids, strict=True):
            self.in_flight[n] = _Sent(mid, version, now)

    def _history(self, node: int):
        who = self.participants.get(node)
        if who is None or not self.cfg.privacy.enabled or self.user_dp:
            return None
        return self.ledger.history(who)

    def wait_for(self, nodes: list[int]) -> dict[int, Message]:
        """The replies of ``nodes`` (polled until all arrive or federation.reply-timeout)."""
        want = {self.in_flight[n].message_id: n for n in nodes if n in self.in_flight}
        got: dict[int, Message] = {}
        timeout = self.cfg.federation.reply_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while want:
            for m in self.grid.pull_messages(list(want)):
                got[want.pop(m.metadata.reply_to_message_id)] = m
            if not want or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(POLL_SECONDS)
        return got

    # -- one aggregation ---------------------------------------------------------------------

    def aggregate(
        self,
        index: int,
        at: float,
        members: list[tuple[int, Message | None, float, int]],
        *,
        last: bool,
    ) -> None:
        """Aggregation ``index`` at time ``at``: ``members`` are (node, reply, weight, version
        the node was sent). Records the privacy reported, drops what is unusable, applies the
        rest, evaluates (every ``eval-interval``), records the event and a checkpoint."""
        run = self.run
        if run is not None:
            run.start_round(index)
        reference = self.strategy.reply_reference(self.state, self.cfg)
        used: list[tuple[ParsedReply, float, int]] = []
        dropped = []
        for node, message, weight, version in members:
            if message is not None:
                self.in_flight.pop(node, None)
            parsed = parse_reply(node, message, reference)
            if parsed.participant is not None:
                self.participants[node] = parsed.participant
            record_spent(self.ledger, parsed, index)  # before anything of the reply is used
            if parsed.reason is not None:
                if parsed.reason.startswith("privacy budget spent"):
                    self.retired.add(node)
                dropped.append(
                    {"node": node, "participant": parsed.participant, "reason": parsed.reason}
                )
                self.drops[parsed.reason] = self.drops.get(parsed.reason, 0) + 1
            else:
                used.append((parsed, weight, version))
        info: dict[str, Any] = {
            "time": at,
            "participants": [self._who(n) for n, *_ in members],
            "weights": [w for _, _, w, _ in members],
            "staleness": [index - 1 - v for *_, v in members],
            "dropped": dropped,
        }
        if self.user_dp and (len(used) < len(members) or not used):
            info["reason"] = (
                f"fail closed: {len(used)} of {len(members)} buffered updates valid; "
                "nothing aggregated, nothing released"
            )
            self._advance(index, self.state, "skipped", info, at, last)
            return
        before = self.state
        try:
            new = self._apply(used, index) if used else self.state
        except PrivacyBudgetError as e:
            info["reason"] = f"privacy budget: {e}"
            self.stopped, self.message = "budget", str(e)
            self._advance(index, before, "skipped", info, at, last=True)
            return
        info["bytes-up"] = float(sum(_nbytes(p.reply.arrays) for p, _, _ in used))
        self._advance(index, new, "completed" if used else "skipped", info, at, last)

    def _who(self, node: int) -> str:
        return self.participants.get(node, f"node-{node}")

    def _apply(self, used: list[tuple[ParsedReply, float, int]], index: int) -> State:
        lr = self.cfg.federation.server_lr
        if self.user_dp:
            return self._dp_buffered(used, index, lr)
        replies = [p.reply.arrays for p, _, _ in used]
        weights = [w for _, w, _ in used]
        fresh = all(v == self.version for *_, v in used)
        out = dict(self.state)
        if lr == 1.0 and fresh and math.fsum(weights) == 1.0:
            # theta + sum d_i (theta_i - theta) with sum d_i = 1 is the average sum d_i theta_i;
            # computed as an average it is the synchronous loop's FedAvg to the last bit
            for k, v in replies[0].items():
                out[k] = (
                    sum(r[k] * w for r, w in zip(replies, weights, strict=True))
                    if v.is_floating_point()
                    else v
                )
            return out
        for k, v in replies[0].items():
            if not v.is_floating_point():
                out[k] = v  # integer buffers: the first participant's, as in FedAvg
                continue
            delta = sum(
                w * (r[k] - self.versions[ver][k])
                for r, (_, w, ver) in zip(replies, used, strict=True)
            )
            out[k] = self.state[k] + lr * delta
        return out

    def _dp_buffered(self, used, index: int, lr: float) -> State:
        """DP-FedBuff: each participant charged one Gaussian release, then clip, sum, noise."""
        z = self.noise_multiplier
        release = Phase(z, 1.0, 1)
        short = [
            p.participant for p, _, _ in used if not self.ledger.can_afford(p.participant, release)
        ]
        if short:  # before anything is recorded or released
            raise PrivacyBudgetError(
                f"{short[0]} would exceed privacy.target-epsilon in aggregation {index}"
            )
        for parsed, _, _ in used:
            self.ledger.record(parsed.participant, z, 1.0, 1, round=index)
        clip = self.cfg.privacy.clip_norm
        total: State | None = None
        for parsed, _, _ in used:
            update, _ = flat_clip(parsed.reply.arrays, clip)  # re-clip: sensitivity is S
            total = update if total is None else {k: total[k] + update[k] for k in total}
        c = self.cfg.federation.async_buffer
        secure = self.cfg.privacy.secure_mode
        out = dict(self.state)
        for k, v in total.items():
            noisy = v + gaussian_like(v, z * clip, self.generator, secure)
            out[k] = self.state[k] + lr * noisy / c
        return out

    def _advance(self, index, new_state, status, info, at, last) -> None:
        """Version ``index`` is ``new_state``; evaluate and checkpoint when due; record."""
        self.version = index
        self.state = new_state
        self.versions[index] = new_state
        interval = self.cfg.federation.eval_interval
        due = last or eval_due(at, self.last_eval_time, interval)
        used = len(info["participants"]) - len(info["dropped"])
        row: dict[str, float] = {
            "virtual-time" if self.aggregations is not None else "time": at,
            "clients": float(used if status == "completed" else 0),
            "dropped": float(len(info["dropped"])),
            "staleness-max": float(max(info["staleness"], default=0)),
        }
        if due:
            self.loss, self.acc = self._evaluate()
            self.last_eval_time = at
            try:
                self.monitor.check_loss(self.loss, f"aggregation {index}")
            except StopTraining as e:
                self.stopped, self.message = e.status, e.message
            eps = self.epsilons()
            row.update(
                {
                    self.task.metric: self.acc,
                    "loss": self.loss,
                    "epsilon-max": max(eps.values(), default=0.0)
                    if self.cfg.privacy.enabled
                    else math.inf,
                }
            )
            self.history.append({"round": float(index), **row})
        if self.run is not None:
            self.run.log_metrics(row, round=index, scope="server")
            if due:
                self.run.add_artifact(
                    "checkpoint", f"round-{index}.pt", self.checkpoint(at), round=index
                )
            self.run.end_round(index, status, info)
        self.completed = index
        if due and self.on_round is not None:
            self.on_round(index, row)

    def release_unused_versions(self, keep: set[int]) -> None:
        for v in [v for v in self.versions if v not in keep and v != self.version]:
            del self.versions[v]

    def checkpoint(self, at: float) -> bytes:
        import io

        held = {s.version for s in self.in_flight.values()} | {self.version}
        buf = io.BytesIO()
        torch.save(
            {
                "round": self.version,
                "global_state": self.state,
                "strategy": self.strategy.state_dict(),
                "participants": self.participants,
                "async": {
                    "versions": {v: self.versions[v] for v in held if v in self.versions},
                    "retired": sorted(self.retired),
                    "time": at,
                    "generator": self.generator.get_state(),
                },
            },
            buf,
        )
        return buf.getvalue()

    def _evaluate(self) -> tuple[float, float]:
        self.task.load_trainable_state(self.model, self.state)
        m = self.task.evaluate(self.model, self.data.test)
        return m["loss"], m[self.task.metric]

    def epsilons(self) -> dict[str, float]:
        return self.ledger.spent()

    def should_stop(self) -> bool:
        return self.stopped != "completed"


def eval_due(at: float, last_eval: float | None, interval: float) -> bool:
    """Whether an aggregation at time ``at`` is evaluated: every aggregation (interval 0), else
    the first one in each interval of time after the last evaluation's (None: none yet)."""
    if interval == 0 or last_eval is None:
        return True
    return math.floor(at / interval) > math.floor(last_eval / interval)


def _nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def run_async(
    grid: Grid,
    cfg: Config,
    run: RunHandle | None = None,
    *,
    resume=None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
):
    """Runs ``cfg``'s asynchronous federation on ``grid`` (module docstring)."""
    from dpfl.server.loop import FederationResult

    check_async(cfg)
    start = time.perf_counter()
    if resume is not None and cfg.federation.clock == "real":
        raise ConfigError(
            "a real-clock async run cannot be replayed from a checkpoint (its arrival order is "
            "not reproducible): start a new run"
        )
    server = _Server(grid, cfg, run, resume, on_round)
    nodes = sorted(grid.get_node_ids())
    if cfg.federation.clock == "virtual":
        _replay(server, nodes)
    else:
        _real_time(server, nodes)
    if server.stopped == "completed" and server.completed == 0:
        common = max(server.drops, key=server.drops.get) if server.drops else None
        server.stopped = "failed"
        server.message = (
            f"no aggregation applied a valid reply (most common reason: {common})"
            if common
            else "no client returned within federation.horizon: lengthen it"
        )
    elif server.stopped == "completed":
        verdict = server.monitor.final(
            server.loss,
            judged=len(server.history) >= 3,
            accuracy=server.acc if server.task.metric == "accuracy" else None,
        )
        if verdict is not None:
            server.stopped, server.message = verdict
    return FederationResult(
        rounds_completed=server.completed,
        accuracy=server.acc,
        loss=server.loss,
        epsilon=server.epsilons() if cfg.privacy.enabled else {},
        stopped=server.stopped,
        seconds=time.perf_counter() - start,
        history=server.history,
        noise_multiplier=server.noise_multiplier,
        message=server.message,
    )


def _replay(server: _Server, nodes: list[int]) -> None:
    """The virtual clock: replays the schedule; client i is ``nodes[i]`` (partition i)."""
    cfg = server.cfg
    aggs: list[Aggregation] = server.aggregations
    if len(nodes) != cfg.federation.num_clients:
        raise ConfigError(
            f"the grid has {len(nodes)} nodes for federation.num-clients="
            f"{cfg.federation.num_clients}: the virtual clock gives each client its speed"
        )
    upcoming: dict[int, list[Aggregation]] = {i: [] for i in range(len(nodes))}
    for a in aggs:
        for i in a.participants:
            upcoming[i].append(a)
    done = server.version
    # every client's next participation after what is done; it was sent version v <= done
    first: dict[int, int] = {}
    for i, seq in upcoming.items():
        nxt = next((a for a in seq if a.index > done), None)
        if nxt is not None:
            first[i] = nxt.sent_versions[nxt.participants.index(i)]
    for v in sorted(set(first.values())):
        server.send([nodes[i] for i, w in first.items() if w == v], v)
    for a in aggs:
        if a.index <= done:
            continue
        wanted = [nodes[i] for i in a.participants if nodes[i] not in server.retired]
        got = server.wait_for(wanted)
        members = [
            (nodes[i], got.get(nodes[i]), w, v)
            for i, w, v in zip(a.participants, a.weights, a.sent_versions, strict=True)
            if nodes[i] not in server.retired
        ]
        server.aggregate(a.index, a.time, members, last=a.index == aggs[-1].index)
        if server.should_stop():
            return
        again = []
        for i in a.participants:
            if any(b.index > a.index for b in upcoming[i]):
                again.append(nodes[i])
        server.send(again, a.index)
        server.release_unused_versions({s.version for s in server.in_flight.values()})


def _real_time(server: _Server, nodes: list[int]) -> None:
    """The real clock: replies in arrival order, polled; time in seconds since the start."""
    f = server.cfg.federation
    m = len(nodes)
    t0 = time.monotonic()

    def now() -> float:
        return time.monotonic() - t0

    server.send(nodes, 0, now())
    arrived: list[tuple[float, int, Message]] = []  # (arrival time, node, reply)
    index = 0
    while True:
        t = now()
        if t > f.horizon or server.should_stop():
            break
        pending = {s.message_id: n for n, s in server.in_flight.items()}
        pending = {mid: n for mid, n in pending.items() if n not in {a[1] for a in arrived}}
        for msg in server.grid.pull_messages(list(pending)) if pending else []:
            arrived.append((t, pending[msg.metadata.reply_to_message_id], msg))
        arrived.sort(key=lambda a: (a[0], a[1]))
        batch, at = _due(f, arrived, index, t, m)
        if batch is None:
            time.sleep(POLL_SECONDS)
            continue
        index += 1
        members = []
        for arrival, node, msg in batch:
            sent = server.in_flight[node]
            if f.async_scheme == "fedfix":
                weight = math.ceil(max(arrival - sent.at, 1e-9) / f.async_window) / m
            elif f.async_scheme == "fedbuff":
                weight = 1.0 / f.async_buffer
            elif f.async_scheme == "fedasync":
                weight = 1.0
            else:
                weight = 1.0 / m
            members.append((node, msg, weight, sent.version))
        arrived = arrived[len(batch) :]
        server.aggregate(index, at, members, last=False)
        server.send([node for node, *_ in members], index, now())
        server.release_unused_versions({s.version for s in server.in_flight.values()})
    _drain(server)


def _due(f, arrived, index: int, t: float, m: int):
    """(the replies to aggregate now, the event's time), or (None, None) when none is due."""
    scheme = f.async_scheme
    if scheme == "fedasync" and arrived:
        return arrived[:1], arrived[0][0]
    if scheme == "fedbuff" and len(arrived) >= f.async_buffer:
        batch = arrived[: f.async_buffer]
        return batch, batch[-1][0]
    if scheme == "fedfix" and t >= (index + 1) * f.async_window:
        end = (index + 1) * f.async_window
        return [a for a in arrived if a[0] <= end], end
    if scheme == "sync" and len(arrived) == m:
        return arrived, arrived[-1][0]
    return None, None


def _drain(server: _Server) -> None:
    """Replies still in flight at the horizon: their privacy is recorded, nothing aggregated."""
    if not server.in_flight:
        return
    timeout = server.cfg.federation.reply_timeout or DRAIN_SECONDS
    want = {s.message_id: n for n, s in server.in_flight.items()}
    deadline = time.monotonic() + timeout
    while want and time.monotonic() < deadline:
        for msg in server.grid.pull_messages(list(want)):
            node = want.pop(msg.metadata.reply_to_message_id)
            parsed = parse_reply(node, msg, {})
            if parsed.participant is not None:
                server.participants[node] = parsed.participant
            record_spent(server.ledger, parsed, server.version)
        time.sleep(POLL_SECONDS)
    server.in_flight.clear()
