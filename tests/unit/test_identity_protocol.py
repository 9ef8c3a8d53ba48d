"""The identity protocol over many partitions, against a union-find oracle and Segment's documented cases.

`Cluster` plays Kafka for the pure protocol: one raw log and one command log per partition, keys routed with
Kafka's murmur2, and a random scheduler that picks which partition (and which of its two logs) goes next, so
every interleaving of owners is possible; optionally it also shuffles each partition's log (records from
different writers reach a partition in any order) and delivers commands again, at once or much later, as the
stage does when it re-sends its outbox after a crash; and it may lose a partition's claiming sagas (`c|`, which the
stage keeps in memory only) and read their events again, as the stage does after a SIGKILL. The same protocol runs on real Kafka in tests/integration/test_identity_stage.py.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from aiokafka.partitioner import murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.identity.protocol import IdentityProtocol, Outputs, event_command, identifier_record
from agents.identity.records import CLAIMING
from agents.identity.rules import IdentifierRule, IdentityRules, Limit

Ident = tuple[str, str]
UNLIMITED = IdentityRules(
    identifiers=tuple(IdentifierRule(t, Limit(10_000)) for t in ("user_id", "email", "anonymous_id")),
    blocked=(), max_merges=10_000, max_identifiers=10_000,
)  # fmt: skip
POOL: list[Ident] = [("user_id", f"u{n}") for n in range(4)] + [("email", f"e{n}") for n in range(3)] + [("anonymous_id", f"a{n}") for n in range(5)]


def partition_of(key: str, partitions: int) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def make_event(message_id: str, identifiers: list[Ident], at: int) -> dict[str, Any]:
    """A RawEvent carrying exactly `identifiers` (as context.externalIds, which take any type)."""
    external = [{"type": t, "id": v, "collection": "users", "encoding": "none"} for t, v in identifiers]
    return {"message_id": message_id, "type": "track", "source": "test", "user_id": None, "anonymous_id": None,
            "event": "e", "properties": {}, "traits": {}, "context": {"externalIds": external}, "integrations": {},
            "timestamp": at, "received_at": at, "extra": {}}  # fmt: skip


class Cluster:
    """The protocol's owners on `partitions` partitions, fed by a random scheduler."""

    def __init__(self, rules: IdentityRules, partitions: int = 1, seed: int = 0, duplicate: float = 0.0,
                 shuffled: bool = False, late: float = 0.0, forget: float = 0.0) -> None:  # fmt: skip
        self.protocol = IdentityProtocol(rules)
        self.partitions = partitions
        self.random = random.Random(seed)
        self.duplicate, self.shuffled, self.late, self.forget = duplicate, shuffled, late, forget
        self.forgotten = 0
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.states: list[dict[str, Any]] = [{} for _ in range(partitions)]
        self.raw: list[deque[dict[str, Any]]] = [deque() for _ in range(partitions)]
        self.work: list[deque[dict[str, Any]]] = [deque() for _ in range(partitions)]
        self.resolved: dict[str, list[str]] = {}
        self.log: list[dict[str, Any]] = []
        self.sent = 0

    def send(self, identifiers: list[Ident], at: int | None = None) -> str:
        message_id = f"m{self.sent}"
        self.sent += 1
        event = make_event(message_id, identifiers, 1_000 + self.sent if at is None else at)
        self.raw[partition_of(message_id, self.partitions)].append(event_command(event))
        return message_id

    def run(self, steps: int | None = None) -> None:
        """Deliver until nothing is left (or `steps` deliveries), in a random order across partitions (FIFO within
        each log)."""
        while steps is None or steps > 0:
            steps = None if steps is None else steps - 1
            ready = [(p, log) for p in range(self.partitions) for log in (self.raw[p], self.work[p]) if log]
            if not ready:
                return
            partition, queue = self.random.choice(ready)
            if self.shuffled and queue is self.work[partition]:
                queue.rotate(-self.random.randrange(len(queue)))
            self._deliver(partition, queue.popleft())
            if self.history and self.random.random() < self.late:  # an old command, delivered again
                again = self.random.choice(self.history)
                self.work[again[0]].append(again[1])
            if self.random.random() < self.forget:
                self._crash(self.random.randrange(self.partitions))

    def _crash(self, partition: int) -> None:
        """The partition's claiming sagas are lost; their events are read again first (the stage re-reads
        cdp.events.raw from its oldest claiming saga's offset), answers already on their way stay there."""
        state = self.states[partition]
        lost = sorted((k for k in state if k.startswith(CLAIMING)), key=lambda k: int(k[len(CLAIMING) + 1:]))
        for key in reversed(lost):
            self.raw[partition].appendleft(event_command(state.pop(key)["event"]))
        self.forgotten += len(lost)

    def _deliver(self, partition: int, command: dict[str, Any]) -> None:
        state = _DictState(self.states[partition])
        out = Outputs()
        self.protocol.handle(command, state, out)
        self._route(out)

    def _route(self, out: Outputs) -> None:
        """Commands to their owners' logs (sometimes twice), resolved events and log entries kept."""
        for key, sent in out.commands:
            target = self.work[partition_of(key, self.partitions)]
            target.append(sent)
            self.history.append((partition_of(key, self.partitions), sent))
            if self.random.random() < self.duplicate:
                target.append(sent)
        for resolved in out.resolved:
            self.resolved.setdefault(resolved.event["message_id"], []).append(resolved.profile_id)
        self.log.extend(out.log)

    def record(self, prefix: str, key: str) -> Any:
        return self.states[partition_of(key, self.partitions)].get(f"{prefix}|{key}")

    def profile(self, profile_id: str) -> dict[str, Any]:
        return self.record("p", profile_id)

    def root(self, profile_id: str) -> str:
        while (record := self.profile(profile_id))["status"] == "merged":
            profile_id = record["into"]
        return profile_id

    def holder(self, type_: str, value: str) -> str | None:
        record = self.states[partition_of(f"{type_}:{value}", self.partitions)].get(identifier_record(type_, value))
        return None if record is None else self.root(record["p"])

    def identifiers(self) -> list[Ident]:
        return [tuple(k.split("|")[1:3]) for s in self.states for k in s if k.startswith("i|")]  # type: ignore[misc]

    def groups(self) -> set[frozenset[Ident]]:
        by_root: dict[str, set[Ident]] = {}
        for ident in self.identifiers():
            by_root.setdefault(self.holder(*ident), set()).add(ident)  # type: ignore[arg-type]
        return {frozenset(g) for g in by_root.values()}

    def roots(self) -> dict[str, dict[str, Any]]:
        return {k[2:]: r for s in self.states for k, r in s.items() if k.startswith("p|") and r["status"] == "live"}

    def assert_quiet(self) -> None:
        """Every saga finished, no lock held, nothing queued, no profile left waiting for its creation."""
        for state in self.states:
            for key, record in state.items():
                assert not key.startswith(("e|", CLAIMING)), f"unfinished saga {key}"
                if key.startswith("p|"):
                    assert record["status"] != "expected" and record["lock"] is None and not record["queue"], (key, record)


