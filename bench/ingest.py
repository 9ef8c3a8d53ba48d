"""`cdp bench ingest`: events/s accepted through /v1/batch, beside the floor, in one run on one broker.

Floor: a confluent-kafka producer writing the same Avro payloads (acks=all, idempotent, lz4, same topic) as fast
as it can: what Kafka and librdkafka cost without HTTP, JSON and validation. Ingest: a real `cdp ingest` process
fed by a separate load-generator process. CPU seconds per million events come from /proc for the ingest
process and from this process for the floor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from agents.ingest.tracking import to_raw_event
from bench.common import WRITE_KEY, Bench, bench_pipeline, cpu_seconds, wait_healthy, write_report
from bench.traffic import Traffic
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.runtime.producer import producer_config
from topology.topics import EVENTS_ACCEPTED


def encoded_events(count: int, run: str) -> list[bytes]:
    """`count` distinct calls (bench/traffic.py) as the ingest would write them."""
    codec = AvroCodec("raw_event", SchemaRepository.load())
    received = int(time.time() * 1000)
    return [codec.encode(to_raw_event(call, call_type=None, source="bench", received_at=received)) for call in Traffic(run=run).calls(count)]


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


def ingest(bench: Bench, events: int, batch_size: int, concurrency: int) -> dict[str, Any]:
    """A real `cdp ingest` process under load from a separate generator process."""
    process = subprocess.Popen([sys.executable, "-m", "topology.ops.cli", "ingest"], env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{bench.settings.ingest_port}"
    try:
        wait_healthy(url)
        load = [sys.executable, "-m", "bench.load", url, WRITE_KEY, "--batch-size", str(batch_size), "--concurrency", str(concurrency)]
        subprocess.run([*load, "--events", str(min(events // 10, 20_000))], check=True, capture_output=True)  # warm-up
        cpu0 = cpu_seconds(process.pid)
        result = json.loads(subprocess.run([*load, "--events", str(events)], check=True, capture_output=True, text=True).stdout)
        cpu = cpu_seconds(process.pid) - cpu0
        result["cpu_s_per_million"] = round(cpu / max(result["events"], 1) * 1e6, 1)
        result["batch_size"], result["concurrency"] = batch_size, concurrency
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_ingest_bench(settings: Settings, *, events: int, batch_size: int, out: Path | None, concurrency: int = 8) -> str:
    """Run floor and ingest on one broker (a temporary local one if none is reachable); returns the JSON text."""
    with bench_pipeline(settings, {"ingest": {"max_lag": 0}}) as bench:  # no worker drains it: measure the ingest alone
        payloads = encoded_events(1_000, "floor")
        report = bench.header("ingest")
        report["avro_bytes_per_event"] = round(sum(map(len, payloads)) / len(payloads))
        report["floor_confluent_producer"] = floor(bench.settings, payloads, events)
        report["ingest_http_batch"] = ingest(bench, events, batch_size, concurrency)
    return write_report(report, out)
