"""The sync stage: profile and audience changes delivered to destinations (webhooks, ...), in order per profile,
retried, never lost, one destination never holding up another.

It reads cdp.profile.changes and cdp.audience.membership (co-partitioned by profile id, read_committed) on a
PartitionedStage. Each change becomes, for each destination that wants it, one or two calls (agents/sync/payloads.py)
queued in the partition's state (agents/sync/queue.py, changelog cdp.sync.state) in the batch's transaction: from
then on it survives a SIGKILL, a restart and a rebalance. A destination past its share of `backlog`, or turned off
by a 410, gets the change dead-lettered instead (cdp.sync.dead-letter, with the reason).

Sending happens beside the input cycle, never in it: each destination has a Courier (topology/runtime/courier.py)
that takes the profiles whose first queued delivery is due (agents/sync/schedule.py) and sends them through its kind
(topology/destinations/). Their answers are written back every FLUSH_S in one transaction for all partitions
(`run_across`): the delivery leaves the queue (delivered; or given up: the dead letter goes in the same transaction)
or waits for its retry, and every attempt's outcome goes to cdp.sync.outcomes. A crash between a destination's
answer and that transaction sends the delivery again with the same id, which is the receiver's idempotency key.

Order: a profile's deliveries to a destination go one at a time in the order of its changes' `seq`. A change read
before an earlier one of its profile (the other topic's records of a compute transaction may come a poll later) is
held until the gap fills (agents/sync/queue.py, `read_change`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agents.errors import InvalidRecord, UndecodableError
from agents.sync.destinations import Destination
from agents.sync.payloads import Delivery, membership_deliveries, trait_deliveries
from agents.sync.queue import (
    QUEUED, Settled, enqueue, expire, queue_prefix, queued, read_change, release_held, requeue, settle, split_key,
)  # fmt: skip
from agents.sync.retry import Attempt, verdict
from agents.sync.schedule import Schedule
from topology.codecs import AvroCodec
from topology.destinations import KINDS, Kind, SenderContext
from topology.runtime.courier import Courier
from topology.runtime.dead_letters import DeadLetters, dead_letter
from topology.runtime.input_feed import InputFeed, InputRecord
from topology.runtime.partitioned_stage import PartitionedStage
from topology.runtime.producer import AsyncProducer, Record
from topology.runtime.stage import Timer
from topology.runtime.stage_io import Output, StageIO
from topology.runtime.state_store import StateStore, Transaction
from topology.spec import StageSpec, Wiring
from topology.topics import (
    AUDIENCE_MEMBERSHIP, DEFINITIONS, EVENTS_DEAD_LETTER, PROFILE_CHANGES, SYNC_DEAD_LETTER, SYNC_OUTCOMES, SYNC_REDELIVERIES,
    SYNC_STATE,
)  # fmt: skip
from topology.web.metrics import Histogram, Metric

log = logging.getLogger(__name__)
FLUSH_S = 0.1  # how often attempts' answers are written (a crash sends at most this much again)
RECONCILE_S = 1.0  # how often couriers follow the destinations' definitions


@dataclass(frozen=True)
class SyncTopics:
    changes: str
    membership: str
    redeliveries: str
    state: str
    outcomes: str
    dead_letter: str  # deliveries given up
    events_dead_letter: str  # input records that do not decode


@dataclass(frozen=True)
class SyncCodecs:
    changes: AvroCodec
    membership: AvroCodec
    state: AvroCodec
    outcome: AvroCodec
    dead_letter: AvroCodec
    events_dead_letter: AvroCodec


@dataclass
class DestinationCounts:
    """What the stage did for one destination since start (this worker); /metrics and GET /v1/destinations."""

    queued: int = 0
    attempts: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    last_error: str | None = None
    last_error_at: int | None = None
    latency: Histogram = field(default_factory=Histogram)  # seconds from a change read to its delivery


@dataclass
class SyncCounters:
    changes: int = 0
    deliveries_queued: int = 0
    redelivered: Counter[str] = field(default_factory=Counter)  # queued, superseded, queued already, full
    dead_lettered: int = 0
    caught_up: int = 0
    per_destination: dict[str, DestinationCounts] = field(default_factory=lambda: defaultdict(DestinationCounts))


class SyncStage(PartitionedStage):
    def __init__(self, *, topics: SyncTopics, codecs: SyncCodecs, destinations: Callable[[], Mapping[str, Destination]],
                 disable: Callable[[str, str], Any], live_ready: Callable[[], bool] = lambda: True, partitions: int,
                 store_dir: Path, bootstrap: str, producer: Callable[[], AsyncProducer],
                 kinds: Mapping[str, Kind] = KINDS, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        """`disable(name, reason)`: turn a destination off for every worker (a coroutine: a 410)."""
        io = StageIO(
            name="sync", inputs={topics.changes: "traits", topics.membership: "memberships", topics.redeliveries: "redeliveries"},
            state_topic=topics.state, state_codec=codecs.state,
            dead_letters=DeadLetters("sync", topics.events_dead_letter, codecs.events_dead_letter),
        )  # fmt: skip
        super().__init__(io=io, partitions=partitions, store_dir=store_dir, bootstrap=bootstrap, producer=producer)
        self.topics, self.codecs, self.destinations, self.kinds, self.clock = topics, codecs, destinations, kinds, clock
        self._disable, self.live_ready = disable, live_ready
        self.context = SenderContext(bootstrap)
        self._counters = SyncCounters()
        self._partition = -1  # the partition of the batch being applied (prepare)
        self._touched: dict[int, set[tuple[str, str]]] = defaultdict(set)  # (destination, profile) queues changed
        self._schedules: dict[str, Schedule] = defaultdict(Schedule)
        self._couriers: dict[str, Courier] = {}
        self._answers: dict[int, list[tuple[str, str, Attempt | None]]] = defaultdict(list)
        self._unsettled: set[tuple[int, str, str]] = set()  # (partition, destination, key): delivered, not written yet
        self._flushed = asyncio.Event()

    @property
    def counters(self) -> SyncCounters:
        self._counters.dead_lettered, self._counters.caught_up = self.dead_lettered, self.caught_up
        return self._counters

    def now(self) -> int:
        return int(self.clock() * 1000)

    # -- queueing the inputs' changes ------------------------------------------------------------------------

    def prepare(self, partition: int, tx: Transaction) -> None:
        self._partition = partition

    def apply(self, mark: str, message: InputRecord, tx: Transaction, out: Output) -> None:
        if message.value is None:
            raise UndecodableError("empty record (no value)")
        destinations = self.destinations()
        if mark == "redeliveries":
            self._redeliver(self.codecs.dead_letter.decode(message.value), message, tx, destinations, out)
            return
        if not destinations:
            return  # nothing to deliver to: not even decoded (a destination defined later starts from its definition)
        membership = mark == "memberships"
        change = (self.codecs.membership if membership else self.codecs.changes).decode(message.value)
        self._counters.changes += 1
        origin = {"topic": message.topic, "partition": self._partition, "offset": message.offset}
        now = self.now()
        ready, upto = read_change(tx, change["profile_id"], change["seq"], now)
        for destination in destinations.values():
            if upto is not None and release_held(tx, destination.name, change["profile_id"], upto, now):
                self._touched[self._partition].add((destination.name, change["profile_id"]))
            deliveries = membership_deliveries(change, destination) if membership else trait_deliveries(change, destination)
            limit = max(1, math.ceil(destination.backlog / self.partitions))
            for delivery in deliveries:
                if destination.disabled is not None:
                    reason = f"destination disabled ({destination.disabled.get('reason')})"
                elif not enqueue(tx, destination, delivery, origin, now, limit, held=not ready):
                    reason = f"backlog full: {limit} deliveries queued in partition {self._partition} (backlog {destination.backlog})"
                else:
                    self._touched[self._partition].add((destination.name, delivery.profile_id))
                    self._counters.deliveries_queued += 1
                    continue
                item = {"id": delivery.id, "profile": delivery.profile_id, "seq": delivery.seq, "call": delivery.call,
                        "subject": delivery.subject, "payload": delivery.payload, "attempts": 0, "status": None,
                        "response": None, "origin": origin}  # fmt: skip
                out.atomic.append(self._dead_letter(destination.name, item, reason))

    def _redeliver(self, letter: dict[str, Any], message: InputRecord, tx: Transaction, destinations: Mapping[str, Destination],
                   out: Output) -> None:  # fmt: skip
        """A dead letter `cdp sync redeliver` handed back: queued again with its id, or superseded (agents/sync/queue.py)."""
        name = letter.get("destination")
        destination = destinations.get(name)  # type: ignore[arg-type]
        if destination is None:
            raise InvalidRecord(f"a redelivery for destination {name!r:.80}, which is not defined")
        try:
            item = orjson.loads(letter["value"] or b"")
            delivery = Delivery(item["id"], item["profile"], int(item["seq"]), item["call"], item["subject"], item["payload"], letter["failed_at"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRecord(f"a redelivery for {name} whose value is not a delivery: {exc}") from None
        if message.key != delivery.profile_id.encode():
            raise InvalidRecord(f"a redelivery of {delivery.id} keyed {message.key!r:.60}, not by its profile {delivery.profile_id}")
        origin = {"topic": letter["topic"], "partition": letter["partition"], "offset": letter["offset"]}
        limit = max(1, math.ceil(destination.backlog / self.partitions))
        done = requeue(tx, destination, delivery, origin, self.now(), limit)
        self._counters.redelivered[done] += 1
        if done == "queued":
            self._touched[self._partition].add((name, delivery.profile_id))  # type: ignore[arg-type]
        elif done != "queued already":
            status, error = ("superseded", "a newer change was delivered since") if done == "superseded" else ("dead_lettered", "backlog full")
            out.atomic.append(Record(self.topics.outcomes, name.encode(), self.codecs.outcome.encode({  # type: ignore[union-attr]
                "destination": name, "idempotency_key": delivery.id, "profile_id": delivery.profile_id, "status": status,
                "http_status": None, "attempt": letter["attempts"], "attempted_at": self.now(), "next_attempt_at": None, "error": error,
            })))  # fmt: skip

    def committed(self, partition: int, store: StateStore) -> None:
        for destination, profile in self._touched.pop(partition, ()):
            self._refresh(partition, store, destination, profile)

    def _refresh(self, partition: int, store: StateStore, destination: str, profile: str, done: str | None = None) -> None:
        """The profile's next delivery to send: its first queued one that is not delivered already (`_unsettled`)."""
        schedule = self._schedules[destination]
        key = next((k for k in store.keys(queue_prefix(destination, profile)) if (partition, destination, k) not in self._unsettled), None)
        item = None if key is None else store.get(key)
        if key is None or item is None:
            schedule.clear(partition, profile)
        else:
            schedule.set_head(partition, profile, key, item["due"], done=done)
            courier = self._couriers.get(destination)
            if courier is not None:
                courier.wake()

    def on_ready(self, partition: int, store: StateStore) -> None:
        """The partition's queues as its store holds them (after a restart, a rebalance or a catch-up). A delivery in
        flight whose queue is still there stays busy: a catch-up must not send it a second time."""
        queues = {split_key(key) for key in store.keys(QUEUED)}
        for destination, schedule in self._schedules.items():
            for slot in [slot for slot in schedule.heads if slot[0] == partition and (destination, slot[1]) not in queues]:
                schedule.clear(*slot)
        for queue in sorted(queues):
            self._refresh(partition, store, *queue)

    async def on_partitions_revoked(self, partitions: set[int]) -> None:
        await super().on_partitions_revoked(partitions)
        for partition in partitions:
            if partition not in self.owned():
                self._answers.pop(partition, None)
                self._unsettled = {entry for entry in self._unsettled if entry[0] != partition}
                for schedule in self._schedules.values():
                    schedule.drop_partition(partition)

    # -- sending, and writing the answers ----------------------------------------------------------------------

    async def run(self, feed: InputFeed) -> None:
        """Not before the definitions feed has read the whole topic: a change read before a destination is known
        would never be queued for it."""
        while not self.live_ready():
            await asyncio.sleep(0.1)
        flushing = asyncio.ensure_future(self._flush_forever())
        try:
            await super().run(feed)
        finally:
            flushing.cancel()
            for courier in self._couriers.values():
                await courier.stop()

    def timers(self) -> list[Timer]:
        return [(RECONCILE_S, self.reconcile), *super().timers()]

    async def reconcile(self) -> None:
        """A courier per destination defined now, made anew when its definition changed; never raises (a timer)."""
        try:
            wanted = self.destinations()
            for name in list(self._couriers):
                if wanted.get(name) != self._couriers[name].destination:  # gone or changed (equal: keeps going)
                    stopping = self._couriers.pop(name)
                    asyncio.ensure_future(stopping.stop())  # in the background: a slow close must not hold up the others
                    schedule = self._schedules[name]
                    for slot in list(schedule.busy):  # its sends are cancelled: the next courier sends them again
                        schedule.release(*slot)
            for name, destination in wanted.items():
                if name not in self._couriers and destination.kind in self.kinds:
                    courier = Courier(destination, self.kinds[destination.kind].open(destination, self.context), self._schedules[name],
                                      load=self._load, report=self._answer, share=self._share)  # fmt: skip
                    self._couriers[name] = courier
                    courier.start()
                    log.info("sync: delivering to %s (%s)%s", name, destination.kind, " — disabled" if destination.disabled else "")
        except Exception:
            log.exception("sync: following the destinations failed; trying again")

    def _load(self, partition: int, key: str) -> dict[str, Any] | None:
        store = self.readable_store(partition)
        return None if store is None else store.get(key)

    def _share(self) -> float:
        return len(self.owned()) / self.partitions

    def _answer(self, destination: str, partition: int, key: str, attempt: Attempt | None) -> None:
        """An attempt's answer, written at the next flush. A delivered one lets the profile's next delivery go at once
        (it is in order: this one arrived): a crash before the flush sends both again, in order, with their ids."""
        self._answers[partition].append((destination, key, attempt))
        if attempt is not None and verdict(attempt) == "delivered":
            self._unsettled.add((partition, destination, key))
            store = self.readable_store(partition)
            if store is not None:
                self._refresh(partition, store, destination, split_key(key)[1], done=key)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if not self._answers:
                continue
            answers, self._answers = self._answers, defaultdict(list)
            tallies: list[tuple[str, Settled, bool]] = []
            try:
                done = await self.run_across(list(answers), lambda p, tx, out: tallies.extend(self._settle(answers[p], tx, out)))
            except Exception as exc:
                log.info("sync: writing %d partitions' delivery answers failed (%s); trying again", len(answers), exc)
                for partition, items in answers.items():
                    if partition in self.owned():
                        self._answers[partition][:0] = items
                await asyncio.sleep(1.0)
                continue
            for partition in set(answers) - set(done):
                if partition in self.owned():  # catching up: written at a later flush
                    self._answers[partition][:0] = answers[partition]
                    continue
                for destination, key, _ in answers[partition]:  # not ours any more: its new owner sends them again
                    self._unsettled.discard((partition, destination, key))
                    self._schedules[destination].release(partition, split_key(key)[1])
            for partition in done:
                store = self.readable_store(partition)
                for destination, key, _ in answers[partition]:
                    self._unsettled.discard((partition, destination, key))
                    if store is not None:
                        self._refresh(partition, store, destination, split_key(key)[1], done=key)
            for destination, settled, tried in tallies:
                self._count(destination, settled, tried)
            self._flushed.set()

    def _settle(self, answers: list[tuple[str, str, Attempt | None]], tx: Transaction, out: Output) -> list[tuple[str, Settled, bool]]:
        now, tallies = self.now(), []
        for name, key, attempt in answers:
            destination = self.destinations().get(name) or (self._couriers[name].destination if name in self._couriers else None)
            if destination is None:
                continue  # deleted meanwhile: its queue is kept as it is
            settled = expire(tx, destination, key, now) if attempt is None else settle(tx, destination, key, attempt, now, random.random())
            if settled is None:
                continue
            tallies.append((name, settled, attempt is not None))
            item = settled.item
            status = {"delivered": "succeeded", "retry": "retrying"}.get(settled.outcome, "dead_lettered")
            out.atomic.append(Record(self.topics.outcomes, name.encode(), self.codecs.outcome.encode({
                "destination": name, "idempotency_key": item["id"], "profile_id": item["profile"], "status": status,
                "http_status": item["status"], "attempt": item["attempts"], "attempted_at": now,
                "next_attempt_at": item["due"] if settled.outcome == "retry" else None, "error": item["error"],
            })))  # fmt: skip
            if settled.outcome in ("dead", "gone"):
                out.atomic.append(self._dead_letter(name, item, settled.reason or "given up"))
            if settled.outcome == "gone":
                log.warning("sync: %s answered %s: it is turned off until its definition is POSTed again", name, item["error"])
                asyncio.ensure_future(self._disable(name, item["error"] or "HTTP 410"))
        return tallies

    def _count(self, name: str, settled: Settled, tried: bool) -> None:
        counts = self._counters.per_destination[name]
        counts.attempts += tried
        if settled.outcome == "delivered":
            counts.delivered += 1
            counts.latency.observe(max(0, self.now() - settled.item["queued_at"]) / 1000)
        elif settled.outcome == "retry":
            counts.retried += 1
        else:
            counts.dead_lettered += 1
        if settled.item["error"] is not None and settled.outcome != "delivered":
            counts.last_error, counts.last_error_at = settled.item["error"], self.now()

    def _dead_letter(self, destination: str, item: dict[str, Any], reason: str) -> Record:
        origin = item["origin"]
        letter = dead_letter(stage="sync", error=RuntimeError(reason), topic=origin["topic"], partition=origin["partition"],
                             offset=origin["offset"], key=item["profile"].encode(), value=None)  # fmt: skip
        delivery = {key: item.get(key) for key in ("id", "profile", "seq", "call", "subject", "payload")}
        letter.update(reason=reason, error="DeliveryGivenUp", destination=destination, attempts=item["attempts"],
                      http_status=item["status"], response=item.get("response") or item.get("error"),
                      value=orjson.dumps(delivery))  # fmt: skip
        return Record(self.topics.dead_letter, destination.encode(), self.codecs.dead_letter.encode(letter))

    # -- what it says ------------------------------------------------------------------------------------------

    def backlog(self, destination: str) -> int:
        """Deliveries queued for a destination in the partitions this worker has ready."""
        return sum(queued(store, destination) for p in self.owned() if (store := self.readable_store(p)) is not None)  # type: ignore[arg-type]

    def status(self) -> list[dict[str, Any]]:
        """Each destination as this worker sees it (its partitions' backlog, its attempts since start)."""
        rows = []
        for name, destination in sorted(self.destinations().items()):
            counts = self._counters.per_destination[name]
            backlog = self.backlog(name)
            state = "disabled" if destination.disabled else ("retrying" if counts.last_error and backlog else "ok")
            rows.append({"name": name, "kind": destination.kind, "status": state, "disabled": destination.disabled,
                         "backlog": backlog, "delivered": counts.delivered, "retried": counts.retried,
                         "dead_lettered": counts.dead_lettered, "attempts": counts.attempts,
                         "last_error": counts.last_error, "last_error_at": counts.last_error_at,
                         "partitions": sorted(self.owned())})  # fmt: skip
        return rows

    def metrics(self) -> list[Metric]:
        deliveries = Metric("cdp_sync_deliveries_total", "counter", "delivery attempts' outcomes per destination (this worker)")
        backlog = Metric("cdp_sync_backlog", "gauge", "deliveries queued per destination in this worker's partitions")
        disabled = Metric("cdp_sync_disabled", "gauge", "1 while a destination is off (a 410) until it is POSTed again")
        attempts = Metric("cdp_sync_attempts_total", "counter", "deliveries tried per destination (a batch counts each of its deliveries)")
        latency = Metric("cdp_sync_delivery_seconds", "histogram", "from a change read by the sync stage to its delivery, per destination")
        for name, destination in sorted(self.destinations().items()):
            counts = self._counters.per_destination[name]
            for outcome in ("delivered", "retried", "dead_lettered"):
                deliveries.add(getattr(counts, outcome), destination=name, outcome=outcome)
            attempts.add(counts.attempts, destination=name)
            counts.latency.into(latency, destination=name)
            backlog.add(self.backlog(name), destination=name)
            disabled.add(int(destination.disabled is not None), destination=name)
        work = Metric("cdp_sync_total", "counter", "sync stage work, by what was done")
        for what in ("changes", "deliveries_queued", "dead_lettered", "caught_up"):
            work.add(getattr(self.counters, what), what=what)
        redelivered = Metric("cdp_sync_redelivered_total", "counter", "dead letters handed back by `cdp sync redeliver`, by result")
        for result, count in sorted(self._counters.redelivered.items()):
            redelivered.add(count, result=result)
        transactions = Metric("cdp_transactions_total", "counter", "Kafka transactions committed (one per poll cycle, and per timer run)")
        return [work, redelivered, deliveries, attempts, latency, backlog, disabled, transactions.add(self.transactions, stage=self.name), *self.cycles.metrics(self.name)]