class _DictState:
    def __init__(self, records: dict[str, Any]) -> None:
        self.records = records

    def get(self, key: str) -> Any:
        value = self.records.get(key)
        return None if value is None else _copy(value)  # the stage's records are decoded copies too

    def put(self, key: str, value: Any) -> None:
        self.records[key] = _copy(value)

    def delete(self, key: str) -> None:
        self.records.pop(key, None)


def _copy(value: Any) -> Any:
    import orjson

    return orjson.loads(orjson.dumps(value))


def union_find(batches: list[list[Ident]]) -> set[frozenset[Ident]]:
    parent: dict[Ident, Ident] = {}

    def find(x: Ident) -> Ident:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for batch in batches:
        for ident in batch[1:]:
            parent[find(ident)] = find(batch[0])
        find(batch[0])
    groups: dict[Ident, set[Ident]] = {}
    for ident in parent:
        groups.setdefault(find(ident), set()).add(ident)
    return {frozenset(g) for g in groups.values()}


streams = st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), max_size=40)
topologies = st.tuples(st.integers(1, 6), st.integers(0, 2**32), st.sampled_from([0.0, 0.2]), st.booleans(), st.sampled_from([0.0, 0.05]),
                       st.sampled_from([0.0, 0.0, 0.05]))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(streams, topologies)
def test_without_limits_profiles_are_the_connected_components(batches: list[list[Ident]], topology: tuple[Any, ...]) -> None:
    cluster = Cluster(UNLIMITED, *topology)
    sent = [cluster.send(batch) for batch in batches]
    cluster.run()
    cluster.assert_quiet()
    assert cluster.groups() == union_find(batches)
    assert all(len(set(cluster.resolved[m])) == 1 for m in sent) and set(cluster.resolved) == set(sent)
    for message_id, batch in zip(sent, batches):  # the profile an event got is (or was merged into) its group's
        assert cluster.root(cluster.resolved[message_id][0]) == cluster.holder(*batch[0])


