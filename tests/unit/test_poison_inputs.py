"""No input record can stall a stage: poison on every input topic, through each stage's own decode step.

For each stage, hypothesis interleaves good records with poison (tests/poison.py: random and truncated bytes,
null values, valid Avro of wrong meaning, hand-made shapes) on every topic the stage reads, and checks against
a run of the good records alone: the stage never raises, every record it can't take is dead-lettered with its
coordinates and error, no good record is, and the good records come out exactly as without the poison
(identity: the same profiles, as a union-find oracle groups them; compute: the same trait values; dedup: the
same first sightings). The stages run on one partition without Kafka (tests/stage_harness.py); the same
poison goes through real workers on real Kafka in tests/integration/test_poison_records.py.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.errors import DeliveryFailed
from agents.identity.rules import IdentifierRule, IdentityRules, Limit
from tests import stage_harness
from tests.poison import CODECS, FAR, T0, encode, poison, raw_event
from tests.unit.test_identity_protocol import union_find
from topology.codecs import AvroCodec, SchemaRepository
from topology.runtime.dead_letters import DeadLetters
from topology.stages.dedup import DedupStage
from topology.runtime.definitions_feed import DefinitionsFeed
from topology.runtime.seen_store import SeenStore

UNLIMITED = IdentityRules(
    identifiers=tuple(IdentifierRule(t, Limit(10_000)) for t in ("user_id", "email", "anonymous_id")),
    blocked=(), max_merges=10_000, max_identifiers=10_000,
)  # fmt: skip
POOL = [("user_id", f"u{n}") for n in range(3)] + [("email", f"e{n}") for n in range(2)] + [("anonymous_id", f"a{n}") for n in range(4)]
EXAMPLES = int(os.environ.get("CDP_POISON_EXAMPLES", "60"))  # more for a deeper search: CDP_POISON_EXAMPLES=2000
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def identified(message_id: str, identifiers: list[tuple[str, str]]) -> dict[str, Any]:
    """A RawEvent carrying exactly `identifiers` (as context.externalIds, which take any type)."""
    external = [{"type": t, "id": v, "collection": "users", "encoding": "none"} for t, v in identifiers]
    return raw_event(message_id=message_id, anonymous_id=None, context={"externalIds": external})


def interleave(good: list[Any], bad: list[Any], slots: list[int]) -> list[tuple[bool, Any]]:
    """`good` in order with each of `bad` put before the good record its slot names (or at the end)."""
    out: list[tuple[bool, Any]] = [(True, item) for item in good]
    for item, slot in sorted(zip(bad, slots), key=lambda pair: -pair[1]):
        out.insert(min(slot, len(out)), (False, item))
    return out


def letters_only_for(letters: list[dict[str, Any]], poison_at: set[tuple[str, int]]) -> None:
    """Every dead letter names a poison record (never a good one), with the stage's coordinates and an error."""
    for letter in letters:
        assert (letter["topic"], letter["offset"]) in poison_at, f"a good record was dead-lettered: {letter['reason']}"
        assert letter["partition"] == 0 and letter["error"] and letter["reason"].startswith(f"{letter['topic']}[0]@")


# -- identity: events.raw and identity.commands ---------------------------------------------------------------

