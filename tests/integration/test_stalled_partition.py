"""A partition whose writes Kafka refuses is retried, says why in the log and on /metrics, and does not keep the
worker from stopping: SIGTERM ends it within its shutdown timeout, and the next start processes what was held,
losing nothing and resolving nothing twice.

The refusal is real: the dead-letter topic is deleted (as an operator might), and a bad record arrives on
events.raw in front of good ones. The identity stage must not drop the bad record unrecorded, so its partition
waits — retrying, the only thing a stage does about Kafka failing it — until the topic is back.
"""

from __future__ import annotations

import re
import signal
import time
import uuid

import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from tests.poison import encode, raw_event
from tests.support import Pipeline, wait_until
from topology.runtime.partitioning import partition_for
from topology.runtime.shutdown import EXIT_CODE, SHUTDOWN_TIMEOUT_S


def stalled(port: int) -> dict[str, float]:
    """`stage:reason` -> stalled partitions, from the worker's /metrics."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    pattern = r'^cdp_partitions_stalled\{reason="(\w+)",stage="(\w+)"\} (\S+)$'
    return {f"{m[2]}:{m[1]}": float(m[3]) for m in re.finditer(pattern, text, re.M)}


def test_a_partition_kafka_refuses_shows_as_stalled_and_sigterm_still_stops_the_worker(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:8]
    worker = pipeline.start("worker")
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    ids = [m for n in range(200) if partition_for(m := f"{run}-{n}", pipeline.partitions) == 1][:6]  # one partition

    def write(message_id: str, **fields: object) -> None:
        producer.produce(pipeline.topic("events.raw"), key=message_id.encode(), value=encode("raw_event", raw_event(
            message_id, anonymous_id=f"anon-{message_id}", **fields)), partition=1)  # fmt: skip
        producer.flush(10)

    def resolved() -> dict[str, set[str]]:
        """messageId -> the profiles it was resolved to (an outbox re-sent after a crash repeats a record, never
        with another profile)."""
        found: dict[str, set[str]] = {}
        for record in pipeline.read("events.resolved", until=lambda rs: True, timeout=5):
            found.setdefault(record.value["event"]["message_id"], set()).add(record.value["profile_id"])
        return found

    def resolved_ids() -> set[str]:
        return set(resolved())

    write(ids[0])
    wait_until(lambda: ids[0] in resolved_ids(), timeout=90, what="a first event to be resolved")
    admin = AdminClient({"bootstrap.servers": pipeline.bootstrap})
    admin.delete_topics([pipeline.topic("events.dead-letter")])[pipeline.topic("events.dead-letter")].result(timeout=30)
    write(ids[1], context="not an object")  # to be dead-lettered, where there is no topic now
    for message_id in ids[2:]:
        write(message_id)

    wait_until(lambda: stalled(pipeline.web_port).get("identity:DeliveryFailed", 0) >= 1, timeout=90,
               what="the identity partition to show as stalled on /metrics")  # fmt: skip
    assert not set(ids[1:]) & resolved_ids(), "nothing after the bad record was resolved while it could not be recorded"
    log = pipeline.log_tail("worker", 400)
    assert re.search(r"identity: partition 1 is stalled: DeliveryFailed: .*dead-letter", log), log[-3000:]

    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=SHUTDOWN_TIMEOUT_S + 20)
    took = time.monotonic() - started
    assert took <= 30, f"SIGTERM took {took:.1f}s"
    # The stalled batch is cancelled with the stage's reading task (nothing of it was committed); should anything
    # else hold the stop, the watchdog exits hard (topology/runtime/shutdown.py). Either way the worker is gone in time.
    assert worker.returncode in (0, EXIT_CODE), pipeline.log_tail("worker", 50)

    pipeline.create_topics()  # the dead-letter topic is back
    pipeline.start("worker")
    wait_until(lambda: set(ids[2:]) <= resolved_ids(), timeout=120, what="the held events to be resolved after the restart")
    profiles = resolved()
    assert [len(profiles.get(m, ())) for m in ids] == [1, 0, 1, 1, 1, 1], "each good event resolved to one profile, the bad one never"
    letters = pipeline.read("events.dead-letter", until=lambda rs: len(rs) >= 1, timeout=30)
    assert [(r.key, r.value["stage"]) for r in letters] == [(ids[1].encode(), "identity")]
    assert stalled(pipeline.web_port) == {}, "nothing is stalled any more"
