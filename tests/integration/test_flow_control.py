"""Backpressure at the ingest (`ingest.max_lag`) against real Kafka, a real `cdp ingest` and a real `cdp worker`.

A flood sent as fast as the ingest takes it, faster than one worker applies it, is refused with 429 and
Retry-After once the pipeline's lag passes the bound; the lag, read here from Kafka independently of the ingest
(committed offsets of the worker group and the topics' watermarks, through other client calls), stays within the
bound plus the stated overshoot; every event answered 200 is applied. With `max_lag: 0` nothing is refused for
lag; with no worker at all the ingest accepts about `max_lag` events and then refuses.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.support import WRITE_KEY, Pipeline, wait_until

MAX_LAG = 2_000
BATCH = 100  # events per request
SENDERS = 4
HOPS = ("events.accepted", "events.raw", "events.resolved")
# The overshoot allowed: the backlog may pass MAX_LAG by the last request the ingest let through (BATCH); the
# lag as read from committed offsets also counts an event on each hop it crossed within the last Faust commit
# interval (1 s), and at this small bound a worker moves a hop's whole backlog within one interval, so a reading
# may count the backlog once per hop: up to len(HOPS) * (MAX_LAG + BATCH); plus identity's transaction markers on
# events.resolved (an offset per transaction and partition) not yet committed past. Unbounded, the flood reads 13,000+.
MARKERS = 200
OVERSHOOT = (len(HOPS) - 1) * MAX_LAG + len(HOPS) * BATCH + MARKERS


class LagProbe:
    """The pipeline's lag as this test reads it: per hop, sum of (high watermark - committed offset)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.group = f"{pipeline.prefix}-pipeline"
        self.admin = AdminClient({"bootstrap.servers": pipeline.bootstrap})
        self.consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
        self.partitions = [TopicPartition(pipeline.topic(hop), p) for hop in HOPS for p in range(pipeline.partitions)]

    def lag(self) -> int:
        request = [ConsumerGroupTopicPartitions(self.group, self.partitions)]
        result = self.admin.list_consumer_group_offsets(request)[self.group].result(10)
        committed = {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}
        total = 0
        for tp in self.partitions:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            total += high - max(committed.get((tp.topic, tp.partition), -1), low)
        return total

    def close(self) -> None:
        self.consumer.close()


