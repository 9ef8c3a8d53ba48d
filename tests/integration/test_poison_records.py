"""Poison on every input topic of a real worker on real Kafka, one test per stage: each bad record is dead-lettered
with its reason and coordinates, the good record written after it *on the same partition* is processed, and no
partition stalls.

The records are written straight to the topics (as a replay tool, a bug or another version could), each stage's
poison in front of a good record that only passes if the partition went on: dedup passes an event, identity
resolves one (after a valid-Avro event whose `context` is a JSON string: the record that stalled a partition for
good before), compute counts one after bad events, merges and commands, and the definitions feed holds a trait
written after records that are no definitions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from confluent_kafka import Producer

from tests.poison import encode, raw_event
from tests.support import Pipeline, Read, wait_until
from topology.runtime.partitioning import partition_for

JUNK: list[bytes | None] = [b"not avro", None, b"\xc3\x01" + b"\x00" * 9]  # not Avro, no value, a truncated header


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path_factory.mktemp("poison"), extra_config={"traits": [{"key": "events", "kind": "count"}]})
    pipe.create_topics()
    try:
        pipe.start("worker")
        yield pipe
    finally:
        pipe.stop_all()


class Writer:
    """Writes records to a partition of one of the pipeline's topics, and remembers which must be dead-lettered."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline, self.run = pipeline, uuid.uuid4().hex[:8]
        self.producer = Producer({"bootstrap.servers": pipeline.bootstrap})
        self.bad: list[tuple[str, int, bytes]] = []  # (topic, partition, key)

    def key(self, partition: int, form: str) -> str:
        """A key of the form (`{n}` numbered) that lands in `partition`, as every input of a stage must."""
        parts = self.pipeline.partitions
        return next(key for n in range(10_000) if partition_for(key := form.format(n=n, run=self.run), parts) == partition)

    def write(self, suffix: str, partition: int, key: str, values: list[bytes | None], *, bad: bool = False) -> None:
        for value in values:
            self.producer.produce(self.pipeline.topic(suffix), key=key.encode(), value=value, partition=partition)
            if bad:
                self.bad.append((self.pipeline.topic(suffix), partition, key.encode()))
        self.producer.flush(10)

    def dead_letters(self, stage: str) -> list[Read]:
        """This test's dead letters, checked against what was written: stage, coordinates, key, original bytes."""
        mine = {key for _, _, key in self.bad}
        letters = self.pipeline.read("events.dead-letter", until=lambda rs: sum(r.key in mine for r in rs) >= len(self.bad), timeout=90)
        letters = [r for r in letters if r.key in mine]
        assert sorted((r.value["topic"], r.value["partition"], r.key) for r in letters) == sorted(self.bad)
        originals = {(topic, r.partition, r.offset): r.raw for topic in {t for t, _, _ in self.bad}
                     for r in self.pipeline.read(topic[len(self.pipeline.prefix) + 1 :], until=lambda rs: True, timeout=5, decode=False)}  # fmt: skip
        for record in letters:
            letter = record.value
            assert letter["stage"] == stage and letter["error"] and letter["key"] == record.key
            assert letter["reason"].startswith(f"{letter['topic']}[{letter['partition']}]@{letter['offset']}: ")
            assert letter["value"] == originals[(letter["topic"], letter["partition"], letter["offset"])], "the original bytes, verbatim"
        return letters

    def no_partition_retrying(self) -> None:
        metrics = requests.get(f"http://127.0.0.1:{self.pipeline.web_port}/metrics", timeout=10).text
        assert "cdp_partitions_stalled{" not in metrics and "cdp_partitions_waiting{" not in metrics, metrics


def reasons(letters: list[Read]) -> str:
    return " | ".join(r.value["reason"] for r in letters)


def test_dedup_dead_letters_poison_on_events_accepted_and_goes_on(worker: Pipeline) -> None:
    writer, now = Writer(worker), int(time.time() * 1000)
    future, good = writer.key(1, "future-{n}-{run}"), writer.key(1, "good-{n}-{run}")
    # an event from the far future would drag the partition's stream time along and forget every sighting
    writer.write("events.accepted", 1, future, [*JUNK, encode("raw_event", raw_event(future, received_at=now + 10 * 3_600_000))], bad=True)
    writer.write("events.accepted", 1, good, [encode("raw_event", raw_event(good, received_at=now))])
    passed = worker.read("events.raw", until=lambda rs: any(r.key == good.encode() for r in rs), timeout=90, decode=False)
    assert [r.partition for r in passed if r.key == good.encode()] == [1], "dedup went on past the poison"
    assert "received_at" in reasons(writer.dead_letters("dedup"))
    writer.no_partition_retrying()


