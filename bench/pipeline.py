"""`cdp bench pipeline`, throughput: the whole worker pipeline beside its floor in the same run.

Per configuration (definitions × workers), on fresh topics: W real `cdp worker` processes start and settle on
the configured definitions; then N distinct, realistic Segment calls (bench/traffic.py) are written to
events.accepted as the HTTP ingest writes them, and the run is timed from the first write until compute has
applied all N on every worker (their /metrics). Measured over that span: worker and broker CPU per event, per
stage (`cdp_stage_cpu_seconds_total`) and per thread, records and bytes (key + value, uncompressed) written to
every topic per event and the log growth on disk, peak RSS, state bytes per profile. The floor
(bench/pipeline_floor.py) runs on the same input after it. The latency and flood modes are in
bench/pipeline_load.py, the whole bench and its table in bench/pipeline_bench.py.
"""

from __future__ import annotations

import re

import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from agents.ingest.tracking import to_raw_event
from bench.common import (
    REPO_ROOT,
    Bench,
    bench_pipeline,
    broker_cpu,
    cpu_seconds,
    produce_all,
)
from bench.compute import ADMIN_TOKEN, LABEL, METRIC_LINE, wait_definitions_settled
from bench.compute_input import definitions
from bench.identity import wait_group_stable, workers
from bench.pipeline_floor import floor
from bench.traffic import Traffic
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.topics import ALL_TOPICS, EVENTS_ACCEPTED, EVENTS_RESOLVED

DRAIN_TIMEOUT_S = 1_800.0
FLOOR_PASSES = 3
UNSEEN = 150  # definitions on events that never occur, added to the 50 in the "200" configuration
RENAMED_PROPERTIES = {"amount": "revenue"}  # bench/compute_input's definitions, on the Segment spec's names


# -- configurations ------------------------------------------------------------------------------------------


def example_definitions() -> dict[str, Any]:
    config = yaml.safe_load((REPO_ROOT / "cdp.example.yaml").read_text())
    return {"traits": config["traits"], "audiences": config["audiences"]}


def _renamed(node: Any, unseen: bool) -> Any:
    """bench/compute_input's definitions on this traffic's property names; `unseen`: on events that never occur
    (every event renamed, every key prefixed, `not` dropped so nothing holds for a profile without them)."""
    if isinstance(node, list):
        return [_renamed(item, unseen) for item in node]
    if not isinstance(node, dict):
        return node
    if unseen and set(node) == {"not"}:
        return _renamed(node["not"], unseen)
    out = {}
    for key, value in node.items():
        if key == "property" and isinstance(value, str):
            value = RENAMED_PROPERTIES.get(value, value)
        elif unseen and key == "event":
            value = f"Unseen {value}"
        elif unseen and key in ("key", "audience") or (unseen and key == "trait" and not value.startswith("traits.")):
            value = f"u_{value}"
        out[key] = _renamed(value, unseen)
    if unseen and "kind" in out and "event" not in out:
        out["event"] = "Unseen Track"
    return out


def many_definitions(count: int, unseen: int = 0) -> dict[str, Any]:
    traits, audiences = definitions(count)
    config = {"traits": _renamed(traits, False), "audiences": _renamed(audiences, False)}
    if unseen:
        extra_traits, extra_audiences = definitions(unseen)
        config["traits"] += _renamed(extra_traits, True)
        config["audiences"] += _renamed(extra_audiences, True)
    return config


CONFIGURATIONS: dict[str, Any] = {
    "example": example_definitions,
    "50": lambda: many_definitions(50),
    "200": lambda: many_definitions(50, UNSEEN),
}


# -- input ---------------------------------------------------------------------------------------------------


def accepted_records(traffic: Traffic, events: int) -> list[tuple[bytes, bytes]]:
    """The calls as the HTTP ingest writes them to events.accepted: RawEvents keyed by messageId."""
    codec = AvroCodec("raw_event", SchemaRepository.load())
    received = int(time.time() * 1000)
    records = []
    for call in traffic.calls(events):
        raw = to_raw_event(call, call_type=None, source="bench", received_at=received)
        records.append((raw["message_id"].encode(), codec.encode(raw)))
    return records


