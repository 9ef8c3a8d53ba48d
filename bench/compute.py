"""`cdp bench compute`: the compute stage (one `cdp worker`) with 10, 50 and 200 definitions, its event→audience
latency at a steady offered load, its backfill speed and its state per profile, beside a consume→produce floor.

Input: synthetic ResolvedEvents written straight to `events.resolved`, keyed by profile id (5,000 profiles; track
"Order Completed" 20 %, "Product Viewed" 50 %, page calls 25 %, identify calls 5 %, stamped over the last ten
minutes, so no window slides while measured). The definitions (see `definitions`) are 60 % traits of every kind,
some windowed, some with `where`, and 40 % audiences over trait leaves, event-count leaves with `within` and
other audiences, nested in all/any/not; they sit in the pipeline's YAML config like a user's.

Each configuration gets fresh topics and state. Its worker starts on empty topics and the input is written once
the worker has recorded and settled the first generation of every configured definition: a worker meeting a
configuration for the first time over a pre-filled backlog would spend its start settling every definition over
the profiles seen so far (one run per definition, all profiles of the partition each), which is a one-off cost
of a new deployment, not the stage's throughput. Writing the input takes about a second against the stage's tens
of seconds. Throughput runs from the first poll of /metrics that shows compute events to the one that shows all
of them applied (every events.resolved partition at lag 0); CPU is the worker's over the same span.

Backfill (10 and 50 definitions; at 200 it would take as long again as the run): with that backlog applied, a new
trait is POSTed to the worker; every partition re-reads its history for it, then settles its profiles; timed from
the POST (an idle partition notices the new definition on its next 5 s tick) and from the runs' own clocks.
State: the compute changelog read back (read_committed): every record written, and the latest record per key.
Latency (the 10-definition configuration, on fresh topics): each event an "Order Completed" for a new profile, so
each makes exactly one `entered` change of the audience `active`; events are sent on a fixed schedule (open loop:
a late send does not move the later ones) and stamped with their scheduled time; latency is when a read_committed
consumer receives the change (or, second figure, the change record's Kafka timestamp) minus that time. When the
stage falls behind at LATENCY_RATE, a second run offers SUSTAINED_SHARE of the rate it applied.
The floor reads the first configuration's input, decodes and re-encodes each ResolvedEvent and writes it acks=all.
"""

from __future__ import annotations

import random
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from agents.compute.catalog import build_catalog
from bench.common import Bench, bench_pipeline, consume_produce_floor, cpu_seconds, end_offsets, produce_all, write_report
from bench.compute_input import ACTIVE, PROFILES, definitions, encode, event_stream, resolved_event
from bench.identity import log_sizes, log_warnings, wait_group_stable, workers
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.runtime.partition_reader import catch_up_consumer, read_chunks
from topology.runtime.producer import producer_config
from topology.topics import AUDIENCE_MEMBERSHIP, COMPUTE_STATE, EVENTS_DEAD_LETTER, EVENTS_RESOLVED

DEFINITION_COUNTS = (10, 50, 200)
ADMIN_TOKEN = "bench-admin-token"
BACKFILL_TRAIT = {"key": "bench_backfill_spend_30d", "kind": "sum", "event": "Order Completed", "property": "amount", "window": "30d"}
BACKFILL_AT = (10, 50)  # definition counts whose run also measures a backfill (at 200 it takes as long as the run)
LATENCY_DEFINITIONS = 10  # the configuration the latency runs use (its audiences include `active`)
LATENCY_RATE = 5_000  # events/s offered
LATENCY_SECONDS = 20
SUSTAINED_SHARE = 0.6  # of the rate the stage showed, when it can't take LATENCY_RATE
WARM_UP_EVENTS = 400
DRAIN_TIMEOUT_S = 900.0
METRIC_LINE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')

def fill(settings: Settings, records: Sequence[tuple[bytes, bytes]]) -> None:
    """Write (key, value) records to events.resolved, partitioned by key as Faust and identity do."""
    produce_all(settings, EVENTS_RESOLVED.name(settings), records)


# -- the worker ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """What one GET /metrics said about the compute stage."""

    counters: dict[str, float]  # cdp_compute_total by `what`
    lag: dict[int, float]  # events.resolved partition -> records not applied yet


