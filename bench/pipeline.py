"""`cdp bench pipeline`: the headline benchmark, the whole worker pipeline beside its floor in the same run.

Per configuration (definitions × workers), on fresh topics: W real `cdp worker` processes start and settle on
the configured definitions; then N distinct, realistic Segment calls (bench/traffic.py) are written to
events.accepted as the HTTP ingest writes them, and the run is timed from the first write until compute has
applied all N on every worker (their /metrics). Measured over that span: worker and broker CPU per event, per
stage (`cdp_stage_cpu_seconds_total`), records and bytes (key + value, uncompressed) written to every topic per
event and the log growth on disk, peak RSS, state bytes per profile. The floor (`floor()`) is a plain
confluent-kafka loop doing the same three hops through the broker with the same schemas and producer settings.

`--mode latency`: one worker, events at a steady rate (half of what the throughput run sustained), each a new
visitor's Order Completed; latency from its write to its `entered` change on the read_committed topic.
"""

from __future__ import annotations

import copy
import os
import subprocess
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
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.ingest.tracking import to_raw_event
from bench.common import REPO_ROOT, WRITE_KEY, Bench, bench_pipeline, cpu_seconds, produce_all, wait_healthy, write_report
from bench.compute import ADMIN_TOKEN, METRIC_LINE, LABEL, Collector, percentile, summary, wait_definitions_settled
from bench.compute_input import definitions
from bench.identity import wait_group_stable, workers
from bench.traffic import Traffic
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.producer import producer_config
from topology.topics import ALL_TOPICS, EVENTS_ACCEPTED, EVENTS_RESOLVED

DRAIN_TIMEOUT_S = 1_800.0
UNSEEN = 150  # definitions on events that never occur, added to the 50 in the "200" configuration
FLOOR_PASSES = 3
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
        elif name == "cdp_gc_seconds_total":
            found["gc"][labels["generation"]] = value
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
                                kind = kinds[key.split(b"|", 1)[0].decode(errors="replace")]
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


def broker_cpu(bench: Bench) -> float:
    return cpu_seconds(bench.broker_pid) if bench.broker_pid else 0.0


# -- the floor -----------------------------------------------------------------------------------------------


def floor(bench: Bench, events: int, run: int = 0) -> dict[str, Any]:
    """Three hops through the broker in one confluent-kafka loop, one thread, the project's producer settings:
    accepted → decode RawEvent, a dict of seen messageIds → encode → floor.raw; floor.raw → decode, a dict of
    identifiers to profiles → encode ResolvedEvent → floor.resolved; floor.resolved → decode, counts per
    profile → encode ProfileChange → floor.changes. Read from the pipeline's own input, after it finished."""
    settings = bench.settings
    prefix, partitions = settings.topics.prefix, settings.topics.partitions
    hops = [f"{prefix}.floor{run}.raw", f"{prefix}.floor{run}.resolved", f"{prefix}.floor{run}.changes"]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(t, partitions, 1) for t in hops]).values():
        future.result()
    repository = SchemaRepository.load()
    raw_codec, resolved_codec = AvroCodec("raw_event", repository), AvroCodec("resolved_event", repository)
    change_codec = AvroCodec("profile_change", repository)
    accepted = EVENTS_ACCEPTED.name(settings)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{prefix}.floor{run}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})  # fmt: skip
    consumer.subscribe([accepted, hops[0], hops[1]])
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    seen: set[str] = set()
    profiles: dict[str, str] = {}
    counts: Counter[tuple[str, str]] = Counter()
    done = 0
    started = cpu0 = broker0 = 0.0

    def send(topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:
                producer.poll(0.01)

    while done < events:
        batch = consumer.consume(num_messages=2_000, timeout=1.0)
        if batch and not started:
            started, cpu0, broker0 = time.perf_counter(), time.process_time(), broker_cpu(bench)
        for message in batch:
            if message.error() is not None:
                continue
            topic, value = message.topic(), message.value()
            if topic == accepted:
                raw = raw_codec.decode(value)
                if raw["message_id"] not in seen:
                    seen.add(raw["message_id"])
                    send(hops[0], message.key(), raw_codec.encode(raw), message.partition())
            elif topic == hops[0]:
                raw = raw_codec.decode(value)
                ids = [i for i in (raw["user_id"], raw["anonymous_id"]) if i]
                profile = next((profiles[i] for i in ids if i in profiles), f"p-{ids[0]}")
                for identifier in ids:
                    profiles[identifier] = profile
                identifiers = [{"type": "user_id" if i == raw["user_id"] else "anonymous_id", "value": i} for i in ids]
                encoded = resolved_codec.encode({"profile_id": profile, "identifiers": identifiers, "event": raw})
                send(hops[1], profile.encode(), encoded, message.partition())
            else:
                resolved = resolved_codec.decode(value)
                event = resolved["event"]
                name = event["event"] or event["type"]
                counts[resolved["profile_id"], name] += 1
                change = {"profile_id": resolved["profile_id"], "trait": f"count_{name}", "origin": "computed",
                          "old_value": counts[resolved["profile_id"], name] - 1, "new_value": counts[resolved["profile_id"], name],
                          "timestamp": event["timestamp"], "message_id": event["message_id"], "seq": done}  # fmt: skip
                send(hops[2], message.key(), change_codec.encode(change), message.partition())
                done += 1
        producer.poll(0)
    producer.flush(60)
    seconds, cpu, broker = time.perf_counter() - started, time.process_time() - cpu0, broker_cpu(bench) - broker0
    consumer.close()
    return {"events": done, "seconds": round(seconds, 2), "events_per_s": round(done / seconds, 1),
            "cpu_us_per_event": round(cpu / done * 1e6, 1),
            "broker_cpu_us_per_event": round(broker / done * 1e6, 1) if bench.broker_pid else None}  # fmt: skip


# -- latency -------------------------------------------------------------------------------------------------


LATENCY_AUDIENCE = {"key": "active", "when": {"event": "Order Completed", "within": "1h"}}


def latency(shared: Settings, rate: float, seconds: float) -> dict[str, Any]:
    """One worker, the example config plus `active`; new visitors' Order Completed at `rate`/s for `seconds`:
    from each event's write to its `entered` change received by a read_committed consumer."""
    config = copy.deepcopy(example_definitions())
    config["audiences"].append(LATENCY_AUDIENCE)
    with bench_pipeline(shared, config) as bench:
        prefix = bench.settings.topics.prefix
        with settled_workers(bench, 1):
            collector = Collector(bench.settings)
            collector.start()
            try:
                count = int(rate * seconds)
                codec = AvroCodec("raw_event", SchemaRepository.load())
                calls = [{"type": "track", "userId": f"{prefix}-u{i}", "messageId": f"{prefix}-m{i}", "event": "Order Completed",
                          "properties": {"revenue": 20.0, "currency": "USD"}} for i in range(count)]  # fmt: skip
                sent = steady(bench.settings, codec, calls, rate)
                collector.wait_for(prefix, count, timeout=seconds + 300, stall=60)
                entries = collector.entered(prefix)
            finally:
                collector.stopping.set()
                collector.join(10)
    latencies = [received - sent[message_id] for message_id, (received, _, _) in entries.items() if message_id in sent]
    return {"offered_events_per_s": rate, "seconds": seconds, "events": count, "entered_received": len(entries),
            "latency_ms": summary(latencies) if latencies else None}  # fmt: skip


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


# -- flood ---------------------------------------------------------------------------------------------------


def flood(shared: Settings, seconds: float, events: int = 300_000) -> dict[str, Any]:
    """One worker and a real `cdp ingest` (default `ingest.max_lag`), flooded by bench/load.py flat out (8
    connections, each 429 retried after its Retry-After as SDKs do) for `seconds`; every second: events the
    ingest accepted and compute applied, the lag the ingest reads, 429s. Then until compute applied every event
    the ingest answered 200 for."""
    config = copy.deepcopy(example_definitions())
    with bench_pipeline(shared, config) as bench:
        with settled_workers(bench, 1) as (urls, _):
            ingest = subprocess.Popen([sys.executable, "-m", "topology.cli", "ingest"], env=bench.env,
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
                                    "refused_429": int(now[2] - last[2]), "lag": front["lag"]})  # fmt: skip
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


