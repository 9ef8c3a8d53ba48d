"""The compute engine on a simulated cluster: partitions fed in random interleavings, with merges and repeats.

Each partition has three logs (resolved events, merge-log entries, the engine's own commands), FIFO each, read
in a random order across logs and partitions, as Kafka delivers them. Events may be resolved to a profile that
is merged meanwhile, merge entries chain (a survivor merged on later), and anything may be delivered twice
(identity's outbox re-sends, our own). Whatever the order, every surviving profile's traits equal the oracle
over every event of the profiles merged into it, each event counted once; audience memberships follow.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.compute.catalog import build_catalog
from agents.compute.definitions import parse_trait
from agents.compute.engine import Changes, ComputeEngine
from agents.compute.generations import Live
from agents.compute.traits import value
from tests.unit.test_compute_traits import oracle
from tests.unit.test_identity_protocol import _DictState, partition_of

TRAITS = [
    {"key": "orders", "kind": "count", "event": "Order Completed"},
    {"key": "revenue", "kind": "sum", "event": "Order Completed", "property": "amount"},
    {"key": "first_item", "kind": "first", "property": "item"},
    {"key": "last_item", "kind": "last", "property": "item"},
    {"key": "items", "kind": "unique_list", "property": "item"},
    {"key": "favourite", "kind": "most_frequent", "property": "item"},
    {"key": "recent", "kind": "count", "window": "60s"},
]
AUDIENCES = [{"key": "buyers", "when": {"trait": "orders", "gte": 2}}, {"key": "others", "when": {"not": {"audience": "buyers"}}}]
LIVE = Live.of_catalog(build_catalog(TRAITS, AUDIENCES))
NOW = 1_000_000
PROFILES = [f"p{n}" for n in range(6)]


class Cluster:
    def __init__(self, partitions: int, rnd: random.Random, duplicate: float) -> None:
        self.engine = ComputeEngine(lambda: LIVE)
        self.partitions, self.random, self.duplicate = partitions, rnd, duplicate
        self.states: list[dict[str, Any]] = [{} for _ in range(partitions)]
        self.logs = [{"resolved": deque(), "merges": deque(), "commands": deque()} for _ in range(partitions)]  # type: ignore[var-annotated]
        self.memberships: list[dict[str, Any]] = []

    def put(self, log: str, key: str, item: Any) -> None:
        self.logs[partition_of(key, self.partitions)][log].append(item)
        if self.random.random() < self.duplicate:  # the same record written again (an outbox re-sent)
            self.logs[partition_of(key, self.partitions)][log].append(item)

    def run(self) -> None:
        while True:
            ready = [(p, name) for p in range(self.partitions) for name, log in self.logs[p].items() if log]
            if not ready:
                return
            partition, name = self.random.choice(ready)
            item = self.logs[partition][name].popleft()
            state, out = _DictState(self.states[partition]), Changes()
            if name == "resolved":
                self.engine.event(item[0], item[1], state, out, NOW, item[2])
            elif name == "merges":
                self.engine.merge(item, out)
            else:
                self.engine.command(item, state, out, NOW)
            for key, command in out.commands:
                self.put("commands", key, command)
            self.memberships.extend(out.memberships)

    def record(self, profile_id: str) -> dict[str, Any] | None:
        return self.states[partition_of(profile_id, self.partitions)].get(f"p|{profile_id}")


@st.composite
def scenarios(draw: Any) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """Events keyed to profiles, and merges: each profile merged at most once, into an older one."""
    merges: dict[str, str] = {}
    for index, profile in enumerate(PROFILES[1:], start=1):
        if draw(st.booleans()):
            merges[profile] = PROFILES[draw(st.integers(0, index - 1))]
    events = draw(st.lists(st.fixed_dictionaries({
        "profile": st.sampled_from(PROFILES),
        "type": st.sampled_from(["track", "track", "page"]),
        "event": st.sampled_from(["Order Completed", "Signed Up"]),
        "timestamp": st.integers(NOW - 120_000, NOW),
        "properties": st.fixed_dictionaries({}, optional={"amount": st.integers(1, 50), "item": st.sampled_from(["a", "b", "c"])}),
    }), max_size=30))  # fmt: skip
    keyed = []
    for n, e in enumerate(events):
        event = {"message_id": f"m{n}", "type": e["type"], "event": e["event"] if e["type"] == "track" else None,
                 "properties": e["properties"], "traits": {}, "timestamp": e["timestamp"]}  # fmt: skip
        keyed.append((e["profile"], event))
    return keyed, merges


def root(profile: str, merges: dict[str, str]) -> str:
    while profile in merges:
        profile = merges[profile]
    return profile


@settings(max_examples=400, deadline=None)
@given(scenarios(), st.integers(1, 4), st.sampled_from([0.0, 0.3]), st.randoms(use_true_random=False))
def test_survivors_hold_every_event_of_their_merged_profiles_once(scenario: Any, partitions: int, duplicate: float, rnd: random.Random) -> None:
    events, merges = scenario
    cluster = Cluster(partitions, rnd, duplicate)
    entries = [{"kind": "merged", "survivor_profile_id": into, "merged_profile_id": merged, "identifiers": [],
                "message_id": f"merge-{merged}", "timestamp": NOW - 1, "rule": "identifier match"} for merged, into in merges.items()]  # fmt: skip
    feed = [("resolved", profile, (profile, event, offset)) for offset, (profile, event) in enumerate(events)]
    feed += [("merges", entry["survivor_profile_id"], entry) for entry in entries]
    rnd.shuffle(feed)  # resolved events and merge entries interleave in any order
    for log, key, item in feed:
        cluster.put(log, key, item)
    cluster.run()

    survivors = {root(p, merges) for p in PROFILES}
    for profile in PROFILES:
        record = cluster.record(profile)
        if profile not in survivors:
            assert record is None, f"{profile} was merged but still has state"
            continue
        mine = [e for p, e in events if root(p, merges) == profile]
        for trait in TRAITS:
            definition = parse_trait(trait)
            state = None if record is None else record["t"].get(LIVE.sids[trait["key"]])
            assert value(definition, state, NOW) == oracle(definition, mine, NOW), (profile, trait["key"])
        buyer = oracle(parse_trait(TRAITS[0]), mine, NOW) >= 2
        if record is not None:
            assert ("buyers" in record["m"]) == buyer and ("others" in record["m"]) == (not buyer)
    for profile in PROFILES:  # the membership log replays to the final memberships, each change once
        changes = [c for c in cluster.memberships if c["profile_id"] == profile]
        seqs = [c["seq"] for c in changes]
        assert seqs == sorted(set(seqs))
        final = {}
        for change in changes:
            assert final.get(change["audience"], "exited") != change["transition"]
            final[change["audience"]] = change["transition"]
        record = cluster.record(profile)
        assert {a for a, t in final.items() if t == "entered"} == set(record["m"] if record else ())


def test_a_repeated_fold_in_reaching_a_profile_merged_on_since_is_not_counted_again() -> None:
    """p5 folds into p3, which takes it and is then merged into p1; the repeat of p5's fold_in (a re-sent command)
    then reaches p3. p3 handed p5's events on inside its own record: forwarding the repeat would count them twice.
    (Found by the property test above: a chain p5 → p3 → p1 with duplicates.)"""
    engine, records = ComputeEngine(lambda: LIVE), {}  # one partition holds every profile
    state = _DictState(records)
    order = {"message_id": "m1", "type": "track", "event": "Order Completed", "properties": {}, "traits": {}, "timestamp": NOW - 1}
    engine.event("p5", order, state, Changes(), NOW)

    def run(command: dict[str, Any]) -> list[dict[str, Any]]:
        out = Changes()
        engine.command(command, state, out, NOW)
        return [sent for _, sent in out.commands]

    [fold_in_p3] = run({"kind": "fold_out", "profile": "p5", "into": "p3", "at": NOW})
    assert run(fold_in_p3) == []
    [fold_in_p1] = run({"kind": "fold_out", "profile": "p3", "into": "p1", "at": NOW})
    assert run(fold_in_p1) == []
    assert run(fold_in_p3) == []  # the repeat: dropped at p3, not forwarded to p1
    orders = parse_trait(TRAITS[0])
    assert value(orders, records["p|p1"]["t"][LIVE.sids["orders"]], NOW) == 1


RICH_TRAITS = [*TRAITS, {"key": "pages", "kind": "count", "event": "Page Viewed"}]
RICH_AUDIENCES = [
    *AUDIENCES,
    {"key": "pro", "when": {"trait": "traits.plan", "eq": "pro"}},
    {"key": "pro_buyers", "when": {"all": [{"audience": "pro"}, {"audience": "buyers"}]}},
    {"key": "browsers", "when": {"all": [{"trait": "pages", "gte": 2}, {"not": {"event": "Order Completed", "within": "30s"}}]}},
    {"key": "never_signed_up", "when": {"not": {"event": "Signed Up", "within": "1h", "count": {"gte": 1}}}},
    {"key": "big", "when": {"any": [{"trait": "revenue", "gte": 60}, {"trait": "traits.vip", "eq": True}]}},
]
RICH = Live.of_catalog(build_catalog(RICH_TRAITS, RICH_AUDIENCES))


def every_audience(record: dict[str, Any]) -> set[str]:
    """The oracle: every audience evaluated afresh on the profile's values, in dependency order."""
    from agents.compute.catalog import evaluate
    from agents.compute.engine import NO_VALUE

    values = {key: record["v"].get(key, NO_VALUE.get(d.kind)) for key, d in RICH.catalog.all_traits.items()}
    identify = {name: held[2] for name, held in record["i"].items()}
    members: dict[str, bool] = {}
    for key, audience in RICH.catalog.audiences.items():
        members[key] = evaluate(audience.when, traits=values, identify=identify, counters=values, memberships=members)
    return {key for key, member in members.items() if member}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(["track", "track", "page", "identify"]),
    "event": st.sampled_from(["Order Completed", "Signed Up", "Product Viewed"]),
    "at": st.integers(0, 120_000),
    "properties": st.fixed_dictionaries({}, optional={"amount": st.integers(1, 50), "item": st.sampled_from(["a", "b"])}),
    "traits": st.fixed_dictionaries({}, optional={"plan": st.sampled_from(["free", "pro"]), "vip": st.booleans()}),
}), max_size=25))  # fmt: skip
def test_audiences_re_evaluated_only_on_what_changed_match_a_full_evaluation(calls: list[dict[str, Any]]) -> None:
    engine, store = ComputeEngine(lambda: RICH), {}
    state = _DictState(store)
    for n, call in enumerate(calls):
        event = {"message_id": f"m{n}", "type": call["type"], "event": call["event"] if call["type"] == "track" else None,
                 "properties": call["properties"], "traits": call["traits"] if call["type"] == "identify" else {},
                 "timestamp": NOW - 120_000 + call["at"]}  # fmt: skip
        engine.event("p", event, state, Changes(), NOW)
        record = store["p|p"]
        assert set(record["m"]) == every_audience(record), (n, event)