def scrape(url: str, resolved: str) -> Scrape:
    counters: dict[str, float] = {}
    lag: dict[int, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match[1], dict(LABEL.findall(match[2])), float(match[3])
        if name == "cdp_compute_total":
            counters[labels["what"]] = value
        elif name == "cdp_consumer_lag" and labels.get("stage") == "compute" and labels.get("topic") == resolved:
            lag[int(labels["partition"])] = value
    return Scrape(counters, lag)


def get_json(url: str, timeout: float = 60) -> dict[str, Any]:
    """GET a worker view, retrying while it answers 503 (a partition without a ready owner)."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(url, timeout=30)
        if response.ok or time.monotonic() > deadline:
            response.raise_for_status()
            return response.json()
        time.sleep(0.2)


def wait_definitions_settled(url: str, partitions: int, timeout: float = 300) -> float:
    """Until every partition recorded the configured generations and finished their (empty) backfill runs."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = get_json(f"{url}/v1/backfills")
        if not body["runs"] and len({run["partition"] for run in body["done"]}) == partitions:
            return time.perf_counter() - started
        time.sleep(0.25)
    raise TimeoutError(f"the configured definitions were not settled on every partition within {timeout:.0f}s")


@contextmanager
def worker(bench: Bench) -> Iterator[tuple[str, int]]:
    """One `cdp worker` with the admin token, settled on its configured definitions: (web URL, pid)."""
    bench = replace(bench, env={**bench.env, "CDP_ADMIN_TOKEN": ADMIN_TOKEN})
    with workers(bench, 1) as processes:
        url = f"http://127.0.0.1:{bench.settings.web_port}"
        group_stable(bench.settings)
        wait_definitions_settled(url, EVENTS_RESOLVED.partition_count(bench.settings))
        yield url, processes[0].pid


def group_stable(settings: Settings, tries: int = 20) -> None:
    """bench.identity's wait, retried while a fresh broker is still loading its group coordinator."""
    for attempt in range(tries):
        try:
            return wait_group_stable(settings, 1)
        except KafkaException:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)


def rss_mib(pid: int) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    return round(int(line.split()[1]) / 1024, 1)