SPEC = StageSpec(
    "sync", "cdp worker (stage 'sync', read in batches beneath Faust; a courier per destination)",
    (PROFILE_CHANGES, AUDIENCE_MEMBERSHIP, SYNC_REDELIVERIES, DEFINITIONS), (SYNC_STATE, SYNC_OUTCOMES, SYNC_DEAD_LETTER, EVENTS_DEAD_LETTER),
    ("deliveries queued per destination and profile: RocksDB per partition, changelog = sync.state",),
    "changes to destinations (webhook), in order per profile, retried with backoff, dead-lettered when given up",
    (PROFILE_CHANGES, AUDIENCE_MEMBERSHIP, SYNC_REDELIVERIES, SYNC_STATE),
)  # fmt: skip


def wire(w: Wiring) -> SyncStage:
    """profile.changes and audience.membership (co-partitioned) into one queue store per partition, delivering to
    the destinations the worker follows."""
    settings, codecs, definitions = w.settings, w.codecs, w.definitions

    async def disable(name: str, reason: str) -> None:
        try:
            await definitions.disable(name, reason, w.producer())
        except Exception:
            log.exception("sync: turning %s off failed (it stays on for now)", name)

    return SyncStage(
        topics=SyncTopics(
            changes=PROFILE_CHANGES.name(settings), membership=AUDIENCE_MEMBERSHIP.name(settings),
            redeliveries=SYNC_REDELIVERIES.name(settings), state=SYNC_STATE.name(settings), outcomes=SYNC_OUTCOMES.name(settings),
            dead_letter=SYNC_DEAD_LETTER.name(settings), events_dead_letter=EVENTS_DEAD_LETTER.name(settings),
        ),
        codecs=SyncCodecs(
            changes=codecs.for_topic(PROFILE_CHANGES), membership=codecs.for_topic(AUDIENCE_MEMBERSHIP),
            state=codecs.for_topic(SYNC_STATE), outcome=codecs.for_topic(SYNC_OUTCOMES),
            dead_letter=codecs.for_topic(SYNC_DEAD_LETTER), events_dead_letter=codecs.for_topic(EVENTS_DEAD_LETTER),
        ),
        destinations=lambda: definitions.destinations,
        disable=disable,
        live_ready=definitions.caught_up.is_set,
        partitions=PROFILE_CHANGES.partition_count(settings),
        store_dir=w.stage_dir("sync"),
        bootstrap=settings.kafka_bootstrap,
        producer=w.producer,
    )  # fmt: skip
