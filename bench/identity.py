"""`cdp bench identity`: the identity stage (1 and 2 workers) at merge shares 0, 5 and 30 %,
beside a raw confluent-kafka consume→decode→encode→produce loop.

The input is a synthetic population written straight to `events.raw`: new people (userId + anonymousId, one
fresh profile), repeats of a known person's ids, anonymous-only visitors (a profile of their own) and merge
events (a visitor's anonymousId with a known person's userId: two profiles that exist separately, joined by
"identifier match"). Every id an event refers back to was first sent a few hundred events earlier, and all
events touching one person share a partition of events.raw, so the merge share is what the stage really does
(see Population). No event links two userIds (limit 1) and no person takes more visitors than anonymous_id's
limit 5 allows: those joins would be refused, not merged.

Each configuration gets its own topics (its own prefix) and scratch state, so nothing one run resolved helps
the next. Its workers join the consumer group on empty topics and the input is written once the group is
stable: neither start-up nor a rebalance is counted, and writing takes a fraction of a second against the
stage's many seconds. Throughput runs from the first resolved record to the last; CPU is the sum of the
worker processes' over that span. The floor reads the same kind of input pre-filled, decodes each raw_event,
encodes a resolved_event and writes it acks=all: the Kafka and Avro cost without any identity work.
"""

from __future__ import annotations

import itertools
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, OFFSET_BEGINNING, TopicPartition
from confluent_kafka.admin import AdminClient

from agents.events import RawEvent
from agents.identity.rules import IdentityRules
from bench.common import produce_all, Bench, bench_pipeline, consume_produce_floor, cpu_seconds, wait_healthy, write_report
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import Settings
from topology.runtime.partitioning import partition_for
from topology.ops.kafka_local import free_ports
from topology.topics import EVENTS_DEAD_LETTER, EVENTS_RAW, EVENTS_RESOLVED, IDENTITY_MERGES

MERGE_SHARES = (0.0, 0.05, 0.3)
WORKER_COUNTS = (1, 2)
LAG = 500  # events between an id's first sighting and any later event that refers to it (at most a tenth of all)
NEW_PERSON_SHARE = 0.3  # of the plain events once there are people enough to merge into; the rest repeat one
MERGES_PER_PERSON = IdentityRules().rule("anonymous_id").limit.count - 1  # a 5th visitor's id would be refused
DRAIN_TIMEOUT_S = 900.0
WARNING_LINE = re.compile(r"\[(WARNING|ERROR|CRITICAL)\]|Traceback")


# -- input ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """Someone with a userId and an anonymousId on one profile, and the events.raw partition all their events use."""

    first: int  # position of their first event
    user_id: str
    anonymous_id: str
    home: int


@dataclass
class Population:
    """Who exists so far, and message ids that send every event touching a person to that person's partition.

    Kafka orders only within a partition, and a pre-written backlog is not read in offset order across
    partitions: an event thousands of positions later can be resolved before one on another partition. On one
    partition the earlier event's claims reach each identifier's owner first, so every merge is the one the
    stream meant ("identifier match"), never a race between a new id and its first sighting ("new identifiers").
    """

    run: str
    rng: random.Random
    lag: int
    partitions: int
    persons: list[Person] = field(default_factory=list)
    aged: int = 0  # persons[:aged] were first sent at least `lag` events ago: the ones repeats refer to
    open: list[int] = field(default_factory=list)  # persons that may still take another visitor's anonymous_id
    taken: Counter[int] = field(default_factory=Counter)
    serial: int = 0

    def fresh(self, kind: str) -> str:
        self.serial += 1
        return f"{self.run}-{kind}{self.serial}"

    def message_id(self, position: int, home: int) -> str:
        """A messageId that Faust and our producers hash to partition `home` (about `partitions` tries)."""
        for attempt in itertools.count():
            message_id = f"{self.run}-m{position}-{attempt}"
            if partition_for(message_id, self.partitions) == home:
                return message_id
        raise AssertionError("unreachable")

    def advance(self, position: int) -> None:
        while self.aged < len(self.persons) and self.persons[self.aged].first <= position - self.lag:
            self.aged += 1

    def new_person(self, position: int) -> Person:
        person = Person(position, self.fresh("u"), self.fresh("a"), self.rng.randrange(self.partitions))
        self.open.append(len(self.persons))
        self.persons.append(person)
        return person

    def repeat(self) -> Person:
        return self.persons[self.rng.randrange(self.aged)]

    def reserve(self) -> Person:
        """A person below MERGES_PER_PERSON visitors, for a visitor to be merged into (the caller checks `open`)."""
        slot = self.rng.randrange(len(self.open))
        index = self.open[slot]
        self.taken[index] += 1
        if self.taken[index] >= MERGES_PER_PERSON:
            self.open[slot] = self.open[-1]
            self.open.pop()
        return self.persons[index]