@FAST
@given(
    good=st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), min_size=1, max_size=12),
    bad=st.lists(st.tuples(st.sampled_from(["raw", "commands"]), st.data()), max_size=6),
    slots=st.lists(st.integers(0, 12), min_size=6, max_size=6),
)
def test_identity_takes_the_good_events_whatever_poison_comes_between(good: list[list[tuple[str, str]]], bad: list[Any],
                                                                      slots: list[int]) -> None:  # fmt: skip
    poisons = [(topic, data.draw(poison("raw_event" if topic == "raw" else "identity_command"))) for topic, data in bad]
    with tempfile.TemporaryDirectory() as root:
        run = stage_harness.identity(Path(root), UNLIMITED)
        topics = {"raw": run.stage.topics.raw, "commands": run.stage.topics.commands}
        poison_at: set[tuple[str, int]] = set()
        for is_good, item in interleave(list(enumerate(good)), poisons, slots):
            if is_good:
                index, ids = item
                run.write(topics["raw"], f"g{index}".encode(), encode("raw_event", identified(f"g{index}", ids)))
            else:
                message = run.write(topics[item[0]], b"poison", item[1])
                poison_at.add((message.topic, message.offset))
        run.run()

        letters_only_for(run.dead_letters, poison_at)
        resolved: dict[str, set[str]] = {}
        for record in run.read(run.stage.topics.resolved, "resolved_event"):
            resolved.setdefault(record["event"]["message_id"], set()).add(record["profile_id"])
        for index in range(len(good)):
            assert len(resolved.get(f"g{index}", ())) == 1, f"good event g{index} resolved {resolved.get(f'g{index}')}"
        assert _grouping(run, {i for ids in good for i in ids}) == union_find(good)
        for key in run.store.keys("e|"):
            assert not key.startswith("e|g"), f"a good event's saga never finished: {key}"
        unfinished = [i for i in range(len(good)) if run.store.get(f"c|g{i}") is not None]
        assert not unfinished, f"good events whose claims never came back: {unfinished}"
        run.close()


def _grouping(run: stage_harness.OnePartition, identifiers: set[tuple[str, str]]) -> set[frozenset[tuple[str, str]]]:
    groups: dict[str, set[tuple[str, str]]] = {}
    for type_, value in identifiers:
        profile = run.store.get(f"i|{type_}|{value}")["p"]  # type: ignore[index]
        while (record := run.store.get(f"p|{profile}"))["status"] == "merged":  # type: ignore[index]
            profile = record["into"]  # type: ignore[index]
        assert record["lock"] is None and not record["queue"], f"profile {profile} left locked or queued"  # type: ignore[index]
        groups.setdefault(profile, set()).add((type_, value))
    return {frozenset(group) for group in groups.values()}


# -- compute: events.resolved, identity.merges, compute.commands ----------------------------------------------

TRAITS = [{"key": "orders", "kind": "count", "event": "Order Completed"},
          {"key": "revenue", "kind": "sum", "event": "Order Completed", "property": "revenue"},
          {"key": "recent", "kind": "count", "window": "1h"}]  # fmt: skip
PROFILES = [f"p-00000000000000{n}-aaaa" for n in range(4)]  # sorted by age: PROFILES[0] is the oldest
NOW_S = (T0 + 100_000) / 1000


@FAST
@given(
    good=st.lists(st.tuples(st.sampled_from(PROFILES), st.sampled_from(["Order Completed", "Clicked"]), st.integers(0, 100)),
                  min_size=1, max_size=15),
    merged=st.sets(st.integers(1, len(PROFILES) - 1), max_size=2),
    bad=st.lists(st.tuples(st.sampled_from(["resolved", "merges", "commands"]), st.data()), max_size=6),
    slots=st.lists(st.integers(0, 17), min_size=6, max_size=6),
)  # fmt: skip
def test_compute_counts_the_good_events_whatever_poison_comes_between(good: list[tuple[str, str, int]], merged: set[int],
                                                                     bad: list[Any], slots: list[int]) -> None:  # fmt: skip
    schemas = {"resolved": "resolved_event", "merges": "merge_log_entry", "commands": "compute_command"}
    poisons = [(topic, data.draw(poison(schemas[topic], PROFILES))) for topic, data in bad]
    merges = {PROFILES[n]: PROFILES[0] for n in merged}  # merged into the oldest profile, as identity would

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as root:
            run = stage_harness.compute(Path(root), TRAITS, now_s=NOW_S)
            topics = {"resolved": run.stage.topics.resolved, "merges": run.stage.topics.merges, "commands": run.stage.topics.commands}
            inputs: list[tuple[str, bytes]] = []
            for n, (profile, name, revenue) in enumerate(good):
                event = raw_event(message_id=f"g{n}", event=name, properties={"revenue": revenue}, timestamp=T0 + n)
                inputs.append(("resolved", encode("resolved_event", {"profile_id": profile, "identifiers": [], "event": event})))
            for merged_id, survivor in merges.items():
                entry = {"kind": "merged", "survivor_profile_id": survivor, "merged_profile_id": merged_id, "identifiers": [],
                         "message_id": f"merge-{merged_id}", "timestamp": T0, "rule": "identifier match"}  # fmt: skip
                inputs.append(("merges", encode("merge_log_entry", entry)))
            poison_at: set[tuple[str, int]] = set()
            for is_good, (topic, value) in interleave(inputs, poisons, slots):
                message = run.write(topics[topic], b"key", value)
                if not is_good:
                    poison_at.add((message.topic, message.offset))
            run.run()

            letters_only_for(run.dead_letters, poison_at)
            for profile in PROFILES:
                if profile in merges:
                    assert run.store.get(f"p|{profile}") is None, f"{profile} was merged but keeps its state"
                    continue
                mine = [(name, revenue) for p, name, revenue in good if merges.get(p, p) == profile]
                orders = [revenue for name, revenue in mine if name == "Order Completed"]
                values = (run.store.get(f"p|{profile}") or {"v": {}})["v"]
                assert values.get("orders", 0) == len(orders) and values.get("revenue", 0) == sum(orders), (profile, values)
            assert not [k for k in run.store.keys("x|") if not k[2:17].isdigit()], "a due time out of range"
            run.close()

    asyncio.run(scenario())


