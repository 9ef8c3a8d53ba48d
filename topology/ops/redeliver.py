"""`cdp sync redeliver NAME [--since TIME]`: hand a destination's dead letters back to the sync stage.

The destination's dead letters (cdp.sync.dead-letter is keyed by destination, so they are all in one partition)
failed at or after `--since` are written, unchanged, to cdp.sync.redeliveries, keyed by their profile; the sync stage
queues each again with its id in its seq's place among the profile's deliveries — or skips it as *superseded* when
a newer change of the same profile and audience or trait was delivered since (agents/sync/queue.py), so
redelivery never reorders. The command then follows cdp.sync.outcomes until each is delivered, superseded or
given up again (or `timeout` passes), with a progress bar, and prints a summary.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from confluent_kafka import TopicPartition

from agents.errors import DeliveryFailed
from topology.codecs import Codecs
from topology.config import Settings
from topology.ops.progress import Progress
from topology.runtime.dead_letters import sync_dead_letters
from topology.runtime.partition_reader import catch_up_consumer
from topology.runtime.partitioning import key_partition
from topology.runtime.producer import Record, producer_config
from topology.topics import SYNC_OUTCOMES, SYNC_REDELIVERIES

FINAL = {"succeeded": "delivered", "superseded": "superseded", "dead_lettered": "dead-lettered again", "failed": "dead-lettered again"}


@dataclass(frozen=True)
class RedeliverySummary:
    destination: str
    letters: int
    results: Counter[str]
    seconds: float

    def __str__(self) -> str:
        if not self.letters:
            return f"no dead letters of {self.destination} to redeliver"
        pending = self.letters - sum(self.results.values())
        parts = [f"{count:,} {result}" for result, count in sorted(self.results.items())]
        if pending:
            parts.append(f"{pending:,} not settled yet (still queued or retrying)")
        return f"redelivered {self.letters:,} dead letters of {self.destination} in {self.seconds:.1f}s: {', '.join(parts)}"


def redeliver(settings: Settings, name: str, since_ms: int = 0, timeout_s: float = 600.0) -> RedeliverySummary:
    started = time.monotonic()
    codecs = Codecs(settings)
    outcomes_topic = SYNC_OUTCOMES.name(settings)
    outcomes_at = key_partition(name.encode(), SYNC_OUTCOMES.partition_count(settings))
    consumer = catch_up_consumer(settings.kafka_bootstrap, f"{outcomes_topic}.redeliver")
    try:
        _, follow_from = consumer.get_watermark_offsets(TopicPartition(outcomes_topic, outcomes_at), timeout=30)
    finally:
        consumer.close()
    by_id = {}
    for letter in sync_dead_letters(settings, codecs, name, since_ms):
        by_id[letter.delivery_id] = letter  # one redelivered and given up again: its latest letter
    if not by_id:
        return RedeliverySummary(name, 0, Counter(), time.monotonic() - started)
    _write([Record(SYNC_REDELIVERIES.name(settings), letter.value["key"], letter.raw) for letter in by_id.values()], settings)
    results = _follow(settings, codecs, outcomes_topic, outcomes_at, follow_from, name, set(by_id), timeout_s)
    return RedeliverySummary(name, len(by_id), results, time.monotonic() - started)


def _write(records: list[Record], settings: Settings) -> None:
    import confluent_kafka

    producer = confluent_kafka.Producer(producer_config(settings.kafka_bootstrap, 30_000))
    failed: list[str] = []
    for record in records:
        producer.produce(record.topic, key=record.key, value=record.value,
                         on_delivery=lambda error, _: failed.append(str(error)) if error else None)  # fmt: skip
        producer.poll(0)
    if producer.flush(60) or failed:
        raise DeliveryFailed(f"could not hand the dead letters back: {failed[:1] or 'timed out'}")


def _follow(settings: Settings, codecs: Codecs, topic: str, partition: int, start: int, name: str, ids: set[str],
            timeout_s: float) -> Counter[str]:  # fmt: skip
    results: dict[str, str] = {}
    progress = Progress(f"redeliver {name}")
    consumer = catch_up_consumer(settings.kafka_bootstrap, f"{topic}.redeliver")
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topic, partition, start)])
        while len(results) < len(ids) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                if message.error() is not None:
                    continue
                outcome = codecs.for_topic(SYNC_OUTCOMES).decode(message.value())
                if outcome["destination"] == name and outcome["idempotency_key"] in ids and outcome["status"] in FINAL:
                    results[outcome["idempotency_key"]] = FINAL[outcome["status"]]
            progress.update(len(results), len(ids))
    finally:
        consumer.close()
        progress.finish()
    return Counter(results.values())