@dataclass
class Flood:
    """Batches of unique messageIds sent by SENDERS threads; a 429 is retried after its Retry-After, as SDKs do."""

    pipeline: Pipeline
    events: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    accepted: list[str] = field(default_factory=list)
    refusals: list[tuple[float, requests.Response]] = field(default_factory=list)
    others: list[requests.Response] = field(default_factory=list)
    retry: bool = True

    def send(self) -> None:
        batches: queue.Queue[list[str]] = queue.Queue()
        for first in range(0, self.events, BATCH):
            batches.put([f"f-{self.run}-{n}" for n in range(first, min(first + BATCH, self.events))])
        threads = [threading.Thread(target=self._sender, args=(batches,)) for _ in range(SENDERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _sender(self, batches: queue.Queue[list[str]]) -> None:
        session = requests.Session()
        while True:
            try:
                ids = batches.get_nowait()
            except queue.Empty:
                return
            body = {"batch": [{"type": "track", "userId": f"u-{self.run}-{i[-2:]}", "event": "Flooded", "messageId": i} for i in ids]}
            response = session.post(f"{self.pipeline.url}/v1/batch", json=body, auth=(WRITE_KEY, ""), timeout=60)
            if response.status_code == 200:
                self.accepted.extend(ids)
            elif response.status_code == 429:
                self.refusals.append((time.monotonic(), response))
                if self.retry:
                    time.sleep(int(response.headers["Retry-After"]))
                    batches.put(ids)
            else:
                self.others.append(response)


def metrics(pipeline: Pipeline) -> dict[str, float]:
    """The ingest's /metrics: sample (name and labels) -> value."""
    text = requests.get(f"{pipeline.url}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def first_reading(pipeline: Pipeline) -> None:
    """Until the ingest has read the lag once (before it, it accepts everything)."""
    wait_until(lambda: 'cdp_ingest_pipeline_lag{stage="dedup"}' in metrics(pipeline), timeout=30, what="the ingest's first reading")


@pytest.fixture
def flow(kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pipeline]:
    """A pipeline whose config sets ingest.max_lag to the test's parameter (MAX_LAG unless parametrized)."""
    max_lag = getattr(request, "param", MAX_LAG)
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, extra_config={"ingest": {"max_lag": max_lag, "retry_after": 1}})
    pipe.create_topics()
    try:
        yield pipe
    finally:
        pipe.stop_all()


def test_a_flood_is_refused_past_max_lag_and_everything_accepted_is_applied(flow: Pipeline) -> None:
    flow.start("ingest")
    flow.start("worker")
    ready = f"http://127.0.0.1:{flow.web_port}/v1/backfills"  # every partition of the worker's stages is assigned
    wait_until(lambda: requests.get(ready, timeout=10).status_code == 200, timeout=90, what="the worker's partitions")
    first_reading(flow)
    failed_readings = metrics(flow)["cdp_ingest_lag_read_errors_total"]  # a fresh broker may answer "coordinator loading"
    probe = LagProbe(flow)
    samples: list[tuple[float, int]] = []
    flood = Flood(flow, events=12_000)
    sending = threading.Thread(target=flood.send)
    started = time.monotonic()
    sending.start()
    while sending.is_alive():
        samples.append((time.monotonic(), probe.lag()))
        time.sleep(0.05)
    sent_for = time.monotonic() - started

    assert not flood.others, [(r.status_code, r.text[:200]) for r in flood.others]
    assert flood.refusals, f"no 429 while {flood.events} events flooded in; lag peaked at {max(lag for _, lag in samples)}"
    for _, response in flood.refusals:
        assert response.headers["Retry-After"] == "1" and response.headers["Content-Type"].startswith("application/json")
        body = response.json()
        assert body["success"] is False and f"ingest.max_lag ({MAX_LAG})" in body["error"], body
    first_refusal = min(at for at, _ in flood.refusals)
    over = [at for at, lag in samples if lag > MAX_LAG + OVERSHOOT]
    timeline = [(round(at - started, 2), lag) for at, lag in samples if at <= first_refusal + 1]
    assert not over or first_refusal < over[0], f"the lag passed the bound and its overshoot before the first 429: {timeline}"
    peak = max(lag for _, lag in samples)
    assert peak <= MAX_LAG + OVERSHOOT, f"lag peaked at {peak}, over {MAX_LAG} + {OVERSHOOT}"
    assert peak > MAX_LAG // 2, f"the flood never brought the lag near the bound (peak {peak}): the test shows nothing"

    assert sorted(flood.accepted) == sorted(f"f-{flood.run}-{n}" for n in range(flood.events))  # retried until taken
    resolved = flow.read("events.resolved", until=lambda rs: len(rs) >= flood.events, timeout=120)
    applied = [r.value["event"]["message_id"] for r in resolved]
    assert sorted(applied) == sorted(flood.accepted), "every event answered 200 is resolved, once"
    wait_until(lambda: probe.lag() == 0, timeout=60, what="compute to commit every event (transaction markers too)")
    shown = metrics(flow)
    assert shown["cdp_ingest_max_lag"] == MAX_LAG and shown["cdp_ingest_lag_read_errors_total"] == failed_readings
    assert shown["cdp_ingest_lag_refusals_total"] == len(flood.refusals)
    assert {key for key in shown if key.startswith("cdp_ingest_pipeline_lag")} == {
        f'cdp_ingest_pipeline_lag{{stage="{stage}"}}' for stage in ("dedup", "identity", "compute")
    }
    calm = {"userId": "after", "event": "Calm"}
    wait_until(lambda: flow.post("/v1/track", calm).status_code == 200, timeout=10, what="the gate to reopen")
    probe.close()
    print(f"\nflood of {flood.events}: sent in {sent_for:.1f}s, {len(flood.refusals)} refusals, lag peak {peak}")


@pytest.mark.parametrize("flow", [0, MAX_LAG], indirect=True)
def test_without_a_worker_the_ingest_takes_max_lag_events_then_refuses_and_zero_never_refuses(flow: Pipeline) -> None:
    """No worker ever committed: every event written is lag (counted from the low watermarks)."""
    max_lag = flow.settings.ingest.max_lag
    flow.start("ingest")
    if max_lag:  # with 0 the ingest reads nothing
        first_reading(flow)
    flood = Flood(flow, events=5_000, retry=False)
    flood.send()
    probe = LagProbe(flow)
    lag = probe.lag()
    probe.close()
    assert not flood.others, [(r.status_code, r.text[:200]) for r in flood.others]
    assert lag == len(flood.accepted), "what the ingest wrote is all lag"
    shown = metrics(flow)
    assert shown["cdp_ingest_max_lag"] == max_lag and shown["cdp_ingest_lag_refusals_total"] == len(flood.refusals)
    if max_lag == 0:
        assert not flood.refusals and len(flood.accepted) == flood.events and lag > MAX_LAG
    else:
        assert max_lag - 2 * BATCH * SENDERS <= len(flood.accepted) <= max_lag + BATCH, len(flood.accepted)
        assert len(flood.refusals) == (flood.events - len(flood.accepted)) // BATCH
