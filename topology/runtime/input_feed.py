"""A stage's inputs read in batches beneath Faust: one confluent-kafka consumer per stage, on the partitions
Faust's consumer group gave this worker.

Faust stays the application: its group membership decides which partitions a worker owns (co-partitioned, with
rebalancing, and the views route by it), its rebalance signals drive the stage, and the group's committed offsets
are where a new owner starts. What it no longer does is carry each input record through its per-record path
(aiokafka's pure-Python fetch parsing, the conductor, a stream, an ack per record: ≈ 68 µs a record, measured,
against ≈ 2 µs for `Consumer.consume`). `never_fetch` keeps Faust's consumer subscribed to the stage inputs
(that is what assigns them) without ever fetching, resuming or livelock-checking them.

Per partition the feed hands out records in offset order. A rebalance bumps the partition's *epoch*: a batch
polled before it is stale (the partition may have moved and come back at another offset) and is dropped unread,
so a stage never applies records out of order. Offsets are committed to Faust's group (through Faust's own
consumer, the only member that may) once the stage has made a batch durable, every commit interval (graph.py); a crash
between the two re-reads at most that much, which the stages take idempotently (watermarks, seen-store), as
they did with Faust's commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, TopicPartition

from agents.errors import DeliveryFailed
from topology.runtime.stage_cpu import CycleTimes

log = logging.getLogger(__name__)
QUEUED_KB_PER_PARTITION = 4_096  # librdkafka prefetches up to this much per partition (its default: 64 MiB)


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One input record, as the stages read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Polled:
    """One partition's records of one poll, in offset order; the partition's epoch when they were read; and where
    each input's reading stands after them (past transaction markers and aborted records, which are never handed
    out: committing only "last record + 1" would leave the group behind the markers for ever)."""

    partition: int
    epoch: int
    records: list[InputRecord]
    positions: dict[str, int]


class InputFeed:
    """The input topics of one stage (co-partitioned), for the partitions this worker owns.

    Every call on the consumer runs on one thread of its own (librdkafka's calls block), so an assignment change
    and a poll never overlap: a poll's records and its epochs are of the same assignment."""

    def __init__(self, name: str, bootstrap: str, group: str, topics: Sequence[str], *, max_records: int = 2_000,
                 within_s: float = 0.1, group_metadata: Callable[[], bytes | None] = lambda: None) -> None:  # fmt: skip
        """`group`: Faust's consumer group, whose committed offsets say where each partition starts.
        `group_metadata`: that group's member (Faust's consumer) and its generation as librdkafka takes them
        (transactional.group_metadata), None while it has none: a stage's transactions commit offsets as it."""
        self.name, self.topics = name, tuple(topics)
        self.group_metadata = group_metadata
        self.max_records, self.within_s = max_records, within_s
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": group,  # only read (committed offsets): this consumer is assigned, it never joins
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",  # the stages' outputs to each other are in their batch's transaction
            "queued.max.messages.kbytes": QUEUED_KB_PER_PARTITION,
            "enable.partition.eof": False,
        })  # fmt: skip
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"feed-{name}")
        self._epochs: dict[int, int] = defaultdict(int)
        self._owned: set[int] = set()
        self._applied: dict[tuple[str, int], int] = {}  # next offset, once the stage made the records durable
        self._committed: dict[tuple[str, int], int] = {}
        self._holds: dict[tuple[str, int], int] = {}  # offsets the stage still needs read again after a restart

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    # -- assignment (Faust's rebalance signals) -----------------------------------------------------------------

    async def assign(self, partitions: Iterable[int]) -> None:
        """Start reading these partitions of every input, where the group committed (or this worker got further
        before an eager rebalance took them away and gave them back), else from the earliest record."""
        new = sorted(set(partitions) - self._owned)
        if new:
            await self._call(self._assign, new)

    def _assign(self, partitions: list[int]) -> None:
        wanted = [TopicPartition(topic, p) for topic in self.topics for p in partitions]
        committed = self._consumer.committed(wanted, timeout=30)
        starts = []
        for tp in committed:
            key = (tp.topic, tp.partition)
            offset = max(tp.offset, self._applied.get(key, OFFSET_INVALID))
            if offset < 0:  # never committed: the earliest record, as auto.offset.reset says
                offset = self._consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=30)[0]
            self._applied[key] = offset  # everything before it is durable: a transaction may commit it (commit_point)
            starts.append(TopicPartition(tp.topic, tp.partition, offset))
        self._consumer.incremental_assign(starts)
        for p in partitions:
            self._epochs[p] += 1
            self._owned.add(p)

    async def revoke(self, partitions: Iterable[int]) -> None:
        """Stop reading these; a batch of them polled before is stale from now on."""
        gone = sorted(set(partitions) & self._owned)
        if gone:
            await self._call(self._revoke, gone)

    def _revoke(self, partitions: list[int]) -> None:
        self._consumer.incremental_unassign([TopicPartition(topic, p) for topic in self.topics for p in partitions])
        for p in partitions:
            self._epochs[p] += 1
            self._owned.discard(p)

    async def read_again(self, partition: int) -> None:
        """Read an owned partition's inputs again from where a new owner would start (the group's committed offset
        or this worker's applied one, never past a hold); batches polled before are stale."""
        if partition in self._owned:
            await self._call(self._reassign, partition)

    def _reassign(self, partition: int) -> None:
        self._revoke([partition])
        self._assign([partition])

    def current(self, polled: Polled) -> bool:
        """Whether the batch is still of the partition's present assignment (else: drop it, it will be read again)."""
        return polled.partition in self._owned and self._epochs[polled.partition] == polled.epoch

    def owned(self) -> set[int]:
        return set(self._owned)

    # -- reading ------------------------------------------------------------------------------------------------

    async def poll(self) -> list[Polled]:
        """The next records, by partition: up to `max_records` of what has come; when nothing has, the first to come
        within `within_s` and what came with it. A batch is what piled up while the stage was busy — a record is
        never held back to fill one (librdkafka's `consume(n, timeout)` waits out the timeout for n records)."""
        return await self._call(self._poll)  # type: ignore[no-any-return]

    def _consume(self) -> list[Any]:
        messages = self._consumer.consume(self.max_records, 0)
        if not messages:
            messages = self._consumer.consume(1, self.within_s)
            if messages and self.max_records > 1:
                messages += self._consumer.consume(self.max_records - 1, 0)
        return messages  # type: ignore[no-any-return]

    def _poll(self) -> list[Polled]:
        by_partition: dict[int, list[InputRecord]] = defaultdict(list)
        for message in self._consume():
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: reading its inputs: %s (librdkafka retries)", self.name, error.str())
                continue
            partition = message.partition()
            by_partition[partition].append(InputRecord(message.topic(), partition, message.offset(), message.key(),
                                                       message.value()))  # fmt: skip
        moved: dict[int, dict[str, int]] = defaultdict(dict)
        owned = [TopicPartition(topic, p) for topic in self.topics for p in self._owned]
        for tp in self._consumer.position(owned) if owned else ():
            if tp.offset >= 0 and tp.offset != self._applied.get((tp.topic, tp.partition)):
                moved[tp.partition][tp.topic] = tp.offset  # a partition with only markers read moves too
        return [Polled(p, self._epochs[p], by_partition.get(p, []), moved.get(p, {})) for p in by_partition.keys() | moved.keys()]

    def highwater(self, topic: str, partition: int) -> int | None:
        """The partition's end as of the last fetch (no request), or None before the first."""
        try:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        except Exception:  # librdkafka raises before it fetched the partition once
            return None
        return high if high >= 0 else None

    # -- progress -----------------------------------------------------------------------------------------------

    def done(self, polled: Polled) -> None:
        """The stage made these records durable: their offsets may be committed."""
        if not self.current(polled):
            return
        for record in polled.records:
            self._applied[(record.topic, record.partition)] = record.offset + 1
        for topic, position in polled.positions.items():
            key = (topic, polled.partition)
            self._applied[key] = max(position, self._applied.get(key, position))
        for topic in self.topics:
            key = (topic, polled.partition)
            held = self._holds.get(key)
            if held is not None and self._applied.get(key, held) > held:
                self._applied[key] = held

    def commit_point(self, partitions: Iterable[int]) -> dict[tuple[str, int], int]:
        """Offsets of these partitions' inputs that are safe to commit now (what the stage made durable, from where
        the partition started), for a transaction to commit as the group's member: that is what fences a worker
        that lost its partitions (topology/runtime/transactional.py). DeliveryFailed for a partition this feed
        does not read (yet): its stage must wait, not commit an offset it does not know."""
        offsets = {}
        for partition in partitions:
            if partition not in self._owned:
                raise DeliveryFailed(f"{self.name}: partition {partition} is not assigned to its input feed (yet)")
            for topic in self.topics:
                offsets[(topic, partition)] = self._applied[(topic, partition)]
        return offsets

    def hold(self, topic: str, partition: int, offset: int | None) -> None:
        """The stage keeps state rebuilt from topic[partition]'s records from `offset` on in memory only: commit
        no further, so a new owner (or this worker, after an eager rebalance) reads them again. None: no hold.
        A hold only ever moves forward: what it guards is at or past what was committed before. It outlives a
        revocation (a store kept open over an eager rebalance still holds those records) until the stage sets it
        again."""
        if offset is None:
            self._holds.pop((topic, partition), None)
        else:
            self._holds[(topic, partition)] = offset

    def to_commit(self) -> dict[tuple[str, int], int]:
        """Offsets of owned partitions that moved since the last commit."""
        return {tp: offset for tp, offset in self._applied.items()
                if tp[1] in self._owned and self._committed.get(tp) != offset}  # fmt: skip

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        self._committed.update(offsets)

    async def close(self) -> None:
        await self._call(self._consumer.close)
        self._thread.shutdown(wait=False)