def test_sums_stay_numbers_the_state_can_hold() -> None:
    """Sums past a 64-bit integer or the largest float go on (as a float, or capped) instead of poisoning the
    profile: a profile whose state can't be written would refuse every later event."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as root:
            run = stage_harness.compute(Path(root), TRAITS, now_s=NOW_S)
            for n, revenue in enumerate([2**63 - 1, 2**63 - 1, 1.7e308, 1.7e308, -1.7e308, 5]):
                event = raw_event(message_id=f"big{n}", event="Order Completed", properties={"revenue": revenue})
                run.write(run.stage.topics.resolved, b"k", encode("resolved_event", {"profile_id": PROFILES[0], "identifiers": [], "event": event}))
            run.run()
            assert run.dead_letters == []
            values = run.store.get(f"p|{PROFILES[0]}")["v"]  # type: ignore[index]
            assert values["orders"] == 6 and isinstance(values["revenue"], float) and abs(values["revenue"]) < float("inf")
            run.close()

    asyncio.run(scenario())


def test_an_event_that_would_outgrow_its_profile_record_is_dead_lettered_and_the_rest_goes_on() -> None:
    """A unique_list of 30 KB values keeps growing the profile's record; the event that would take it past what a
    Kafka record holds is refused alone (its partition would otherwise stall for good), later ones go on."""
    traits = [*TRAITS, {"key": "blobs", "kind": "unique_list", "property": "blob"}]

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as root:
            run = stage_harness.compute(Path(root), traits, now_s=NOW_S)
            for n in range(40):
                event = raw_event(message_id=f"blob{n}", properties={"blob": f"{n:05d}" + "x" * 30_000})
                run.write(run.stage.topics.resolved, b"k", encode("resolved_event", {"profile_id": PROFILES[2], "identifiers": [], "event": event}))
            event = raw_event(message_id="after", event="Order Completed", properties={"revenue": 1})
            run.write(run.stage.topics.resolved, b"k", encode("resolved_event", {"profile_id": PROFILES[3], "identifiers": [], "event": event}))
            run.run()
            letters = run.dead_letters
            assert letters and all("bytes" in letter["reason"] and letter["offset"] >= 10 for letter in letters)
            assert len(run.store.raw(f"p|{PROFILES[2]}") or b"") <= 900_000
            assert run.store.get(f"p|{PROFILES[3]}")["v"]["orders"] == 1  # type: ignore[index]
            run.close()

    asyncio.run(scenario())


def test_events_from_the_ends_of_time_count_and_the_clock_goes_on() -> None:
    """Timestamps at ±2^62 are taken within [0, now]: counted, never a bucket or due time out of range."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as root:
            run = stage_harness.compute(Path(root), TRAITS, now_s=NOW_S)
            for n, at in enumerate([FAR, -FAR, T0]):
                event = raw_event(message_id=f"t{n}", timestamp=at)
                run.write(run.stage.topics.resolved, b"k", encode("resolved_event", {"profile_id": PROFILES[1], "identifiers": [], "event": event}))
            run.run()
            assert run.dead_letters == []
            assert run.store.get(f"p|{PROFILES[1]}")["v"]["recent"] == 2, "the far-future one counts now, 1970 left the hour"  # type: ignore[index]
            due = list(run.store.keys("x|"))
            assert due and all(k[2:17].isdigit() and int(k[2:17]) <= NOW_S * 1000 + 3_600_000 for k in due)
            run.close()

    asyncio.run(scenario())


