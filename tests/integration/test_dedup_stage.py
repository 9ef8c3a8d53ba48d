"""The dedup stage on real Kafka with real worker processes: a messageId passes once, across restarts of the
ingest and of the worker (graceful and SIGKILL), and undecodable bytes are dead-lettered without stopping it."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter

from confluent_kafka import Producer

import requests

from agents.ingest.tracking import batch_to_raw_events
from tests.support import Pipeline, free_port
from topology.codecs import AvroCodec, SchemaRepository


def raw_ids(pipeline: Pipeline, until_ids: set[str], timeout: float = 90) -> Counter[str]:
    """messageId -> how many times it is on cdp.events.raw, once every id in `until_ids` is there and the
    worker has committed all its input (so a duplicate written after a restart can't arrive later)."""
    pipeline.read("events.raw", until=lambda rs: {r.key.decode() for r in rs} >= until_ids, timeout=timeout, decode=False)
    pipeline.wait_processed()
    records = pipeline.read("events.raw", until=lambda rs: True, decode=False)
    return Counter(r.key.decode() for r in records)


def metric(port: int, sample: str) -> float:
    """One sample's value from a process's /metrics."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    assert len(values) == 1, f"{sample} not in:\n{text}"
    return values[0]


def send(pipeline: Pipeline, message_id: str, user: str = "u1") -> None:
    response = pipeline.post("/v1/track", {"userId": user, "event": "Clicked", "messageId": message_id})
    assert response.status_code == 200, response.text


def test_a_message_id_sent_twice_passes_once_across_restarts(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:8]
    twice = f"dup-{run}"
    ingest = pipeline.start("ingest")
    worker = pipeline.start("worker")
    send(pipeline, twice)
    send(pipeline, twice)
    batch = {"batch": [{"type": "track", "userId": "u1", "event": "Clicked", "messageId": twice}] * 3}
    assert pipeline.post("/v1/batch", batch).status_code == 200
    send(pipeline, f"marker1-{run}")
    seen = raw_ids(pipeline, {twice, f"marker1-{run}"})
    assert seen[twice] == 1

    assert metric(pipeline.web_port, 'cdp_dedup_events_total{outcome="duplicate"}') == 4
    assert metric(pipeline.ingest_port, "cdp_ingest_events_total") == 6
    pipeline.stop(ingest)
    pipeline.stop(worker)
    pipeline.start("ingest")
    pipeline.start("worker")
    send(pipeline, twice)
    send(pipeline, f"marker2-{run}")
    seen = raw_ids(pipeline, {f"marker2-{run}"})
    lags = [metric(pipeline.web_port, f'cdp_consumer_lag{{partition="{p}",stage="dedup",topic="{pipeline.topic("events.accepted")}"}}')
            for p in range(pipeline.partitions)]  # fmt: skip
    assert lags == [0.0] * pipeline.partitions, "every accepted record was decided"
    assert metric(pipeline.web_port, "cdp_process_cpu_seconds_total") > 0
    assert seen[twice] == 1, "the dedup memory survived the restart of both processes"
    assert seen[f"marker1-{run}"] == 1 and seen[f"marker2-{run}"] == 1

    accepted = pipeline.read("events.accepted", until=lambda rs: len(rs) >= 8, decode=False)
    assert sum(1 for r in accepted if r.key.decode() == twice) == 6, "every copy was accepted; dedup is behind"


def test_sigkill_of_the_worker_mid_stream_loses_nothing_and_duplicates_nothing(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:8]
    ids = [f"k-{run}-{n}" for n in range(3_000)]
    pipeline.start("ingest")
    worker = pipeline.start("worker")
    for start in range(0, len(ids), 250):  # every id twice, the second copy one batch later
        chunk = ids[start : start + 250] + ids[max(0, start - 250) : start]
        body = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": m} for m in chunk]}
        assert pipeline.post("/v1/batch", body).status_code == 200
        if start == 1_500:
            pipeline.stop(worker, signal.SIGKILL)
            worker = pipeline.start("worker")
    body = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": m} for m in ids[-250:]]}
    assert pipeline.post("/v1/batch", body).status_code == 200
    pipeline.stop(worker, signal.SIGKILL)  # and once more, after everything was sent
    pipeline.start("worker")
    seen = raw_ids(pipeline, set(ids), timeout=120)
    assert set(seen) == set(ids), f"lost: {sorted(set(ids) - set(seen))[:5]}"
    assert max(seen.values()) == 1, f"written twice: {[m for m, n in seen.items() if n > 1][:5]}"


def test_undecodable_bytes_go_to_the_dead_letter_topic_and_the_stage_goes_on(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:8]
    pipeline.start("worker")
    accepted = pipeline.topic("events.accepted")
    good = {"type": "track", "userId": "u", "event": "e", "messageId": f"after-{run}"}
    (event,), _ = batch_to_raw_events({"batch": [good]}, source="test", received_at=int(time.time() * 1000))
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    garbage = b'{"userId": "not avro"}'
    # All in one partition, the good record last: it passes only if the stage went on past the bad ones.
    producer.produce(accepted, key=f"junk-{run}".encode(), value=garbage, partition=2)
    producer.produce(accepted, key=f"junk2-{run}".encode(), value=b"\xc3\x01" + b"\x00" * 9, partition=2)
    producer.produce(accepted, key=f"after-{run}".encode(), value=AvroCodec("raw_event", SchemaRepository.load()).encode(event), partition=2)
    producer.flush(10)
    assert raw_ids(pipeline, {f"after-{run}"})[f"after-{run}"] == 1
    letters = pipeline.read("events.dead-letter", until=lambda rs: len(rs) >= 2)
    by_key = {r.key.decode(): r.value for r in letters}
    junk = by_key[f"junk-{run}"]
    assert junk["value"] == garbage and junk["stage"] == "dedup" and junk["error"] == "UndecodableError"
    assert (junk["topic"], junk["partition"], junk["offset"]) == (accepted, 2, 0)
    assert accepted in junk["reason"] and "7b" in junk["reason"].lower()
    assert by_key[f"junk2-{run}"]["error"] == "UndecodableError" and "fingerprint" in by_key[f"junk2-{run}"]["reason"]


def test_partitions_moving_between_two_workers_lose_and_duplicate_nothing(pipeline: Pipeline) -> None:
    """A second worker joins mid-stream (partitions move to it), then the first is SIGKILLed (they all move
    back): each worker catches up from cdp.events.raw before deciding, so every messageId passes exactly once."""
    run = uuid.uuid4().hex[:8]
    ids = [f"r-{run}-{n}" for n in range(2_400)]
    second_port = free_port()
    pipeline.start("ingest")
    first = pipeline.start("worker")
    second = None
    for n, start in enumerate(range(0, len(ids), 200)):
        chunk = ids[start : start + 200] + ids[max(0, start - 200) : start]  # every id again one request later
        body = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": m} for m in chunk]}
        assert pipeline.post("/v1/batch", body).status_code == 200
        if n == 3:
            second = pipeline.start("worker", CDP_WEB_PORT=str(second_port))
        if n == 8:
            pipeline.stop(first, signal.SIGKILL)
    assert second is not None and second.poll() is None
    seen = raw_ids(pipeline, set(ids), timeout=120)
    assert set(seen) == set(ids), f"lost: {sorted(set(ids) - set(seen))[:5]}"
    assert max(seen.values()) == 1, f"written twice: {[m for m, n in seen.items() if n > 1][:5]}"
    assert metric(second_port, 'cdp_dedup_events_total{outcome="passed"}') > 0, "the second worker got partitions"