def drain(bench: Bench, url: str, pid: int, records: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    """Write the input and wait until compute applied it all; events/s and CPU from the first poll that shows
    compute at work (the events it had applied by then are not counted) to the one that shows all applied."""
    events, resolved = len(records), EVENTS_RESOLVED.name(bench.settings)
    partitions = EVENTS_RESOLVED.partition_count(bench.settings)
    writer = threading.Thread(target=fill, args=(bench.settings, records), daemon=True)
    written_at = time.perf_counter()
    writer.start()
    first: tuple[float, float, float] | None = None  # (time, events applied, cpu)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        state = scrape(url, resolved)
        now, applied = time.perf_counter(), state.counters.get("events", 0.0)
        if first is None and applied > 0:
            first = (now, applied, cpu_seconds(pid))
        if applied >= events * (1 - 1e-6) and len(state.lag) == partitions and not any(state.lag.values()):
            break  # /metrics prints counters with 6 significant digits: the lag says "all" exactly
        if time.monotonic() > deadline:
            raise TimeoutError(f"compute applied {applied:.0f} of {events} events within {DRAIN_TIMEOUT_S:.0f}s")
        time.sleep(0.1)
    assert first is not None  # the loop ends only once events were applied
    cpu = cpu_seconds(pid) - first[2]
    writer.join()
    measured, seconds = events - first[1], now - first[0]
    return {
        "events": events, "measured_events": int(measured), "seconds": round(seconds, 2),
        "events_per_s": round(measured / seconds, 1), "cpu_s_per_million": round(cpu / measured * 1e6, 1),
        "seconds_from_first_write": round(now - written_at, 2), "events_per_s_from_first_write": round(events / (now - written_at), 1),
        "worker_rss_mib": rss_mib(pid), "counters": {k: int(v) for k, v in state.counters.items()},
    }  # fmt: skip


# -- backfill ------------------------------------------------------------------------------------------------


def backfill(url: str, pid: int, partitions: int, events: int) -> dict[str, Any]:
    """POST a new trait and wait until every partition has read its history and settled its profiles."""
    cpu0, started = cpu_seconds(pid), time.perf_counter()
    response = requests.post(f"{url}/v1/definitions/traits", json=BACKFILL_TRAIT, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    response.raise_for_status()
    prefix = f"trait:{BACKFILL_TRAIT['key']}@{response.json()['version']}."
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        body = get_json(f"{url}/v1/backfills")
        runs = [run for run in body["runs"] if run["gen"].startswith(prefix)]
        done = [run for run in body["done"] if run["gen"].startswith(prefix)]
        if not runs and len({run["partition"] for run in done}) == partitions:
            break
        time.sleep(0.2)
    else:
        raise TimeoutError(f"the backfill of {BACKFILL_TRAIT['key']} did not finish within {DRAIN_TIMEOUT_S:.0f}s")
    seconds, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu0
    read, counted, settled = (sum(run[field] for run in done) for field in ("read", "counted", "settled"))
    span = (max(run["finished"] for run in done) - min(run["started"] for run in done)) / 1000
    return {
        "definition": BACKFILL_TRAIT, "past_events": events, "read": read, "counted": counted, "profiles_settled": settled,
        "seconds_from_post": round(seconds, 2), "events_per_s": round(read / seconds, 1),
        "seconds_runs_recorded_to_done": round(span, 2), "events_per_s_runs_recorded_to_done": round(read / span, 1),
        "cpu_s_per_million_read": round(cpu / max(read, 1) * 1e6, 1),
    }  # fmt: skip


# -- state ---------------------------------------------------------------------------------------------------


def changelog_stats(settings: Settings, events: int) -> dict[str, Any]:
    """The compute changelog as written (every record) and as compaction would keep it (latest per key)."""
    topic = COMPUTE_STATE.name(settings)
    codec = AvroCodec("compute_state", SchemaRepository.load())
    consumer = catch_up_consumer(settings.kafka_bootstrap, f"{topic}.bench-stats", read_committed=True)
    written = Counter[str]()
    latest: dict[str, int] = {}
    profiles: dict[str, bytes] = {}

    def take(message: Any) -> None:
        key, value = message.key().decode(), message.value()
        written["records"] += 1
        written["bytes"] += len(key) + len(value or b"")
        if value is None:
            latest.pop(key, None)
            profiles.pop(key, None)
        else:
            latest[key] = len(key) + len(value)
            if key.startswith("p|"):
                profiles[key] = value

    try:
        for partition in range(COMPUTE_STATE.partition_count(settings)):
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            read_chunks(consumer, topic, partition, 0, high, 10**9, take, lambda _: None)
    finally:
        consumer.close()
    by_kind: dict[str, dict[str, int]] = {}
    for key, size in latest.items():
        kind = by_kind.setdefault(re.match(r"[^|#]*[|#]?", key).group(0), {"records": 0, "bytes": 0})  # type: ignore[union-attr]
        kind["records"] += 1
        kind["bytes"] += size
    count = max(len(profiles), 1)
    fields = Counter[str]()
    for value in profiles.values():
        for name, part in codec.decode(value)["record"].items():
            fields[name] += len(orjson.dumps(part))
    return {
        "profiles": len(profiles),
        "profile_record_bytes_per_profile": round(by_kind.get("p|", {}).get("bytes", 0) / count),
        "profile_record_json_bytes_by_field_per_profile": {name: round(n / count) for name, n in fields.most_common()},
        "live_state_bytes_per_profile": round(sum(latest.values()) / count),
        "live_state_by_key_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])),
        "changelog_records_written": written["records"], "changelog_bytes_written": written["bytes"],
        "changelog_bytes_written_per_profile": round(written["bytes"] / count),
        "changelog_bytes_written_per_event": round(written["bytes"] / max(events, 1)),
    }  # fmt: skip


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- one configuration ---------------------------------------------------------------------------------------


def configuration(shared: Settings, count: int, events: int, *, floor: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Throughput, backfill and state for `count` definitions on fresh topics; the floor on the same input."""
    traits, audiences = definitions(count)
    catalog = build_catalog(traits, audiences)
    with bench_pipeline(shared, {"traits": traits, "audiences": audiences}) as bench:
        run = bench.settings.topics.prefix
        records = encode(event_stream(events, run))
        partitions = EVENTS_RESOLVED.partition_count(bench.settings)
        with worker(bench) as (url, pid):
            measured_from = log_sizes(bench)
            result = drain(bench, url, pid, records)
            print(f"compute: {count} definitions: {result['events_per_s']} events/s", file=sys.stderr)
            result["state"] = changelog_stats(bench.settings, events)
            result["state"]["rocksdb_dir_bytes_per_profile"] = round(
                directory_bytes(bench.scratch / "data") / max(result["state"]["profiles"], 1))
            if count in BACKFILL_AT:
                result["backfill"] = backfill(url, pid, partitions, events)
                print(f"compute: {count} definitions: backfill {result['backfill']['events_per_s']} events/s", file=sys.stderr)
            result["dead_lettered"] = dead_letters(bench.settings)
            warnings = log_warnings(measured_from)
        for line in warnings[:20]:
            print(f"[{run}] {line}", file=sys.stderr)
        result["worker_log_warnings_while_measured"] = len(warnings)
        floor_result = decode_encode_floor(bench.settings, events) if floor else None
    shape = {"definitions": count, "traits": len(traits), "audiences": len(audiences), "hidden_event_counters": len(catalog.counters),
             "profiles": PROFILES}  # fmt: skip
    return {**shape, **result}, floor_result


def dead_letters(settings: Settings) -> int:
    return end_offsets(settings, EVENTS_DEAD_LETTER.name(settings))


def decode_encode_floor(settings: Settings, events: int) -> dict[str, Any]:
    """Consume events.resolved, decode each ResolvedEvent, encode it again, produce it (same partition, acks=all)."""
    codec = AvroCodec("resolved_event", SchemaRepository.load())
    return consume_produce_floor(settings, EVENTS_RESOLVED.name(settings), events, lambda value: codec.encode(codec.decode(value)))


# -- latency -------------------------------------------------------------------------------------------------


class Collector(threading.Thread):
    """Every record of audience.membership as a read_committed consumer receives it: (ms received, record)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        topic = AUDIENCE_MEMBERSHIP.name(settings)
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{topic}.bench-{uuid.uuid4().hex[:6]}",
                                  "isolation.level": "read_committed", "enable.auto.commit": False,
                                  "fetch.wait.max.ms": 10})  # a waiting fetch would add up to 500 ms (the default)
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(AUDIENCE_MEMBERSHIP.partition_count(settings))])
        self.codec = AvroCodec("audience_membership_change", SchemaRepository.load())
        self.received: list[tuple[float, int, bytes]] = []  # (ms received, Kafka timestamp, value)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            message = self.consumer.poll(0.05)
            if message is not None and message.error() is None:
                self.received.append((time.time() * 1000, message.timestamp()[1], message.value()))
        self.consumer.close()

    def entered(self, prefix: str, since: int = 0) -> dict[str, tuple[float, int, dict[str, Any]]]:
        """message id -> (ms received, Kafka timestamp, change) of `active` entries for events of `prefix`."""
        found = {}
        for received, stamp, value in self.received[since:]:
            change = self.codec.decode(value)
            if change["audience"] == "active" and change["transition"] == "entered" and (change["message_id"] or "").startswith(prefix):
                found[change["message_id"]] = (received, stamp, change)
        return found

    def wait_for(self, prefix: str, count: int, timeout: float, stall: float = 60.0) -> None:
        """Until `count` entries for `prefix` arrived, `timeout` passed, or none arrived for `stall` seconds."""
        deadline, seen, last_change = time.monotonic() + timeout, 0, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_change < stall:
            now_seen = len(self.received)
            if now_seen != seen:
                seen, last_change = now_seen, time.monotonic()
                if len(self.entered(prefix)) >= count:
                    return
            time.sleep(0.5)


