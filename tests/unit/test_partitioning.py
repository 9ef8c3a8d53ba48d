"""Which partition a key is on: every stage routes and checks by it, so it must be the partition Kafka's clients
pick (aiokafka's murmur2 in Faust, librdkafka's murmur2_random in our producers)."""

from __future__ import annotations

from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from topology.runtime.partitioning import key_partition, murmur2, partition_for


@given(st.binary(max_size=80))
def test_our_murmur2_is_kafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


@given(st.text(max_size=40), st.integers(1, 64))
def test_a_key_has_one_partition_as_text_or_as_bytes(key: str, partitions: int) -> None:
    assert partition_for(key, partitions) == key_partition(key.encode(), partitions) == (aiokafka_murmur2(key.encode()) & 0x7FFFFFFF) % partitions