def test_changes_name_their_profile_by_its_latest_identifiers_and_a_merge_fills_the_gaps() -> None:
    """Every change carries the profile's latest userId, anonymousId and email (what sync's destinations address it
    by); a merged profile's identifiers fill what the survivor lacks, the survivor's own win."""
    engine, records = ComputeEngine(lambda: LIVE), {}
    state = _DictState(records)

    def order(message_id: str, **who: str) -> dict[str, Any]:
        return {"message_id": message_id, "type": "track", "event": "Order Completed", "properties": {}, "traits": {},
                "timestamp": NOW - 1, "user_id": None, "anonymous_id": None, **who}  # fmt: skip

    out = Changes()
    engine.event("p1", order("m1", anonymous_id="a-1"), state, out, NOW, identifiers=[{"type": "anonymous_id", "value": "a-1"}])
    assert {(c["user_id"], c["anonymous_id"], c["email"]) for c in out.traits} == {(None, "a-1", None)}
    out = Changes()
    engine.event("p1", order("m2", user_id="u-1"), state, out, NOW,
                 identifiers=[{"type": "user_id", "value": "u-1"}, {"type": "email", "value": "a@b.io"}])
    assert out.traits and out.memberships  # the second order: orders 2, and the profile joins `buyers`
    assert {(c["user_id"], c["anonymous_id"], c["email"]) for c in out.traits + out.memberships} == {("u-1", "a-1", "a@b.io")}
    engine.event("p7", order("m3"), state, Changes(), NOW, identifiers=[{"type": "anonymous_id", "value": "a-7"}])
    out = Changes()
    engine.command({"kind": "fold_out", "profile": "p7", "into": "p1", "at": NOW}, state, out, NOW)
    [(_, fold_in)] = out.commands
    out = Changes()
    engine.command(fold_in, state, out, NOW)
    assert out.traits and {(c["user_id"], c["anonymous_id"], c["email"]) for c in out.traits} == {("u-1", "a-1", "a@b.io")}
    engine.event("p8", order("m4"), state, Changes(), NOW, identifiers=[{"type": "email", "value": "c@d.io"}])
    assert records["p|p8"]["ids"] == {"email": "c@d.io"}
    engine.event("p8", order("m5", user_id="u-8"), state, Changes(), NOW)  # forwarded events carry only their own ids
    assert records["p|p8"]["ids"] == {"email": "c@d.io", "user_id": "u-8"}