def orders(prefix: str, count: int, start_ms: float, rate: float) -> list[tuple[bytes, bytes]]:
    """`count` Order Completed events, each for a new profile, stamped with the time they are due to be sent."""
    rng = random.Random(prefix)
    return encode([resolved_event(rng, f"{prefix}-n{i}", f"{prefix}-m{i}", int(start_ms + i * 1000 / rate), "Order Completed")
                   for i in range(count)])  # fmt: skip


def send_steady(settings: Settings, records: Sequence[tuple[bytes, bytes]], start: float, rate: float) -> tuple[float, float]:
    """Send record i at `start` + i / rate (open loop: a late send is not rescheduled); returns (first, last) send."""
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    topic = EVENTS_RESOLVED.name(settings)
    while time.time() < start:
        time.sleep(0.0005)
    first, sent = time.time(), 0
    while sent < len(records):
        due = min(len(records), int((time.time() - start) * rate) + 1)
        while sent < due:
            key, value = records[sent]
            try:
                producer.produce(topic, value, key)
                sent += 1
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
        time.sleep(0.0005)
    last = time.time()
    producer.flush(60)
    return first, last


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def steady_run(settings: Settings, collector: Collector, rate: float, seconds: float, prefix: str) -> dict[str, Any]:
    """Offer `rate` events/s for `seconds`, each entering `active` for a new profile; latencies of the entries."""
    count = int(rate * seconds)
    sample = time.perf_counter()
    orders(prefix + "-sample", 1_000, time.time() * 1000, rate)
    per_event = (time.perf_counter() - sample) / 1_000
    start = time.time() + per_event * count * 1.5 + 1.0  # encoded before the first is due
    records = orders(prefix, count, start * 1000, rate)
    first, last = send_steady(settings, records, start, rate)
    collector.wait_for(prefix, count, DRAIN_TIMEOUT_S)
    entries = collector.entered(prefix)
    receive = [received - change["timestamp"] for received, _, change in entries.values()]
    written = [stamp - change["timestamp"] for _, stamp, change in entries.values()]
    by_end_of_sending = sum(1 for received, _, _ in entries.values() if received <= last * 1000)
    times = sorted(received for received, _, _ in entries.values())
    result: dict[str, Any] = {
        "offered_events_per_s": rate, "seconds": seconds, "events": count, "entered_changes_received": len(entries),
        "send_started_late_ms": round((first - start) * 1000, 1), "sent_events_per_s": round(count / max(last - first, 1e-9), 1),
        "backlog_when_sending_ended": count - by_end_of_sending,
    }  # fmt: skip
    if len(receive) >= 4:
        by_send = [received - change["timestamp"] for received, _, change in sorted(entries.values(), key=lambda e: e[2]["timestamp"])]
        quarter = len(by_send) // 4
        early, late = statistics.median(by_send[:quarter]), statistics.median(by_send[-quarter:])
        result["latency_ms_received_read_committed"] = summary(receive)
        result["latency_ms_change_written"] = summary(written)
        result["latency_ms_p50_first_quarter_of_sends"], result["latency_ms_p50_last_quarter_of_sends"] = round(early, 1), round(late, 1)
        result["applied_events_per_s"] = round(len(times) / max((times[-1] - times[0]) / 1000, 1e-9), 1)
        # Kept up: latency did not grow over the run (a growing backlog adds seconds over 20 s of load).
        result["sustained"] = len(entries) == count and late <= early + 1_000
    else:
        result["sustained"] = False
    return result


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 1), "p90": round(percentile(values, 0.9), 1),
            "p99": round(percentile(values, 0.99), 1), "max": round(max(values), 1)}  # fmt: skip


