"""Computed-trait definitions as data: parsed and checked once, with errors that name the problem.

The format (PRODUCT.md): `{"key": "orders_30d", "kind": "count", "event": "Order Completed", "window": "30d",
"where": {"property": "currency", "eq": "USD"}}`. Kinds count, sum, avg, min, max, first, last, most_frequent,
unique_list, unique_count; all but count read `property` (a dotted path into the event's properties, or its
traits for identify calls). `event` absent: any track event; `Page Viewed` / `Screen Viewed` stand for page and
screen calls, as in Segment. `where` is a condition: a leaf `{"property": p, <op>: value}` with op one of eq, ne,
gt, gte, lt, lte, contains, exists, in, or `all` / `any` / `not` over conditions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from agents.checks import json_depth
from agents.durations import format_duration_ms, parse_duration_ms
from agents.errors import ConfigError

KINDS = ("count", "sum", "avg", "min", "max", "first", "last", "most_frequent", "unique_list", "unique_count")
NUMERIC_KINDS = ("sum", "avg", "min", "max")
OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "contains", "exists", "in")
CALL_EVENTS = {"Page Viewed": "page", "Screen Viewed": "screen"}
KEYS = {"key", "kind", "event", "property", "window", "where", "description"}
KEY = re.compile(r"[A-Za-z0-9_.-]{1,100}")
MAX_DEFINITION_BYTES = 64 * 1024  # a definition's JSON; conditions of real audiences are a few hundred bytes
MAX_DEFINITION_DEPTH = 64  # levels of objects and arrays, the definition itself included
MAX_LIST_ITEMS = 1_000  # items in any list of a definition (an `in` list, an `all` of conditions)
MAX_WINDOW_MS = 3_650 * 86_400_000  # ten years


@dataclass(frozen=True)
class TraitDefinition:
    """One computed trait; `window_ms` None means all-time."""

    key: str
    kind: str
    event: str | None = None
    property: str | None = None
    window_ms: int | None = None
    where: Mapping[str, Any] | None = None


def parse_trait(raw: Any) -> TraitDefinition:
    """A trait definition from its JSON/YAML form; raises ConfigError naming the first problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a trait definition is an object, not {raw!r:.100}")
    check_depth(raw, "a trait definition")
    key = check_key(raw.get("key"), "trait")
    where = f"trait {key!r}"
    unknown = set(raw) - KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(KEYS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    prop = raw.get("property")
    if kind != "count" and (not isinstance(prop, str) or not prop):
        raise ConfigError(f"{where}: kind {kind} needs a property (the event property it reads)")
    event = raw.get("event")
    if event is not None and (not isinstance(event, str) or not event):
        raise ConfigError(f"{where}: event must be a non-empty string, not {event!r}")
    window_ms = None if raw.get("window") is None else parse_window(raw["window"], f"{where}: bad window")
    condition = raw.get("where")
    if condition is not None:
        check_condition(condition, f"{where}: where")
    return TraitDefinition(key, kind, event, prop if kind != "count" else None, window_ms, condition)


def check_depth(raw: Any, what: str) -> None:
    """ConfigError if a definition nests deeper than MAX_DEFINITION_DEPTH: checked before anything walks it, so no
    definition (even one already on the topic) can exhaust a worker's stack."""
    if json_depth(raw, MAX_DEFINITION_DEPTH) > MAX_DEFINITION_DEPTH:
        raise ConfigError(f"{what} nests deeper than {MAX_DEFINITION_DEPTH} levels of objects and arrays; that is the limit")


def check_new(kind: str, raw: Any) -> None:
    """What a *new* definition (the config file, an HTTP POST) must meet beyond being valid: at most 64 KB of JSON,
    no list of more than 1,000 items, windows written as duration strings of at most ten years. Definitions already
    on the topic are read as they were accepted (a number of seconds was a window then), so an upgrade changes none.
    """
    what = f"a {kind} definition"
    check_depth(raw, what)
    pending = [raw]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            if len(node) > MAX_LIST_ITEMS:
                raise ConfigError(f"{what} has a list of {len(node)} items; the limit is {MAX_LIST_ITEMS}")
            pending.extend(node)
        elif isinstance(node, Mapping):
            pending.extend(node.values())
    try:
        size = len(orjson.dumps(raw))
    except TypeError as exc:  # from YAML: a value JSON has no spelling for
        raise ConfigError(f"{what} is not JSON: {exc}") from None
    if size > MAX_DEFINITION_BYTES:
        raise ConfigError(f"{what} is {size} bytes of JSON; the limit is {MAX_DEFINITION_BYTES}")
    windows = [("bad window", raw.get("window"))] if kind == "trait" and isinstance(raw, Mapping) else []
    if kind == "audience" and isinstance(raw, Mapping):
        windows = [("within", leaf.get("within")) for _, leaf in leaves(raw.get("when"), "when") if isinstance(leaf, Mapping)]
    for name, window in windows:
        if window is None:
            continue
        if not isinstance(window, str):
            raise ConfigError(f"{what}: {name}: bad duration {window!r:.40} (write it as a string like 90s, 5m, 2h or 30d)")
        if parse_window(window, name) > MAX_WINDOW_MS:
            raise ConfigError(f"{what}: {name}: must be at most {format_duration_ms(MAX_WINDOW_MS)} (ten years), not {window!r:.40}")


def parse_window(value: Any, where: str) -> int:
    """A window (`window`, `within`) in ms, at least 1s: a duration string, or (as definitions were once written)
    a number of seconds."""
    try:
        window_ms = parse_duration_ms(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: bad duration {value!r:.40} (write it as a string like 90s, 5m, 2h or 30d)") from None
    if window_ms < 1_000:
        raise ConfigError(f"{where}: must be at least 1s, not {value!r}")
    return window_ms


def check_key(key: Any, kind: str) -> str:
    """A definition key: what URLs, state keys (`a|<audience>|<id>`) and change records name it by."""
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ConfigError(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} definition needs a key of letters, digits and . _ - (at most 100), got {key!r:.120}")
    return key


def leaves(condition: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every leaf of an all/any/not condition with its path, in the order written; ConfigError where the
    combinators are misused. Trait `where` conditions and audience `when` conditions share this shape."""
    if not isinstance(condition, Mapping) or not condition:
        raise ConfigError(f"{where}: a condition is a non-empty object, not {condition!r}")
    if "all" in condition or "any" in condition:
        combinator = "all" if "all" in condition else "any"
        parts = condition[combinator]
        if len(condition) != 1 or not isinstance(parts, list) or not parts:
            raise ConfigError(f"{where}: {combinator} takes a non-empty list of conditions and nothing beside it")
        for index, part in enumerate(parts):
            yield from leaves(part, f"{where}.{combinator}[{index}]")
    elif "not" in condition:
        if len(condition) != 1:
            raise ConfigError(f"{where}: not takes one condition and nothing beside it")
        yield from leaves(condition["not"], f"{where}.not")
    else:
        yield where, condition


def check_condition(condition: Any, where: str) -> None:
    """A `where` condition is well formed, or ConfigError says what is wrong and where."""
    for path, leaf in leaves(condition, where):
        _check_leaf(leaf, path)


def _check_leaf(condition: Mapping[str, Any], where: str) -> None:
    prop = condition.get("property")
    operators = [op for op in condition if op != "property"]
    if not isinstance(prop, str) or not prop:
        raise ConfigError(f"{where}: a leaf condition needs a property, got {dict(condition)!r}")
    if len(operators) != 1 or operators[0] not in OPERATORS:
        raise ConfigError(f"{where}: a leaf condition needs exactly one operator of {', '.join(OPERATORS)}, got {operators}")
    if operators[0] == "in" and not isinstance(condition["in"], list):
        raise ConfigError(f"{where}: in takes a list, not {condition['in']!r}")
