"""`cdp replay --from TIME [--to TIME]`: re-drive a time range of cdp.events.raw through identity and compute.

Each partition's records whose Kafka timestamp falls in the range (found with offsets_for_times; the end fixed
when the replay starts, so its own copies are never replayed again) are written again to the same partition
of cdp.events.raw, unchanged. The stages downstream are idempotent per messageId: identity resolves an event to
the profile it resolved to before (or its survivor), compute counts a messageId once — so replaying what was
processed changes nothing, while an event that never got through (dead-lettered before a fix, say) is counted
now. Replaying twice changes no count.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import confluent_kafka
from confluent_kafka import TopicPartition

from agents.durations import parse_duration_ms
from agents.errors import ConfigError, DeliveryFailed
from topology.config import Settings
from topology.runtime.partition_reader import catch_up_consumer, read_range
from topology.runtime.producer import producer_config
from topology.ops.progress import Progress
from topology.topics import EVENTS_RAW

CHUNK = 5_000


@dataclass(frozen=True)
class ReplaySummary:
    topic: str
    from_ms: int
    to_ms: int | None
    records: int
    partitions: dict[int, int]
    seconds: float

    def __str__(self) -> str:
        until = "now" if self.to_ms is None else _iso(self.to_ms)
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        spread = ", ".join(f"{p}: {n:,}" for p, n in sorted(self.partitions.items()) if n)
        return (f"replayed {self.records:,} records of {self.topic} from {_iso(self.from_ms)} to {until} in "
                f"{self.seconds:.1f}s ({rate:,.0f}/s){f' — per partition {spread}' if spread else ''}. Identity and "
                "compute take them idempotently: a messageId counted before is not counted again.")  # fmt: skip


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Epoch ms from ISO 8601 (`2026-11-20T10:00:00Z`), epoch milliseconds, or a duration ago (`2h`, `30m`)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if re.fullmatch(r"\d{12,}", text):
        return int(text)
    try:
        return now_ms - parse_duration_ms(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"not a time: {text!r} (write 2026-11-20T10:00:00Z, epoch ms, or a duration ago like 2h)") from None
    if parsed.tzinfo is None:
        raise ConfigError(f"{text!r} has no time zone; add Z or +00:00")
    return int(parsed.timestamp() * 1000)


def replay(settings: Settings, from_ms: int, to_ms: int | None = None) -> ReplaySummary:
    if to_ms is not None and to_ms <= from_ms:
        raise ConfigError("--to must be after --from")
    topic = EVENTS_RAW.name(settings)
    consumer = catch_up_consumer(settings.kafka_bootstrap, f"{topic}.replay")
    producer = confluent_kafka.Producer(producer_config(settings.kafka_bootstrap, settings.ingest.delivery_timeout_ms))
    try:
        ranges = _ranges(consumer, topic, EVENTS_RAW.partition_count(settings), from_ms, to_ms)
        total = sum(end - start for start, end in ranges.values())
        progress, done, written = Progress(f"replay {topic}"), 0, {p: 0 for p in ranges}
        errors: list[str] = []

        def delivered(error: object, message: object) -> None:
            if error is not None:
                errors.append(str(error))

        for partition, (start, end) in sorted(ranges.items()):
            position = start
            while position < end:
                messages, position = read_range(consumer, topic, partition, position, end, CHUNK)
                for message in messages:
                    _produce(producer, topic, partition, message, delivered)
                if producer.flush(60) or errors:
                    raise DeliveryFailed(f"replay to {topic}[{partition}] failed: {errors[:1] or 'not acknowledged in 60s'}")
                written[partition] += len(messages)
                done += len(messages)
                progress.update(done, total, f"partition {partition}")
        seconds = progress.finish()
        return ReplaySummary(topic, from_ms, to_ms, done, written, seconds)
    finally:
        consumer.close()


def _ranges(consumer: confluent_kafka.Consumer, topic: str, partitions: int, from_ms: int, to_ms: int | None) -> dict[int, tuple[int, int]]:
    """[start, end) offsets per partition: the first record at or after `from_ms`, up to `to_ms` or today's end."""
    ranges = {}
    starts = consumer.offsets_for_times([TopicPartition(topic, p, from_ms) for p in range(partitions)], timeout=30)
    ends = consumer.offsets_for_times([TopicPartition(topic, p, to_ms) for p in range(partitions)], timeout=30) if to_ms else None
    for p in range(partitions):
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
        start = starts[p].offset if starts[p].offset >= 0 else high
        end = high if ends is None or ends[p].offset < 0 else ends[p].offset
        ranges[p] = (start, max(start, end))
    return ranges


def _produce(producer: confluent_kafka.Producer, topic: str, partition: int, message: confluent_kafka.Message, delivered: object) -> None:
    while True:
        try:
            producer.produce(topic, message.value(), message.key(), partition=partition, on_delivery=delivered)
            return
        except BufferError:
            producer.poll(0.05)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
