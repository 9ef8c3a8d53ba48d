"""The identity stage on real Kafka with real processes (ingest -> dedup -> identity), two workers, 4 partitions.

The final grouping of identifiers into profiles is read through the web views of *both* workers and compared
with a union-find oracle over the events sent; Segment's documented cases show up in cdp.identity.merges; a
worker SIGKILLed in a merge-heavy stream loses nothing and resolves nothing twice to different profiles.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Pipeline, free_port, wait_until
from tests.unit.test_identity_protocol import union_find

Ident = tuple[str, str]
UNLIMITED = {
    "identity": {
        "identifiers": [{"type": "user_id", "limit": 100_000}, {"type": "email", "limit": 100_000}, {"type": "anonymous_id", "limit": 100_000}],
        "max_merges": 100_000, "max_identifiers": 100_000,
    }
}  # fmt: skip


@pytest.fixture(scope="module")
def two_workers(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, int]]:
    """One pipeline with no limits, an ingest and two workers, shared by the examples of the property test."""
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path_factory.mktemp("identity-property"), extra_config=UNLIMITED)
    pipe.create_topics()
    other_port = free_port()
    try:
        pipe.start("ingest")
        pipe.start("worker")
        pipe.start("worker", CDP_WEB_PORT=str(other_port))
        yield pipe, other_port
    finally:
        pipe.stop_all()


PEOPLE = [("anonymous_id", f"a{n}") for n in range(8)] + [("user_id", f"u{n}") for n in range(4)] + [("email", f"e{n}@x.io") for n in range(3)]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(PEOPLE), min_size=1, max_size=3, unique_by=lambda i: i[0]), min_size=1, max_size=40))
def test_property_on_kafka_profiles_are_the_connected_components(two_workers: tuple[Pipeline, int], drawn: list[list[Ident]]) -> None:
    """Hypothesis draws the stream; each example gets its own identifier namespace on the same two workers."""
    pipeline, other_port = two_workers
    run = uuid.uuid4().hex[:6]
    stream = [[(t, f"{v}-{run}") for t, v in ids] for ids in drawn]
    stream = [ids if any(t == "anonymous_id" for t, _ in ids) else [("anonymous_id", f"solo{n}-{run}"), *ids]
              for n, ids in enumerate(stream)]  # fmt: skip  (the ingest requires anonymousId or userId; calls use anonymousId)
    resolved = resolved_profiles(pipeline, send_all(pipeline, stream, run))
    assert all(len(p) == 1 for p in resolved.values())
    identifiers = {i for ids in stream for i in ids}
    port = random.choice([pipeline.web_port, other_port])
    assert grouping(port, identifiers) == union_find(stream)


@pytest.fixture
def unlimited(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Pipeline]:
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, extra_config=UNLIMITED)
    pipe.create_topics()
    try:
        yield pipe
    finally:
        pipe.stop_all()


def random_stream(seed: int, events: int, run: str) -> list[list[Ident]]:
    """Events over a small pool of people, so many of them link profiles created apart (merge-heavy)."""
    rng = random.Random(seed)
    stream = []
    for _ in range(events):
        ids: list[Ident] = [("anonymous_id", f"a{rng.randrange(60)}-{run}")]
        if rng.random() < 0.5:
            ids.append(("user_id", f"u{rng.randrange(25)}-{run}"))
        if rng.random() < 0.3:
            ids.append(("email", f"e{rng.randrange(15)}-{run}@x.io"))
        stream.append(ids)
    return stream


def call(identifiers: list[Ident], message_id: str) -> dict[str, Any]:
    """A Segment identify call carrying exactly these identifiers."""
    ids = dict(identifiers)
    body: dict[str, Any] = {"type": "identify", "messageId": message_id, "anonymousId": ids["anonymous_id"], "traits": {}}
    if "user_id" in ids:
        body["userId"] = ids["user_id"]
    if "email" in ids:
        body["traits"]["email"] = ids["email"]
    return body


def send_all(pipeline: Pipeline, stream: list[list[Ident]], run: str, start: int = 0) -> list[str]:
    message_ids = [f"m-{run}-{n}" for n in range(start, start + len(stream))]
    for first in range(0, len(stream), 50):
        batch = [call(ids, m) for ids, m in zip(stream[first : first + 50], message_ids[first : first + 50])]
        response = pipeline.post("/v1/batch", {"batch": batch})
        assert response.status_code == 200, response.text
    return message_ids


def resolved_profiles(pipeline: Pipeline, message_ids: list[str], timeout: float = 180) -> dict[str, set[str]]:
    """messageId -> every profile id it was resolved to, once every message id is on cdp.events.resolved."""
    wanted = set(message_ids)
    records = pipeline.read(
        "events.resolved", until=lambda rs: wanted <= {r.value["event"]["message_id"] for r in rs}, timeout=timeout
    )
    found: dict[str, set[str]] = defaultdict(set)
    for record in records:
        assert record.key.decode() == record.value["profile_id"], "resolved events are keyed by profile id"
        found[record.value["event"]["message_id"]].add(record.value["profile_id"])
    missing = wanted - set(found)
    assert not missing, f"{len(missing)} events never resolved, e.g. {sorted(missing)[:3]}"
    return found


def view(port: int, path: str) -> requests.Response:
    """A web view's answer; a 503 (its partition is moving between workers) is retried for a while."""
    deadline = time.monotonic() + 60
    while True:
        response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=30)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def grouping(port: int, identifiers: set[Ident]) -> set[frozenset[Ident]]:
    """Identifiers grouped by the profile the web view of the worker on `port` answers for each."""
    by_profile: dict[str, set[Ident]] = defaultdict(set)
    for type_, value in identifiers:
        response = view(port, f"/v1/identifiers/{type_}/{value}")
        assert response.status_code == 200, (type_, value, response.text)
        by_profile[response.json()["profile_id"]].add((type_, value))
    return {frozenset(g) for g in by_profile.values()}