# -- measuring -----------------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, dict[str, float]]:
    """The figures of one worker's /metrics this bench reads: {metric: {label value: value}}."""
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = METRIC_LINE.match(line) if "{" in line else None
        if match is None:
            if line.startswith("cdp_process_cpu_seconds_total "):
                found["process_cpu"][""] = float(line.split()[1])
            continue
        name, labels, value = match[1], dict(LABEL.findall(match[2])), float(match[3])
        if name == "cdp_compute_total":
            found["compute"][labels["what"]] = value
        elif name == "cdp_stage_cpu_seconds_total":
            found["stage_cpu"][labels["stage"]] = value
        elif name == "cdp_transactions_total":
            found["transactions"][labels["stage"]] = value
        elif name == "cdp_gc_seconds_total":
            found["gc"][labels["generation"]] = value
        elif name == "cdp_gc_longest_seconds":
            found["gc_longest"][labels["generation"]] = value
        elif name in ("cdp_cycles_total", "cdp_cycles_slow_total", "cdp_cycle_longest_seconds"):
            found[name.removeprefix("cdp_")][labels["stage"]] = value
        elif name == "cdp_consumer_lag":
            found["lag"][f"{labels['topic']}/{labels['partition']}"] = value
    return found


def summed(scrapes: Sequence[dict[str, dict[str, float]]], metric: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for one in scrapes:
        total.update(one.get(metric, {}))
    return total


def topic_traffic(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every topic's records and key + value bytes as written (aborted transactions included: they were written);
    for changelogs also by kind of state record (the key up to its first `|`)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-topic-traffic",
                         "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    try:
        for spec in ALL_TOPICS:
            topic = spec.name(settings)
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            left = {p for p in partitions if consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] > 0}
            records = size = 0
            kinds: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
            live: dict[bytes, int] = {}  # key -> size of its last value: what the compacted changelog converges to
            if left:
                consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in left])
                while left:
                    for message in consumer.consume(num_messages=10_000, timeout=1.0):
                        error = message.error()
                        if error is None:
                            records += 1
                            length = len(message.key() or b"") + len(message.value() or b"")
                            size += length
                            if spec.compacted:
                                key = message.key() or b""
                                kind = kinds[re.split(rb"[|#]", key, maxsplit=1)[0].decode(errors="replace")]  # a memo pack: its kind@hour
                                kind[0] += 1
                                kind[1] += length
                                if message.value() is None:
                                    live.pop(key, None)
                                else:
                                    live[key] = length
                        elif error.code() == KafkaError._PARTITION_EOF:
                            left.discard(message.partition())
            out[spec.suffix] = {"records": records, "bytes": size,
                                **({"by_kind": dict(kinds), "live_bytes": sum(live.values())} if kinds else {})}  # fmt: skip
    finally:
        consumer.close()
    return out


