"""All-or-nothing writes of a stage's cycle: its changelog records on every partition it touched, its outputs and
its input offsets in one Kafka transaction, with the previous owner of a partition fenced off.

A stage's batch of state changes is many records; written one by one, a SIGKILL or a refused record could leave a
prefix on the changelog that a later catch-up would take for the whole batch. One transaction makes the changelog
hold whole batches only (readers use `isolation.level=read_committed`).

One transaction per *cycle* (every partition a poll brought), not per partition: the broker writes a commit marker
into every partition a transaction touched and the stage's outputs spread over all partitions, so per-partition
transactions cost the broker (and the latency) that many times over (docs/benchmarks.md). A per-partition
`transactional.id` can then no longer fence a partition's previous owner; the group does (KIP-447): every
transaction commits its input offsets to the group with the member id and generation of Faust's consumer, and the
group coordinator refuses them — the transaction aborts — from a member of a past generation, i.e. a worker that
lost its partitions in a rebalance it did not see. A new owner waits for any transaction still open on the
changelog partition before it catches up (changelog_catch_up.wait_settled), so what it reads is final.

The `transactional.id` is the stage's and the worker's (kept in its data directory): a worker restarted on its
data aborts its own earlier incarnation's open transaction at once; one that never comes back leaves it to the
broker's `transaction.timeout.ms`. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaException, TopicPartition

from agents.errors import DeliveryFailed
from topology.runtime.producer import Record, producer_config

TRANSACTION_TIMEOUT_MS = 10_000  # Kafka Streams' default too: a dead writer's open transaction blocks readers this
# long, plus up to the broker's sweep for timed-out transactions (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s)
ABORT_SWEEP_MS = 10_000


def transactional_id(stage_dir: Path, state_topic: str) -> str:
    """The stage's transactional id on this worker: the changelog's name and an id kept in the worker's data, so it
    survives restarts and two workers never share one (they would fence each other)."""
    path = stage_dir / "transactional-id"
    if not path.exists():
        stage_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:12])
    return f"{state_topic}-{path.read_text().strip()}"


def group_metadata(group: str, generation: int, member: str, instance: str | None = None) -> bytes:
    """A consumer group member as librdkafka's `send_offsets_to_transaction` takes it (the bytes
    `Consumer.consumer_group_metadata()` returns, rd_kafka_consumer_group_metadata_write): the group's member is
    Faust's aiokafka consumer, not a librdkafka one, so the stage builds it from that consumer's generation."""
    instance_part = b"\x01" if instance is None else b"\x00" + instance.encode() + b"\x00"
    return b"CGMDv2:" + struct.pack("=i", generation) + group.encode() + b"\x00" + member.encode() + b"\x00" + instance_part


class TransactionalWriter:
    """One transactional producer for one stage of one worker."""

    def __init__(self, bootstrap: str, transactional: str, timeout_s: float = 30.0) -> None:
        self.transactional, self.timeout_s = transactional, timeout_s
        config = producer_config(
            bootstrap, TRANSACTION_TIMEOUT_MS,
            **{"transactional.id": transactional, "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS},
        )  # fmt: skip
        self._producer = confluent_kafka.Producer(config)
        self.broken = False
        try:
            self._producer.init_transactions(timeout_s)
        except KafkaException as exc:
            raise DeliveryFailed(f"can't start transactions as {transactional}: {exc.args[0].str()}") from exc

    def write(self, changelog: str, records: Sequence[tuple[int, bytes, bytes | None]], atomic: Sequence[Record],
              offsets: Mapping[tuple[str, int], int], group: bytes) -> dict[int, int]:  # fmt: skip
        """Write (partition, key, value) records to the changelog, `atomic` records to their own topics and commit
        `offsets` to the group as `group` (a member and its generation), as one transaction; returns, per changelog
        partition written, the offset after its last record. Raises DeliveryFailed (nothing of it is visible then:
        e.g. the group refused a past generation's offsets); after a fatal error `broken` is set."""
        after: dict[int, int] = {}
        errors: list[str] = []

        def delivered(error: object, message: confluent_kafka.Message) -> None:
            if error is not None:
                errors.append(str(error))
            else:
                partition = message.partition()
                after[partition] = max(after.get(partition, 0), message.offset() + 1)

        def checked(error: object, message: confluent_kafka.Message) -> None:
            if error is not None:
                errors.append(str(error))

        producer = self._producer
        try:
            producer.begin_transaction()
            for partition, key, value in records:
                self._produce(changelog, key, value, partition, delivered)
            for record in atomic:
                self._produce(record.topic, record.key, record.value, record.partition, checked)
            positions = [TopicPartition(topic, partition, offset) for (topic, partition), offset in sorted(offsets.items())]
            if not positions:
                raise DeliveryFailed(f"{changelog}: a transaction without input offsets would not be fenced by the group")
            # Every record on the log before the group takes the offsets: once it has (the generation was current),
            # a new owner of these partitions, of a later generation, finds this transaction open on its changelog
            # and waits for it (changelog_catch_up.wait_settled) instead of catching up past records still in flight.
            producer.flush(self.timeout_s)
            if errors:
                raise DeliveryFailed(f"{changelog}: {errors[0]}")
            producer.send_offsets_to_transaction(positions, group, self.timeout_s)
            producer.commit_transaction(self.timeout_s)
        except KafkaException as exc:
            error = exc.args[0]
            self.broken = bool(error.fatal())
            if not self.broken:
                self._abort()
            raise DeliveryFailed(f"transaction on {changelog} failed: {error.str()}") from exc
        except DeliveryFailed:
            self._abort()
            raise
        return after

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
