"""Computed traits against a plain-Python oracle over random event streams, including merges of profiles."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.compute.definitions import KINDS, TraitDefinition, parse_trait
from agents.compute.traits import bucket_ms, expire, fold, observe, value
from agents.errors import ConfigError

NAMES = ["Order Completed", "Signed Up"]
events = st.lists(
    st.fixed_dictionaries({
        "type": st.sampled_from(["track", "track", "track", "page"]),
        "event": st.sampled_from(NAMES),
        "timestamp": st.integers(0, 300_000),
        "properties": st.fixed_dictionaries({}, optional={
            "amount": st.one_of(st.integers(-50, 50), st.integers(-100, 100).map(lambda n: n / 2), st.just("n/a")),
            "currency": st.sampled_from(["USD", "EUR"]),
            "item": st.sampled_from(["a", "b", "c", 1, True]),
        }),
    }),
    max_size=40,
)  # fmt: skip
definitions = st.builds(
    lambda kind, window, event, where, prop: parse_trait(
        {"key": "t", "kind": kind, **({"window": window} if window else {}), **({"event": event} if event else {}),
         **({"where": where} if where else {}), **({"property": prop} if kind != "count" else {})}
    ),
    st.sampled_from(KINDS),
    st.sampled_from([None, "10s", "60s", "2m"]),
    st.sampled_from([None, "Order Completed", "Page Viewed"]),
    st.sampled_from([None, {"property": "currency", "eq": "USD"}, {"any": [{"property": "amount", "gte": 0}, {"not": {"property": "item", "exists": True}}]}]),
    st.sampled_from(["amount", "item"]),
)  # fmt: skip


def numbered(stream: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "message_id": f"m{n}", "traits": {}, "event": e["event"] if e["type"] == "track" else None} for n, e in enumerate(stream)]


def oracle(definition: TraitDefinition, stream: list[dict[str, Any]], now: int) -> Any:
    """The trait computed directly from the events: filter, window by bucket, aggregate."""
    picked = []
    for e in stream:
        name = {"track": e["event"], "page": "Page Viewed", "screen": "Screen Viewed"}.get(e["type"])
        if (definition.event is None and e["type"] != "track") or (definition.event is not None and name != definition.event):
            continue
        if definition.where is not None and not where_holds(definition.where, e["properties"]):
            continue
        if definition.window_ms is not None:
            size = bucket_ms(definition.window_ms)
            if not now // size - math.ceil(definition.window_ms / size) + 1 <= e["timestamp"] // size <= now // size:
                continue
        v = e["properties"].get(definition.property) if definition.property else None
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if definition.kind in ("sum", "avg", "min", "max") and not numeric:
            continue
        if definition.kind not in ("count", "sum", "avg", "min", "max") and v is None:
            continue
        picked.append((e["timestamp"], e["message_id"], v))
    values = [v for _, _, v in picked]
    kind = definition.kind
    if kind == "count":
        return len(picked)
    if kind == "sum":
        return sum(values)
    if not picked:
        return [] if kind == "unique_list" else 0 if kind == "unique_count" else None
    if kind == "avg":
        return sum(values) / len(values)
    if kind in ("min", "max"):
        return min(values) if kind == "min" else max(values)
    if kind in ("first", "last"):
        ordered = sorted(picked, key=lambda p: (p[0], p[1]))
        return ordered[0][2] if kind == "first" else ordered[-1][2]
    encoded = [orjson.dumps(v).decode() for v in values]
    if kind == "most_frequent":
        return orjson.loads(min(set(encoded), key=lambda x: (-encoded.count(x), x)))
    distinct = sorted(set(encoded))
    return [orjson.loads(x) for x in distinct] if kind == "unique_list" else len(distinct)


def where_holds(condition: dict[str, Any], props: dict[str, Any]) -> bool:
    if "any" in condition:
        return any(where_holds(c, props) for c in condition["any"])
    if "not" in condition:
        return not where_holds(condition["not"], props)
    actual = props.get(condition["property"])
    if "eq" in condition:
        return actual == condition["eq"]
    if "exists" in condition:
        return (actual is not None) == condition["exists"]
    return isinstance(actual, (int, float)) and not isinstance(actual, bool) and actual >= condition["gte"]


@settings(max_examples=500, deadline=None)
@given(definitions, events, st.integers(0, 400_000), st.randoms(use_true_random=False))
def test_every_kind_equals_the_oracle_also_after_merging_profiles(definition: TraitDefinition, stream: list[dict[str, Any]],
                                                                   now: int, rnd: random.Random) -> None:  # fmt: skip
    stream = numbered(stream)
    shuffled = stream[:]
    rnd.shuffle(shuffled)  # arrival order is not event-time order
    split = rnd.randrange(len(shuffled) + 1)
    left = right = None
    for e in shuffled[:split]:
        left = observe(definition, left, e)
    for e in shuffled[split:]:
        right = observe(definition, right, e)
    merged = fold(definition, left, right)  # two profiles' states folded on a merge
    assert value(definition, merged, now) == oracle(definition, stream, now)
    assert value(definition, expire(definition, merged, now), now) == oracle(definition, stream, now), "expiry keeps the value"
    later = now + 30_000  # the window only moves forward: what expiry at `now` dropped is out at `later` too
    assert value(definition, expire(definition, merged, now), later) == oracle(definition, stream, later)


def test_windowed_state_stays_bounded() -> None:
    definition = parse_trait({"key": "c", "kind": "count", "window": "60s"})
    state = None
    for n in range(10_000):
        state = expire(definition, observe(definition, state, {"type": "track", "event": "x", "timestamp": n * 100,
                                                               "message_id": f"m{n}", "properties": {}}), n * 100)  # fmt: skip
    assert state is not None and len(state["b"]) <= 61
    assert value(definition, state, 999_900) == 600
    assert expire(definition, state, 999_900 + 61_000) is None, "a window slid past every event leaves no state"


@pytest.mark.parametrize("raw, message", [
    ({"key": "x", "kind": "median", "property": "p"}, "unknown kind 'median'"),
    ({"key": "x", "kind": "sum"}, "kind sum needs a property"),
    ({"key": "x", "kind": "count", "window": "soon"}, "bad window"),
    ({"key": "x", "kind": "count", "window": "10ms"}, "at least 1s"),
    ({"key": "x", "kind": "count", "where": {"property": "a", "like": 1}}, "exactly one operator"),
    ({"key": "x", "kind": "count", "where": {"all": []}}, "non-empty list"),
    ({"key": "x", "kind": "count", "colour": "red"}, "unknown fields ['colour']"),
    ({"kind": "count"}, "needs a key of letters"),
    ({"key": "x", "kind": "count", "window": ["1d"]}, "bad window"),
])  # fmt: skip
def test_bad_definitions_name_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_trait(raw)