def identity_partitions(port: int, topic: str) -> set[int]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {int(line.split('partition="')[1].split('"')[0]) for line in text.splitlines()
            if line.startswith("cdp_consumer_lag{") and 'stage="identity"' in line and f'topic="{topic}"' in line}  # fmt: skip


def test_two_workers_group_a_merge_heavy_stream_like_the_oracle(unlimited: Pipeline) -> None:
    run = uuid.uuid4().hex[:6]
    other_port = free_port()
    unlimited.start("ingest")
    unlimited.start("worker")
    unlimited.start("worker", CDP_WEB_PORT=str(other_port))
    stream = random_stream(7, 400, run)
    message_ids = send_all(unlimited, stream, run)
    resolved = resolved_profiles(unlimited, message_ids)
    assert all(len(p) == 1 for p in resolved.values()), "each event resolved once, to one profile"

    commands = unlimited.topic("identity.commands")
    wait_until(lambda: identity_partitions(unlimited.web_port, commands) and identity_partitions(other_port, commands),
               timeout=90, what="both workers to own identity partitions")  # fmt: skip
    mine, theirs = identity_partitions(unlimited.web_port, commands), identity_partitions(other_port, commands)
    assert mine and theirs and not mine & theirs, (mine, theirs)
    identifiers = {i for ids in stream for i in ids}
    expected = union_find(stream)
    assert grouping(unlimited.web_port, identifiers) == expected
    assert grouping(other_port, identifiers) == expected, "the other worker routes to the owners and agrees"
    assert len(expected) < len(identifiers) / 2, "the stream was merge-heavy"

    merges = unlimited.read("identity.merges", until=lambda rs: len(rs) > 0)
    merged = [m.value for m in merges if m.value["kind"] == "merged" and m.value["rule"] == "identifier match"]
    assert merged, "profiles created apart were merged"
    some = merged[-1]
    for port in (unlimited.web_port, other_port):
        survivor = view(port, f"/v1/profiles/{some['merged_profile_id']}").json()
        assert survivor["requested_profile_id"] == some["merged_profile_id"]
        assert some["merged_profile_id"] in survivor["merged_from"]
        log = view(port, f"/v1/profiles/{survivor['profile_id']}/merges").json()["merges"]
        assert some in log, "the profile's merge view lists the entry that merged it"


def test_segments_documented_cases_on_kafka(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:6]
    pipeline.start("ingest")
    pipeline.start("worker")
    calls = [
        {"type": "identify", "messageId": f"1-{run}", "userId": f"u1-{run}", "anonymousId": f"shared-{run}", "traits": {"email": f"x-{run}@y.io"}},
        {"type": "identify", "messageId": f"2-{run}", "userId": f"u2-{run}", "anonymousId": f"shared-{run}", "traits": {}},
        {"type": "identify", "messageId": f"3-{run}", "userId": f"u3-{run}", "anonymousId": f"other-{run}", "traits": {"email": f"x-{run}@y.io"}},
        {"type": "track", "event": "e", "messageId": f"4-{run}", "userId": f"u4-{run}", "anonymousId": "anonymous"},
        {"type": "track", "event": "e", "messageId": f"5-{run}", "userId": f"u5-{run}", "anonymousId": "anonymous"},
    ]
    for body in calls:  # one at a time: the cases are about order
        assert pipeline.post("/v1/batch", {"batch": [body]}).status_code == 200
        resolved_profiles(pipeline, [body["messageId"]])
    profiles = {mid: next(iter(p)) for mid, p in resolved_profiles(pipeline, [c["messageId"] for c in calls]).items()}
    assert len(set(profiles.values())) == 5, "no two of these events may share a profile"

    entries = [r.value for r in pipeline.read("identity.merges", until=lambda rs: len(rs) >= 4)]
    refused = {e["message_id"]: e for e in entries if e["kind"] == "refused"}
    assert refused[f"2-{run}"]["rule"] == "user_id limit 1" and refused[f"2-{run}"]["survivor_profile_id"] == profiles[f"1-{run}"]
    demoted = {e["message_id"]: e["identifiers"] for e in entries if e["kind"] == "demoted"}
    assert demoted[f"2-{run}"] == [{"type": "anonymous_id", "value": f"shared-{run}"}]
    assert demoted[f"3-{run}"] == [{"type": "email", "value": f"x-{run}@y.io"}], "a new user_id with a known email demotes it"

    port = pipeline.web_port
    assert view(port, f"/v1/identifiers/anonymous_id/shared-{run}").json()["profile_id"] == profiles[f"1-{run}"]
    assert view(port, f"/v1/identifiers/email/x-{run}@y.io").json()["profile_id"] == profiles[f"1-{run}"]
    assert view(port, f"/v1/identifiers/user_id/u2-{run}").json()["profile_id"] == profiles[f"2-{run}"]
    blocked = view(port, "/v1/identifiers/anonymous_id/anonymous")
    assert blocked.status_code == 404 and blocked.json() == {"error": "no profile has the identifier anonymous_id:anonymous"}
    unknown = view(port, "/v1/profiles/p-nope")
    assert unknown.status_code == 404 and unknown.json() == {"error": "no profile p-nope"}
    first = view(port, f"/v1/profiles/{profiles[f'1-{run}']}").json()
    assert {(i["type"], i["value"]) for i in first["identifiers"]} == {
        ("user_id", f"u1-{run}"), ("anonymous_id", f"shared-{run}"), ("email", f"x-{run}@y.io")}
    merges = view(port, f"/v1/profiles/{profiles[f'1-{run}']}/merges").json()["merges"]
    assert [e["rule"] for e in merges if e["kind"] == "refused"] == ["user_id limit 1", "user_id limit 1"]