TIGHT = IdentityRules(
    identifiers=(IdentifierRule("user_id", Limit(1)), IdentifierRule("email", Limit(2)), IdentifierRule("anonymous_id", Limit(3))),
    blocked=("^[0-]*$", "null", "a4"), max_merges=3, max_identifiers=5,
)  # fmt: skip
TIGHT_POOL = POOL + [("anonymous_id", "null"), ("user_id", "000")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(TIGHT_POOL), min_size=1, max_size=4, unique=True), max_size=40), topologies)
def test_with_limits_no_profile_breaks_a_rule_and_blocked_values_link_nothing(
    batches: list[list[Ident]], topology: tuple[Any, ...]
) -> None:
    cluster = Cluster(TIGHT, *topology)
    sent = [cluster.send(batch) for batch in batches]
    cluster.run()
    cluster.assert_quiet()
    assert set(cluster.resolved) == set(sent) and all(len(set(p)) == 1 for p in cluster.resolved.values())
    roots = cluster.roots()
    for profile_id, root in roots.items():
        types = [t for t, _, _ in root["ids"]]
        for type_ in set(types):
            assert types.count(type_) <= TIGHT.rule(type_).limit.count, (profile_id, root)
        assert len(root["ids"]) <= TIGHT.max_identifiers and root["merges"] <= TIGHT.max_merges
    assert not any(TIGHT.is_blocked(v) for _, v in cluster.identifiers())
    held = [(t, v) for root in roots.values() for t, v, _ in root["ids"]]
    assert sorted(held) == sorted(cluster.identifiers()), "each identifier in exactly one live profile"
    assert all(cluster.holder(t, v) in roots and [t, v] in [i[:2] for i in roots[cluster.holder(t, v)]["ids"]] for t, v in held)


def one_by_one(rules: IdentityRules) -> tuple[Cluster, Any]:
    """A cluster on 4 partitions where each event is resolved before the next is sent."""
    cluster = Cluster(rules, partitions=4)

    def send(identifiers: list[Ident]) -> str:
        message_id = cluster.send(identifiers)
        cluster.run()
        return cluster.root(cluster.resolved[message_id][0])

    return cluster, send


def test_an_anonymous_id_shared_by_two_user_ids_is_refused() -> None:
    cluster, send = one_by_one(IdentityRules())
    first = send([("user_id", "u1"), ("anonymous_id", "shared")])
    second = send([("user_id", "u2"), ("anonymous_id", "shared")])
    assert first != second and len(cluster.roots()) == 2
    refused = [e for e in cluster.log if e["kind"] == "refused"]
    assert len(refused) == 1 and refused[0]["survivor_profile_id"] == first and refused[0]["rule"] == "user_id limit 1"
    assert refused[0]["merged_profile_id"] == second
    demoted = [e for e in cluster.log if e["kind"] == "demoted"]
    assert [e["identifiers"] for e in demoted] == [[{"type": "anonymous_id", "value": "shared"}]]
    assert cluster.holder("anonymous_id", "shared") == first and cluster.holder("user_id", "u2") == second


def test_a_new_user_id_with_an_existing_email_demotes_the_email() -> None:
    cluster, send = one_by_one(IdentityRules())
    first = send([("user_id", "u1"), ("email", "x@y.io")])
    second = send([("user_id", "u2"), ("email", "x@y.io")])
    assert second != first
    assert cluster.holder("email", "x@y.io") == first and cluster.holder("user_id", "u2") == second
    assert [e["identifiers"] for e in cluster.log if e["kind"] == "demoted"] == [[{"type": "email", "value": "x@y.io"}]]


def test_a_blocked_value_links_nothing() -> None:
    cluster, send = one_by_one(IdentityRules())
    first = send([("user_id", "u1"), ("anonymous_id", "anonymous")])
    second = send([("user_id", "u2"), ("anonymous_id", "anonymous")])
    only_blocked = send([("anonymous_id", "null")])
    assert len({first, second, only_blocked}) == 3 and cluster.holder("anonymous_id", "anonymous") is None
    assert cluster.resolved["m1"] != cluster.resolved["m0"]


def test_the_101st_merge_is_refused() -> None:
    rules = IdentityRules(identifiers=(IdentifierRule("user_id", Limit(1)), IdentifierRule("anonymous_id", Limit(1_000))))
    cluster, send = one_by_one(rules)
    hub = send([("anonymous_id", "hub")])
    for n in range(101):
        send([("anonymous_id", f"a{n}")])
    for n in range(100):
        assert send([("anonymous_id", "hub"), ("anonymous_id", f"a{n}")]) == hub
    assert cluster.profile(hub)["merges"] == 100
    alone = send([("anonymous_id", "hub"), ("anonymous_id", "a100")])  # "a100" sorts first: it is the anchor
    assert alone != hub and cluster.holder("anonymous_id", "a100") == alone and cluster.profile(hub)["merges"] == 100
    assert cluster.log[-2]["kind"] == "refused" and cluster.log[-2]["rule"] == "max_merges 100"
    assert cluster.log[-1]["kind"] == "demoted" and cluster.log[-1]["identifiers"] == [{"type": "anonymous_id", "value": "hub"}]