def disk_bytes(logs: Path | None, prefix: str) -> dict[str, int]:
    """Bytes on the broker's disk per topic of this run (compressed, with indexes)."""
    if logs is None:
        return {}
    found: Counter[str] = Counter()
    for directory in logs.glob(f"{prefix}.*-*"):
        topic = directory.name.rsplit("-", 1)[0][len(prefix) + 1 :]
        found[topic] += sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return dict(found)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def thread_cpu(pids: Sequence[int]) -> Counter[str]:
    """CPU seconds so far of every thread of the workers, by thread name with digits dropped: the event loop
    (`python`), asyncio's executor (`asyncio_`), librdkafka's (`rdk:broker`, `rdk:main`), RocksDB's."""
    found: Counter[str] = Counter()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip().rstrip("0123456789")
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            found[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def peak_rss_mib(pid: int) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return round(int(line.split()[1]) / 1024, 1)


@contextmanager
def settled_workers(bench: Bench, count: int) -> Iterator[tuple[list[str], list[int]]]:
    """`count` workers in one stable group, every partition settled on the configured definitions."""
    bench = replace(bench, env={**bench.env, "CDP_ADMIN_TOKEN": ADMIN_TOKEN})
    with workers(bench, count) as processes:
        for attempt in range(20):  # a fresh broker's group coordinator may still be loading
            try:
                wait_group_stable(bench.settings, count)
                break
            except Exception:
                if attempt == 19:
                    raise
                time.sleep(1.0)
        urls = [f"http://127.0.0.1:{port}" for port in worker_ports(bench, processes)]
        wait_definitions_settled(urls[0], EVENTS_RESOLVED.partition_count(bench.settings))
        yield urls, [p.pid for p in processes]


def worker_ports(bench: Bench, processes: Sequence[Any]) -> list[int]:
    """Each worker's web port, as bench.identity.workers gave it in its environment."""
    return [int(Path(f"/proc/{p.pid}/environ").read_bytes().split(b"CDP_WEB_PORT=")[1].split(b"\0")[0]) for p in processes]


def throughput(shared: Settings, name: str, worker_count: int, events: int) -> dict[str, Any]:
    """One configuration on fresh topics: the pipeline, then (with one worker) the floor on the same input."""
    config = CONFIGURATIONS[name]()
    with bench_pipeline(shared, config) as bench:
        prefix = bench.settings.topics.prefix
        traffic = Traffic(run=prefix)
        records = accepted_records(traffic, events)
        with settled_workers(bench, worker_count) as (urls, pids):
            before = [scrape(url) for url in urls]
            cpu0, broker0, threads0 = sum(cpu_seconds(pid) for pid in pids), broker_cpu(bench), thread_cpu(pids)
            disk0 = disk_bytes(bench.broker_logs, prefix)
            started = time.perf_counter()
            writer = threading.Thread(target=produce_all, args=(bench.settings, EVENTS_ACCEPTED.name(bench.settings), records))
            writer.start()
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while True:
                after = [scrape(url) for url in urls]
                applied = summed(after, "compute")["events"] - summed(before, "compute")["events"]
                if applied >= events:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: compute applied {applied:.0f} of {events} events in {DRAIN_TIMEOUT_S:.0f}s")
                time.sleep(0.1)
            seconds = time.perf_counter() - started
            cpu, broker = sum(cpu_seconds(pid) for pid in pids) - cpu0, broker_cpu(bench) - broker0
            threads = thread_cpu(pids)
            threads.subtract(threads0)
            writer.join()
            rss = [peak_rss_mib(pid) for pid in pids]
            stage_cpu = summed(after, "stage_cpu")
            stage_cpu.subtract(summed(before, "stage_cpu"))
            transactions = summed(after, "transactions")
            transactions.subtract(summed(before, "transactions"))
            gc_spent = sum(summed(after, "gc").values()) - sum(summed(before, "gc").values())
            state_dirs = directory_bytes(bench.scratch / "data")
        written = topic_traffic(bench.settings)
        disk = disk_bytes(bench.broker_logs, prefix)
        people = traffic.visitors
        state_topics = {k: v for k, v in written.items() if k.endswith(".state")}
        result: dict[str, Any] = {
            "configuration": name, "definitions": len(config["traits"]) + len(config["audiences"]), "workers": worker_count,
            "events": events, "profiles_about": people, "seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1),
            "worker_cpu_us_per_event": round(cpu / events * 1e6, 1),
            "broker_cpu_us_per_event": round(broker / events * 1e6, 1) if bench.broker_pid else None,
            "stage_cpu_us_per_event": {stage: round(s / events * 1e6, 1) for stage, s in sorted(stage_cpu.items())},
            "machinery_cpu_us_per_event": round((cpu - sum(stage_cpu.values())) / events * 1e6, 1),
            "transactions_per_1000_events": {stage: round(n / events * 1000, 1) for stage, n in sorted(transactions.items())},
            "gc_us_per_event": round(gc_spent / events * 1e6, 1),  # wall time, inside the stages' or the machinery's share
            "thread_cpu_us_per_event": {name: round(s / events * 1e6, 1) for name, s in threads.most_common() if s > 0},
            "records_per_event": round(sum(t["records"] for t in written.values()) / events, 2),
            "kb_per_event": round(sum(t["bytes"] for t in written.values()) / events / 1000, 2),
            "per_topic_per_event": {t: {"records": round(v["records"] / events, 3), "bytes": round(v["bytes"] / events),
                                        **({"by_kind": {k: [round(n / events, 3), round(b / events)] for k, (n, b) in sorted(v["by_kind"].items())}}
                                           if "by_kind" in v else {})}
                                    for t, v in written.items() if v["records"]},
            "disk_bytes_per_event": {t: round((b - disk0.get(t, 0)) / events) for t, b in sorted(disk.items()) if b - disk0.get(t, 0) > 0},
            "worker_peak_rss_mib": rss,
            "state_bytes_per_profile": {"live": round(sum(v.get("live_bytes", 0) for v in state_topics.values()) / people),
                                        "rocksdb_files": round(state_dirs / people),
                                        "changelog_written": round(sum(v["bytes"] for v in state_topics.values()) / people)},
        }  # fmt: skip
        if worker_count == 1:  # the fastest of FLOOR_PASSES: a pass of a few seconds varies by ±25 % on its own
            passes = [floor(bench, events, n) for n in range(FLOOR_PASSES)]
            result["floor"] = {**max(passes, key=lambda p: p["events_per_s"]), "passes_events_per_s": [p["events_per_s"] for p in passes]}
            result["ratio_to_floor"] = round(result["events_per_s"] / result["floor"]["events_per_s"], 3)
        print(f"pipeline {name} × {worker_count}: {result['events_per_s']} events/s, worker {result['worker_cpu_us_per_event']} µs, "
              f"broker {result['broker_cpu_us_per_event']} µs, {result['records_per_event']} records / {result['kb_per_event']} KB per event"
              + (f"; floor {result['floor']['events_per_s']}/s → {result['ratio_to_floor']}×" if worker_count == 1 else ""),
              file=sys.stderr)  # fmt: skip
        return result
