"""An asyncio face on confluent-kafka's producer: await a group of writes until Kafka acknowledged them.

librdkafka batches, retries and keeps order per partition (idempotent, acks=all) on its own threads; we only
need to know when every record of a group is safely written, e.g. before answering an HTTP request with
200 or before remembering that a batch was passed on. One future per group, not per record, keeps that cheap.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import confluent_kafka

from agents.errors import DeliveryFailed


MAX_RECORD_BYTES = 900_000  # what a stage lets one record grow to: under librdkafka's 1,000,000-byte message.max.bytes


@dataclass(frozen=True)
class Record:
    """One record to write; `partition=None` lets the murmur2 partitioner pick by key, as Faust does."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Written:
    """Where Kafka put a record."""

    topic: str
    partition: int
    offset: int


class _Group:
    """The pending writes of one `write_all` call; callbacks arrive on the poll thread, one at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, on_fatal: Callable[[], None]) -> None:
        self.loop = loop
        self.on_fatal = on_fatal
        self.future: asyncio.Future[list[Written]] = loop.create_future()
        self.remaining = size
        self.written: list[Written | None] = [None] * size
        self.error: str | None = None

    def on_delivery(self, index: int, error: Any, message: Any) -> None:
        if error is not None:
            self.error = self.error or f"{error.str()} (topic {message.topic()})"
            if error.fatal():
                self.on_fatal()
        else:
            self.written[index] = Written(message.topic(), message.partition(), message.offset())
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(DeliveryFailed(f"Kafka did not acknowledge the write: {self.error}"))
        else:
            self.future.set_result([w for w in self.written if w is not None])


def producer_config(bootstrap: str, delivery_timeout_ms: int, **overrides: Any) -> dict[str, Any]:
    """Settings for writes that must not be lost or reordered, and that Faust partitions the same way."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",  # Faust (aiokafka) uses murmur2: same key, same partition
        "message.timeout.ms": delivery_timeout_ms,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        **overrides,
    }


class AsyncProducer:
    """One librdkafka producer per process, polled by a daemon thread.

    After a fatal error (e.g. the idempotent producer's sequence broke) librdkafka refuses every further write;
    the next `write_all` then starts a new producer instead of failing forever.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._producer = confluent_kafka.Producer(config)
        self._fatal = False
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.05)

    def _mark_fatal(self) -> None:
        self._fatal = True

    def _renew_if_fatal(self) -> None:
        if self._fatal:
            old, self._producer, self._fatal = self._producer, confluent_kafka.Producer(self._config), False
            old.purge()  # its queue can never be delivered: fail those writes now ...
            old.flush(0)  # ... by serving their (error) delivery reports, which the poll thread no longer does

    async def write_all(self, records: Sequence[Record]) -> list[Written]:
        """Write every record; returns when Kafka acknowledged all, raises DeliveryFailed if any failed."""
        if not records:
            return []
        self._renew_if_fatal()
        group = _Group(asyncio.get_running_loop(), len(records), self._mark_fatal)
        for index, record in enumerate(records):
            kwargs: dict[str, Any] = {"key": record.key, "value": record.value}
            if record.partition is not None:
                kwargs["partition"] = record.partition
            if record.timestamp_ms is not None:
                kwargs["timestamp"] = record.timestamp_ms
            if record.headers:
                kwargs["headers"] = list(record.headers)
            callback = lambda error, message, index=index: group.on_delivery(index, error, message)  # noqa: E731
            while True:
                try:
                    self._producer.produce(record.topic, on_delivery=callback, **kwargs)
                    break
                except BufferError:  # local queue full: let librdkafka drain, then go on
                    await asyncio.sleep(0.01)
        return await group.future

    def queued(self) -> int:
        """Records written but not yet acknowledged (librdkafka's queue)."""
        return len(self._producer)

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued; returns how many records were still unacknowledged at the timeout."""
        remaining = self._producer.flush(timeout)
        self._stopping.set()
        self._poller.join(timeout=1.0)
        return remaining


class LazyProducer:
    """The worker's confluent-kafka producer, created on first use: importing the app must not connect."""

    def __init__(self, settings: Any) -> None:
        """`settings`: topology.config.Settings (its bootstrap and delivery timeout)."""
        self._settings = settings
        self._producer: AsyncProducer | None = None

    def __call__(self) -> AsyncProducer:
        if self._producer is None:
            config = producer_config(self._settings.kafka_bootstrap, self._settings.ingest.delivery_timeout_ms)
            self._producer = AsyncProducer(config)
        return self._producer
