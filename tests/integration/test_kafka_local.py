"""The embedded broker of `topology/ops/kafka_local.py` is a real, durable Kafka that `cdp kafka` can manage.

Proves, against one broker started from the Maven-fetched jars in a temp data dir on free ports:
a fresh start answers metadata and round-trips a record (acks=all, a consumer group, a transaction);
`status()` sees the process, its reachability and RSS; a second `start()` adopts the running broker;
a broker killed with SIGKILL starts again over the same data and still has the record written before;
a port held by someone else is named in the error; a cached runtime needs no Maven; `stop()` ends it.
The jars are cached in CDP_KAFKA_RUNTIME_DIR (default <repo>/.cache/kafka-runtime), fetched once per checkout.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agents.errors import LocalKafkaError
from tests.conftest import runtime_dir
from tests.support import free_ports
from topology.ops.kafka_local import LocalKafka, Started, is_reachable, wait_for_metadata

pytestmark = pytest.mark.integration

RUNTIME_DIR = runtime_dir()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    port, controller_port = free_ports(2)
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), RUNTIME_DIR, port=port, controller_port=controller_port)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def started(kafka: LocalKafka) -> Started:
    """The module's one fresh start (format + spawn); later tests reuse the running broker."""
    return kafka.start()


def create_topic(bootstrap: str) -> str:
    topic = f"test.kafka-local.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # held: a destroyed client cancels its futures
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    return topic


def produce(bootstrap: str, topic: str, key: bytes, value: bytes, **conf: str) -> None:
    """Write one record and fail unless the broker acknowledged it with acks=all."""
    errors: list[KafkaError] = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **conf})
    if "transactional.id" in conf:
        producer.init_transactions(30)
        producer.begin_transaction()
    producer.produce(topic, value, key, on_delivery=lambda err, _msg: errors.append(err) if err else None)
    if "transactional.id" in conf:
        producer.commit_transaction(30)
    assert producer.flush(30) == 0 and not errors, errors


def consume_all(bootstrap: str, topic: str, expected: int, **conf: str) -> list[tuple[bytes | None, bytes | None]]:
    """Read `topic` from the start through a new consumer group until `expected` records arrived."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", **conf})
    consumer.subscribe([topic])
    records: list[tuple[bytes | None, bytes | None]] = []
    deadline = time.monotonic() + 30
    try:
        while len(records) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                records.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return records


def test_a_fresh_start_serves_metadata_and_round_trips_a_record(kafka: LocalKafka, started: Started) -> None:
    assert not started.already_running
    assert started.bootstrap == kafka.bootstrap
    assert (kafka.data_dir / "logs" / "meta.properties").exists()
    wait_for_metadata(kafka.bootstrap, timeout=5)
    topic = create_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, b"user-1", b"hello")
    assert consume_all(kafka.bootstrap, topic, 1) == [(b"user-1", b"hello")]


def test_transactions_work_on_one_node(kafka: LocalKafka, started: Started) -> None:
    topic = create_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, b"k", b"committed", **{"transactional.id": f"tx-{topic}"})
    assert consume_all(kafka.bootstrap, topic, 1, **{"isolation.level": "read_committed"}) == [(b"k", b"committed")]


def test_status_sees_a_running_reachable_broker_and_its_memory(kafka: LocalKafka, started: Started) -> None:
    status = kafka.status()
    assert status.running and status.reachable
    assert status.pid == kafka.start().pid
    assert status.bootstrap == kafka.bootstrap
    assert status.rss_bytes is not None and status.rss_bytes > 50 * 2**20


def test_a_second_start_adopts_the_running_broker(kafka: LocalKafka, started: Started) -> None:
    pid = kafka.status().pid
    again = kafka.start()
    assert again.already_running
    assert again.pid == pid


def test_a_broker_killed_with_sigkill_restarts_with_its_data(kafka: LocalKafka, started: Started) -> None:
    kafka.start()
    topic = create_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, b"user-2", b"before the crash")
    old_pid = kafka.status().pid

    kafka.kill()
    crashed = kafka.status()
    assert not crashed.running and not crashed.reachable
    assert (kafka.data_dir / "kafka.pid").exists()  # stale, as after a real crash

    restarted = kafka.start()
    assert not restarted.already_running
    assert restarted.pid != old_pid
    assert consume_all(kafka.bootstrap, topic, 1) == [(b"user-2", b"before the crash")]


@pytest.mark.parametrize("which", ["port", "controller_port"])
def test_a_port_taken_by_someone_else_is_named(tmp_path: Path, which: str) -> None:
    port, other = free_ports(2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        broker_port, controller_port = (port, other) if which == "port" else (other, port)
        with pytest.raises(LocalKafkaError, match=f"port {port}"):
            LocalKafka(tmp_path, RUNTIME_DIR, port=broker_port, controller_port=controller_port).start(timeout=10)
    assert not (tmp_path / "kafka.pid").exists()


def test_a_cached_runtime_needs_no_maven(kafka: LocalKafka, started: Started, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    libs = kafka.install()
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn, no java
    assert kafka.install() == libs
    assert any(libs.glob("kafka_2.13-*.jar"))
    with pytest.raises(LocalKafkaError, match="Maven is needed once"):
        LocalKafka(tmp_path / "data", tmp_path / "empty-runtime").install()


def test_stop_ends_the_broker(kafka: LocalKafka, started: Started) -> None:
    kafka.start()
    assert kafka.stop() is True
    status = kafka.status()
    assert not status.running and status.pid is None and status.rss_bytes is None
    assert not is_reachable(kafka.bootstrap)
    assert not (kafka.data_dir / "kafka.pid").exists()
    assert kafka.stop() is False
