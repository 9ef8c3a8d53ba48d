"""All-or-nothing writes to one partition of a changelog, with the partition's previous owner fenced off.

A stage's batch of state changes is many records; written one by one, a SIGKILL or a refused record can leave a
prefix on the changelog that a later catch-up would take for the whole batch. One Kafka transaction per batch
makes the changelog hold whole batches only (readers use `isolation.level=read_committed`), and a
`transactional.id` per partition makes a new owner's `init_transactions` fence any older writer of it (a worker
cut off by a rebalance), which then can't write there at all. Blocking calls: run them in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaException

from agents.errors import DeliveryFailed
from topology.runtime.producer import Record, producer_config

TRANSACTION_TIMEOUT_MS = 60_000


class TransactionalWriter:
    """One transactional producer for one partition of one topic."""

    def __init__(self, bootstrap: str, topic: str, partition: int, timeout_s: float = 30.0) -> None:
        self.topic, self.partition, self.timeout_s = topic, partition, timeout_s
        config = producer_config(
            bootstrap, TRANSACTION_TIMEOUT_MS,
            **{"transactional.id": f"{topic}-{partition}", "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS},
        )  # fmt: skip
        self._producer = confluent_kafka.Producer(config)
        self.broken = False
        try:
            self._producer.init_transactions(timeout_s)
        except KafkaException as exc:
            raise DeliveryFailed(f"can't start transactions on {topic}[{partition}]: {exc.args[0].str()}") from exc

    def write(self, records: Sequence[tuple[bytes, bytes | None]], atomic: Sequence[Record] = ()) -> list[int]:
        """Write (key, value) records to the partition, and `atomic` records to their own topics, as one
        transaction; returns the partition records' offsets. Raises DeliveryFailed (nothing of the batch is
        visible then); after a fatal error (fenced: another owner took over) `broken` is set."""
        offsets: list[int] = []
        errors: list[str] = []

        def delivered(error: object, message: confluent_kafka.Message) -> None:
            if error is not None:
                errors.append(str(error))
            else:
                offsets.append(message.offset())

        def checked(error: object, message: confluent_kafka.Message) -> None:
            if error is not None:
                errors.append(str(error))

        producer = self._producer
        try:
            producer.begin_transaction()
            for key, value in records:
                self._produce(self.topic, key, value, self.partition, delivered)
            for record in atomic:
                self._produce(record.topic, record.key, record.value, record.partition, checked)
            producer.flush(self.timeout_s)
            if errors:
                raise DeliveryFailed(f"{self.topic}[{self.partition}]: {errors[0]}")
            producer.commit_transaction(self.timeout_s)
        except KafkaException as exc:
            error = exc.args[0]
            self.broken = bool(error.fatal())
            if not self.broken:
                self._abort()
            raise DeliveryFailed(f"transaction on {self.topic}[{self.partition}] failed: {error.str()}") from exc
        except DeliveryFailed:
            self._abort()
            raise
        return offsets

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None, on_delivery: Any) -> None:
        kwargs = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=on_delivery, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.01)

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(self.timeout_s)
        except KafkaException:
            self.broken = True  # can't tell where it stands: start over with a new producer

    def close(self) -> None:
        self._producer.flush(1.0)