async def drive(feed: InputFeed, process: Callable[[Polled], Awaitable[None]], cycles: CycleTimes | None = None) -> None:
    """Poll and process for ever: each poll's partitions side by side (they are independent), the next poll once
    all are durable. `process` retries until its batch is durable or no longer wanted; it never raises. `cycles`
    takes each poll's processing time."""

    async def together(batches: list[Polled]) -> None:
        await asyncio.gather(*(process(batch) for batch in batches))

    await drive_cycles(feed, together, cycles)


async def drive_cycles(feed: InputFeed, process: Callable[[list[Polled]], Awaitable[None]],
                       cycles: CycleTimes | None = None) -> None:  # fmt: skip
    """`drive`, with each poll's partitions handed to `process` together (a stage that commits them in one
    transaction); `process` never raises."""
    while True:
        polled = await feed.poll()
        if not polled:
            continue
        batches = [batch for batch in polled if batch.records]
        if batches:
            started = time.perf_counter()
            await process(batches)
            if cycles is not None:
                cycles.add(time.perf_counter() - started)
        for batch in polled:
            feed.done(batch)


def never_fetch(consumer: Any, topics: Iterable[str]) -> None:
    """Keep Faust's consumer subscribed to `topics` (its group assigns them) but never let it fetch them, resume
    them after a rebalance, or report them stalled: an InputFeed reads them. Patches this one consumer."""
    ours = frozenset(topics)
    set_active, resume, verify = consumer._set_active_tps, consumer.resume_partitions, consumer.verify_event_path

    def _set_active_tps(tps: Any) -> Any:
        return set_active({tp for tp in tps if tp.topic not in ours})

    def resume_partitions(tps: Any) -> None:
        resume([tp for tp in tps if tp.topic not in ours])

    def verify_event_path(now: float, tp: Any) -> None:
        if tp.topic not in ours:
            verify(now, tp)

    consumer._set_active_tps = _set_active_tps
    consumer.resume_partitions = resume_partitions
    consumer.verify_event_path = verify_event_path


