"""How far the pipeline is behind the ingest, read from Kafka: the ingest's backpressure signal (`ingest.max_lag`).

The lag is the number of events the ingests wrote that the last stage has not applied yet, counted from the
offsets of the workers' consumer group (`<prefix>-pipeline`), not from one process's memory: several ingests
write and several workers read. For each input hop — `events.accepted` (read by dedup), `events.raw` (identity),
`events.resolved` (compute) — it sums over partitions the high watermark minus the group's committed offset (a
partition the group never committed counts from its low watermark, where `auto_offset_reset=earliest` starts),
and adds the three hops.

Why the sum: an event the ingest wrote and compute has not applied is in exactly one hop's backlog — accepted
until dedup passed it on, raw until identity resolved it (identity commits `events.raw` no further than the
oldest event whose saga still waits for its commands, topology/stages/identity.py `held`: while they travel the
event is on no topic), resolved until compute applied it — so the sum counts it once;
duplicates that dedup drops and records that go to a dead letter leave the count. Committed offsets trail what
the stages did: a stage's output is on the next hop before the input it came from is committed (every 0.2 s,
topology/graph.py), so for up to one commit interval an event counts on two hops (three, if it crossed two).
So a reading errs upwards only, by at most what the stages move in one commit interval (and never more than the
backlog itself), and the ingest refuses a little early rather than late. Identity writes `events.resolved` in
transactions, whose commit markers take an offset each; they count until compute commits past them, and are gone
at rest.

Reading costs a few admin requests (the three topics' metadata, the group's offsets, earliest and latest
offsets of every partition), so a thread reads every POLL_S, off the event loop, and keeps the last reading. Between readings the
ingest adds what it wrote itself since the reading began (acknowledged or in flight): its own flood counts at
once, other ingests' from the next reading. So the backlog can pass `max_lag` by the last request each ingest let
through plus what other ingests accept within one poll; a reading (what /metrics shows) can pass it by the
double counting above too. A reading that fails never fails a request: the lag is then unknown and the ingest
accepts (it logs the first failure of a streak and the recovery, and counts every failure on /metrics).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from topology.config import Settings
from topology.web.metrics import Metric
from topology.topics import EVENTS_ACCEPTED, EVENTS_RAW, EVENTS_RESOLVED

log = logging.getLogger(__name__)
POLL_S = 0.5
REQUEST_TIMEOUT_S = 5.0
HOPS = (("dedup", EVENTS_ACCEPTED), ("identity", EVENTS_RAW), ("compute", EVENTS_RESOLVED))  # stage, topic it reads


@dataclass(frozen=True)
class Offsets:
    """One partition's earliest and latest offsets and the group's committed offset (None: never committed)."""

    low: int
    high: int
    committed: int | None


def partition_lag(offsets: Offsets) -> int:
    """Records on the partition the group has not consumed: from its committed offset, or from the low watermark
    when it has none (or when retention deleted what it had not read yet)."""
    start = offsets.low if offsets.committed is None else max(offsets.committed, offsets.low)
    return max(offsets.high - start, 0)


def hop_lags(partitions: Mapping[tuple[str, int], Offsets], topics: Mapping[str, str]) -> dict[str, int]:
    """Stage -> the sum of its input partitions' lags; `topics` maps each stage to the topic it reads."""
    return {stage: sum(partition_lag(o) for (t, _), o in partitions.items() if t == topic) for stage, topic in topics.items()}


def pipeline_group(settings: Settings) -> str:
    """The workers' consumer group: the Faust app id of topology/app.py's create_app."""
    return f"{settings.topics.prefix}-pipeline"