def test_merges_keep_the_oldest_profile_and_record_what_linked_them() -> None:
    cluster, send = one_by_one(IdentityRules())
    old = send([("anonymous_id", "a1")])
    young = send([("user_id", "u1")])
    assert send([("user_id", "u1"), ("anonymous_id", "a1")]) == old
    merged = [e for e in cluster.log if e["kind"] == "merged"]
    assert merged == [{"kind": "merged", "survivor_profile_id": old, "merged_profile_id": young,
                       "identifiers": [{"type": "user_id", "value": "u1"}, {"type": "anonymous_id", "value": "a1"}],
                       "message_id": "m2", "timestamp": 1_003, "rule": "identifier match"}]  # fmt: skip
    assert cluster.profile(old)["merged_from"] == [young] and cluster.profile(old)["merges"] == 1


def test_new_identifiers_attach_without_counting_as_merges() -> None:
    cluster, send = one_by_one(IdentityRules())
    profile = send([("user_id", "u1")])
    assert send([("user_id", "u1"), ("anonymous_id", "a1"), ("email", "x@y.io")]) == profile
    assert cluster.profile(profile)["merges"] == 0 and cluster.profile(profile)["merged_from"] == []
    assert {(t, v) for t, v, _ in cluster.profile(profile)["ids"]} == {("user_id", "u1"), ("anonymous_id", "a1"), ("email", "x@y.io")}
    assert [e["rule"] for e in cluster.log] == ["new identifiers"]


def test_limits_with_a_period_count_only_identifiers_added_within_it() -> None:
    day = 86_400_000
    rules = IdentityRules(identifiers=(IdentifierRule("user_id", Limit(1)), IdentifierRule("anonymous_id", Limit(2, 7 * day))))
    cluster = Cluster(rules, partitions=3)
    for n, at in enumerate([0, day, 2 * day, 9 * day]):
        cluster.send([("user_id", "u"), ("anonymous_id", f"a{n}")], at=at)
        cluster.run()
    profile = cluster.holder("user_id", "u")
    assert {v for t, v, _ in cluster.profile(profile)["ids"] if t == "anonymous_id"} == {"a0", "a1", "a3"}
    assert [e["rule"] for e in cluster.log if e["kind"] == "refused"] == ["anonymous_id limit 2 per 7d"]


def test_a_replayed_event_resolves_to_the_profile_it_resolved_to_first() -> None:
    """`cdp replay` re-drives raw events: each gets the same resolved record again (same profile id, even when
    that profile was merged since), so compute, which counts a messageId once per partition, counts it once."""
    cluster = Cluster(UNLIMITED, partitions=4, seed=5)
    rnd = random.Random(9)
    sent = []
    for _ in range(60):
        identifiers: list[Ident] = [("anonymous_id", f"a{rnd.randrange(10)}")]
        if rnd.random() < 0.4:
            identifiers.append(("user_id", f"u{rnd.randrange(4)}"))
        sent.append((cluster.send(identifiers), identifiers))
    cluster.run()
    first = {mid: profiles[0] for mid, profiles in cluster.resolved.items()}
    entries = len(cluster.log)
    for mid, identifiers in sent:
        cluster.raw[partition_of(mid, 4)].append(event_command(make_event(mid, identifiers, 2_000)))
    cluster.run()
    cluster.assert_quiet()
    assert {mid: profiles for mid, profiles in cluster.resolved.items()} == {mid: [p, p] for mid, p in first.items()}
    assert len(cluster.log) == entries, "a replay logs no merge again"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), min_size=10, max_size=40),
       st.integers(2, 6), st.integers(0, 2**32))  # fmt: skip
def test_claiming_sagas_lost_and_started_again_resolve_as_if_never_lost(batches: list[list[Ident]], partitions: int, seed: int) -> None:
    """The stage keeps claiming sagas in memory only: losing them often, mid-flight, must not change any outcome."""
    cluster = Cluster(UNLIMITED, partitions, seed, duplicate=0.1, forget=0.2)
    sent = [cluster.send(batch) for batch in batches]
    cluster.run()
    cluster.assert_quiet()
    assert cluster.groups() == union_find(batches)
    assert set(cluster.resolved) == set(sent) and all(len(cluster.resolved[m]) == 1 for m in sent), "each event resolved once"
    for message_id, batch in zip(sent, batches):
        assert cluster.root(cluster.resolved[message_id][0]) == cluster.holder(*batch[0])


def test_losing_claiming_sagas_is_exercised() -> None:
    """The test above would pass vacuously if nothing were ever lost: here sagas are."""
    cluster = Cluster(UNLIMITED, 4, 7, forget=0.2)
    for n in range(30):
        cluster.send([POOL[n % len(POOL)], POOL[(n * 5 + 1) % len(POOL)]])
    cluster.run()
    cluster.assert_quiet()
    assert cluster.forgotten > 5