def faust_group_metadata(app: Any) -> bytes | None:
    """The group membership of Faust's consumer (aiokafka's coordinator: member id and generation) as librdkafka
    takes it, for the stages' transactions to commit offsets as that member; None while it has joined no
    generation."""
    from topology.runtime.transactional import group_metadata

    try:
        coordinator = app.consumer._thread._ensure_consumer()._coordinator
    except Exception:  # not started yet
        return None
    generation, member = coordinator.generation, coordinator.member_id
    if generation < 0 or not member:
        return None
    return group_metadata(coordinator.group_id, generation, member, coordinator._group_instance_id)


async def commit_offsets(app: Any, feeds: Sequence[InputFeed]) -> None:
    """Commit what the feeds' stages made durable to Faust's group, through Faust's consumer (a member: a consumer
    outside the group may not commit to it while it has members). Skipped while the group rebalances, when a
    commit would be refused; never raises (a timer calls it)."""
    from faust.types import TP

    if app.rebalancing:
        return
    moved = [(feed, feed.to_commit()) for feed in feeds]
    offsets = {TP(topic, partition): offset for _, found in moved for (topic, partition), offset in found.items()}
    if not offsets:
        return
    try:
        if await app.consumer._commit(offsets):
            for feed, found in moved:
                feed.committed(found)
    except Exception:
        log.exception("committing input offsets failed; trying again at the next interval")
