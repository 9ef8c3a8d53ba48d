"""Identity resolution decisions (one writer), against a union-find oracle and Segment's documented cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.identity.graph import ProfileState, identifier_key, resolve, survivor_of
from agents.identity.identifiers import ExtractedIdentifier as Id
from agents.identity.rules import IdentifierRule, IdentityRules, Limit

UNLIMITED = IdentityRules(
    identifiers=tuple(IdentifierRule(t, Limit(10_000)) for t in ("user_id", "email", "anonymous_id")),
    blocked=(), max_merges=10_000, max_identifiers=10_000,
)  # fmt: skip
POOL = [Id("user_id", f"u{n}") for n in range(4)] + [Id("email", f"e{n}") for n in range(3)] + [Id("anonymous_id", f"a{n}") for n in range(5)]
events = st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), max_size=40)


class Graph:
    """The two tables as dicts, and every event's resolution."""

    def __init__(self, rules: IdentityRules) -> None:
        self.rules = rules
        self.by_identifier: dict[str, str] = {}
        self.profiles: dict[str, ProfileState] = {}
        self.resolved: list[str] = []
        self.log: list[dict] = []

    def send(self, identifiers: list[Id], n: int | None = None) -> str:
        n = len(self.resolved) if n is None else n
        ordered = sorted(identifiers, key=lambda i: (self.rules.priority(i.type), i.value))
        result = resolve(ordered, message_id=f"m{n}", timestamp=1_000 + n, rules=self.rules,
                         profile_by_identifier=self.by_identifier, profiles=self.profiles)  # fmt: skip
        assert self.profiles[result.profile_id]["merged_into"] is None, "an event resolves to a live profile"
        self.resolved.append(result.profile_id)
        self.log.extend(result.log)
        return result.profile_id

    def groups(self) -> set[frozenset[str]]:
        by_root: dict[str, set[str]] = {}
        for key, profile in self.by_identifier.items():
            by_root.setdefault(survivor_of(self.profiles, profile), set()).add(key)
        return {frozenset(keys) for keys in by_root.values()}

    def roots(self) -> list[ProfileState]:
        return [p for p in self.profiles.values() if p["merged_into"] is None]


def union_find(batches: list[list[Id]]) -> set[frozenset[str]]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for batch in batches:
        keys = [identifier_key(i) for i in batch]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        find(keys[0])
    groups: dict[str, set[str]] = {}
    for key in parent:
        groups.setdefault(find(key), set()).add(key)
    return {frozenset(g) for g in groups.values()}


@settings(max_examples=300)
@given(events)
def test_without_limits_profiles_are_the_connected_components(batches: list[list[Id]]) -> None:
    graph = Graph(UNLIMITED)
    for batch in batches:
        graph.send(batch)
    assert graph.groups() == union_find(batches)


TIGHT = IdentityRules(
    identifiers=(IdentifierRule("user_id", Limit(1)), IdentifierRule("email", Limit(2)), IdentifierRule("anonymous_id", Limit(3))),
    blocked=("^[0-]*$", "null", "a4"), max_merges=3, max_identifiers=5,
)  # fmt: skip
TIGHT_POOL = POOL + [Id("anonymous_id", "null"), Id("user_id", "000")]


@settings(max_examples=300)
@given(st.lists(st.lists(st.sampled_from(TIGHT_POOL), min_size=1, max_size=4, unique=True), max_size=40))
def test_with_limits_no_profile_breaks_a_rule_and_blocked_values_link_nothing(batches: list[list[Id]]) -> None:
    graph = Graph(TIGHT)
    for batch in batches:
        graph.send([Id(i.type, i.value, TIGHT.is_blocked(i.value)) for i in batch])
    assert len(graph.resolved) == len(batches)
    for root in graph.roots():
        types = [key.split(":", 1)[0] for key in root["identifiers"]]
        for type_ in set(types):
            assert types.count(type_) <= TIGHT.rule(type_).limit.count, root
        assert len(root["identifiers"]) <= TIGHT.max_identifiers and root["merges"] <= TIGHT.max_merges
    assert not any(TIGHT.is_blocked(key.split(":", 1)[1]) for key in graph.by_identifier)
    assert sum(len(r["identifiers"]) for r in graph.roots()) == len(graph.by_identifier), "each identifier in one profile"