def test_identity_dead_letters_poison_on_its_inputs_and_goes_on(worker: Pipeline) -> None:
    writer = Writer(worker)
    bad, elsewhere, good = writer.key(2, "bad-{n}-{run}"), writer.key(3, "elsewhere-{n}-{run}"), writer.key(2, "good-{n}-{run}")
    writer.write("events.raw", 2, bad, [*JUNK, encode("raw_event", raw_event(bad, context="a string"))], bad=True)
    writer.write("events.raw", 2, elsewhere, [encode("raw_event", raw_event(elsewhere))], bad=True)  # on a partition not its key's
    commands = [*JUNK, encode("identity_command", {"kind": "claim", "body": {"kind": "claim", "message_id": "m"}}),
                encode("identity_command", {"kind": "nope", "body": {"kind": "nope"}}),
                encode("identity_command", {"kind": "batch", "body": {"kind": "batch", "commands": "not a list"}})]  # fmt: skip
    writer.write("identity.commands", 2, writer.key(2, "cmd-{n}-{run}"), commands, bad=True)
    writer.write("events.raw", 2, good, [encode("raw_event", raw_event(good, anonymous_id=f"anon-{good}"))])
    out = worker.read("events.resolved", until=lambda rs: any(good.encode() in (r.raw or b"") for r in rs), timeout=90, decode=False)
    assert any(good.encode() in (r.raw or b"") for r in out), "identity went on past the poison"
    text = reasons(writer.dead_letters("identity"))
    assert "context must be a JSON object" in text and "does not belong to partition 2" in text and "unknown identity command kind" in text
    writer.no_partition_retrying()


def test_compute_dead_letters_poison_on_its_inputs_and_goes_on(worker: Pipeline) -> None:
    writer, now = Writer(worker), int(time.time() * 1000)
    profiles = {p: writer.key(p, "p-{n:015d}-{run}") for p in range(worker.partitions)}
    older = f"p--{writer.run}"  # sorts before every profile above: merging one of them into it is fine, the reverse is not

    def resolved(profile: str, message_id: str, **event: Any) -> bytes:
        return encode("resolved_event", {"profile_id": profile, "identifiers": [], "event": raw_event(message_id=message_id, **event)})

    writer.write("events.resolved", 3, profiles[3], [*JUNK, resolved("", f"empty-{writer.run}"),
                                                     resolved(profiles[3], f"ctx-{writer.run}", context=[1])], bad=True)  # fmt: skip
    merges = [encode("merge_log_entry", {"kind": "merged", "survivor_profile_id": s, "merged_profile_id": m, "identifiers": [],
                                         "message_id": f"m-{writer.run}", "timestamp": now, "rule": "r"})
              for s, m in ((profiles[0], profiles[0]), (profiles[0], older))]  # into itself; into a younger profile  # fmt: skip
    writer.write("identity.merges", 0, profiles[0], [*JUNK, *merges], bad=True)
    fold = {"kind": "fold_out", "profile": profiles[1], "into": f"p-999999999999999-{writer.run}", "at": now}  # into a younger one
    ahead = {"kind": "event", "profile": profiles[1], "event": raw_event(f"fwd-{writer.run}"), "sids": [], "feed": 10**12}
    writer.write("compute.commands", 1, profiles[1], [*JUNK, *(encode("compute_command", {"kind": c["kind"], "body": c}) for c in (fold, ahead))], bad=True)
    for partition, profile in profiles.items():  # then a good event on every partition
        writer.write("events.resolved", partition, profile, [resolved(profile, f"good-{partition}-{writer.run}", timestamp=now)])

    def counted(profile: str) -> bool:
        response = requests.get(f"http://127.0.0.1:{worker.web_port}/v1/internal/compute/profiles/{profile}", timeout=10)
        return response.status_code == 200 and response.json().get("computed_traits", {}).get("events") == 1

    wait_until(lambda: all(counted(p) for p in profiles.values()), timeout=90, what="every partition's good event to be counted")
    text = reasons(writer.dead_letters("compute"))
    assert "older profile" in text and "beyond the end of the definitions topic" in text and "profile_id must be" in text
    writer.no_partition_retrying()


def test_the_definitions_feed_skips_records_that_are_no_definitions_and_takes_the_next(worker: Pipeline) -> None:
    writer, now = Writer(worker), int(time.time() * 1000)
    key = f"late{writer.run}"
    definition = {"kind": "trait", "key": key, "version": 1, "updated_at": now, "deleted": False}
    skipped = _skipped(worker)
    writer.write("definitions", 0, f"trait:{key}", [b"garbage", encode("definition", {**definition, "body": {"key": key, "kind": "count", "window": "soon"}}),
                                                   encode("definition", {**definition, "body": {"key": "other", "kind": "count"}})])  # fmt: skip
    writer.write("definitions", 0, f"trait:{key}", [encode("definition", {**definition, "version": 2, "body": {"key": key, "kind": "count"}})])

    def held() -> Any:
        listed = requests.get(f"http://127.0.0.1:{worker.web_port}/v1/definitions/traits", timeout=10).json()["traits"]
        return next((d["definition"] for d in listed if d["definition"]["key"] == key), None)

    wait_until(lambda: held() == {"key": key, "kind": "count"}, timeout=60, what="the good definition to be held")
    assert _skipped(worker) == skipped + 3, "each record that is no definition is counted, not dead-lettered"
    writer.no_partition_retrying()


def _skipped(pipeline: Pipeline) -> int:
    metrics = requests.get(f"http://127.0.0.1:{pipeline.web_port}/metrics", timeout=10).text
    return int(next(line.split()[1] for line in metrics.splitlines() if line.startswith("cdp_definitions_skipped_total ")))