# -- the whole bench -----------------------------------------------------------------------------------------


def run_pipeline_bench(settings: Settings, *, events: int, configurations: Sequence[str], worker_counts: Sequence[int],
                       latency_seconds: float, out: Path | None, flood_seconds: float = 0) -> str:  # fmt: skip
    started = time.perf_counter()
    with bench_pipeline(settings) as probe:
        header = probe.header("pipeline")
    runs = []
    for name in configurations:
        for count in worker_counts:
            if count == 1 or name == "example":
                runs.append(throughput(settings, name, count, events))
    report: dict[str, Any] = {**header, "events": events, "runs": runs}
    one = next((r for r in runs if r["configuration"] == "example" and r["workers"] == 1), None)
    if latency_seconds and one is not None:
        report["latency"] = latency(settings, round(one["events_per_s"] / 2, -1), latency_seconds)
    if flood_seconds:
        report["flood"] = flood(settings, flood_seconds)
    report["total_seconds"] = round(time.perf_counter() - started)
    table = render_table(report)
    print(table, file=sys.stderr)
    report["table"] = table.splitlines()
    return write_report(report, out)


def render_table(report: dict[str, Any]) -> str:
    lines = ["| configuration | workers | events/s | × floor | worker µs/event | broker µs/event | records/event | KB/event |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in report["runs"]:
        floor_run = run.get("floor")
        lines.append(f"| {run['configuration']} ({run['definitions']} definitions) | {run['workers']} | {run['events_per_s']:,} | "
                     f"{run.get('ratio_to_floor', '–')} | {run['worker_cpu_us_per_event']} | {run['broker_cpu_us_per_event']} | "
                     f"{run['records_per_event']} | {run['kb_per_event']} |")  # fmt: skip
        if floor_run:
            lines.append(f"| floor (same input) | 1 | {floor_run['events_per_s']:,} | 1 | {floor_run['cpu_us_per_event']} | "
                         f"{floor_run['broker_cpu_us_per_event']} | 4 (input + 3 hops) | – |")  # fmt: skip
    if report.get("latency"):
        lat = report["latency"]
        lines.append(f"\nlatency at {lat['offered_events_per_s']}/s: {lat['latency_ms']}")
    if report.get("flood"):
        f = report["flood"]
        lines.append(f"\nflood {f['seconds']} s: accepted {f['accepted']:,}, applied {f['applied_after_drain']:,} (lost {f['lost']}), "
                     f"max lag read {f['max_lag_read']:,.0f} (bound {f['max_lag_bound']:,}), seconds applying ≥ 80 % of accepted "
                     f"or answering 429: {f['seconds_applied_80pct_or_429']}/{f['seconds']}")  # fmt: skip
    return "\n".join(lines)