def latency(shared: Settings, count: int) -> dict[str, Any]:
    """On fresh topics: a warm-up, then LATENCY_RATE offered; if the stage fell behind, SUSTAINED_SHARE of what it did."""
    traits, audiences = definitions(count)
    with bench_pipeline(shared, {"traits": traits, "audiences": audiences}) as bench:
        run = bench.settings.topics.prefix
        with worker(bench) as (url, pid):
            collector = Collector(bench.settings)
            collector.start()
            try:
                fill(bench.settings, orders(f"{run}-warm", WARM_UP_EVENTS, time.time() * 1000, 1_000))
                collector.wait_for(f"{run}-warm", WARM_UP_EVENTS, 120)
                runs = [steady_run(bench.settings, collector, LATENCY_RATE, LATENCY_SECONDS, f"{run}-r{LATENCY_RATE}")]
                print(f"compute: latency at {LATENCY_RATE}/s: {runs[-1].get('latency_ms_received_read_committed')}", file=sys.stderr)
                if not runs[-1]["sustained"] and runs[-1].get("applied_events_per_s"):
                    rate = round(runs[-1]["applied_events_per_s"] * SUSTAINED_SHARE, -1)
                    runs.append(steady_run(bench.settings, collector, rate, LATENCY_SECONDS, f"{run}-r{rate:.0f}"))
                    print(f"compute: latency at {rate}/s: {runs[-1].get('latency_ms_received_read_committed')}", file=sys.stderr)
                cpu = cpu_seconds(pid)
            finally:
                collector.stopping.set()
                collector.join(10)
    return {"definitions": count, "audience": ACTIVE, "worker_cpu_s_total": round(cpu, 1), "runs": runs}


# -- the whole bench -----------------------------------------------------------------------------------------


def run_compute_bench(settings: Settings, *, events: int, out: Path | None) -> str:
    """Three configurations, then the latency runs, on one broker (a temporary local one if none is reachable)."""
    started = time.perf_counter()
    with bench_pipeline(settings) as first:
        shared = replace(settings, kafka_bootstrap=first.settings.kafka_bootstrap)  # every configuration uses its broker
        report = first.header("compute")
        report["input"] = {"events_per_configuration": events, "profiles": PROFILES,
                           "mix": "Order Completed 20 %, Product Viewed 50 %, page 25 %, identify 5 %; stamped over the last 10 min"}  # fmt: skip
        report["compute"] = []
        floor = None
        for count in DEFINITION_COUNTS:
            result, floor_result = configuration(shared, count, events, floor=floor is None)
            floor = floor or floor_result
            report["compute"].append(result)
        report["floor_confluent_consume_decode_encode_produce"] = floor
        report["latency"] = latency(shared, LATENCY_DEFINITIONS)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    return write_report(report, out)
