"""Reading one partition from an offset to a known end, in chunks: how a stage's store catches up.

Both stores (dedup's SeenStore from events.raw, identity's from identity.state) rebuild the same way: assign
the partition at the store's offset, read up to the high watermark taken before, and hand each chunk to the
store together with the offset it reaches, so memory stays flat and a crash mid-way resumes from the last
chunk. `enable.partition.eof` ends the read at a partition end that is below the watermark (transaction
markers of a read_committed reader take offsets but are never delivered).
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition


def catch_up_consumer(bootstrap: str, group: str, *, read_committed: bool = True) -> Consumer:
    """A consumer that is only ever `assign`ed and never commits. read_committed (librdkafka's default, and what
    every caller needs: compute's backfill reads identity's transactional `events.resolved`) sees whole committed
    transactions only; said explicitly, since the default used to read as if it were read_uncommitted."""
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "enable.partition.eof": True,
                     "isolation.level": "read_committed" if read_committed else "read_uncommitted"})  # fmt: skip


def read_chunks(consumer: Consumer, topic: str, partition: int, start: int, high: int, chunk_size: int,
                take: Callable[[Message], None], flush: Callable[[int], None], full: Callable[[], bool] | None = None) -> None:  # fmt: skip
    """`take` every record of topic[partition] from `start` to `high`; `flush(position)` after every
    `chunk_size` records, whenever `full()` says what was taken is big enough, and at the end, with the offset
    reached (never beyond `high`)."""
    position, taken = start, 0
    if start < high:
        consumer.assign([TopicPartition(topic, partition, start)])
    while position < high:
        for message in consumer.consume(num_messages=10_000, timeout=1.0):
            error = message.error()
            if error is None:
                take(message)
                taken += 1
                position = message.offset() + 1
                if full is not None and full():
                    flush(min(position, high))
                    taken = 0
            elif error.code() == KafkaError._PARTITION_EOF:
                position = high
            else:
                raise KafkaException(error)
        if taken >= chunk_size or position >= high:
            flush(min(position, high))
            taken = 0


def read_range(consumer: Consumer, topic: str, partition: int, start: int, end: int, limit: int) -> tuple[list[Message], int]:
    """Up to `limit` records of topic[partition] from `start` (before `end`), and the offset to go on from."""
    consumer.assign([TopicPartition(topic, partition, start)])
    taken: list[Message] = []
    position = start
    while position < end and len(taken) < limit:
        for message in consumer.consume(num_messages=min(limit - len(taken), 10_000), timeout=1.0):
            error = message.error()
            if error is None:
                if message.offset() >= end:
                    return taken, end
                taken.append(message)
                position = message.offset() + 1
            elif error.code() == KafkaError._PARTITION_EOF:
                return taken, end  # nothing more before `end`
            else:
                raise KafkaException(error)
    return taken, min(position, end)
