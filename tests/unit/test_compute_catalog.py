"""Audiences and the catalog: errors that name the definition and the problem; dependency order and cycles against a
DFS oracle on random graphs; evaluate against an independent oracle on random conditions; shared event counters;
with_definition re-checking the whole catalog."""

from __future__ import annotations

import operator
import random
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agents.compute.catalog import Catalog, build_catalog, counter_key, evaluate, parse_audience, requirements
from agents.compute.definitions import TraitDefinition
from agents.compute.traits import compare, holds, observe, value
from agents.errors import ConfigError

TRAITS = [{"key": "ltv", "kind": "sum", "property": "amount"}, {"key": "plan", "kind": "last", "property": "plan"},
          {"key": "tags", "kind": "unique_list", "property": "tag"}]  # fmt: skip


def audience(key: str, when: Any) -> dict[str, Any]:
    return {"key": key, "when": when}


ERRORS = [
    ([audience("a", {"trait": "ltv", "like": 1})], ["audience 'a': when: unknown operator 'like'"]),
    ([audience("a", {"trait": "ltv", "gte": 1, "lte": 3})], ["audience 'a': when: trait 'ltv' takes one operator"]),
    ([audience("big_spenders", {"all": [{"trait": "ltv", "gte": 500}, {"event": "E", "within": "x"}]})],
     ["audience 'big_spenders': when.all[1]: within: bad duration 'x'"]),
    ([audience("a", {"event": "E", "within": "10ms"})], ["audience 'a': when: within: must be at least 1s"]),
    ([audience("a", {"event": "E", "within": ["30d"]})], ["audience 'a': when: within: bad duration ['30d']"]),
    ([audience("a", {"any": [{"trait": "traits.email", "exists": True}, {"trait": "ltw", "gt": 1}]})],
     ["audience 'a': when.any[1]: unknown trait 'ltw'", "ltv, plan, tags", "traits.<name>"]),
    ([audience("a", {"not": {"audience": "ghost"}})], ["audience 'a': when.not: unknown audience 'ghost'"]),
    ([audience("a", {"audience": "b"}), audience("b", {"all": [{"event": "E"}, {"audience": "a"}]})],
     ["audiences form a cycle: a -> b -> a"]),
    ([audience("a", {"not": {"audience": "a"}})], ["audiences form a cycle: a -> a"]),
    ([audience("x", {"audience": "a"}), audience("a", {"audience": "b"}), audience("b", {"audience": "c"}),
      audience("c", {"any": [{"event": "E"}, {"audience": "a"}]})], ["audiences form a cycle: a -> b -> c -> a"]),
    ([audience("a", {"event": "E"}), audience("a", {"event": "F"})], ["audience 'a' is defined twice"]),
    ([audience("a", {"event": "E", "count": {"contains": 1}})],
     ["audience 'a': when: count: unknown operator 'contains'"]),
    ([audience("a", {"event": "E", "count": {"in": [1, 2]}})], ["audience 'a': when: count: unknown operator 'in'"]),
    ([audience("a", {"event": "E", "count": {"gte": 1.5}})], ["audience 'a': when: count: gte takes a whole number"]),
    ([audience("a", {"event": "E", "count": {"gte": True}})], ["audience 'a': when: count: gte compares numbers"]),
    ([audience("a", {"event": "E", "count": {"gte": 1, "lte": 3}})], ["audience 'a': when: count takes one operator"]),
    ([audience("a", {"event": "E", "times": 2})], ["audience 'a': when: unknown fields ['times']"]),
    ([audience("a", {"event": ""})], ["audience 'a': when: event must be a non-empty string"]),
    ([audience("a", {"event": "E", "where": {"property": "p", "like": 1}})],
     ["audience 'a': when: where: a leaf condition needs exactly one operator"]),
    ([audience("a", {"trait": "plan", "in": "pro"})], ["audience 'a': when: in takes a list"]),
    ([audience("a", {"trait": "ltv", "gt": "100"})], ["audience 'a': when: gt compares numbers, not '100'"]),
    ([audience("a", {"trait": "ltv", "exists": "yes"})], ["audience 'a': when: exists takes true or false"]),
    ([audience("a", {"trait": "traits.", "exists": True})], ["audience 'a': when: trait names a computed trait"]),
    ([audience("a", {"audience": "b", "eq": True})], ["audience 'a': when: an audience leaf is"]),
    ([audience("a", {"property": "p", "eq": 1})], ["audience 'a': when: a condition is all, any, not, or a trait"]),
    ([audience("a", {"all": []})], ["audience 'a': when: all takes a non-empty list"]),
    ([audience("a", {"any": [{"event": "E"}], "not": {"event": "F"}})], ["audience 'a': when: any takes a non-empty"]),
    ([audience("a", {"not": {"event": "E"}, "event": "F"})], ["audience 'a': when: not takes one condition"]),
    ([audience("a", {"all": [{"event": "E"}, 3]})], ["audience 'a': when.all[1]: a condition is a non-empty object"]),
    ([{"key": "a", "when": {"event": "E"}, "colour": "red"}], ["audience 'a': unknown fields ['colour']"]),
    ([{"key": "a"}], ["audience 'a': needs a when condition"]),
    ([{"key": "a", "when": {"event": "E"}, "description": 3}], ["audience 'a': description must be a string"]),
    ([{"key": "", "when": {"event": "E"}}], ["needs a key of letters, digits", "got ''"]),
    ([{"when": {"event": "E"}}], ["needs a key of letters, digits", "got None"]),
    ([{"key": "a|b", "when": {"event": "E"}}], ["needs a key of letters, digits", "got 'a|b'"]),
    ([{"key": "a/b", "when": {"event": "E"}}], ["needs a key of letters, digits", "got 'a/b'"]),
    (["big_spenders"], ["an audience definition is an object, not 'big_spenders'"]),
]  # fmt: skip


