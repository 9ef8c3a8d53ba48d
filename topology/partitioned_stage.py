"""A stateful stage on a Faust stream: one RocksDB store per partition, mirrored from a compacted changelog, with
every batch's decisions made durable before anything leaves. The identity and compute stages are built on it.

The stage's agent reads co-partitioned input topics, so partition N of each lands on one worker and shares
store N. Per batch and partition:
  1. catch up the store from its changelog partition (read_committed) when the partition is (re)assigned — at
     once, not at its next input — and re-send an outbox a crash left behind;
  2. apply every input not applied yet (an input watermark per topic lives in the state, `w|<mark>`) through the
     subclass's `apply`, dead-lettering what does not decode;
  3. write the changes, the outputs meant for other partitions *as outbox records*, and the outputs meant for
     the outside (`Output.atomic`) in one Kafka transaction (the partition's transactional id fences a previous
     owner), then apply the changes locally;
  4. write the outbox's records, wait for the acks; the next batch's transaction deletes the outbox.
A SIGKILL before 3 commits re-reads the inputs (nothing was decided: the transaction is all or nothing); after
it, the watermark skips them and step 1 re-sends the outbox, whose records the receivers take idempotently. So
nothing is lost, nothing is decided twice, and read_committed readers of the atomic outputs see each once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from confluent_kafka import KafkaException, TopicPartition

from agents.errors import DeliveryFailed, InvalidMessage, UndecodableError
from topology.codecs import AvroCodec
from topology.dead_letters import dead_letter
from topology.partition_reader import catch_up_consumer, read_chunks
from topology.producer import AsyncProducer, Record
from topology.state_store import StateStore, Transaction
from topology.transactional import TransactionalWriter

log = logging.getLogger(__name__)
BATCH = "batch"  # a command record carrying several commands for one partition, in order
OUTBOX = "o|"  # outbox records: o|0, o|1, ... each at most OUTBOX_CHUNK_BYTES of JSON
OUTBOX_CHUNK_BYTES = 256_000  # records stay far below Kafka's 1 MB default message size
CATCH_UP_CHUNK = 20_000
STALE_AFTER_MS = 20 * 3_600_000  # under the changelog's delete.retention.ms (Kafka's default: 24 h)
MAX_BACKOFF_S = 5.0


@functools.lru_cache(maxsize=262_144)
def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as Faust's and ours) gives a raw string key.

    Cached: aiokafka's murmur2 is pure Python (≈ 9 % of the identity stage's CPU before), and keys repeat."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def command_records(keyed: Sequence[tuple[str, dict[str, Any]]], topic: str, codec: AvroCodec, partitions: int) -> list[Record]:
    """Commands for other partitions as one record per partition, not per command: Faust's cost is per record,
    and a `batch` of commands for one partition is applied in order, as separate records would be."""
    by_partition: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for key, command in keyed:
        by_partition[partition_for(key, partitions)].append((key, command))
    records = []
    for owner, commands in by_partition.items():
        body = commands[0][1] if len(commands) == 1 else {"kind": BATCH, "commands": [c for _, c in commands]}
        records.append(Record(topic, commands[0][0].encode(), codec.encode({"kind": body["kind"], "body": body}), owner))
    return records


@dataclass
class Output:
    """What one batch sends: `outbox` items (JSON, turned into records by the stage once the changelog holds them)
    and `atomic` records, written inside the changelog's transaction (exactly once for read_committed readers)."""

    outbox: list[Any] = field(default_factory=list)
    atomic: list[Record] = field(default_factory=list)


@dataclass(frozen=True)
class StageIO:
    """Where a stage keeps its state and where its bad inputs go."""

    name: str  # for logs, e.g. "identity"
    inputs: Mapping[str, str]  # input topic -> its watermark mark
    state_topic: str
    state_codec: AvroCodec  # a record {"record": json}
    dead_letter_topic: str
    dead_letter_codec: AvroCodec


