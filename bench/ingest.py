"""`cdp bench ingest`: events/s accepted through /v1/batch, beside the floor, in one run on one broker.

Floor: a confluent-kafka producer writing the same Avro payloads (acks=all, idempotent, lz4, same topic) as fast
as it can: what Kafka and librdkafka cost without HTTP, JSON and validation. Ingest: a real `cdp ingest` process
fed by a separate load-generator process. CPU seconds per million events come from /proc for the ingest
process and from this process for the floor.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
from confluent_kafka import Producer

from agents.ingest.tracking import batch_to_raw_events
from bench.load import synthetic_batch
from topology.admin import ensure_topics
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.producer import producer_config
from topology.topics import EVENTS_ACCEPTED

REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_bench"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "python": platform.python_version()}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return f"{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def floor(settings: Settings, payloads: list[bytes], events: int) -> dict[str, Any]:
    """A raw confluent-kafka producer writing pre-encoded Avro payloads: the cost of Kafka alone."""
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    topic = EVENTS_ACCEPTED.name(settings)
    errors = 0

    def delivered(error: Any, message: Any) -> None:
        nonlocal errors
        errors += error is not None

    cpu0, t0 = time.process_time(), time.perf_counter()
    for n in range(events):
        while True:
            try:
                producer.produce(topic, payloads[n % len(payloads)], f"floor-{n}".encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.01)
        if n % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"events": events, "seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1),
            "cpu_s_per_million": round(cpu / events * 1e6, 1), "errors": errors}  # fmt: skip


def ingest(settings: Settings, env: dict[str, str], events: int, batch_size: int, concurrency: int) -> dict[str, Any]:
    """A real `cdp ingest` process under load from a separate generator process."""
    process = subprocess.Popen([sys.executable, "-m", "topology.cli", "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{settings.ingest_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        warmup = [sys.executable, "-m", "bench.load", url, WRITE_KEY, "--events", str(min(events // 10, 20_000)), "--batch-size", str(batch_size)]
        subprocess.run(warmup, check=True, capture_output=True)
        cpu0 = cpu_seconds(process.pid)
        load = [*warmup[:5], "--events", str(events), "--batch-size", str(batch_size), "--concurrency", str(concurrency)]
        result = json.loads(subprocess.run(load, check=True, capture_output=True, text=True).stdout)
        cpu = cpu_seconds(process.pid) - cpu0
        result["cpu_s_per_million"] = round(cpu / max(result["events"], 1) * 1e6, 1)
        result["batch_size"], result["concurrency"] = batch_size, concurrency
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_ingest_bench(settings: Settings, *, events: int, batch_size: int, out: Path | None, concurrency: int = 8) -> str:
    """Run floor and ingest on one broker (a temporary local one if none is reachable); returns the JSON text."""
    from topology.kafka_local import LocalKafka, is_reachable

    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as scratch:
        broker = None
        if not is_reachable(settings.kafka_bootstrap):
            runtime = Path(os.environ.get("CDP_KAFKA_RUNTIME_DIR") or REPO_ROOT / ".cache" / "kafka-runtime")
            broker = LocalKafka(data_dir=Path(scratch) / "kafka", runtime_dir=runtime, port=_free_port(), controller_port=_free_port())
            broker.start()
            settings = replace(settings, kafka_bootstrap=broker.bootstrap)
        try:
            prefix = f"bench{uuid.uuid4().hex[:6]}"
            settings = replace(settings, topics=replace(settings.topics, prefix=prefix), ingest_port=_free_port())
            config = Path(scratch) / "bench.yaml"
            config.write_text(json.dumps({"sources": [{"name": "bench", "write_key": WRITE_KEY}],
                                          "topics": {"prefix": prefix, "partitions": settings.topics.partitions}}))  # fmt: skip
            ensure_topics(settings)
            body = synthetic_batch(100, "floor", random.Random(1))
            raw, _ = batch_to_raw_events(body, source="bench", received_at=int(time.time() * 1000))
            codec = AvroCodec("raw_event", SchemaRepository.load())
            payloads = [codec.encode(event) for event in raw]
            env = {**os.environ, "CDP_CONFIG": str(config), "CDP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                   "CDP_INGEST_PORT": str(settings.ingest_port), "CDP_DATA_DIR": str(Path(scratch) / "data")}  # fmt: skip
            report = {
                "benchmark": "ingest",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "commit": commit(),
                "machine": machine(),
                "kafka": {"bootstrap": "local single node" if broker else settings.kafka_bootstrap, "partitions": settings.topics.partitions},
                "avro_bytes_per_event": round(sum(map(len, payloads)) / len(payloads)),
                "floor_confluent_producer": floor(settings, payloads, events),
                "ingest_http_batch": ingest(settings, env, events, batch_size, concurrency),
            }
        finally:
            if broker is not None:
                broker.stop()
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
