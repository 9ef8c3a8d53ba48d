"""Dead letters: a record a stage gave up on, kept with the reason and its original bytes.

Bad input never stops a stage and never vanishes: whatever an input record raises while it is decoded or
applied (a BadEventError, or any other exception: a bug must cost one record, not the partition), the stage
turns it into one of these — here, and only here — writes it to the dead-letter topic, and moves on to the
next record. Only Kafka being unreachable, a fenced writer and deliberate waits (agents/errors.py) are retried.
The sync stage's given-up deliveries are read back by destination (`sync_dead_letters`): the dead-letters view and
`cdp sync redeliver`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import TopicPartition

from agents.errors import CdpError
from agents.events import DeadLetter
from topology.codecs import AvroCodec
from topology.runtime.producer import Record

MAX_REASON_CHARS = 2_000  # an error message quoting a 200 KB value must not make a 200 KB dead letter
MAX_COPIED_BYTES = 400_000  # of the original key and of its value: a dead letter must itself fit a Kafka record


def describe(error: BaseException) -> str:
    """The error in words, bounded: our own errors' messages name the ids involved; anything else (a bug) is shown
    with its class, e.g. "KeyError('event')"."""
    shown = str(error) if isinstance(error, CdpError) else repr(error)
    return shown if len(shown) <= MAX_REASON_CHARS else shown[: MAX_REASON_CHARS - 1] + "…"


def dead_letter(
    *, stage: str, error: BaseException, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> DeadLetter:
    """The DeadLetter payload for one record read from `topic` at `partition`/`offset`. A key or value too large to
    copy whole is cut, and the reason says so (the original stays on its topic until retention)."""
    cut = [f"{name} of {len(data)} bytes cut to its first {MAX_COPIED_BYTES}" for name, data in (("key", key), ("value", value))
           if data is not None and len(data) > MAX_COPIED_BYTES]  # fmt: skip
    return DeadLetter(
        stage=stage,
        reason=f"{topic}[{partition}]@{offset}: {describe(error)}" + (f" ({'; '.join(cut)})" if cut else ""),
        error=type(error).__name__,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key if key is None else key[:MAX_COPIED_BYTES],
        value=value if value is None else value[:MAX_COPIED_BYTES],
        destination=None,
        attempts=0,
        failed_at=int(time.time() * 1000),
        http_status=None,
        response=None,
    )


@dataclass(frozen=True)
class DeadLetters:
    """Where one stage's dead letters go: `record` is the one way every stage turns an exception into one."""

    stage: str
    topic: str
    codec: AvroCodec

    def record(self, error: BaseException, *, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes | None) -> Record:  # fmt: skip
        letter = dead_letter(stage=self.stage, error=error, topic=topic, partition=partition, offset=offset, key=key, value=value)
        return Record(self.topic, key, self.codec.encode(letter))


@dataclass(frozen=True)
class SyncLetter:
    """A delivery the sync stage gave up, as read back from cdp.sync.dead-letter."""

    offset: int
    value: DeadLetter
    raw: bytes

    @property
    def delivery_id(self) -> str:
        try:
            return str(orjson.loads(self.value["value"] or b"{}").get("id"))
        except ValueError:
            return f"{self.value['topic']}[{self.value['partition']}]@{self.value['offset']}"


def sync_dead_letters(settings: Any, codecs: Any, destination: str, since_ms: int = 0) -> Iterator[SyncLetter]:
    """A destination's dead letters failed at or after `since_ms`, oldest first, up to the topic's end now. The topic
    is keyed by destination: they are all in one partition (shared with the destinations that hash there)."""
    from topology.runtime.partition_reader import catch_up_consumer, read_range
    from topology.runtime.partitioning import key_partition
    from topology.topics import SYNC_DEAD_LETTER

    topic, codec = SYNC_DEAD_LETTER.name(settings), codecs.for_topic(SYNC_DEAD_LETTER)
    partition = key_partition(destination.encode(), SYNC_DEAD_LETTER.partition_count(settings))
    consumer = catch_up_consumer(settings.kafka_bootstrap, f"{topic}.reader")
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
        position = low
        if since_ms:
            [found] = consumer.offsets_for_times([TopicPartition(topic, partition, since_ms)], timeout=30)
            position = high if found.offset < 0 else max(found.offset, low)
        while position < high:
            messages, position = read_range(consumer, topic, partition, position, high, 10_000)
            for message in messages:
                letter = codec.decode(message.value())
                if letter.get("destination") == destination and letter["failed_at"] >= since_ms and letter.get("key"):
                    yield SyncLetter(message.offset(), letter, message.value())
            if not messages:
                break
    finally:
        consumer.close()
