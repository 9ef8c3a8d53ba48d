"""The identity stage on a Faust stream: the protocol's owners, one RocksDB store per partition, Kafka between them.

One agent reads cdp.events.raw (key messageId) and cdp.identity.commands (key: the owner's key) with the same
partition count, so partition N of both lands on one worker and shares store N. Per batch and partition:
  1. catch up the store from its changelog partition (cdp.identity.state, read_committed) when the partition is
     (re)assigned — at once, not at its next input — and re-send an outbox a crash left behind;
  2. apply every input not applied yet (an input watermark per topic lives in the state) through the protocol,
     dead-lettering what does not decode;
  3. write the changes *and the outputs as outbox records* to the changelog in one Kafka transaction (the
     partition's transactional id fences a previous owner), then apply them locally;
  4. write the outputs (commands, resolved events, merge-log entries), wait for the acks, delete the outbox.
A SIGKILL before 3 commits re-reads the inputs (nothing was decided: the transaction is all or nothing); after
it, the watermark skips them and step 1 re-sends the outbox, whose commands the protocol's handlers take
idempotently. So nothing is lost, and an event is never resolved twice to different profiles: its decision is
in the changelog before anything leaves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from confluent_kafka import KafkaException, TopicPartition

from agents.errors import DeliveryFailed, InvalidMessage, UndecodableError
from agents.identity.protocol import IdentityProtocol, Outputs, Resolved, event_command
from topology.codecs import AvroCodec
from topology.dead_letters import dead_letter
from topology.identity_store import IdentityStore, Transaction
from topology.partition_reader import catch_up_consumer, read_chunks
from topology.producer import AsyncProducer, Record
from topology.transactional import TransactionalWriter

log = logging.getLogger(__name__)
BATCH = "batch"  # a record of cdp.identity.commands carrying several commands for one partition
OUTBOX = "o|"  # outbox records: o|0, o|1, ... each at most OUTBOX_CHUNK_BYTES of JSON
OUTBOX_CHUNK_BYTES = 256_000  # records stay far below Kafka's 1 MB default message size
CATCH_UP_CHUNK = 20_000
STALE_AFTER_MS = 20 * 3_600_000  # under the changelog's delete.retention.ms (Kafka's default: 24 h)
MAX_BACKOFF_S = 5.0


@functools.lru_cache(maxsize=262_144)
def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as Faust's and ours) gives a raw string key.

    Cached: aiokafka's murmur2 is pure Python (≈ 9 % of the stage's CPU before), and identifier keys repeat."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class IdentityTopics:
    raw: str
    commands: str
    state: str
    resolved: str
    merges: str
    dead_letter: str


@dataclass(frozen=True)
class IdentityCodecs:
    raw: AvroCodec
    command: AvroCodec
    state: AvroCodec
    resolved: AvroCodec
    merges: AvroCodec
    dead_letter: AvroCodec


@dataclass
class IdentityCounters:
    """What the stage did since start; served on /metrics."""

    events: int = 0
    resolved: int = 0
    commands: int = 0
    merged: int = 0
    refused: int = 0
    demoted: int = 0
    dead_lettered: int = 0
    caught_up: int = 0


class IdentityStage:
    """One instance per worker process; owns an IdentityStore per assigned partition."""

    def __init__(
        self,
        *,
        topics: IdentityTopics,
        codecs: IdentityCodecs,
        protocol: IdentityProtocol,
        partitions: int,
        store_dir: Path,
        bootstrap: str,
        producer: Callable[[], AsyncProducer],
        batch_size: int = 2_000,
        batch_within: float = 0.02,
    ) -> None:
        self.topics, self.codecs, self.protocol, self.partitions = topics, codecs, protocol, partitions
        self.store_dir, self.bootstrap = store_dir, bootstrap
        self._producer = producer
        self.batch_size, self.batch_within = batch_size, batch_within
        self.counters = IdentityCounters()
        self._stores: dict[int, IdentityStore] = {}
        self._stale: set[int] = set()
        self._locks: dict[int, asyncio.Lock] = {}
        self._assigned: set[int] = set()
        self._writers: dict[int, TransactionalWriter] = {}

    # -- partitions --------------------------------------------------------------------------------------------

    def on_partitions_assigned(self, partitions: set[int]) -> None:
        """Catch up now, not at the partition's next input: its views must answer and a crash's outbox must go
        out (the sagas waiting on it) even if no new record ever arrives on it."""
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
                    log.warning("identity: partition %d: catching up failed (%s); retrying in %.1fs", partition, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def readable_store(self, partition: int) -> IdentityStore | None:
        """The store of a partition this worker owns and has caught up, for the web views; else None."""
        return None if partition in self._stale else self._stores.get(partition)

    def owns(self, partition: int) -> bool:
        return partition in self._assigned

    def applied_offset(self, partition: int, topic: str) -> int | None:
        store = self.readable_store(partition)
        if store is None:
            return None
        mark = store.get(f"w|{'raw' if topic == self.topics.raw else 'commands'}")
        return 0 if mark is None else int(mark["next"])

    # -- the agent ---------------------------------------------------------------------------------------------

    async def run(self, stream: AsyncIterable[Any]) -> None:
        """The Faust agent body: batches of events from both topics, each partition's share in arrival order."""
        async for events in stream.take_events(self.batch_size, within=self.batch_within):  # type: ignore[attr-defined]
            by_partition: dict[int, list[Any]] = defaultdict(list)
            for event in events:
                by_partition[event.message.partition].append(event)
            await asyncio.gather(*(self._process_until_written(p, batch) for p, batch in by_partition.items()))

    async def _process_until_written(self, partition: int, events: Sequence[Any]) -> None:
        """Retry until Kafka takes it: giving up would let Faust commit inputs whose effects were lost."""
        backoff = 0.1
        while True:
            if partition not in self._assigned:
                # Moved to another worker while we retried: its owner re-reads these inputs from the committed
                # offset, and retrying here would only fight it for the changelog's transactional id.
                log.warning("identity: partition %d was revoked; leaving its batch to the new owner", partition)
                return
            try:
                async with self._lock(partition):
                    await self._process(partition, events)
                return
            except DeliveryFailed as exc:
                log.warning("identity: partition %d: %s; retrying in %.1fs", partition, exc, backoff)
            except Exception:  # a bug must stall the partition visibly, not let Faust ack the batch away
                log.exception("identity: partition %d: batch failed; retrying in %.1fs", partition, backoff)
            self._stale.add(partition)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _process(self, partition: int, events: Sequence[Any]) -> None:
        store = await self._ready_store(partition)
        tx = Transaction(store)
        out = Outputs()
        letters: list[Record] = []
        applied = 0
        for event in events:
            message = event.message
            mark = "raw" if message.topic == self.topics.raw else "commands"
            watermark = tx.get(f"w|{mark}")
            if watermark is not None and message.offset < watermark["next"]:
                continue  # applied before a crash: its effects are in the store already
            try:
                self._apply(mark, message.value, tx, out)
            except (UndecodableError, InvalidMessage) as exc:
                letter = dead_letter(stage="identity", error=exc, topic=message.topic, partition=partition,
                                     offset=message.offset, key=message.key, value=message.value)  # fmt: skip
                letters.append(Record(self.topics.dead_letter, message.key, self.codecs.dead_letter.encode(letter)))
            tx.put(f"w|{mark}", {"next": message.offset + 1})
            applied += 1
            self.counters.events += mark == "raw"
            self.counters.commands += mark == "commands"
        if not applied:
            return
        if letters:  # at-least-once, before the changelog: a crash may write one twice, never lose one
            await self._producer().write_all(letters)
            self.counters.dead_lettered += len(letters)
        for key in store.keys(OUTBOX):  # the previous batch's outbox was sent: replaced in this same transaction
            tx.delete(key)
        chunks = _outbox_chunks(out)
        for index, chunk in enumerate(chunks):
            tx.put(f"{OUTBOX}{index}", chunk)
        await self._commit(partition, store, tx.changes)
        await self._send_outbox(partition, store, chunks, delete=False)

    def _apply(self, mark: str, value: bytes | None, tx: Transaction, out: Outputs) -> None:
        """One input through the protocol; each command in it all or nothing (a failing one leaves no half-made
        change). A record of cdp.identity.commands holds one command or a `batch` of several for one partition."""
        if value is None:
            raise UndecodableError("empty record (no value)")
        if mark == "raw":
            commands = [event_command(self.codecs.raw.decode(value))]  # type: ignore[arg-type]
        else:
            body = self.codecs.command.decode(value)["body"]
            commands = body["commands"] if body.get("kind") == BATCH else [body]
        for command in commands:
            attempt, attempt_out = Transaction(tx), Outputs()  # type: ignore[arg-type]
            try:
                self.protocol.handle(command, attempt, attempt_out)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                if mark == "raw":  # an event the protocol can't take (e.g. a field of the wrong type): dead-letter it
                    raise InvalidMessage(f"the identity stage can't resolve this event: {exc!r}") from exc
                raise  # a command between owners is ours: a bug must stall the partition, not lose a saga
            tx.changes.update(attempt.changes)
            out.commands.extend(attempt_out.commands)
            out.resolved.extend(attempt_out.resolved)
            out.log.extend(attempt_out.log)

    async def _commit(self, partition: int, store: IdentityStore, changes: dict[str, bytes | None]) -> None:
        """Changes to the changelog in one transaction, then (committed) to the local store with its offset."""
        encode = self.codecs.state.encode
        records = [(key.encode(), None if value is None else encode({"record": orjson.loads(value)})) for key, value in changes.items()]
        writer = self._writers.get(partition)
        if partition not in self._assigned:
            raise DeliveryFailed(f"{self.topics.state}[{partition}] is no longer ours")
        if writer is None or writer.broken:
            writer = self._writers[partition] = await asyncio.to_thread(TransactionalWriter, self.bootstrap, self.topics.state, partition)
        offsets = await asyncio.to_thread(writer.write, records)
        store.apply(changes, max(offsets) + 1)

    async def _send_outbox(self, partition: int, store: IdentityStore, chunks: list[dict[str, Any]], *, delete: bool) -> None:
        """Send a committed outbox. After a batch the records stay until the next batch's transaction replaces
        them (one transaction per batch, not two); a crash in between re-sends them, which the handlers absorb."""
        if not chunks:
            return
        records: list[Record] = []
        for chunk in chunks:
            # One record per owner partition, not per command: Faust's cost is per record, and a batch of
            # commands for one partition is applied in order, as separate records would be.
            by_partition: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
            for key, command in chunk["commands"]:
                by_partition[partition_for(key, self.partitions)].append((key, command))
            for owner, keyed in by_partition.items():
                body = keyed[0][1] if len(keyed) == 1 else {"kind": BATCH, "commands": [c for _, c in keyed]}
                value = self.codecs.command.encode({"kind": body["kind"], "body": body})
                records.append(Record(self.topics.commands, keyed[0][0].encode(), value, owner))
            for profile_id, identifiers, event in chunk["resolved"]:
                value = self.codecs.resolved.encode({"profile_id": profile_id, "identifiers": identifiers, "event": event})
                records.append(Record(self.topics.resolved, profile_id.encode(), value))
            for entry in chunk["log"]:
                records.append(Record(self.topics.merges, entry["survivor_profile_id"].encode(), self.codecs.merges.encode(entry)))
        if records:
            await self._producer().write_all(records)
        if delete:
            await self._commit(partition, store, {f"{OUTBOX}{index}": None for index in range(len(chunks))})
        for chunk in chunks:
            self.counters.resolved += len(chunk["resolved"])
            for entry in chunk["log"]:
                setattr(self.counters, entry["kind"], getattr(self.counters, entry["kind"]) + 1)

    # -- store recovery ----------------------------------------------------------------------------------------

    def _open_store(self, partition: int) -> IdentityStore:
        store = self._stores.get(partition)
        if store is None:
            store = self._stores[partition] = IdentityStore(self.store_dir / f"{self.topics.state}-{partition}")
            self._stale.add(partition)
        return store

    async def _ready_store(self, partition: int) -> IdentityStore:
        store = self._open_store(partition)
        if partition in self._stale:
            try:
                self.counters.caught_up += await asyncio.to_thread(self._catch_up, partition, store)
            except KafkaException as exc:
                raise DeliveryFailed(f"can't read {self.topics.state}[{partition}] to catch up: {exc}") from exc
            pending = [store.get(key) for key in sorted(store.keys(OUTBOX), key=lambda k: int(k[len(OUTBOX):]))]
            if pending:  # a crash came between the changelog and the outputs: send them (again)
                log.info("identity: partition %d re-sends an outbox of %d records", partition, len(pending))
                await self._send_outbox(partition, store, pending, delete=True)  # type: ignore[arg-type]
            self._stale.discard(partition)
        return store

    def _catch_up(self, partition: int, store: IdentityStore) -> int:
        """Bring the store to the end of its changelog partition; returns how many records it read."""
        consumer = catch_up_consumer(self.bootstrap, f"{self.topics.state}.catch-up", read_committed=True)  # whole batches
        try:
            tp = TopicPartition(self.topics.state, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=30)
            start = store.changelog_next
            if start is not None and store.applied_at is not None and time.time() * 1000 - store.applied_at > STALE_AFTER_MS:
                log.info("identity: %s[%d]: the local store is older than compaction keeps tombstones; rebuilding",
                         self.topics.state, partition)  # fmt: skip
                store.reset()
                start = None
            if start is not None and start > high:
                log.warning("identity: %s[%d] is shorter than the store remembers: topics were recreated; resetting",
                            self.topics.state, partition)  # fmt: skip
                store.reset()
                start = None
            found = 0
            chunk: dict[str, bytes | None] = {}

            def take(message: Any) -> None:
                value = message.value()
                chunk[message.key().decode()] = None if value is None else orjson.dumps(self.codecs.state.decode(value)["record"])

            def flush(position: int) -> None:
                nonlocal found
                store.apply(chunk, position)
                found += len(chunk)
                chunk.clear()

            read_chunks(consumer, self.topics.state, partition, max(start or 0, low), high, CATCH_UP_CHUNK, take, flush)
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


def _outbox_chunks(out: Outputs) -> list[dict[str, Any]]:
    """The outputs as JSON records of bounded size, so they are in the changelog before anything is sent."""
    chunks: list[dict[str, Any]] = []
    chunk: dict[str, Any] = {"commands": [], "resolved": [], "log": []}
    size = 0
    items = [("commands", [key, command]) for key, command in out.commands]
    items += [("resolved", [r.profile_id, r.identifiers, r.event]) for r in out.resolved]
    items += [("log", entry) for entry in out.log]
    for field, item in items:
        item_size = len(orjson.dumps(item))
        if size and size + item_size > OUTBOX_CHUNK_BYTES:
            chunks.append(chunk)
            chunk, size = {"commands": [], "resolved": [], "log": []}, 0
        chunk[field].append(item)
        size += item_size
    if size:
        chunks.append(chunk)
    return chunks


__all__ = ["IdentityStage", "IdentityTopics", "IdentityCodecs", "Resolved"]