# -- dedup: events.accepted ------------------------------------------------------------------------------------

@FAST
@given(bad=st.lists(poison("raw_event"), max_size=6), slots=st.lists(st.integers(0, 8), min_size=6, max_size=6))
def test_dedup_passes_the_good_events_whatever_poison_comes_between(bad: list[bytes | None], slots: list[int]) -> None:
    good = [encode("raw_event", raw_event(message_id=f"g{n % 5}", received_at=T0 + n)) for n in range(8)]  # 5 distinct
    records = interleave(good, bad, slots)
    with tempfile.TemporaryDirectory() as root:
        stage = DedupStage(accepted_topic="t.events.accepted", raw_topic="t.events.raw", dead_letter_topic=stage_harness.DEAD_LETTER,
                           codec=CODECS["raw_event"], dead_letter_codec=CODECS["dead_letter"], window_ms=86_400_000,
                           store_dir=Path(root), bootstrap="unused:0", producer=stage_harness._no_kafka)  # fmt: skip
        store = SeenStore(Path(root) / "seen")
        events = [stage_harness.Message("t.events.accepted", 0, n, b"k", value) for n, (_, value) in enumerate(records)]
        out, decision, _ = stage.decide(0, store, events, now_ms=T0 + 10_000)
        passed = [r.key for r in out if r.topic == "t.events.raw"]
        letters = [CODECS["dead_letter"].decode(r.value) for r in out if r.topic == stage_harness.DEAD_LETTER]
        letters_only_for(letters, {("t.events.accepted", n) for n, (is_good, _) in enumerate(records) if not is_good})
        good_ids = {f"g{n}".encode() for n in range(5)}
        assert good_ids <= set(passed) and len([k for k in passed if k in good_ids]) == 5
        assert decision.stream_time < T0 + 10_000 + 3_600_000, "no poison dragged stream time into the future"
        store.close()


def test_dedup_refuses_a_record_too_large_to_pass_on() -> None:
    """Dedup passes accepted bytes on as they are: one larger than a record of ours may be would be refused by Kafka
    on every retry, for ever; it is dead-lettered (cut to what a dead letter holds) instead."""
    with tempfile.TemporaryDirectory() as root:
        stage = DedupStage(accepted_topic="t.events.accepted", raw_topic="t.events.raw", dead_letter_topic=stage_harness.DEAD_LETTER,
                           codec=CODECS["raw_event"], dead_letter_codec=CODECS["dead_letter"], window_ms=86_400_000,
                           store_dir=Path(root), bootstrap="unused:0", producer=stage_harness._no_kafka)  # fmt: skip
        store = SeenStore(Path(root) / "seen")
        big = encode("raw_event", raw_event("big", properties={"blob": "x" * 950_000}))
        events = [stage_harness.Message("t.events.accepted", 0, 0, b"big", big)]
        out, _, _ = stage.decide(0, store, events, now_ms=T0)
        assert [r.topic for r in out] == [stage_harness.DEAD_LETTER] and len(out[0].value or b"") < 900_000
        store.close()


# -- definitions ------------------------------------------------------------------------------------------------

@FAST
@given(bad=st.lists(poison("definition"), max_size=8))
def test_the_definitions_feed_skips_what_is_not_a_definition_and_takes_the_rest(bad: list[bytes | None]) -> None:
    feed = DefinitionsFeed(bootstrap="unused:0", topic="t.definitions", codec=CODECS["definition"], traits=[], audiences=[])
    good = {"kind": "trait", "key": "orders", "body": {"key": "orders", "kind": "count"}, "version": 1, "updated_at": T0, "deleted": False}
    for value in [*bad, encode("definition", good)]:
        feed._take(value)  # the feed thread's step for one record: must never raise
    assert [h.key for h in feed.held("trait") if h.key == "orders"] == ["orders"]
    assert feed.skipped <= len(bad)