def test_sigkill_in_a_merge_heavy_stream_loses_nothing_and_resolves_nothing_twice(unlimited: Pipeline) -> None:
    """One of two workers is SIGKILLed mid-stream (its partitions move to the other), then restarted."""
    run = uuid.uuid4().hex[:6]
    other_port = free_port()
    unlimited.start("ingest")
    victim = unlimited.start("worker")
    unlimited.start("worker", CDP_WEB_PORT=str(other_port))
    stream = random_stream(11, 600, run)
    first = send_all(unlimited, stream[:300], run)
    wait_until(lambda: len(unlimited.read("events.resolved", until=lambda rs: len(rs) >= 60, timeout=5, decode=False)) >= 60,
               timeout=120, what="the identity stage to be mid-stream")  # fmt: skip
    unlimited.stop(victim, signal.SIGKILL)
    second = send_all(unlimited, stream[300:450], run, start=300)
    time.sleep(2)
    unlimited.start("worker")
    third = send_all(unlimited, stream[450:], run, start=450)
    resolved = resolved_profiles(unlimited, first + second + third)
    twice = {m: p for m, p in resolved.items() if len(p) > 1}
    assert not twice, f"events resolved to different profiles: {list(twice.items())[:3]}"
    identifiers = {i for ids in stream for i in ids}
    assert grouping(other_port, identifiers) == union_find(stream)


TIGHT = {
    "identity": {
        "identifiers": [{"type": "user_id", "limit": 1}, {"type": "email", "limit": 2}, {"type": "anonymous_id", "limit": 3}],
        "blocked": ["^[0-]*$", "null", "anonymous"], "max_merges": 3, "max_identifiers": 5,
    }
}  # fmt: skip


def test_with_limits_on_kafka_no_profile_breaks_a_rule(kafka_bootstrap: str, tmp_path: Path) -> None:
    pipeline = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, extra_config=TIGHT)
    pipeline.create_topics()
    try:
        run = uuid.uuid4().hex[:6]
        other_port = free_port()
        pipeline.start("ingest")
        pipeline.start("worker")
        pipeline.start("worker", CDP_WEB_PORT=str(other_port))
        rng = random.Random(5)
        stream = [ids if rng.random() > 0.1 else [("anonymous_id", "anonymous"), *ids[1:]] for ids in random_stream(3, 300, run)]
        resolved = resolved_profiles(pipeline, send_all(pipeline, stream, run))
        assert all(len(p) == 1 for p in resolved.values()), "every event resolves to exactly one profile"
        assert view(other_port, "/v1/identifiers/anonymous_id/anonymous").status_code == 404, "blocked values link nothing"
        profiles: dict[str, dict[str, Any]] = {}
        for type_, value in {i for ids in stream for i in ids if i[1] != "anonymous"}:
            body = view(random.choice([pipeline.web_port, other_port]), f"/v1/identifiers/{type_}/{value}").json()
            assert (type_, value) in {(i["type"], i["value"]) for i in body["identifiers"]}, "the profile holds it"
            profiles[body["profile_id"]] = body
        for body in profiles.values():
            types = [i["type"] for i in body["identifiers"]]
            assert types.count("user_id") <= 1 and types.count("email") <= 2 and types.count("anonymous_id") <= 3, body
            assert len(types) <= 5 and body["merges"] <= 3, body
        entries = [r.value for r in pipeline.read("identity.merges", until=lambda rs: len(rs) > 0)]
        assert {e["kind"] for e in entries} == {"merged", "refused", "demoted"}, "the rules were exercised"
    finally:
        pipeline.stop_all()