@pytest.mark.parametrize("audiences, parts", ERRORS)
def test_bad_audiences_name_the_audience_the_path_and_the_problem(audiences: list[Any], parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_catalog(TRAITS, audiences)
    for part in parts:
        assert part in str(info.value)


@pytest.mark.parametrize("traits, part", [
    ([*TRAITS, {"key": "ltv", "kind": "count"}], "trait 'ltv' is defined twice"),
    ([{"key": "~abc", "kind": "count"}], "needs a key of letters, digits and . _ - (at most 100), got '~abc'"),
    ([{"key": "x", "kind": "median"}], "trait 'x': unknown kind 'median'"),
])  # fmt: skip
def test_bad_traits_name_the_trait_and_the_problem(traits: list[Any], part: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_catalog(traits, [])
    assert part in str(info.value)


# -- dependency order and cycles -------------------------------------------------------------------------------------

Dag = tuple[dict[str, list[str]], list[str]]  # audience -> the audiences it reads; a definition order


def reachable(edges: dict[str, list[str]], start: str) -> set[str]:
    """Oracle: the audiences `start` reads, directly or through others (DFS over at least one edge)."""
    seen: set[str] = set()
    stack = list(edges[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(edges[node])
    return seen


def graph_audiences(edges: dict[str, list[str]], order: list[str]) -> tuple[list[Any], list[Any]]:
    """Each audience reads its own trait t_<key> and the audiences it points to, under assorted combinators."""
    traits = [{"key": f"t_{key}", "kind": "count"} for key in edges]
    audiences = []
    for key in order:
        leaves = [{"trait": f"t_{key}", "gte": 1}] + [{"not": {"audience": d}} if i % 2 else {"audience": d}
                                                     for i, d in enumerate(edges[key])]  # fmt: skip
        audiences.append(audience(key, {"any": [{"all": leaves[:1]}, *leaves[1:]]}))
    return traits, audiences


@st.composite
def dags(draw: st.DrawFn) -> Dag:
    """A random DAG (a<i> reads only a<j> with j < i) and a random definition order."""
    names = [f"a{i}" for i in range(draw(st.integers(1, 8)))]
    edges = {name: draw(st.lists(st.sampled_from(names[:i]), max_size=3)) if i else [] for i, name in enumerate(names)}
    return edges, draw(st.permutations(names))


@settings(max_examples=300, deadline=None)
@given(dags())
def test_audiences_come_after_everything_they_read(dag: Dag) -> None:
    edges, order = dag
    catalog = build_catalog(*graph_audiences(edges, order))
    position = {key: index for index, key in enumerate(catalog.audiences)}
    assert sorted(position) == sorted(edges)
    for key in edges:
        assert all(position[dep] < position[key] for dep in reachable(edges, key)), (key, list(catalog.audiences))
        assert requirements(catalog, key) == {f"t_{k}" for k in reachable(edges, key) | {key}}


@settings(max_examples=200, deadline=None)
@given(dags(), st.randoms(use_true_random=False))
def test_a_definition_order_that_already_works_is_kept(dag: Dag, rnd: random.Random) -> None:
    edges, _ = dag
    order: list[str] = []
    while len(order) < len(edges):  # a random topological order (Kahn's, picking any ready audience)
        ready = sorted(k for k in edges if k not in order and all(d in order for d in edges[k]))
        order.append(rnd.choice(ready))
    assert list(build_catalog(*graph_audiences(edges, order)).audiences) == order


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    names = [f"a{i}" for i in range(draw(st.integers(1, 6)))]
    return {name: draw(st.lists(st.sampled_from(names), max_size=3)) for name in names}


@settings(max_examples=300, deadline=None)
@given(graphs(), st.randoms(use_true_random=False))
def test_a_cycle_is_refused_and_named(edges: dict[str, list[str]], rnd: random.Random) -> None:
    assume(any(key in reachable(edges, key) for key in edges))
    order = list(edges)
    rnd.shuffle(order)
    with pytest.raises(ConfigError, match="audiences form a cycle: ") as info:
        build_catalog(*graph_audiences(edges, order))
    cycle = str(info.value).split("cycle: ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1] and len(set(cycle)) == len(cycle) - 1, cycle
    assert all(b in edges[a] for a, b in zip(cycle, cycle[1:])), (cycle, edges)


# -- evaluate --------------------------------------------------------------------------------------------------------

TRAIT_NAMES = ["ltv", "plan", "tags", "traits.email", "traits.address", "traits.address.city", "traits.age"]
EVENTS = ["Order Completed", "Signed Up"]
WHERES = [None, {"property": "currency", "eq": "USD"}, {"not": {"property": "amount", "gt": 10}}]
WITHINS = [None, "30d", "1h"]
AUDIENCES = ["x", "y", "z"]
ORDER = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gte": operator.ge, "lt": operator.lt,
         "lte": operator.le}  # fmt: skip
numbers = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, -1.5, 2.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.sampled_from(["", "a", "ab", "b", "USD", "city"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3))
EXPECTED = {"eq": values, "ne": values, "gt": numbers, "gte": numbers, "lt": numbers, "lte": numbers,
            "contains": scalars, "exists": st.booleans(), "in": st.lists(values, max_size=3)}  # fmt: skip


def event_leaf(event: str, where: int, within: str | None, count: dict[str, int] | None = None) -> dict[str, Any]:
    leaf: dict[str, Any] = {"event": event}
    leaf.update({"where": WHERES[where]} if WHERES[where] is not None else {})
    leaf.update({"within": within} if within is not None else {})
    return {**leaf, "count": count} if count is not None else leaf


trait_leaves = st.sampled_from(list(EXPECTED)).flatmap(lambda op: st.builds(
    lambda name, expected: {"trait": name, op: expected}, st.sampled_from(TRAIT_NAMES), EXPECTED[op]))
counts = st.builds(lambda op, n: {op: n}, st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]), st.integers(0, 4))
event_leaves = st.builds(event_leaf, st.sampled_from(EVENTS), st.integers(0, len(WHERES) - 1), st.sampled_from(WITHINS),
                         st.none() | counts)
audience_leaves = st.sampled_from(AUDIENCES).map(lambda key: {"audience": key})
conditions = st.recursive(
    trait_leaves | event_leaves | audience_leaves,
    lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda parts: {"all": parts})
    | st.lists(inner, min_size=1, max_size=3).map(lambda parts: {"any": parts}) | inner.map(lambda c: {"not": c}),
    max_leaves=12,
)
computed = st.fixed_dictionaries({}, optional={"ltv": values, "plan": values, "tags": values})
identify = st.fixed_dictionaries({}, optional={
    "email": values, "age": values, "address": st.fixed_dictionaries({}, optional={"city": values}) | scalars})
counted = st.dictionaries(st.tuples(st.sampled_from(EVENTS), st.integers(0, len(WHERES) - 1), st.sampled_from(WITHINS)),
                          st.integers(0, 4))
memberships = st.dictionaries(st.sampled_from(AUDIENCES), st.booleans())  # fmt: skip


def oracle(condition: dict[str, Any], traits: dict[str, Any], profile: dict[str, Any],
           counts: dict[tuple[str, int, str | None], int], members: dict[str, bool]) -> bool:  # fmt: skip
    """The condition read directly: nested loops over the tree, lookups by hand, Python's operators."""
    if "all" in condition:
        return all(oracle(c, traits, profile, counts, members) for c in condition["all"])
    if "any" in condition:
        return any(oracle(c, traits, profile, counts, members) for c in condition["any"])
    if "not" in condition:
        return not oracle(condition["not"], traits, profile, counts, members)
    if "audience" in condition:
        return members.get(condition["audience"]) is True
    if "event" in condition:
        n = counts.get((condition["event"], WHERES.index(condition.get("where")), condition.get("within")), 0)
        [(op, k)] = condition.get("count", {"gte": 1}).items()
        return ORDER[op](n, k)
    name = condition["trait"]
    actual: Any = traits.get(name)
    if name.startswith("traits."):
        actual = profile
        for step in name.split(".")[1:]:
            actual = actual.get(step) if isinstance(actual, dict) else None
    [(op, expected)] = [(k, v) for k, v in condition.items() if k != "trait"]
    return oracle_compare(op, actual, expected)


def oracle_compare(op: str, actual: Any, expected: Any) -> bool:
    def number(v: Any) -> bool:
        return type(v) in (int, float)

    if op == "exists":
        return (actual is not None) is expected
    if op in ("eq", "ne"):
        return (actual == expected) is (op == "eq")
    if op == "in":
        return any(actual == e for e in expected)
    if op == "contains":
        if type(actual) is str:
            return type(expected) is str and actual.find(expected) >= 0
        return type(actual) is list and any(x == expected for x in actual)
    return number(actual) and number(expected) and ORDER[op](actual, expected)


@settings(max_examples=1500, deadline=None)
@given(conditions, computed, identify, counted, memberships)
def test_evaluate_equals_the_oracle(condition: dict[str, Any], traits: dict[str, Any], profile: dict[str, Any],
                                    counts: dict[Any, int], members: dict[str, bool]) -> None:  # fmt: skip
    parse_audience(audience("k", condition))  # every generated condition is a valid one
    counters = {counter_key(event_leaf(*triple)): n for triple, n in counts.items()}
    got = evaluate(condition, traits=traits, identify=profile, counters=counters, memberships=members)
    assert got is oracle(condition, traits, profile, counts, members)


def test_contains_looks_into_strings_and_lists_only_and_never_crashes() -> None:
    assert compare("contains", "a5", 5) is False and compare("contains", "a5", "5") is True
    assert compare("contains", [5], 5) is True and compare("contains", 5, 5) is False
    assert compare("contains", {"city": "Oslo"}, "city") is False
    assert holds({"property": "code", "contains": 5}, {"code": "a5"}) is False
    assert evaluate({"trait": "traits.code", "contains": 5}, traits={}, identify={"code": "a5"}, counters={},
                    memberships={}) is False  # fmt: skip


# -- counters --------------------------------------------------------------------------------------------------------

USD_30D = {"event": "Order Completed", "within": "30d", "where": {"property": "currency", "eq": "USD"}}


def test_leaves_counting_the_same_events_share_one_counter() -> None:
    reordered = {"count": {"gte": 3}, "where": {"eq": "USD", "property": "currency"}, "within": "30d",
                 "event": "Order Completed"}  # fmt: skip
    reads_a = {"all": [{"trait": "ltv", "gt": 0}, {"audience": "a"}]}
    catalog = build_catalog(TRAITS, [audience("a", USD_30D), audience("b", {"not": reordered}), audience("c", reads_a)])
    key = counter_key(USD_30D)
    assert list(catalog.counters) == [key] and counter_key(reordered) == key
    assert catalog.counters[key] == TraitDefinition(key=key, kind="count", event="Order Completed",
                                                    window_ms=30 * 86_400_000, where=USD_30D["where"])  # fmt: skip
    assert requirements(catalog, "a") == requirements(catalog, "b") == {key}
    assert requirements(catalog, "c") == {key, "ltv"}
    assert list(catalog.all_traits) == ["ltv", "plan", "tags", key]


@pytest.mark.parametrize("other", [
    {**USD_30D, "where": {"property": "currency", "eq": "EUR"}},
    {**USD_30D, "within": "7d"},
    {**USD_30D, "event": "Order Refunded"},
    {"event": "Order Completed", "within": "30d"},
])  # fmt: skip
def test_leaves_counting_different_events_get_different_counters(other: dict[str, Any]) -> None:
    catalog = build_catalog([], [audience("a", USD_30D), audience("b", {"any": [{"event": "Signed Up"}, other]})])
    assert len(catalog.counters) == 3 and counter_key(other) != counter_key(USD_30D)


def test_counter_names_are_pinned_because_they_name_state() -> None:
    assert counter_key({"event": "Order Completed"}) == "~cd65ef4a8d5cd8e7"
    assert counter_key(USD_30D) == "~071e2f73d8a08ab1"


def test_a_counter_counts_only_its_events() -> None:
    definition = build_catalog([], [audience("a", USD_30D)]).counters[counter_key(USD_30D)]
    state = None
    stream = [("Order Completed", "USD"), ("Order Completed", "EUR"), ("Signed Up", "USD")]
    for n, (name, currency) in enumerate(stream):
        event = {"type": "track", "event": name, "timestamp": 1_000 * n, "message_id": f"m{n}",
                 "properties": {"currency": currency}}  # fmt: skip
        state = observe(definition, state, event)
    assert value(definition, state, 5_000) == 1


# -- with_definition -------------------------------------------------------------------------------------------------

BASE = [audience("a", {"trait": "ltv", "gte": 1}), audience("b", {"all": [{"audience": "a"}, {"event": "Signed Up"}]})]


def test_with_definition_replaces_in_place_and_leaves_the_old_catalog_alone() -> None:
    base = build_catalog(TRAITS, BASE)
    changed = base.with_definition("audience", audience("a", {"event": "Order Completed", "within": "1h"}))
    assert changed.audiences["a"].when == {"event": "Order Completed", "within": "1h"}
    assert base.audiences["a"].when == {"trait": "ltv", "gte": 1}
    assert list(changed.sources) == list(base.sources)
    assert changed.sources[("audience", "a")] == audience("a", {"event": "Order Completed", "within": "1h"})
    assert set(changed.counters) == {counter_key({"event": "Signed Up"}),
                                     counter_key({"event": "Order Completed", "within": "1h"})}  # fmt: skip
    replaced = base.with_definition("trait", {"key": "ltv", "kind": "max", "property": "amount"})
    assert replaced.traits["ltv"].kind == "max" and list(replaced.traits) == ["ltv", "plan", "tags"]


def test_with_definition_reorders_for_a_new_dependency() -> None:
    vip = audience("c", {"trait": "traits.vip", "eq": True})
    catalog = build_catalog(TRAITS, BASE).with_definition("audience", vip)
    assert list(catalog.audiences) == ["a", "b", "c"]
    catalog = catalog.with_definition("audience", audience("a", {"audience": "c"}))
    assert list(catalog.audiences) == ["c", "a", "b"]
    assert requirements(catalog, "b") == {counter_key({"event": "Signed Up"})}


@pytest.mark.parametrize("kind, raw, part", [
    ("audience", audience("a", {"audience": "b"}), "audiences form a cycle: a -> b -> a"),
    ("audience", audience("c", {"any": [{"audience": "c"}]}), "audiences form a cycle: c -> c"),
    ("audience", audience("c", {"trait": "nope", "eq": 1}), "audience 'c': when: unknown trait 'nope'"),
    ("audience", audience("c", {"audience": "ghost"}), "audience 'c': when: unknown audience 'ghost'"),
    ("audience", audience("a", {"trait": "ltv", "between": [1, 2]}), "audience 'a': when: unknown operator 'between'"),
    ("trait", {"key": "ltv", "kind": "sum"}, "trait 'ltv': kind sum needs a property"),
    ("destination", {"name": "crm"}, "unknown definition kind 'destination'"),
])  # fmt: skip
def test_with_definition_refuses_what_would_break_the_catalog(kind: str, raw: Any, part: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_catalog(TRAITS, BASE).with_definition(kind, raw)
    assert part in str(info.value)


def test_an_empty_catalog_grows_one_definition_at_a_time() -> None:
    empty = Catalog.empty()
    assert not (empty.traits or empty.audiences or empty.counters or empty.sources or empty.all_traits)
    with pytest.raises(ConfigError, match="unknown trait 'ltv'; computed traits: none"):
        empty.with_definition("audience", audience("a", {"trait": "ltv", "gte": 1}))
    catalog = empty.with_definition("trait", TRAITS[0])
    catalog = catalog.with_definition("audience", audience("a", {"trait": "ltv", "gte": 1}))
    assert list(catalog.sources) == [("trait", "ltv"), ("audience", "a")]
    assert evaluate(catalog.audiences["a"].when, traits={"ltv": 2}, identify={}, counters={}, memberships={}) is True