def test_a_definition_that_is_wrong_on_its_own_is_skipped_and_counted_not_parked() -> None:
    feed = DefinitionsFeed(bootstrap="unused:0", topic="t.definitions", codec=CODECS["definition"], traits=[], audiences=[])
    record = {"kind": "trait", "key": "w", "version": 1, "updated_at": T0, "deleted": False}
    feed._take(encode("definition", {**record, "body": {"key": "w", "kind": "count", "window": "soon"}}))
    feed._take(b"\x00\x01garbage")
    assert feed.skipped == 2 and feed.held("trait") == [] and not feed._parked


def test_a_dead_letter_names_the_error_of_any_exception_and_stays_bounded() -> None:
    letters = DeadLetters("identity", "t.dl", AvroCodec("dead_letter", SchemaRepository.load()))
    record = letters.record(KeyError("x" * 10_000), topic="t.in", partition=3, offset=7, key=b"k", value=b"v")
    letter = CODECS["dead_letter"].decode(record.value)  # type: ignore[arg-type]
    assert letter["error"] == "KeyError" and letter["reason"].startswith("t.in[3]@7: KeyError(") and len(letter["reason"]) < 2_100
    assert (letter["topic"], letter["partition"], letter["offset"], letter["key"], letter["value"]) == ("t.in", 3, 7, b"k", b"v")
    assert orjson.dumps(letter["stage"]) == b'"identity"'
    huge = letters.record(ValueError("x"), topic="t.in", partition=0, offset=1, key=b"k" * 500_000, value=b"v" * 1_010_000)
    assert len(huge.value or b"") < 900_000, "a dead letter fits a Kafka record, whatever it copies"
    cut = CODECS["dead_letter"].decode(huge.value)  # type: ignore[arg-type]
    assert "value of 1010000 bytes cut" in cut["reason"] and "key of 500000 bytes cut" in cut["reason"]
    assert cut["value"] == b"v" * 400_000


class _AwayRegistry:
    """A schema registry that does not answer (or knows no schema 404): not a record's fault, or the record's."""

    def __init__(self, status: int | None) -> None:
        self.status = status

    def get_schema(self, schema_id: int) -> Any:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if self.status is None:
            raise ConnectionError("registry unreachable")
        raise SchemaRegistryError(self.status, self.status * 100, "no such schema")


def test_a_schema_registry_that_does_not_answer_retries_the_batch_and_dead_letters_nothing() -> None:
    """A Confluent-framed record whose writer schema can't be fetched is not bad: the batch is retried (DeliveryFailed),
    never dead-lettered; a schema id the registry says it does not know (404) is the record's fault."""
    framed = b"\x00\x00\x00\x00\x2a" + b"\x00" * 8
    with tempfile.TemporaryDirectory() as root:
        for status, outcome in ((None, DeliveryFailed), (500, DeliveryFailed), (404, None)):
            codec = AvroCodec("raw_event", SchemaRepository.load())
            codec._registry = _AwayRegistry(status)  # a reader of Confluent framing, as with CDP_SCHEMA_REGISTRY_URL
            stage = DedupStage(accepted_topic="t.events.accepted", raw_topic="t.events.raw", dead_letter_topic=stage_harness.DEAD_LETTER,
                               codec=codec, dead_letter_codec=CODECS["dead_letter"], window_ms=86_400_000,
                               store_dir=Path(root), bootstrap="unused:0", producer=stage_harness._no_kafka)  # fmt: skip
            store = SeenStore(Path(root) / f"seen-{status}")
            events = [stage_harness.Message("t.events.accepted", 0, 0, b"k", framed)]
            if outcome is None:
                out, _, _ = stage.decide(0, store, events, now_ms=T0)
                assert [CODECS["dead_letter"].decode(r.value)["error"] for r in out] == ["UndecodableError"]  # type: ignore[arg-type]
            else:
                with pytest.raises(outcome):
                    stage.decide(0, store, events, now_ms=T0)
            store.close()
