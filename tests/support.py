"""What the integration tests share: isolated settings per test, real processes, reading topics back.

Each test gets its own topic prefix on the one session broker, so tests never see each other's records, and
starts the real `cdp ingest` / `cdp worker` processes (not in-process fakes), so SIGKILL means SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import requests
import yaml
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from topology.ops.admin import ensure_topics
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.ops.kafka_local import free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_test"


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class Pipeline:
    """One isolated pipeline: its own topic prefix, config file, data dir and ports."""

    bootstrap: str
    root: Path
    partitions: int = 4
    extra_config: dict[str, Any] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    ingest_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "cdp.yaml"
        config = {
            "sources": [{"name": "test", "write_key": WRITE_KEY}],
            "topics": {"prefix": self.prefix, "partitions": self.partitions, "replication": 1},
            **self.extra_config,
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            **os.environ,
            "CDP_CONFIG": str(self.config_path),
            "CDP_KAFKA_BOOTSTRAP": self.bootstrap,
            "CDP_DATA_DIR": str(self.root / "data"),
            "CDP_INGEST_PORT": str(self.ingest_port),
            "CDP_WEB_PORT": str(self.web_port),
            **overrides,
        }

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    def create_topics(self) -> None:
        ensure_topics(self.settings)

    def start(self, command: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """Start `cdp <command>` as a real process and wait until it answers /health."""
        log = open(self.root / f"{command}-{len(self.processes)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "topology.ops.cli", command, *args], env=self.env(**env), stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )  # fmt: skip
        self.processes.append(process)
        port = int(env.get("CDP_WEB_PORT", self.web_port)) if command == "worker" else int(env.get("CDP_INGEST_PORT", self.ingest_port))
        wait_until(lambda: healthy(port) or process.poll() is not None, timeout=90, what=f"{command} /health")
        if process.poll() is not None:
            raise AssertionError(f"cdp {command} exited with {process.returncode}:\n{self.log_tail(command)}")
        return process

    def log_tail(self, command: str, lines: int = 40) -> str:
        logs = sorted(self.root.glob(f"{command}-*.log"))
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:]) if logs else ""

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            self.stop(process, timeout=20)

    def post(self, path: str, body: Any, *, write_key: str | None = WRITE_KEY, **kwargs: Any) -> requests.Response:
        auth = (write_key, "") if write_key is not None else None
        return requests.post(f"{self.url}{path}", json=body, auth=auth, timeout=90, **kwargs)

    def wait_processed(self, timeout: float = 120) -> None:
        """Until the worker group has committed every offset of cdp.events.accepted: all input is decided, so
        anything a restarted worker would write twice is on the output by now."""
        group = f"{self.prefix}-pipeline"
        topic = self.topic("events.accepted")
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            partitions = [TopicPartition(topic, p) for p in range(self.partitions)]
            ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}

            def done() -> bool:
                offsets = self.committed("events.accepted")
                return all(end == 0 or offsets.get(p, -1) >= end for p, end in ends.items())

            wait_until(done, timeout=timeout, what=f"group {group} to commit {ends}", interval=0.5)
        finally:
            consumer.close()

    def committed(self, suffix: str) -> dict[int, int]:
        """partition -> the offset the worker group committed on a topic (-1 where it committed none): every input
        record below it was processed by some worker (a lower bound on a stage's progress that survives a SIGKILL)."""
        group = f"{self.prefix}-pipeline"
        partitions = [TopicPartition(self.topic(suffix), p) for p in range(self.partitions)]
        result = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)])[group].result()
        return {tp.partition: tp.offset for tp in result.topic_partitions}

    @cached_property
    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap})

    def read(self, suffix: str, *, until: Callable[[list[Any]], bool], timeout: float = 60, decode: bool = True) -> list[Any]:
        """Every record of a topic from the beginning, read until `until(records)` holds or `timeout` passes."""
        return read_topic(self.bootstrap, self.topic(suffix), until=until, timeout=timeout, decode=decode)


def healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_CODECS: dict[str, AvroCodec] = {}


def decode_value(schema: str, data: bytes) -> dict[str, Any]:
    if schema not in _CODECS:
        _CODECS[schema] = AvroCodec(schema, SchemaRepository.load())
    return _CODECS[schema].decode(data)


@dataclass(frozen=True)
class Read:
    """A record read back: its coordinates, key, raw bytes and (when asked) the decoded value."""

    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    timestamp_ms: int
    value: Any = None
    headers: tuple[tuple[str, bytes], ...] = ()


def read_topic(bootstrap: str, topic: str, *, until: Callable[[list[Read]], bool], timeout: float, decode: bool = True) -> list[Read]:
    schemas = {"dead-letter": "dead_letter", "resolved": "resolved_event", "merges": "merge_log_entry",
               "profile.changes": "profile_change", "audience.membership": "audience_membership_change",
               "sync.outcomes": "delivery_outcome"}  # fmt: skip
    schema = next((name for suffix, name in schemas.items() if topic.endswith(suffix)), "raw_event")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "enable.partition.eof": True})  # fmt: skip
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])  # offset 0: from the beginning
        records: list[Read] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                if message.error() is None:
                    value = decode_value(schema, message.value()) if decode else None
                    records.append(Read(message.partition(), message.offset(), message.key(), message.value(), message.timestamp()[1], value,
                                        tuple(message.headers() or ())))  # fmt: skip
            if until(records):
                _drain_to_end(consumer, topic, partitions, records, schema if decode else None)
                return records
        return records
    finally:
        consumer.close()


def _drain_to_end(consumer: Consumer, topic: str, partitions: Any, records: list[Read], schema: str | None) -> None:
    """Read on to the current end of every partition, so a late duplicate can't hide behind `until`."""
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    seen = {p: -1 for p in partitions}
    for record in records:
        seen[record.partition] = max(seen[record.partition], record.offset)
    deadline = time.monotonic() + 30
    while any(seen[p] + 1 < ends[p] for p in partitions) and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=1000, timeout=0.5):
            if message.error() is None:
                value = decode_value(schema, message.value()) if schema else None
                records.append(Read(message.partition(), message.offset(), message.key(), message.value(), message.timestamp()[1], value,
                                    tuple(message.headers() or ())))  # fmt: skip
                seen[message.partition()] = message.offset()
            elif message.error().code() == KafkaError._PARTITION_EOF:  # transaction markers take offsets too
                seen[message.partition()] = max(seen[message.partition()], message.offset() - 1)