class KafkaLagReader:
    """Reads the hops' offsets with one AdminClient (made on the first reading); blocking, so call it from a thread."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap, self.group = settings.kafka_bootstrap, pipeline_group(settings)
        self.topics = {stage: spec.name(settings) for stage, spec in HOPS}
        self._admin: AdminClient | None = None

    def __call__(self) -> dict[str, int]:
        admin = self._admin = self._admin or AdminClient({"bootstrap.servers": self.bootstrap})
        tps: list[TopicPartition] = []
        for topic in self.topics.values():  # one topic's metadata at a time: a cluster may hold thousands of topics
            found = admin.list_topics(topic, timeout=REQUEST_TIMEOUT_S).topics.get(topic)
            if found is None or found.error is not None:
                raise KafkaException(f"topic {topic} is not readable: {found.error if found else 'missing'}")
            tps.extend(TopicPartition(topic, partition) for partition in sorted(found.partitions))
        request = [ConsumerGroupTopicPartitions(self.group, tps)]  # committed before watermarks: errs upwards
        group = admin.list_consumer_group_offsets(request, request_timeout=REQUEST_TIMEOUT_S)[self.group]
        committed = {(tp.topic, tp.partition): tp.offset for tp in group.result(REQUEST_TIMEOUT_S).topic_partitions}
        low, high = _offsets(admin, tps, OffsetSpec.earliest()), _offsets(admin, tps, OffsetSpec.latest())
        partitions = {
            key: Offsets(low[key], high[key], committed[key] if committed.get(key, -1) >= 0 else None) for key in low
        }
        return hop_lags(partitions, self.topics)


def _offsets(admin: AdminClient, tps: list[TopicPartition], spec: OffsetSpec) -> dict[tuple[str, int], int]:
    futures = admin.list_offsets({tp: spec for tp in tps}, request_timeout=REQUEST_TIMEOUT_S)
    return {(tp.topic, tp.partition): future.result(REQUEST_TIMEOUT_S).offset for tp, future in futures.items()}


class PipelineLag:
    """The last reading of the pipeline's lag, refreshed by a thread; `refuses()` is the ingest's 429 decision.

    `read` returns stage -> lag (KafkaLagReader in production); `acknowledged` counts the events this process
    wrote and Kafka acknowledged so far, `in_flight` those it is writing now.
    """

    def __init__(
        self, max_lag: int, read: Callable[[], dict[str, int]], acknowledged: Callable[[], int], in_flight: Callable[[], int],
        interval_s: float = POLL_S,
    ) -> None:  # fmt: skip
        self.max_lag, self.interval_s = max_lag, interval_s
        self._read, self._acknowledged, self._in_flight = read, acknowledged, in_flight
        self._reading: tuple[dict[str, int], int] | None = None  # (stage -> lag, `acknowledged` when the reading began)
        self.failures = 0
        self.error: str | None = None
        self.refusals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-lag", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(REQUEST_TIMEOUT_S * 4)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        """One reading; on failure the lag becomes unknown (requests are accepted) until a reading succeeds."""
        acknowledged = self._acknowledged()  # before the offsets: what is acknowledged meanwhile counts twice, not never
        try:
            hops = self._read()
        except Exception as exc:  # whatever the reading raises, the ingest keeps serving
            self.failures += 1
            if self.error is None:
                log.warning("can't read the pipeline's lag from Kafka; accepting without backpressure: %s", exc)
            self.error, self._reading = str(exc), None
            return
        if self.error is not None:
            log.info("reading the pipeline's lag from Kafka again (after %d failed readings)", self.failures)
        self.error, self._reading = None, (hops, acknowledged)  # one assignment: the event loop sees both or neither

    def lag(self) -> int | None:
        """Events behind: the last reading plus what this process wrote since it began; None while unknown."""
        reading = self._reading
        if reading is None:
            return None
        hops, acknowledged_then = reading
        return sum(hops.values()) + self._acknowledged() - acknowledged_then + self._in_flight()

    def refuses(self) -> int | None:
        """The lag when it is past `max_lag`, counting the refusal; None: accept (also while unknown, or when off)."""
        lag = self.lag()
        if not self.max_lag or lag is None or lag <= self.max_lag:
            return None
        self.refusals += 1
        return lag

    def metrics(self) -> list[Metric]:
        hops = Metric("cdp_ingest_pipeline_lag", "gauge", "events not applied yet, per stage input (last reading)")
        reading = self._reading
        for stage, lag in (reading[0] if reading else {}).items():
            hops.add(lag, stage=stage)
        bound = Metric("cdp_ingest_max_lag", "gauge", "ingest.max_lag: past this lag events get 429 (0: off)")
        refusals = Metric("cdp_ingest_lag_refusals_total", "counter", "requests refused with 429 for the pipeline's lag")
        errors = Metric("cdp_ingest_lag_read_errors_total", "counter", "readings of the pipeline's lag that failed")
        return [hops, bound.add(self.max_lag), refusals.add(self.refusals), errors.add(self.failures)]
