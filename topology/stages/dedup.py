"""The dedup stage on a Faust stream: decode, drop repeated messageIds, write to raw, then remember.

Reads cdp.events.accepted (key messageId, so every copy of a messageId meets in one partition) and writes the
first sightings to the *same partition number* of cdp.events.raw, which doubles as the changelog of the
per-partition SeenStore (see topology/runtime/seen_store.py). Order of effects per batch, and why it is crash-safe:
  1. catch up: if the partition was (re)assigned or a write failed, read raw from the store's offset to the end;
  2. decide with agents.ingest.dedup (pure), dead-lettering any record that can't be taken (it doesn't decode, has
     no value, isn't a RawEvent as the ingest writes it, or was received more than MAX_AHEAD_MS ahead of this
     worker's clock, which would drag the partition's stream time into the future and forget every sighting);
  3. write outputs and dead letters and wait until Kafka acknowledged all of them;
  4. remember the sightings with the raw offset they reach; the input offsets are committed after that.
A SIGKILL anywhere re-reads some inputs after restart; step 1 has already put their outputs in the store, so
they are dropped, not written twice. Nothing is committed before its output is acknowledged, so nothing is lost.

The logic is pure (agents/ingest/dedup.py); this module is the I/O around it, which is why it lives here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from agents import checks
from agents.errors import DeliveryFailed, InvalidRecord, UndecodableError
from agents.events import RawEvent
from agents.ingest.dedup import Sightings, first_sightings
from topology.codecs import AvroCodec
from topology.runtime.dead_letters import DeadLetters
from topology.runtime.input_feed import InputFeed, InputRecord, Polled, drive
from topology.runtime.stage import Timer
from topology.runtime.stage_cpu import CycleTimes
from topology.spec import StageSpec, Wiring
from topology.topics import EVENTS_ACCEPTED, EVENTS_DEAD_LETTER, EVENTS_RAW
from topology.web.metrics import Metric
from topology.runtime.partition_reader import catch_up_consumer, read_chunks
from topology.runtime.producer import MAX_RECORD_BYTES, AsyncProducer, Record
from topology.runtime.seen_store import SeenStore
from topology.runtime.stage_cpu import spent_by
from topology.runtime.stalls import RETRIED, PartitionHealth, until_done

log = logging.getLogger(__name__)
CATCH_UP_GRACE_MS = 3_600_000  # a store rebuilt from scratch reads this much more than a window of raw
CATCH_UP_CHUNK = 50_000  # sightings per RocksDB write while catching up
MAX_AHEAD_MS = 3_600_000  # a receivedAt further ahead of our clock is refused (so are Kafka timestamps, by default)


@dataclass
class DedupCounters:
    """What the stage did since start; served on /metrics."""

    passed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    caught_up: int = 0


class DedupStage:
    """One instance per worker process; owns a SeenStore per assigned partition."""

    name = "dedup"

    def __init__(
        self,
        *,
        accepted_topic: str,
        raw_topic: str,
        dead_letter_topic: str,
        codec: AvroCodec,
        dead_letter_codec: AvroCodec,
        window_ms: int,
        store_dir: Path,
        bootstrap: str,
        producer: Callable[[], AsyncProducer],
    ) -> None:
        self.accepted_topic, self.raw_topic = accepted_topic, raw_topic
        self.codec, self.dead_letters = codec, DeadLetters("dedup", dead_letter_topic, dead_letter_codec)
        self.window_ms = window_ms
        self.store_dir = store_dir
        self.cycles = CycleTimes()
        self.bootstrap = bootstrap
        self._producer = producer
        self.counters = DedupCounters()
        self.health = PartitionHealth("dedup")
        self._stores: dict[int, SeenStore] = {}
        self._stale: set[int] = set()
        self.feed: InputFeed | None = None

    def on_partitions_assigned(self, partitions: set[int]) -> None:
        """Another worker may have written to raw while we did not own these: catch up before the next batch."""
        for partition in partitions:
            self._open_store(partition)
        self._stale |= partitions

    def applied_offset(self, partition: int, topic: str | None = None) -> int | None:
        """The next input offset to decide on `partition` (of its one input), if this worker has its store open."""
        store = self._stores.get(partition)
        return None if store is None else store.next_input

    def inputs(self) -> list[str]:
        return [self.accepted_topic]

    def timers(self) -> list[Timer]:
        return []  # sightings are forgotten as stream time passes, in the batch

    def metrics(self) -> list[Metric]:
        counters = self.counters
        events = Metric("cdp_dedup_events_total", "counter", "dedup stage decisions")
        events.add(counters.passed, outcome="passed").add(counters.duplicates, outcome="duplicate")
        events.add(counters.dead_lettered, outcome="dead_lettered")
        caught_up = Metric("cdp_dedup_caught_up_total", "counter", "sightings read back from the raw topic")
        return [events, caught_up.add(counters.caught_up), *self.cycles.metrics("dedup")]

    async def on_partitions_revoked(self, partitions: set[int]) -> None:
        """Whoever gets these next may write to raw: if they come back, catch up first (and free the DB now)."""
        for partition in partitions:
            store = self._stores.pop(partition, None)
            if store is not None:
                store.close()
        self._stale |= partitions
        self.health.forget(partitions)

    async def run(self, feed: InputFeed) -> None:
        """Read events.accepted for ever: batches, each partition's in offset order."""
        self.feed = feed
        await drive(feed, self._process_until_written, self.cycles)

    async def _process_until_written(self, polled: Polled) -> None:
        """Retry a batch until Kafka takes it: giving up would let its offsets be committed with outputs lost."""
        await until_done(self.health, polled.partition, lambda: self._process(polled),
                         on_retry=lambda: self._stale.add(polled.partition))  # fmt: skip  (outputs may have landed: find them)

    async def _process(self, polled: Polled) -> None:
        if self.feed is not None and not self.feed.current(polled):
            return  # read before a rebalance: the partition's new assignment reads these again, in order
        partition = polled.partition
        store = await self._ready_store(partition)
        applied = store.next_input
        events = [record for record in polled.records if record.offset >= applied]  # re-read after a crash: done
        if not events:
            return
        with spent_by("dedup"):
            records, out, decoded = self.decide(partition, store, events, time.time() * 1000)
        written = await self._producer().write_all(records)
        raw_offsets = [w.offset for w in written if w.topic == self.raw_topic]
        if raw_offsets and min(raw_offsets) != store.next_offset:
            # Another writer got to raw[p] since our catch-up (an owner cut off by a rebalance): our memory misses
            # its records. Catch up and decide again; what we just wrote is then found and not written twice.
            raise DeliveryFailed(f"{self.raw_topic}[{partition}] moved from {store.next_offset} to {min(raw_offsets)} under us")
        next_offset = max(raw_offsets) + 1 if raw_offsets else store.next_offset
        with spent_by("dedup"):
            store.remember(out.remember, next_offset, out.stream_time, events[-1].offset + 1)
            store.forget_before(out.stream_time - self.window_ms)
        self.counters.passed += len(out.passed)
        self.counters.duplicates += decoded - len(out.passed)
        self.counters.dead_lettered += len(records) - len(out.passed)

    def decide(self, partition: int, store: SeenStore, events: Sequence[InputRecord], now_ms: float) -> tuple[list[Record], Sightings, int]:
        """(records to write: first sightings and dead letters, the dedup decision, how many records decoded) for a
        batch, before anything is written. Whatever one record raises costs that record, never the partition."""
        decoded: list[tuple[RawEvent, bytes]] = []
        records: list[Record] = []
        for message in events:
            try:
                decoded.append((self.decode(message.value, now_ms + MAX_AHEAD_MS), message.value))
            except RETRIED:
                raise
            except Exception as exc:
                records.append(self.dead_letters.record(exc, topic=message.topic, partition=partition, offset=message.offset,
                                                        key=message.key, value=message.value))  # fmt: skip
        out = first_sightings([raw for raw, _ in decoded], store, self.window_ms, store.stream_time)
        for index, stream_time in out.passed:
            raw, value = decoded[index]  # forward the accepted bytes as they are: no re-encoding
            records.append(Record(self.raw_topic, raw["message_id"].encode(), value, partition, stream_time))
        return records, out, len(decoded)

    def decode(self, value: bytes | None, latest_ms: float) -> RawEvent:
        """The stage's decode step: a RawEvent as the ingest writes it, received no later than `latest_ms`."""
        if value is None:
            raise UndecodableError("empty record (no value)")
        if len(value) > MAX_RECORD_BYTES:  # it is passed on as it is: it must fit a record of ours
            raise InvalidRecord(f"{len(value)} bytes, more than any call the ingest accepts ({MAX_RECORD_BYTES} at most)")
        raw = self.codec.decode(value)
        checks.raw_event(raw)
        if raw["received_at"] > latest_ms:
            raise InvalidRecord(f"received_at {raw['received_at']} is more than {MAX_AHEAD_MS // 60_000} minutes ahead "
                                f"of this worker's clock ({int(latest_ms) - MAX_AHEAD_MS})")  # fmt: skip
        return raw  # type: ignore[return-value]

    def _open_store(self, partition: int) -> SeenStore:
        store = self._stores.get(partition)
        if store is None:
            store = self._stores[partition] = SeenStore(self.store_dir / f"{self.raw_topic}-{partition}")
            self._stale.add(partition)
        return store

    async def _ready_store(self, partition: int) -> SeenStore:
        store = self._open_store(partition)
        if partition in self._stale:
            try:
                found = await asyncio.to_thread(self._catch_up, partition, store)
            except KafkaException as exc:  # broker away: retried by the caller, like a write Kafka refused
                raise DeliveryFailed(f"can't read {self.raw_topic}[{partition}] to catch up: {exc}") from exc
            self.counters.caught_up += found
            self._stale.discard(partition)
        return store

    def _catch_up(self, partition: int, store: SeenStore) -> int:
        """Bring the store up to the end of its raw partition; returns how many sightings it read."""
        consumer = catch_up_consumer(self.bootstrap, f"{self.raw_topic}.dedup-catch-up")
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.raw_topic, partition), timeout=30)
            _, accepted_high = consumer.get_watermark_offsets(TopicPartition(self.accepted_topic, partition), timeout=30)
            if (store.next_offset or 0) > high or store.next_input > accepted_high:
                log.warning("dedup: %s[%d] or its input is shorter than the store remembers: topics were recreated; "
                            "resetting the store", self.raw_topic, partition)  # fmt: skip
                store.reset()
            start = store.next_offset
            if start is None or start < low:
                start = self._rebuild_start(consumer, partition, low, high)
            found = self._read_sightings(consumer, partition, start, high, store)
            if found:
                log.info("dedup: partition %d caught up %d sightings from %s", partition, found, self.raw_topic)
            return found
        finally:
            consumer.close()

    def _rebuild_start(self, consumer: Consumer, partition: int, low: int, high: int) -> int:
        """Where a store without history starts reading: one window (plus grace) of stream time before raw's end.

        Stream time, not the wall clock: a worker working through a backlog decides at the backlog's time.
        """
        if high <= low:
            return high
        consumer.assign([TopicPartition(self.raw_topic, partition, high - 1)])
        last = next((m for m in consumer.consume(num_messages=1, timeout=10.0) if m.error() is None), None)
        if last is None:
            return low
        since = last.timestamp()[1] - self.window_ms - CATCH_UP_GRACE_MS
        found = consumer.offsets_for_times([TopicPartition(self.raw_topic, partition, max(since, 0))], timeout=30)
        return found[0].offset if found[0].offset >= 0 else low

    def _read_sightings(self, consumer: Consumer, partition: int, start: int, high: int, store: SeenStore) -> int:
        """Read raw[partition] from `start` to `high` into the store, in chunks so memory stays flat."""
        fresh = store.next_offset is None
        found = 0
        chunk: dict[str, int] = {}

        def take(message: Any) -> None:
            chunk[message.key().decode()] = message.timestamp()[1]  # the stream time it passed at

        def flush(position: int) -> None:
            nonlocal found
            # A store that existed keeps its own stream time: the re-read inputs then get the same decisions as
            # before the crash. A new store takes the newest time it has seen.
            stream_time = max(chunk.values(), default=0) if fresh else store.stream_time
            store.remember(chunk, position, stream_time)
            found += len(chunk)
            chunk.clear()

        read_chunks(consumer, self.raw_topic, partition, start, high, CATCH_UP_CHUNK, take, flush)
        if store.next_offset is None:
            store.remember({}, high, 0)
        return found

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


SPEC = StageSpec(
    "dedup", "cdp worker (stage 'dedup', read in batches beneath Faust)", (EVENTS_ACCEPTED,), (EVENTS_RAW, EVENTS_DEAD_LETTER),
    ("seen-by-message-id: RocksDB per partition, changelog = events.raw",),
    "first sighting of each messageId within ingest.dedup_window passes, to the same partition number",
    (EVENTS_ACCEPTED, EVENTS_RAW),
)  # fmt: skip


def wire(w: Wiring) -> DedupStage:
    """events.accepted into events.raw, one SeenStore per partition."""
    settings, codecs = w.settings, w.codecs
    return DedupStage(
        accepted_topic=EVENTS_ACCEPTED.name(settings),
        raw_topic=EVENTS_RAW.name(settings),
        dead_letter_topic=EVENTS_DEAD_LETTER.name(settings),
        codec=codecs.for_topic(EVENTS_ACCEPTED),
        dead_letter_codec=codecs.for_topic(EVENTS_DEAD_LETTER),
        window_ms=settings.ingest.dedup_window_ms,
        store_dir=w.stage_dir("dedup"),
        bootstrap=settings.kafka_bootstrap,
        producer=w.producer,
    )