def raw_event(message_id: str, at: int, user_id: str | None, anonymous_id: str | None, *, identify: bool) -> RawEvent:
    """A call as the ingest would have written it; no email or device id, so only the two ids link anything."""
    return RawEvent(
        message_id=message_id, type="identify" if identify else "track", source="bench", user_id=user_id,
        anonymous_id=anonymous_id, event=None if identify else "Product Viewed", name=None, category=None,
        group_id=None, previous_id=None,
        properties={} if identify else {"sku": f"sku-{at % 1000}", "price": 19.99, "currency": "USD"},
        traits={"plan": "pro"} if identify else {},
        context={"library": {"name": "cdp-bench", "version": "1"}, "ip": "10.0.0.1", "locale": "en-US",
                 "userAgent": "Mozilla/5.0 (X11; Linux x86_64)"},
        integrations={}, timestamp=at, original_timestamp=at, sent_at=at, received_at=at, extra={},
    )  # fmt: skip


def identity_stream(events: int, merge_share: float, run: str, partitions: int) -> tuple[list[RawEvent], dict[str, int]]:
    """`events` calls of which `merge_share` join two existing profiles; returns them and the count per kind.

    Visitors (an anonymousId alone, a profile of its own) start evenly over the stream but its end, each
    promised to a person who exists already; `lag` events later its merge event carries the visitor's
    anonymousId and the person's userId. Every other position is a new person (always, until there are people
    enough for every merge) or a repeat of a person first sent `lag` events ago.
    """
    lag = min(LAG, events // 10)
    merges = round(events * merge_share)
    rate = merges / max(events - lag - lag // 4, 1)
    population = Population(run, random.Random(f"{run}-{merge_share}"), lag, partitions)
    base = int(time.time() * 1000) - events  # 1 ms apart, ending now
    stream: list[RawEvent] = []
    kinds: Counter[str] = Counter()
    due: list[tuple[int, Person, str]] = []  # (position, person, visitor's anonymous_id), in position order
    visitors = 0

    def add(kind: str, position: int, person: Person, user_id: str | None, anonymous_id: str) -> None:
        message_id = population.message_id(position, person.home)
        stream.append(raw_event(message_id, base + position, user_id, anonymous_id, identify=kind == "merge"))
        kinds[kind] += 1

    for position in range(events):
        population.advance(position)
        if due and due[0][0] <= position:
            _, person, anonymous_id = due.pop(0)
            add("merge", position, person, person.user_id, anonymous_id)
        elif visitors < merges and visitors < rate * (position + 1) and population.open:
            person, anonymous_id = population.reserve(), population.fresh("a")
            add("visitor", position, person, None, anonymous_id)
            due.append((position + lag, person, anonymous_id))
            visitors += 1
        elif not population.aged or len(population.persons) * MERGES_PER_PERSON < merges or population.rng.random() < NEW_PERSON_SHARE:
            person = population.new_person(position)
            add("new_person", position, person, person.user_id, person.anonymous_id)
        else:
            person = population.repeat()
            add("repeat", position, person, person.user_id, person.anonymous_id)
    if due or visitors < merges:
        raise ValueError(f"{merges - kinds['merge']} merges did not fit in {events} events at share {merge_share}: use more events")
    return stream, dict(kinds)


def fill(settings: Settings, stream: list[RawEvent]) -> None:
    """Write the calls to events.raw keyed by messageId, as dedup would have: partitioned like Faust hashes."""
    codec = AvroCodec("raw_event", SchemaRepository.load())
    produce_all(settings, EVENTS_RAW.name(settings), ((event["message_id"].encode(), codec.encode(event)) for event in stream))


# -- reading topics ------------------------------------------------------------------------------------------


class Watermarks:
    """One consumer kept open for end offsets: polling with a new client each time would steal the workers' CPU."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-watermarks"})

    def total(self, topic: str) -> int:
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)

    def close(self) -> None:
        self._consumer.close()


def read_all(settings: Settings, topic: str, schema: str) -> list[dict[str, Any]]:
    """Every record a topic holds now, decoded: assigned from the start, read up to each end offset."""
    codec = AvroCodec(schema, SchemaRepository.load())
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{topic}.bench-read", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        left = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in left])
        records: list[dict[str, Any]] = []
        while left:
            for message in consumer.consume(num_messages=10_000, timeout=1.0):
                if message.error() is None:
                    records.append(codec.decode(message.value()))  # type: ignore[arg-type]
                    if message.offset() + 1 >= ends[message.partition()]:
                        left.discard(message.partition())
        return records
    finally:
        consumer.close()


# -- the floor -----------------------------------------------------------------------------------------------


def floor(settings: Settings, events: int) -> dict[str, Any]:
    """Consume events.raw, decode, encode a resolved_event, produce it to a floor topic (same partition, acks=all)."""
    repository = SchemaRepository.load()
    raw, resolved = AvroCodec("raw_event", repository), AvroCodec("resolved_event", repository)

    def decode_encode(value: bytes) -> bytes:
        return resolved.encode({"profile_id": "p-floor", "identifiers": [], "event": raw.decode(value)})

    return consume_produce_floor(settings, EVENTS_RAW.name(settings), events, decode_encode)

# -- the stage -----------------------------------------------------------------------------------------------


@contextmanager
def workers(bench: Bench, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` real `cdp worker` processes, each on its own web port (and so its own RocksDB dir), logging to scratch."""
    ports = [bench.settings.web_port, *free_ports(count - 1)]
    logs = bench.scratch / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with ExitStack() as files:
            for port in ports:
                log = files.enter_context((logs / f"worker-{port}.log").open("wb"))
                processes.append(subprocess.Popen([sys.executable, "-m", "topology.ops.cli", "worker", "--loglevel", "warn"],
                                                  env={**bench.env, "CDP_WEB_PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
            for port, process in zip(ports, processes, strict=True):
                try:
                    wait_healthy(f"http://127.0.0.1:{port}", timeout=120)
                except Exception:
                    tail = (logs / f"worker-{port}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the worker on port {port} did not start (exit {process.poll()}):\n{tail}") from None
            yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_group_stable(settings: Settings, members: int, timeout: float = 120) -> None:
    """Until the Faust app's consumer group has `members` members, each with partitions: no rebalance to come."""
    group = f"{settings.topics.prefix}-pipeline"  # the Faust app id
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            description = admin.describe_consumer_groups([group])[group].result()
        except KafkaException as exc:  # a new group's coordinator may still be loading: ask again
            if not exc.args[0].retriable():
                raise
            time.sleep(0.5)
            continue
        assigned = [m for m in description.members if m.assignment and m.assignment.topic_partitions]
        if description.state == ConsumerGroupState.STABLE and len(description.members) == members == len(assigned):
            return
        time.sleep(0.5)
    raise TimeoutError(f"consumer group {group} not stable with {members} members within {timeout:.0f}s")


def drain(settings: Settings, processes: list[subprocess.Popen[bytes]], events: int) -> tuple[int, float, float]:
    """Wait until events.resolved holds `events` records; returns (records, seconds, worker CPU s) from the first."""
    resolved = EVENTS_RESOLVED.name(settings)
    watermarks = Watermarks(settings)
    try:
        first = cpu0 = 0.0
        written = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while written < events and time.monotonic() < deadline:
            written = watermarks.total(resolved)
            if written and not first:
                first, cpu0 = time.perf_counter(), sum(cpu_seconds(p.pid) for p in processes)
            time.sleep(0.05)
        return written, time.perf_counter() - first, sum(cpu_seconds(p.pid) for p in processes) - cpu0
    finally:
        watermarks.close()


def merge_log(settings: Settings) -> Counter[str]:
    """Merge-log entries by `kind: rule`, e.g. `merged: identifier match`."""
    return Counter(f"{e['kind']}: {e['rule']}" for e in read_all(settings, IDENTITY_MERGES.name(settings), "merge_log_entry"))


def log_sizes(bench: Bench) -> dict[Path, int]:
    """Where each worker log ends now, so only what is logged while measured counts (not the start's rebalance)."""
    return {log: log.stat().st_size for log in (bench.scratch / "logs").glob("*.log")}


def log_warnings(since: dict[Path, int]) -> list[str]:
    """Lines at WARNING or worse (or tracebacks) the workers logged after `since`; printed and counted."""
    lines: list[str] = []
    for log, offset in sorted(since.items()):
        with log.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
        lines.extend(f"{log.name}: {line}" for line in text.splitlines() if WARNING_LINE.search(line))
    return lines


def stage(bench: Bench, stream: list[RawEvent], worker_count: int) -> dict[str, Any]:
    """Real workers resolving the stream from fresh topics: throughput, CPU and what the merge log shows."""
    events = len(stream)
    with workers(bench, worker_count) as processes:
        wait_group_stable(bench.settings, worker_count)
        measured_from = log_sizes(bench)
        fill(bench.settings, stream)
        written, seconds, cpu = drain(bench.settings, processes, events)
    resolved = read_all(bench.settings, EVENTS_RESOLVED.name(bench.settings), "resolved_event")
    entries = merge_log(bench.settings)
    watermarks = Watermarks(bench.settings)
    dead_lettered = watermarks.total(EVENTS_DEAD_LETTER.name(bench.settings))
    watermarks.close()
    warnings = log_warnings(measured_from)
    for line in warnings[:20]:
        print(f"[{bench.settings.topics.prefix}] {line}", file=sys.stderr)
    return {
        "events": events, "resolved": written, "resolved_distinct_message_ids": len({r["event"]["message_id"] for r in resolved}),
        "seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1), "cpu_s_per_million": round(cpu / events * 1e6, 1),
        "merged_identifier_match": entries.pop("merged: identifier match", 0), "other_merge_log_entries": dict(entries),
        "dead_lettered": dead_lettered, "worker_log_warnings_while_measured": len(warnings),
    }  # fmt: skip


def run_identity_bench(settings: Settings, *, events: int, out: Path | None) -> str:
    """The floor and six stage configurations on one broker (a temporary local one if none is reachable)."""
    with bench_pipeline(settings) as first:
        shared = replace(settings, kafka_bootstrap=first.settings.kafka_bootstrap)  # the others reuse its broker
        report = first.header("identity")
        stream, _ = identity_stream(events, MERGE_SHARES[-1], first.settings.topics.prefix, EVENTS_RAW.partition_count(shared))
        fill(first.settings, stream)
        report["floor_confluent_consume_decode_encode_produce"] = floor(first.settings, len(stream))
        report["identity"] = []
        for share in MERGE_SHARES:
            for worker_count in WORKER_COUNTS:
                with bench_pipeline(shared) as bench:
                    stream, kinds = identity_stream(events, share, bench.settings.topics.prefix, EVENTS_RAW.partition_count(shared))
                    result = stage(bench, stream, worker_count)
                report["identity"].append({"merge_share": share, "workers": worker_count, **result, "input": kinds})
                print(f"identity: share {share} workers {worker_count}: {result['events_per_s']} events/s", file=sys.stderr)
    return write_report(report, out)
