"""A stage's transactions on a real broker: one transaction for many partitions, fenced by the consumer group
(KIP-447) instead of a transactional id per partition, and a new owner waiting for a transaction left open.

The worker tests (crash, rebalance) run these inside whole pipelines; this one pins each rule on its own: a
transaction committing offsets as the group's current member goes through; as a member of a past generation (a
worker that lost its partitions in a rebalance it did not see) it is refused and nothing of it is visible to a
read_committed reader; `wait_settled` returns only once a transaction still open on a partition is finished.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.errors import DeliveryFailed
from topology.runtime.changelog_catch_up import wait_settled
from topology.runtime.producer import Record
from topology.runtime.transactional import TransactionalWriter, group_metadata, transactional_id

PARTITIONS = 3


def _topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names]).values():
        future.result(timeout=30)


def _member(bootstrap: str, group: str, topic: str) -> Consumer:
    """A consumer that joined `group` (its generation is the group's current one)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "the consumer never joined its group"
        consumer.poll(0.2)
    return consumer


def _committed_values(bootstrap: str, topic: str) -> list[bytes]:
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex[:6]}",
                       "isolation.level": "read_committed", "enable.partition.eof": True, "auto.offset.reset": "earliest"})  # fmt: skip
    reader.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    values, ended = [], set()
    deadline = time.monotonic() + 30
    while len(ended) < PARTITIONS and time.monotonic() < deadline:
        for message in reader.consume(100, 0.5):
            if message.error() is None:
                values.append(message.value())
            else:
                ended.add(message.partition())
    reader.close()
    return sorted(values)


def test_a_transaction_commits_as_the_current_member_and_is_refused_as_a_past_one(kafka_bootstrap: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    inputs, changelog, output, group = f"in-{run}", f"state-{run}", f"out-{run}", f"g-{run}"
    _topics(kafka_bootstrap, inputs, changelog, output)
    member = _member(kafka_bootstrap, group, inputs)
    metadata = member.consumer_group_metadata()
    ours = transactional_id(tmp_path, changelog)
    assert ours == transactional_id(tmp_path, changelog)  # kept: a restarted worker fences its earlier self
    writer = TransactionalWriter(kafka_bootstrap, ours)
    try:
        generation, member_id = struct.unpack("=i", metadata[7:11])[0], metadata[11:].split(b"\0")[1].decode()
        rebuilt = group_metadata(group, generation, member_id)
        assert rebuilt == metadata  # what the stage builds from Faust's consumer is what librdkafka writes

        after = writer.write(changelog, [(0, b"a", b"state-a"), (2, b"b", b"state-b"), (2, b"c", b"state-c")],
                             [Record(output, b"k", b"out-1", partition=1)], {(inputs, 0): 5, (inputs, 1): 7}, rebuilt)  # fmt: skip
        assert after == {0: 1, 2: 2}  # per changelog partition: the offset after its last record
        committed = member.committed([TopicPartition(inputs, p) for p in range(PARTITIONS)], timeout=10)
        assert [tp.offset for tp in committed][:2] == [5, 7]

        stale = group_metadata(group, generation - 1, member_id)  # a member before the last rebalance
        with pytest.raises(DeliveryFailed):
            writer.write(changelog, [(1, b"zombie", b"state-zombie")], [Record(output, b"k", b"out-zombie", partition=0)],
                         {(inputs, 0): 9}, stale)  # fmt: skip
        with pytest.raises(DeliveryFailed):
            writer.write(changelog, [(1, b"x", b"y")], [], {}, rebuilt)  # no offsets: nothing would fence it
        assert _committed_values(kafka_bootstrap, changelog) == [b"state-a", b"state-b", b"state-c"]
        assert _committed_values(kafka_bootstrap, output) == [b"out-1"]
        committed = member.committed([TopicPartition(inputs, 0)], timeout=10)
        assert committed[0].offset == 5

        after = writer.write(changelog, [(1, b"d", b"state-d")], [], {(inputs, 0): 6}, rebuilt)  # it goes on after a refusal
        assert list(after) == [1] and after[1] > 0
        assert _committed_values(kafka_bootstrap, changelog) == [b"state-a", b"state-b", b"state-c", b"state-d"]
        assert member.committed([TopicPartition(inputs, 0)], timeout=10)[0].offset == 6
    finally:
        writer.close()
        member.close()


def test_a_new_owner_waits_for_a_transaction_left_open_on_its_partition(kafka_bootstrap: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    changelog = f"state-{run}"
    _topics(kafka_bootstrap, changelog)
    previous = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"previous-{run}"})
    previous.init_transactions(10)
    previous.begin_transaction()
    previous.produce(changelog, b"v", b"k", partition=1)
    previous.flush(10)
    wait_settled(kafka_bootstrap, changelog, 0, timeout_s=5)  # another partition: nothing open there
    with pytest.raises(DeliveryFailed):
        wait_settled(kafka_bootstrap, changelog, 1, timeout_s=1)
    started = time.monotonic()
    threading.Timer(1.0, lambda: previous.commit_transaction(10)).start()
    wait_settled(kafka_bootstrap, changelog, 1, timeout_s=10)
    assert time.monotonic() - started >= 0.9  # it waited for the commit
    assert _committed_values(kafka_bootstrap, changelog) == [b"v"]
