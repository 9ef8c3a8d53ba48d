"""What every benchmark shares: where it ran (machine, commit), a broker, scratch settings, CPU accounting."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests
from confluent_kafka import Consumer, Producer, TopicPartition

from topology.ops.admin import ensure_topics
from topology.config import Settings
from topology.runtime.producer import producer_config

REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_bench"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "python": platform.python_version()}


def commit() -> str:
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_cpu(bench: Bench) -> float:
    """CPU seconds of the local broker so far (0 on a cluster this bench did not start)."""
    return cpu_seconds(bench.broker_pid) if bench.broker_pid else 0.0


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@dataclass(frozen=True)
class Bench:
    """A scratch pipeline for one benchmark run: its settings, environment for child processes, scratch dir."""

    settings: Settings
    env: dict[str, str]
    scratch: Path
    local_broker: bool
    broker_pid: int | None = None  # the local broker's JVM, for its CPU; None on a cluster we did not start
    broker_logs: Path | None = None  # its log directory, for bytes on disk per topic

    def header(self, name: str) -> dict[str, Any]:
        return {
            "benchmark": name,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": commit(),
            "machine": machine(),
            "kafka": {"bootstrap": "local single node" if self.local_broker else self.settings.kafka_bootstrap,
                      "partitions": self.settings.topics.partitions},
        }  # fmt: skip


@contextmanager
def bench_pipeline(settings: Settings, extra_config: Mapping[str, Any] | None = None) -> Iterator[Bench]:
    """Fresh topics under a unique prefix, on the configured Kafka or on a temporary local broker; `extra_config`
    adds keys to the pipeline's YAML config (e.g. `traits` and `audiences`)."""
    from topology.ops.kafka_local import LocalKafka, free_ports, is_reachable

    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as tmp:
        scratch = Path(tmp)
        broker = None
        if not is_reachable(settings.kafka_bootstrap):
            port, controller_port = free_ports(2)
            runtime = settings.kafka_runtime or REPO_ROOT / ".cache" / "kafka-runtime"
            broker = LocalKafka(data_dir=scratch / "kafka", runtime_dir=runtime, port=port, controller_port=controller_port)
            broker.start()
            settings = replace(settings, kafka_bootstrap=broker.bootstrap)
        try:
            prefix = f"bench{uuid.uuid4().hex[:6]}"
            ingest_port, web_port = free_ports(2)
            settings = replace(settings, topics=replace(settings.topics, prefix=prefix), ingest_port=ingest_port, web_port=web_port)
            config = scratch / "bench.yaml"
            config.write_text(json.dumps({"sources": [{"name": "bench", "write_key": WRITE_KEY}],
                                          "topics": {"prefix": prefix, "partitions": settings.topics.partitions},
                                          **(extra_config or {})}))  # fmt: skip
            ensure_topics(settings)
            env = {**os.environ, "CDP_CONFIG": str(config), "CDP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                   "CDP_INGEST_PORT": str(settings.ingest_port), "CDP_WEB_PORT": str(settings.web_port),
                   "CDP_DATA_DIR": str(scratch / "data")}  # fmt: skip
            yield Bench(settings=settings, env=env, scratch=scratch, local_broker=broker is not None,
                        broker_pid=broker.status().pid if broker else None, broker_logs=broker.data_dir / "logs" if broker else None)  # fmt: skip
        finally:
            if broker is not None:
                broker.stop()


def write_report(report: dict[str, Any], out: Path | None) -> str:
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


def consume_produce_floor(settings: Settings, source: str, events: int, transform: Callable[[bytes], bytes] | None = None) -> dict[str, Any]:
    """The floor of a one-hop stage: one confluent-kafka loop consuming `source` and producing each record
    (through `transform`, e.g. decode + encode) to a floor topic of its own, same partition, acks=all. Timed
    from the first record consumed; CPU is this process's."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from topology.runtime.producer import producer_config

    target = f"{settings.topics.prefix}.bench.floor"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})  # must outlive the future
    admin.create_topics([NewTopic(target, settings.topics.partitions, 1)])[target].result()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{target}.floor",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})  # fmt: skip
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    consumer.subscribe([source])
    seen = 0
    started = cpu0 = 0.0
    while seen < events:
        batch = consumer.consume(num_messages=1000, timeout=1.0)
        if batch and not started:
            started, cpu0 = time.perf_counter(), time.process_time()
        for message in batch:
            if message.error() is None:
                seen += 1
                value = message.value() if transform is None else transform(message.value())
                while True:
                    try:
                        producer.produce(target, value, message.key(), partition=message.partition())
                        break
                    except BufferError:
                        producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    consumer.close()
    return {"events": seen, "seconds": round(seconds, 2), "events_per_s": round(seen / seconds, 1),
            "cpu_s_per_million": round(cpu / seen * 1e6, 1)}  # fmt: skip


def produce_all(settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
    """Write (key, value) records to `topic`, partitioned by key as Faust and our stages do; raise unless all acked."""
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(60):
        raise RuntimeError(f"{topic}: input not acknowledged within 60 s")


def end_offsets(settings: Settings, topic: str) -> int:
    """The sum of a topic's partitions' end offsets: how many records it has had."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-watermarks"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
    finally:
        consumer.close()