def test_an_anonymous_id_shared_by_two_user_ids_is_refused() -> None:
    graph = Graph(IdentityRules())
    first = graph.send([Id("user_id", "u1"), Id("anonymous_id", "shared")])
    second = graph.send([Id("user_id", "u2"), Id("anonymous_id", "shared")])
    assert first != second and len(graph.roots()) == 2
    refused = [e for e in graph.log if e["kind"] == "refused"]
    assert refused and refused[0]["survivor_profile_id"] == first and refused[0]["rule"] == "user_id limit 1"
    demoted = [e for e in graph.log if e["kind"] == "demoted"]
    assert demoted[0]["identifiers"] == [{"type": "anonymous_id", "value": "shared"}]


def test_a_new_user_id_with_an_existing_email_demotes_the_email() -> None:
    graph = Graph(IdentityRules())
    first = graph.send([Id("user_id", "u1"), Id("email", "x@y.io")])
    second = graph.send([Id("user_id", "u2"), Id("email", "x@y.io")])
    assert second != first
    assert graph.by_identifier["email:x@y.io"] == first and graph.by_identifier["user_id:u2"] == second
    assert [e["identifiers"] for e in graph.log if e["kind"] == "demoted"] == [[{"type": "email", "value": "x@y.io"}]]


def test_a_blocked_value_links_nothing() -> None:
    graph = Graph(IdentityRules())
    first = graph.send([Id("user_id", "u1"), Id("anonymous_id", "anonymous", blocked=True)])
    second = graph.send([Id("user_id", "u2"), Id("anonymous_id", "anonymous", blocked=True)])
    assert first != second and "anonymous_id:anonymous" not in graph.by_identifier


def test_the_101st_merge_is_refused() -> None:
    rules = IdentityRules(identifiers=(IdentifierRule("user_id", Limit(1)), IdentifierRule("anonymous_id", Limit(1_000))))
    graph = Graph(rules)
    hub = graph.send([Id("anonymous_id", "hub")])
    for n in range(101):
        graph.send([Id("anonymous_id", f"a{n}")])
    for n in range(100):
        assert graph.send([Id("anonymous_id", "hub"), Id("anonymous_id", f"a{n}")]) == hub
    assert graph.profiles[hub]["merges"] == 100
    graph.send([Id("anonymous_id", "hub"), Id("anonymous_id", "a100")])  # one of the two is demoted
    assert survivor_of(graph.profiles, graph.by_identifier["anonymous_id:a100"]) != hub
    assert graph.profiles[hub]["merges"] == 100
    assert graph.log[-2]["kind"] == "refused" and graph.log[-2]["rule"] == "max_merges 100"


def test_merges_keep_the_oldest_profile_and_record_what_linked_them() -> None:
    graph = Graph(IdentityRules())
    old = graph.send([Id("anonymous_id", "a1")])
    young = graph.send([Id("user_id", "u1")])
    assert graph.send([Id("user_id", "u1"), Id("anonymous_id", "a1")]) == old
    merged = [e for e in graph.log if e["kind"] == "merged"]
    assert merged == [{"kind": "merged", "survivor_profile_id": old, "merged_profile_id": young,
                       "identifiers": [{"type": "user_id", "value": "u1"}, {"type": "anonymous_id", "value": "a1"}],
                       "message_id": "m2", "timestamp": 1_002, "rule": "identifier match"}]  # fmt: skip
    assert graph.profiles[old]["merged_from"] == [young]
