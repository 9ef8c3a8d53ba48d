"""Computed-trait state per profile: observe an event, fold a merged profile in, read the value at a time.

State is JSON-able data, replaced whole (never mutated in place), so a changelog sees every change:
  all-time:  {"a": aggregate}
  windowed:  {"b": {"<bucket index>": aggregate}} — explicit keyed buckets of `bucket_ms(window)` (window / 60,
             at least 1 s), so state stays bounded (`expire` drops buckets that left the window) and a window
             slides on any clock, restart or rebalance without in-memory bookkeeping. An event is inside the
             window at time `now` while its bucket is one of the last `ceil(window / bucket)` buckets up to `now`'s:
             windows slide in steps of one bucket.
Aggregates per kind: count n; sum s; avg [s, n]; min/max a number; first/last [timestamp, messageId, value];
most_frequent {json value: n}; unique_list/unique_count a sorted list of json values. Folding two states
(a merge of profiles) combines aggregates bucket by bucket: counts and sums add, min/max/first/last by value and
time, lists union — so folding equals having observed both profiles' events in one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import orjson

from agents.compute.definitions import CALL_EVENTS, NUMERIC_KINDS, TraitDefinition
from agents.paths import read_path

State = dict[str, Any]
BUCKETS_PER_WINDOW = 60
UNIQUE_CAP = 1_000  # values kept per unique_list / most_frequent aggregate (Segment caps property values too)


def bucket_ms(window_ms: int) -> int:
    return max(1_000, window_ms // BUCKETS_PER_WINDOW)


def event_name(event: Mapping[str, Any]) -> str | None:
    """The name a definition's `event` matches: a track's event, `Page Viewed` / `Screen Viewed` for page/screen."""
    if event["type"] == "track":
        return event.get("event")
    for name, call in CALL_EVENTS.items():
        if event["type"] == call:
            return name
    return None


def payload(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """What `property` paths read: properties, or traits for identify and group calls."""
    return event.get("traits") or {} if event["type"] in ("identify", "group") else event.get("properties") or {}


def holds(condition: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """A `where` condition (already checked by definitions.check_condition) on an event's payload."""
    if "all" in condition:
        return all(holds(c, values) for c in condition["all"])
    if "any" in condition:
        return any(holds(c, values) for c in condition["any"])
    if "not" in condition:
        return not holds(condition["not"], values)
    op, expected = next((k, v) for k, v in condition.items() if k != "property")
    return compare(op, read_path(values, condition["property"]), expected)


def compare(op: str, actual: Any, expected: Any) -> bool:
    """One leaf comparison, shared by event `where` conditions and audience conditions so an operator means the same
    in both: gt/gte/lt/lte order numbers only (a bool is not one), so a missing value or a string never passes them;
    exists asks is-not-None; contains looks into a list, or into a string for a string; in looks `actual` up in the
    list `expected`."""
    if op == "exists":
        return (actual is not None) == bool(expected)
    if op == "eq":
        return actual == expected
    if op == "ne":
        return actual != expected
    if op == "in":
        return actual in expected
    if op == "contains":  # a string holds only strings: `5 in "a5"` raises TypeError, and profile data varies
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        return isinstance(actual, list) and expected in actual
    if not _number(actual) or not _number(expected):
        return False
    return {"gt": actual > expected, "gte": actual >= expected, "lt": actual < expected, "lte": actual <= expected}[op]


def matches(definition: TraitDefinition, event: Mapping[str, Any]) -> bool:
    name = event_name(event)
    if definition.event is None:
        wanted = event["type"] == "track"
    else:
        wanted = name == definition.event
    return wanted and (definition.where is None or holds(definition.where, payload(event)))


def observe(definition: TraitDefinition, state: State | None, event: Mapping[str, Any]) -> State | None:
    """The state after `event` (the same state if the event does not count for this trait)."""
    if not matches(definition, event):
        return state
    value = None if definition.property is None else read_path(payload(event), definition.property)
    if definition.kind in NUMERIC_KINDS and not _number(value):
        return state
    if definition.kind not in ("count", *NUMERIC_KINDS) and value is None:
        return state
    single = _aggregate(definition.kind, value, int(event["timestamp"]), event["message_id"])
    return fold(definition, state, _wrap(definition, single, int(event["timestamp"])))


