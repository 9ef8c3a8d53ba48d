"""`cdp bench pipeline` under load: latency at a steady rate, and a flood through the HTTP ingest."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import requests
from confluent_kafka import Producer

from agents.ingest.tracking import to_raw_event
from bench.common import WRITE_KEY, bench_pipeline, wait_healthy
from bench.compute import Collector, summary
from bench.pipeline import (
    DRAIN_TIMEOUT_S,
    example_definitions,
    scrape,
    settled_workers,
    summed,
)
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.runtime.producer import producer_config
from topology.topics import EVENTS_ACCEPTED

LATENCY_AUDIENCE = {"key": "active", "when": {"event": "Order Completed", "within": "1h"}}


def latency(shared: Settings, rate: float, seconds: float) -> dict[str, Any]:
    """One worker, the example config plus `active`; new visitors' Order Completed at `rate`/s for `seconds`:
    from each event's write to its `entered` change received by a read_committed consumer."""
    config = copy.deepcopy(example_definitions())
    config["audiences"].append(LATENCY_AUDIENCE)
    with bench_pipeline(shared, config) as bench:
        prefix = bench.settings.topics.prefix
        with settled_workers(bench, 1) as (urls, _):
            collector = Collector(bench.settings)
            collector.start()
            try:
                count = int(rate * seconds)
                codec = AvroCodec("raw_event", SchemaRepository.load())
                calls = [{"type": "track", "userId": f"{prefix}-u{i}", "messageId": f"{prefix}-m{i}", "event": "Order Completed",
                          "properties": {"revenue": 20.0, "currency": "USD"}} for i in range(count)]  # fmt: skip
                before = scrape(urls[0])
                sent = steady(bench.settings, codec, calls, rate)
                collector.wait_for(prefix, count, timeout=seconds + 300, stall=60)
                entries = collector.entered(prefix)
                figures = scrape(urls[0])
            finally:
                collector.stopping.set()
                collector.join(10)
    latencies = [received - sent[message_id] for message_id, (received, _, _) in entries.items() if message_id in sent]
    def during(metric: str) -> dict[str, float]:
        return {k: v - before.get(metric, {}).get(k, 0) for k, v in figures.get(metric, {}).items()}

    pauses = {"cycles": during("cycles_total"), "cycles_over_250ms": during("cycles_slow_total"),
              "gc_longest_ms_since_start": {g: round(s * 1000, 1) for g, s in figures.get("gc_longest", {}).items()},
              "longest_cycle_ms_since_start": {k: round(s * 1000, 1) for k, s in figures.get("cycle_longest_seconds", {}).items()}}  # fmt: skip
    return {"offered_events_per_s": rate, "seconds": seconds, "events": count, "entered_received": len(entries),
            "latency_ms": summary(latencies) if latencies else None, "worker": pauses}  # fmt: skip


def steady(settings: Settings, codec: AvroCodec, calls: Sequence[dict[str, Any]], rate: float) -> dict[str, float]:
    """Write call i at start + i / rate (open loop); returns messageId → ms it was handed to the producer."""
    producer = Producer({**producer_config(settings.kafka_bootstrap, 60_000), "linger.ms": 1})
    topic = EVENTS_ACCEPTED.name(settings)
    sent: dict[str, float] = {}
    start = time.time() + 0.5
    for index, call in enumerate(calls):
        delay = start + index / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        now = time.time() * 1000
        raw = to_raw_event(call, call_type=None, source="bench", received_at=int(now))
        producer.produce(topic, codec.encode(raw), raw["message_id"].encode())
        sent[raw["message_id"]] = now
        producer.poll(0)
    producer.flush(60)
    return sent


def flood(shared: Settings, seconds: float, events: int = 300_000) -> dict[str, Any]:
    """One worker and a real `cdp ingest` (default `ingest.max_lag`), flooded by bench/load.py flat out (8
    connections, each 429 retried after its Retry-After as SDKs do) for `seconds`; every second: events the
    ingest accepted and compute applied, the lag the ingest reads, 429s, and the backlog (accepted so far minus
    applied so far: the lag itself, which the reading overstates by what the stages moved since their last offset
    commit, pipeline_lag.py). Then until compute applied every event the ingest answered 200 for."""
    config = copy.deepcopy(example_definitions())
    with bench_pipeline(shared, config) as bench:
        with settled_workers(bench, 1) as (urls, _):
            ingest = subprocess.Popen([sys.executable, "-m", "topology.ops.cli", "ingest"], env=bench.env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
            url = f"http://127.0.0.1:{bench.settings.ingest_port}"
            try:
                wait_healthy(url)
                load = subprocess.Popen([sys.executable, "-m", "bench.load", url, WRITE_KEY, "--events", str(events)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                samples, last = [], (0.0, 0.0, 0.0)
                started = time.monotonic()
                while time.monotonic() - started < seconds and load.poll() is None:
                    time.sleep(max(0.0, started + len(samples) + 1 - time.monotonic()))
                    front, back = ingest_figures(url), summed([scrape(u) for u in urls], "compute")["events"]
                    now = (front["accepted"], back, front["refused"])
                    samples.append({"s": len(samples) + 1, "accepted": int(now[0] - last[0]), "applied": int(now[1] - last[1]),
                                    "refused_429": int(now[2] - last[2]), "lag": front["lag"], "backlog": int(now[0] - now[1])})  # fmt: skip
                    last = now
                load.terminate()
                load.wait(30)
                accepted = ingest_figures(url)["accepted"]
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while summed([scrape(u) for u in urls], "compute")["events"] < accepted and time.monotonic() < deadline:
                    time.sleep(0.5)
                applied = summed([scrape(u) for u in urls], "compute")["events"]
            finally:
                ingest.terminate()
                ingest.wait(30)
    kept_up = sum(1 for x in samples if x["applied"] >= 0.8 * x["accepted"] or x["refused_429"])
    return {"seconds": len(samples), "max_lag_bound": bench.settings.ingest.max_lag, "accepted": int(accepted),
            "applied_after_drain": int(applied), "lost": int(accepted - applied), "max_lag_read": max((x["lag"] for x in samples), default=0),
            "max_backlog": max((x["backlog"] for x in samples), default=0),
            "seconds_applied_80pct_or_429": kept_up, "per_second": samples}  # fmt: skip


def ingest_figures(url: str) -> dict[str, float]:
    """The ingest's /metrics: events accepted, requests refused with 429, the pipeline lag it last read."""
    found = {"accepted": 0.0, "refused": 0.0, "lag": 0.0}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "cdp_ingest_events_total":
            found["accepted"] = float(value)
        elif name.startswith("cdp_ingest_responses_total") and 'status="429"' in name:
            found["refused"] = float(value)
        elif name.startswith("cdp_ingest_pipeline_lag{"):
            found["lag"] += float(value)
    return found