class PartitionedStage:
    """One instance per worker process; owns a StateStore per assigned partition. Subclasses decide what an input
    does (`apply`) and what an outbox item is on Kafka (`outbox_records`)."""

    def __init__(
        self,
        *,
        io: StageIO,
        partitions: int,
        store_dir: Path,
        bootstrap: str,
        producer: Callable[[], AsyncProducer],
        batch_size: int = 2_000,
        batch_within: float = 0.02,
    ) -> None:
        self.io, self.partitions, self.store_dir, self.bootstrap = io, partitions, store_dir, bootstrap
        self._producer = producer
        self.batch_size, self.batch_within = batch_size, batch_within
        self.dead_lettered = 0
        self.caught_up = 0
        self._stores: dict[int, StateStore] = {}
        self._stale: set[int] = set()
        self._locks: dict[int, asyncio.Lock] = {}
        self._assigned: set[int] = set()
        self._writers: dict[int, TransactionalWriter] = {}

    # -- what subclasses decide --------------------------------------------------------------------------------

    def apply(self, mark: str, message: Any, tx: Transaction, out: Output) -> None:
        """Apply one input record (a Faust message). Raise UndecodableError / InvalidMessage to dead-letter it."""
        raise NotImplementedError

    def outbox_records(self, items: Sequence[Any]) -> list[Record]:
        """The Kafka records of one committed outbox chunk."""
        raise NotImplementedError

    def sent(self, items: Sequence[Any]) -> None:
        """Called once an outbox chunk was acknowledged (for counters)."""

    def on_ready(self, partition: int, store: StateStore) -> None:
        """Called each time a partition's store is caught up and readable."""

    def prepare(self, partition: int, tx: Transaction) -> None:
        """Called at the start of every batch and timer run, before any input (e.g. to notice new definitions)."""

    # -- partitions --------------------------------------------------------------------------------------------

    def on_partitions_assigned(self, partitions: set[int]) -> None:
        """Catch up now, not at the partition's next input: its views must answer and a crash's outbox must go
        out (whoever waits on it) even if no new record ever arrives on it."""
        self._assigned |= partitions
        self._stale |= partitions
        for partition in partitions:
            asyncio.ensure_future(self._warm(partition))

    async def on_partitions_revoked(self, partitions: set[int]) -> None:
        """Wait for each partition's running work (batch or warm-up), then close its store and writer.

        The local copy is kept (Faust's rebalances are eager: every partition is revoked and most come straight
        back), and caught up from its changelog offset when it is assigned again — unless it is older than
        compaction keeps tombstones (STALE_AFTER_MS), then it is rebuilt from scratch."""
        self._assigned -= partitions
        self._stale |= partitions
        for partition in partitions:
            async with self._lock(partition):
                if partition in self._assigned:
                    continue  # assigned again meanwhile
                store = self._stores.pop(partition, None)
                if store is not None:
                    store.close()
                writer = self._writers.pop(partition, None)
                if writer is not None:
                    writer.close()

    def _lock(self, partition: int) -> asyncio.Lock:
        return self._locks.setdefault(partition, asyncio.Lock())

    async def _warm(self, partition: int) -> None:
        """Catch up (and re-send a pending outbox) until it works or the partition is gone."""
        backoff = 0.5
        while True:
            async with self._lock(partition):
                if partition not in self._assigned:
                    return
                try:
                    await self._ready_store(partition)
                    return
                except Exception as exc:  # a warm-up must never kill the worker; it retries on its own
                    log.warning("%s: partition %d: catching up failed (%s); retrying in %.1fs", self.io.name, partition, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def readable_store(self, partition: int) -> StateStore | None:
        """The store of a partition this worker owns and has caught up, for the web views; else None."""
        return None if partition in self._stale else self._stores.get(partition)

    def owns(self, partition: int) -> bool:
        return partition in self._assigned

    def owned(self) -> set[int]:
        return set(self._assigned)

    def applied_offset(self, partition: int, topic: str) -> int | None:
        store = self.readable_store(partition)
        if store is None or topic not in self.io.inputs:
            return None
        mark = store.get(f"w|{self.io.inputs[topic]}")
        return 0 if mark is None else int(mark["next"])

    # -- the agent ---------------------------------------------------------------------------------------------

    async def run(self, stream: AsyncIterable[Any]) -> None:
        """The Faust agent body: batches of records from every input, each partition's share in arrival order."""
        async for events in stream.take_events(self.batch_size, within=self.batch_within):  # type: ignore[attr-defined]
            by_partition: dict[int, list[Any]] = defaultdict(list)
            for event in events:
                by_partition[event.message.partition].append(event)
            await asyncio.gather(*(self._until_written(p, self._process, batch) for p, batch in by_partition.items()))

    async def run_in(self, partition: int, work: Callable[[Transaction, Output], None]) -> bool:
        """Run `work` on a partition's state like a batch (for timers); False when the partition is not ours."""
        if partition not in self._assigned:
            return False

        async def attempt(partition: int, _: Any) -> None:
            store = await self._ready_store(partition)
            tx, out = Transaction(store), Output()
            self.prepare(partition, tx)
            work(tx, out)
            if tx.changes or out.outbox or out.atomic:
                await self._finish(partition, store, tx, out)

        await self._until_written(partition, attempt, None)
        return True

    async def _until_written(self, partition: int, process: Callable[[int, Any], Any], batch: Any) -> None:
        """Retry until Kafka takes it: giving up would let Faust commit inputs whose effects were lost."""
        backoff = 0.1
        while True:
            if partition not in self._assigned:
                # Moved to another worker while we retried: its owner re-reads these inputs from the committed
                # offset, and retrying here would only fight it for the changelog's transactional id.
                log.warning("%s: partition %d was revoked; leaving its batch to the new owner", self.io.name, partition)
                return
            try:
                async with self._lock(partition):
                    await process(partition, batch)
                return
            except DeliveryFailed as exc:
                log.warning("%s: partition %d: %s; retrying in %.1fs", self.io.name, partition, exc, backoff)
            except Exception:  # a bug must stall the partition visibly, not let Faust ack the batch away
                log.exception("%s: partition %d: batch failed; retrying in %.1fs", self.io.name, partition, backoff)
            self._stale.add(partition)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _process(self, partition: int, events: Sequence[Any]) -> None:
        store = await self._ready_store(partition)
        tx, out = Transaction(store), Output()
        self.prepare(partition, tx)
        letters: list[Record] = []
        applied = 0
        for event in events:
            message = event.message
            mark = self.io.inputs[message.topic]
            watermark = tx.get(f"w|{mark}")
            if watermark is not None and message.offset < watermark["next"]:
                continue  # applied before a crash: its effects are in the store already
            try:
                self.apply(mark, message, tx, out)
            except (UndecodableError, InvalidMessage) as exc:
                letter = dead_letter(stage=self.io.name, error=exc, topic=message.topic, partition=partition,
                                     offset=message.offset, key=message.key, value=message.value)  # fmt: skip
                letters.append(Record(self.io.dead_letter_topic, message.key, self.io.dead_letter_codec.encode(letter)))
            tx.put(f"w|{mark}", {"next": message.offset + 1})
            applied += 1
        if not applied:
            return
        if letters:  # at-least-once, before the changelog: a crash may write one twice, never lose one
            await self._producer().write_all(letters)
            self.dead_lettered += len(letters)
        await self._finish(partition, store, tx, out)

    async def _finish(self, partition: int, store: StateStore, tx: Transaction, out: Output) -> None:
        for key in store.keys(OUTBOX):  # the previous batch's outbox was sent: replaced in this same transaction
            tx.delete(key)
        chunks = _outbox_chunks(out.outbox)
        for index, chunk in enumerate(chunks):
            tx.put(f"{OUTBOX}{index}", {"items": chunk})
        await self._commit(partition, store, tx.changes, out.atomic)
        await self._send_outbox(partition, store, chunks, delete=False)

    async def _commit(
        self, partition: int, store: StateStore, changes: dict[str, bytes | None], atomic: Sequence[Record] = ()
    ) -> None:
        """Changes (and atomic outputs) to Kafka in one transaction, then (committed) to the local store."""
        encode = self.io.state_codec.encode
        records = [(key.encode(), None if value is None else encode({"record": orjson.loads(value)})) for key, value in changes.items()]
        writer = await self._writer(partition)
        offsets = await asyncio.to_thread(writer.write, records, atomic)
        store.apply(changes, max(offsets) + 1 if offsets else store.changelog_next or 0)

    async def _writer(self, partition: int) -> TransactionalWriter:
        """The partition's transactional writer; creating one fences every earlier writer of the partition (its
        open transaction is aborted or finished first), so a changelog read after this is final."""
        if partition not in self._assigned:
            raise DeliveryFailed(f"{self.io.state_topic}[{partition}] is no longer ours")
        writer = self._writers.get(partition)
        if writer is None or writer.broken:
            writer = self._writers[partition] = await asyncio.to_thread(TransactionalWriter, self.bootstrap, self.io.state_topic, partition)
        return writer

    async def _send_outbox(self, partition: int, store: StateStore, chunks: list[list[Any]], *, delete: bool) -> None:
        """Send a committed outbox. After a batch the records stay until the next batch's transaction replaces
        them (one transaction per batch, not two); a crash in between re-sends them, which the receivers absorb."""
        if not chunks:
            return
        records = [record for chunk in chunks for record in self.outbox_records(chunk)]
        if records:
            await self._producer().write_all(records)
        if delete:
            await self._commit(partition, store, {f"{OUTBOX}{index}": None for index in range(len(chunks))})
        for chunk in chunks:
            self.sent(chunk)

    # -- store recovery ----------------------------------------------------------------------------------------

    def _open_store(self, partition: int) -> StateStore:
        store = self._stores.get(partition)
        if store is None:
            store = self._stores[partition] = StateStore(self.store_dir / f"{self.io.state_topic}-{partition}")
            self._stale.add(partition)
        return store

    async def _ready_store(self, partition: int) -> StateStore:
        store = self._open_store(partition)
        if partition in self._stale:
            # Fence the previous owner first: a transaction it still has open would otherwise sit beyond the
            # read_committed end of the catch-up and commit after it, and those changes would never be read here.
            await self._writer(partition)
            try:
                self.caught_up += await asyncio.to_thread(self._catch_up, partition, store)
            except KafkaException as exc:
                raise DeliveryFailed(f"can't read {self.io.state_topic}[{partition}] to catch up: {exc}") from exc
            pending = [store.get(key) for key in sorted(store.keys(OUTBOX), key=lambda k: int(k[len(OUTBOX):]))]
            if pending:  # a crash came between the changelog and the outputs: send them (again)
                log.info("%s: partition %d re-sends an outbox of %d records", self.io.name, partition, len(pending))
                await self._send_outbox(partition, store, [chunk["items"] for chunk in pending if chunk], delete=True)
            self._stale.discard(partition)
            self.on_ready(partition, store)
        return store

    def _catch_up(self, partition: int, store: StateStore) -> int:
        """Bring the store to the end of its changelog partition; returns how many records it read."""
        topic = self.io.state_topic
        consumer = catch_up_consumer(self.bootstrap, f"{topic}.catch-up", read_committed=True)  # whole batches
        try:
            tp = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=30)
            start = store.changelog_next
            if start is not None and store.applied_at is not None and time.time() * 1000 - store.applied_at > STALE_AFTER_MS:
                log.info("%s: %s[%d]: the local store is older than compaction keeps tombstones; rebuilding",
                         self.io.name, topic, partition)  # fmt: skip
                store.reset()
                start = None
            if start is not None and start > high:
                log.warning("%s: %s[%d] is shorter than the store remembers: topics were recreated; resetting",
                            self.io.name, topic, partition)  # fmt: skip
                store.reset()
                start = None
            found = 0
            chunk: dict[str, bytes | None] = {}

            def take(message: Any) -> None:
                value = message.value()
                chunk[message.key().decode()] = None if value is None else orjson.dumps(self.io.state_codec.decode(value)["record"])

            def flush(position: int) -> None:
                nonlocal found
                store.apply(chunk, position)
                found += len(chunk)
                chunk.clear()

            read_chunks(consumer, topic, partition, max(start or 0, low), high, CATCH_UP_CHUNK, take, flush)
            if store.changelog_next is None:
                store.apply({}, high)
            return found
        finally:
            consumer.close()

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _outbox_chunks(items: Sequence[Any]) -> list[list[Any]]:
    """The outbox items in lists of bounded JSON size, so they are in the changelog before anything is sent."""
    chunks: list[list[Any]] = []
    chunk: list[Any] = []
    size = 0
    for item in items:
        item_size = len(orjson.dumps(item))
        if size and size + item_size > OUTBOX_CHUNK_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        chunks.append(chunk)
    return chunks
