"""`cdp bench dedup`: the dedup stage (a worker stage) beside a raw confluent-kafka consume→produce loop.

Both read the same pre-filled `events.accepted` (distinct messageIds plus a share of repeats) and write to a
topic of their own; the stage decodes, decides, writes acks=all and persists its RocksDB state per batch, the
floor only moves bytes. Throughput is measured from the first output record to the last, so the Faust worker's
start-up is not counted; CPU is the worker process's over that span.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.common import end_offsets, Bench, bench_pipeline, consume_produce_floor, cpu_seconds, wait_healthy, write_report
from bench.ingest import encoded_events
from topology.config import Settings
from topology.runtime.producer import producer_config
from topology.topics import EVENTS_ACCEPTED, EVENTS_RAW


def fill(settings: Settings, events: int, duplicate_share: float) -> int:
    """Write the input; returns how many distinct messageIds it holds (what the stage must pass)."""
    from topology.codecs import AvroCodec, SchemaRepository

    distinct = int(events * (1 - duplicate_share))
    payloads = encoded_events(distinct, f"dedup{time.time_ns()}")
    codec = AvroCodec("raw_event", SchemaRepository.load())
    keys = [codec.decode(p)["message_id"].encode() for p in payloads]
    order = list(range(distinct)) + random.Random(3).choices(range(distinct), k=events - distinct)
    random.Random(4).shuffle(order)
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    for index in order:
        while True:
            try:
                producer.produce(EVENTS_ACCEPTED.name(settings), payloads[index], keys[index])
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    return distinct


def floor(settings: Settings, events: int) -> dict[str, Any]:
    """Consume every input record and produce its bytes to a floor topic, same partition, acks=all."""
    return consume_produce_floor(settings, EVENTS_ACCEPTED.name(settings), events)


def stage(bench: Bench, events: int, expected: int) -> dict[str, Any]:
    """A real `cdp worker` draining the same input into cdp.events.raw."""
    raw = EVENTS_RAW.name(bench.settings)
    process = subprocess.Popen([sys.executable, "-m", "topology.ops.cli", "worker", "--loglevel", "warn"],
                               env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{bench.settings.web_port}", timeout=120)
        first = cpu0 = 0.0
        deadline = time.monotonic() + 600
        written = 0
        while written < expected and time.monotonic() < deadline:
            written = end_offsets(bench.settings, raw)
            if written and not first:
                first, cpu0 = time.perf_counter(), cpu_seconds(process.pid)
            time.sleep(0.05)
        seconds, cpu = time.perf_counter() - first, cpu_seconds(process.pid) - cpu0
        return {"events": events, "passed": written, "expected": expected, "seconds": round(seconds, 2),
                "events_per_s": round(events / seconds, 1), "cpu_s_per_million": round(cpu / events * 1e6, 1)}  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_dedup_bench(settings: Settings, *, events: int, out: Path | None, duplicate_share: float = 0.1) -> str:
    with bench_pipeline(settings) as bench:
        expected = fill(bench.settings, events, duplicate_share)
        report = bench.header("dedup")
        report["input"] = {"events": events, "distinct_message_ids": expected, "duplicate_share": duplicate_share}
        report["floor_confluent_consume_produce"] = floor(bench.settings, events)
        report["dedup_faust_agent"] = stage(bench, events, expected)
    return write_report(report, out)