def fold(definition: TraitDefinition, state: State | None, other: State | None) -> State | None:
    """Both states in one (a merge of two profiles, or one more event)."""
    if state is None:
        return other
    if other is None:
        return state
    if definition.window_ms is None:
        return {"a": _combine(definition.kind, state["a"], other["a"])}
    buckets = dict(state["b"])
    for index, aggregate in other["b"].items():
        buckets[index] = _combine(definition.kind, buckets[index], aggregate) if index in buckets else aggregate
    return {"b": buckets}


def expire(definition: TraitDefinition, state: State | None, now: int) -> State | None:
    """Drop the buckets that left the window at `now` (bounded state); None when nothing is left."""
    if state is None or definition.window_ms is None:
        return state
    oldest = _oldest_bucket(definition.window_ms, now)
    kept = {index: aggregate for index, aggregate in state["b"].items() if int(index) >= oldest}
    return {"b": kept} if kept else None


def value(definition: TraitDefinition, state: State | None, now: int) -> Any:
    """The trait's value at `now`: over the window's buckets, or all-time."""
    aggregate = None
    if state is not None and definition.window_ms is None:
        aggregate = state["a"]
    elif state is not None:
        assert definition.window_ms is not None
        oldest, newest = _oldest_bucket(definition.window_ms, now), now // bucket_ms(definition.window_ms)
        for index in sorted(state["b"], key=int):
            if oldest <= int(index) <= newest:
                part = state["b"][index]
                aggregate = part if aggregate is None else _combine(definition.kind, aggregate, part)
    return _result(definition.kind, aggregate)


def _oldest_bucket(window_ms: int, now: int) -> int:
    size = bucket_ms(window_ms)
    return now // size - math.ceil(window_ms / size) + 1


def _wrap(definition: TraitDefinition, aggregate: Any, timestamp: int) -> State:
    if definition.window_ms is None:
        return {"a": aggregate}
    return {"b": {str(timestamp // bucket_ms(definition.window_ms)): aggregate}}


def _aggregate(kind: str, value: Any, timestamp: int, message_id: str) -> Any:
    if kind == "count":
        return 1
    if kind in ("sum", "min", "max"):
        return value
    if kind == "avg":
        return [value, 1]
    if kind in ("first", "last"):
        return [timestamp, message_id, value]
    encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return {encoded: 1} if kind == "most_frequent" else [encoded]


def _combine(kind: str, left: Any, right: Any) -> Any:
    if kind in ("count", "sum"):
        return _bounded(left + right)
    if kind == "avg":
        return [_bounded(left[0] + right[0]), left[1] + right[1]]
    if kind == "min":
        return min(left, right)
    if kind == "max":
        return max(left, right)
    if kind == "first":
        return min(left, right, key=lambda x: (x[0], x[1]))
    if kind == "last":
        return max(left, right, key=lambda x: (x[0], x[1]))
    if kind == "most_frequent":
        counts = dict(left)
        for encoded, n in right.items():
            counts[encoded] = counts.get(encoded, 0) + n
        if len(counts) > UNIQUE_CAP:  # keep the most frequent (then smallest) values: bounded state
            counts = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:UNIQUE_CAP])
        return counts
    return sorted(set(left) | set(right))[:UNIQUE_CAP]


def _result(kind: str, aggregate: Any) -> Any:
    if aggregate is None:
        return {"count": 0, "sum": 0, "unique_list": [], "unique_count": 0}.get(kind)
    if kind == "avg":
        return aggregate[0] / aggregate[1]
    if kind in ("first", "last"):
        return aggregate[2]
    if kind == "most_frequent":
        return orjson.loads(min(aggregate.items(), key=lambda kv: (-kv[1], kv[0]))[0])
    if kind == "unique_list":
        return [orjson.loads(v) for v in aggregate]
    if kind == "unique_count":
        return len(aggregate)
    return aggregate


def _bounded(total: Any) -> Any:
    """A sum that JSON (and so the state) can hold: past a 64-bit integer it goes on as a float, and a float sum
    stops at the largest finite one instead of becoming infinity (which JSON would store as null)."""
    if isinstance(total, int) and not -(2**63) <= total < 2**63:
        total = float(total)
    if isinstance(total, float) and not math.isfinite(total):
        total = math.copysign(sys.float_info.max, total)
    return total


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
