"""Bringing a stage's local store to the end of its changelog partition (read_committed: whole batches only).

The local copy is a cache of the changelog: caught up from the offset it remembers, rebuilt from scratch when it
is older than compaction keeps tombstones (STALE_AFTER_MS) or the changelog is shorter than it remembers (the
topics were recreated).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from agents.errors import DeliveryFailed
from topology.codecs import AvroCodec
from topology.runtime.memo_packs import CATCH_UP_ENTRIES, mark_legacy, unpack
from topology.runtime.partition_reader import catch_up_consumer, read_chunks
from topology.runtime.state_store import StateStore

log = logging.getLogger(__name__)
CATCH_UP_CHUNK = 20_000
STALE_AFTER_MS = 20 * 3_600_000  # under the changelog's delete.retention.ms (Kafka's default: 24 h)
SETTLE_POLL_S = 0.05


def wait_settled(bootstrap: str, topic: str, partition: int, timeout_s: float) -> None:
    """Return once no transaction is open on topic[partition]: its last stable offset (the end a read_committed
    reader is given) has reached its end. A new owner calls it before catching up: a previous owner's transaction
    still open either commits (and the catch-up then reads it) or is aborted (the group fenced it, or the broker
    timed it out), so the store ends up where the changelog will stay. DeliveryFailed after `timeout_s`."""
    stable_reader = catch_up_consumer(bootstrap, f"{topic}.catch-up", read_committed=True)
    end_reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}.catch-up", "enable.auto.commit": False,
                           "isolation.level": "read_uncommitted"})  # librdkafka's default is read_committed  # fmt: skip
    tp = TopicPartition(topic, partition)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            _, stable = stable_reader.get_watermark_offsets(tp, timeout=10)
            _, end = end_reader.get_watermark_offsets(tp, timeout=10)
            if stable >= end:
                return
            if time.monotonic() > deadline:
                raise DeliveryFailed(f"{topic}[{partition}] still has a transaction open at offset {stable} after {timeout_s:.0f}s")
            time.sleep(SETTLE_POLL_S)
    finally:
        stable_reader.close()
        end_reader.close()


def catch_up(store: StateStore, bootstrap: str, topic: str, partition: int, codec: AvroCodec, stage: str,
             memos: Sequence[str] = ()) -> int:  # fmt: skip
    """Bring `store` to the end of topic[partition]; returns how many entries it applied. Blocking. `memos`: the
    stage's memo kinds, whose packs are unpacked (topology/runtime/memo_packs.py)."""
    consumer = catch_up_consumer(bootstrap, f"{topic}.catch-up", read_committed=True)  # whole batches
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
        start = store.changelog_next
        if start is not None and store.applied_at is not None and time.time() * 1000 - store.applied_at > STALE_AFTER_MS:
            log.info("%s: %s[%d]: the local store is older than compaction keeps tombstones; rebuilding", stage, topic, partition)
            store.reset()
            start = None
        if start is not None and start > high:
            log.warning("%s: %s[%d] is shorter than the store remembers: topics were recreated; resetting", stage, topic, partition)
            store.reset()
            start = None
        if memos:
            mark_legacy(store, memos)
        found = 0
        chunk: dict[str, bytes | None] = {}

        def take(message: Any) -> None:
            value = message.value()
            chunk.update(unpack(message.key().decode(), None if value is None else codec.decode(value)["record"], memos))

        def flush(position: int) -> None:
            nonlocal found
            store.apply(chunk, position)
            found += len(chunk)
            chunk.clear()

        read_chunks(consumer, topic, partition, max(start or 0, low), high, CATCH_UP_CHUNK, take, flush,
                    full=lambda: len(chunk) >= CATCH_UP_ENTRIES)  # a memo pack unpacks to thousands of entries
        if store.changelog_next is None:
            store.apply({}, high)
        return found
    finally:
        consumer.close()
