"""InputFeed on a real broker: what a stage reads beneath Faust, where a partition starts, and that a batch read
before a rebalance is never taken after it.

The worker tests (crash, rebalance, replay) run the feed inside whole pipelines; this one pins the rules a
stage relies on, one at a time: records come per partition in offset order; an (re)assigned partition starts
at the group's committed offset, or further where this feed itself got; a batch polled before a revocation or
a re-assignment is stale.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.errors import DeliveryFailed
from topology.runtime.input_feed import InputFeed, Polled

PARTITIONS = 2


def _topic(bootstrap: str) -> str:
    name = f"feed-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, PARTITIONS, 1)])[name].result(timeout=30)
    return name


def _write(bootstrap: str, topic: str, partition: int, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in values:
        producer.produce(topic, value, b"k", partition=partition)
    assert producer.flush(30) == 0


def _commit(bootstrap: str, group: str, topic: str, partition: int, offset: int) -> None:
    """A commit to a group without members, as an earlier owner's would stand."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
    consumer.close()


async def _poll_until(feed: InputFeed, count: int) -> list[Polled]:
    polled: list[Polled] = []
    for _ in range(500):
        polled.extend(await feed.poll())
        if sum(len(p.records) for p in polled) >= count:
            return polled
    raise AssertionError(f"only {sum(len(p.records) for p in polled)} of {count} records came")


def test_records_come_per_partition_in_order_from_the_committed_offset(kafka_bootstrap: str) -> None:
    topic, group = _topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    _write(kafka_bootstrap, topic, 0, [b"a%d" % n for n in range(10)])
    _write(kafka_bootstrap, topic, 1, [b"b%d" % n for n in range(10)])
    _commit(kafka_bootstrap, group, topic, 1, 4)  # partition 1 was processed up to 4; partition 0 never

    async def scenario() -> None:
        feed = InputFeed("t", kafka_bootstrap, group, [topic])
        with pytest.raises(DeliveryFailed):
            feed.commit_point([0])  # not read yet: no offset a transaction could commit for it
        await feed.assign({0, 1})
        assert feed.commit_point([0, 1]) == {(topic, 0): 0, (topic, 1): 4}  # where each starts: log start, committed
        polled = await _poll_until(feed, 16)
        offsets = {p: [r.offset for b in polled if b.partition == p for r in b.records] for p in (0, 1)}
        assert offsets == {0: list(range(10)), 1: list(range(4, 10))}
        for batch in polled:
            feed.done(batch)
        assert feed.commit_point([1]) == {(topic, 1): 10}
        values = [r.value for b in polled if b.partition == 1 for r in b.records]
        assert values == [b"b%d" % n for n in range(4, 10)]
        assert all(feed.current(b) for b in polled)
        assert feed.highwater(topic, 0) == 10
        await feed.close()

    asyncio.run(scenario())


def test_committed_offsets_pass_transaction_markers_so_a_drained_input_shows_no_lag(kafka_bootstrap: str) -> None:
    topic, group = _topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{topic}"})
    producer.init_transactions(30)
    for aborted in (False, True, False):
        producer.begin_transaction()
        for n in range(3):
            producer.produce(topic, b"aborted" if aborted else b"%d" % n, b"k", partition=0)
        producer.flush(30)  # on the log before the end: an abort would otherwise just drop them
        (producer.abort_transaction if aborted else producer.commit_transaction)(30)

    async def scenario() -> None:
        feed = InputFeed("t", kafka_bootstrap, group, [topic])
        await feed.assign({0})
        polled = await _poll_until(feed, 6)
        assert [r.value for b in polled for r in b.records] == [b"0", b"1", b"2"] * 2, "read_committed: nothing aborted"
        for _ in range(20):  # the last marker may come in a fetch of its own
            for batch in polled:
                feed.done(batch)
            if feed.to_commit().get((topic, 0)) == feed.highwater(topic, 0):
                break
            polled = await feed.poll()
        assert feed.to_commit() == {(topic, 0): 12}, "3 records + a marker, 3 aborted + a marker, 3 + a marker"
        await feed.close()

    asyncio.run(scenario())


def test_a_batch_read_before_a_rebalance_is_stale_and_the_partition_resumes_where_the_feed_got(kafka_bootstrap: str) -> None:
    topic, group = _topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    _write(kafka_bootstrap, topic, 0, [b"%d" % n for n in range(6)])

    async def scenario() -> None:
        feed = InputFeed("t", kafka_bootstrap, group, [topic], max_records=3)
        await feed.assign({0})
        first = await _poll_until(feed, 3)
        for batch in first:
            feed.done(batch)  # durable: 0..2
        assert feed.to_commit() == {(topic, 0): 3}
        second = await _poll_until(feed, 3)  # 3..5, read but not yet taken
        await feed.revoke({0})
        assert not any(feed.current(b) for b in second), "a batch of a revoked partition is stale"
        assert feed.to_commit() == {}, "nothing of a partition no longer ours is committed"
        await feed.assign({0})  # an eager rebalance gives it back
        assert not any(feed.current(b) for b in second), "and stays stale after the partition comes back"
        for batch in second:
            feed.done(batch)  # ignored: stale
        again = await _poll_until(feed, 3)
        assert [r.offset for b in again for r in b.records] == [3, 4, 5], "resumed after what was durable, nothing skipped"
        await feed.close()

    asyncio.run(scenario())
