"""Audience definitions, and the catalog of every trait and audience the compute stage runs, checked as a whole.

An audience (PRODUCT.md): `{"key": "big_spenders", "when": {"all": [{"trait": "ltv", "gte": 500},
{"event": "Order Completed", "within": "30d", "count": {"gte": 2}}, {"not": {"audience": "churned"}}]}}`.
`when` is `all` / `any` / `not` over three leaves: a trait (a computed trait's key, or `traits.<path>` into the
profile's identify traits) with one operator; an event count (no `count`: at least once), kept as a hidden count
trait named by `counter_key`, one per distinct event/where/within, so audiences asking the same question share
state; membership in another audience. The catalog checks what one definition alone can't (references exist, no
cycle) and orders audiences so one pass in that order has every membership an audience reads.
Errors are ConfigError naming the definition and the path inside `when`; the HTTP API returns them as 400 bodies.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import orjson

from agents.compute.definitions import (
    OPERATORS, TraitDefinition, check_condition, check_depth, check_key, check_new, leaves, parse_trait, parse_window,
)  # fmt: skip
from agents.compute.traits import compare
from agents.errors import ConfigError
from agents.paths import read_path

AUDIENCE_FIELDS = ("key", "when", "description")
EVENT_FIELDS = ("event", "where", "within", "count")
COUNT_OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte")
NUMERIC_OPERATORS = ("gt", "gte", "lt", "lte")
IDENTIFY = "traits."  # a trait leaf reading the profile's identify traits, not a computed trait
COUNTER = "~"  # prefix of hidden counter keys; reserved, so a user trait can't collide with one
AT_LEAST_ONCE: Mapping[str, int] = MappingProxyType({"gte": 1})
KINDS = ("trait", "audience")


@dataclass(frozen=True)
class AudienceDefinition:
    """One audience; `when` is its checked condition as written."""

    key: str
    when: Mapping[str, Any]


@dataclass(frozen=True)
class Catalog:
    """Every definition, checked together. `audiences` is in dependency order; `sources` keeps each definition's
    JSON as given ((kind, key) -> raw, in definition order), so it can be shown back and rebuilt with a change."""

    traits: Mapping[str, TraitDefinition]
    audiences: Mapping[str, AudienceDefinition]
    counters: Mapping[str, TraitDefinition]
    sources: Mapping[tuple[str, str], Mapping[str, Any]]

    @classmethod
    def empty(cls) -> Catalog:
        return build_catalog([], [])

    @cached_property
    def all_traits(self) -> Mapping[str, TraitDefinition]:
        """What the compute engine keeps state for: the user's traits and the hidden counters. Cached: the engine
        reads it for every event and trait (rebuilt on each access it was a quarter of the stage's CPU)."""
        return MappingProxyType({**self.traits, **self.counters})

    @cached_property
    def _observers(self) -> dict[tuple[str | None, bool], tuple[str, ...]]:
        return {}

    def observers(self, name: str | None, track: bool) -> tuple[str, ...]:
        """The keys of `all_traits` an event named `name` (agents/compute/traits.event_name) can count, in
        `all_traits` order: a trait names its event, or (no event) counts every track call. Built once per name, so
        an event costs what it touches, not what is defined."""
        found = self._observers.get((name, track))
        if found is None:
            found = self._observers[name, track] = tuple(
                key for key, d in self.all_traits.items() if (d.event == name if d.event is not None else track)
            )  # fmt: skip
        return found

    @cached_property
    def audience_inputs(self) -> Mapping[str, tuple[frozenset[str], bool]]:
        """Per audience: the trait and counter keys its membership reads, and whether it reads identify traits,
        both through the audiences it reads. Its membership can change only when one of those did."""
        return MappingProxyType({key: (requirements(self, key), _reads_identify(self, key)) for key in self.audiences})

    @cached_property
    def counter_keys(self) -> Mapping[int, str]:
        """Each event leaf of an audience (by identity: the catalog holds them) -> its counter key, hashed once."""
        return MappingProxyType({id(leaf): counter_key(leaf) for audience in self.audiences.values()
                                 for _, leaf in leaves(audience.when, "when") if _leaf_kind(leaf) == "event"})  # fmt: skip

    @cached_property
    def tests(self) -> Mapping[str, Test]:
        """Each audience's `when`, compiled once (compile_condition)."""
        return MappingProxyType({key: compile_condition(audience.when, self.counter_keys) for key, audience in self.audiences.items()})

    def with_definition(self, kind: str, raw: Any) -> Catalog:
        """A new catalog with `raw` added (or replacing the one with its key, in place), re-checked as a whole: what
        an HTTP POST validates with, so a definition that breaks a reference or makes a cycle is refused."""
        if kind not in KINDS:
            raise ConfigError(f"unknown definition kind {kind!r}; kinds: {', '.join(KINDS)}")
        key = (parse_trait(raw) if kind == "trait" else parse_audience(raw)).key
        check_new(kind, raw)
        sources = {**self.sources, (kind, key): raw}
        return build_catalog([r for (k, _), r in sources.items() if k == "trait"],
                             [r for (k, _), r in sources.items() if k == "audience"])  # fmt: skip


def parse_audience(raw: Any) -> AudienceDefinition:
    """An audience definition from its JSON/YAML form; raises ConfigError naming the audience and the problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"an audience definition is an object, not {raw!r:.100}")
    check_depth(raw, "an audience definition")
    key = check_key(raw.get("key"), "audience")
    unknown = set(raw) - set(AUDIENCE_FIELDS)
    if unknown:
        fields = sorted(unknown, key=str)
        raise ConfigError(f"audience {key!r}: unknown fields {fields}; known: {', '.join(AUDIENCE_FIELDS)}")
    if not isinstance(raw.get("description", ""), str):
        raise ConfigError(f"audience {key!r}: description must be a string, not {raw['description']!r}")
    if "when" not in raw:
        raise ConfigError(f"audience {key!r}: needs a when condition")
    for where, leaf in leaves(raw["when"], f"audience {key!r}: when"):
        _check_leaf(leaf, where)
    return AudienceDefinition(key, raw["when"])


def _check_leaf(leaf: Mapping[str, Any], where: str) -> None:
    kind = _leaf_kind(leaf)
    if kind is None:
        fields = sorted(leaf, key=str)
        raise ConfigError(f"{where}: a condition is all, any, not, or a trait, event or audience leaf; got {fields}")
    if kind == "audience" and (len(leaf) != 1 or not isinstance(leaf["audience"], str) or not leaf["audience"]):
        raise ConfigError(f'{where}: an audience leaf is {{"audience": "<key>"}} alone, not {dict(leaf)!r}')
    if kind != "audience":
        (_check_trait_leaf if kind == "trait" else _check_event_leaf)(leaf, where)


def _check_trait_leaf(leaf: Mapping[str, Any], where: str) -> None:
    name = leaf["trait"]
    if not isinstance(name, str) or not name or name == IDENTIFY:
        raise ConfigError(f"{where}: trait names a computed trait or traits.<name>, not {name!r}")
    operators = [op for op in leaf if op != "trait"]
    if len(operators) != 1:
        raise ConfigError(f"{where}: trait {name!r} takes one operator of {', '.join(OPERATORS)}, got {operators}")
    _check_operator(operators[0], leaf[operators[0]], OPERATORS, where)


def _check_event_leaf(leaf: Mapping[str, Any], where: str) -> None:
    unknown = set(leaf) - set(EVENT_FIELDS)
    if unknown:
        fields = sorted(unknown, key=str)
        raise ConfigError(f"{where}: unknown fields {fields}; an event leaf has {', '.join(EVENT_FIELDS)}")
    if not isinstance(leaf["event"], str) or not leaf["event"]:
        raise ConfigError(f"{where}: event must be a non-empty string (the event's name), not {leaf['event']!r}")
    if leaf.get("where") is not None:
        check_condition(leaf["where"], f"{where}: where")
    _window_ms(leaf, where)
    if "count" in leaf:
        count = leaf["count"]
        if not isinstance(count, Mapping) or len(count) != 1:
            raise ConfigError(f'{where}: count takes one operator of {", ".join(COUNT_OPERATORS)} and a whole number, '
                              f'e.g. {{"gte": 2}}, not {count!r}')  # fmt: skip
        ((op, expected),) = count.items()
        _check_operator(op, expected, COUNT_OPERATORS, f"{where}: count")
        if not isinstance(expected, int) or isinstance(expected, bool):
            raise ConfigError(f"{where}: count: {op} takes a whole number, not {expected!r}")


def _check_operator(op: Any, expected: Any, allowed: Sequence[str], where: str) -> None:
    """Refuse what could never hold (gt on a string, in on a non-list) rather than let it be silently false."""
    if op not in allowed:
        raise ConfigError(f"{where}: unknown operator {op!r}; operators: {', '.join(allowed)}")
    if op == "in" and not isinstance(expected, list):
        raise ConfigError(f"{where}: in takes a list, not {expected!r}")
    if op == "exists" and not isinstance(expected, bool):
        raise ConfigError(f"{where}: exists takes true or false, not {expected!r}")
    if op in NUMERIC_OPERATORS and not _number(expected):
        raise ConfigError(f"{where}: {op} compares numbers, not {expected!r}")


def _window_ms(leaf: Mapping[str, Any], where: str) -> int | None:
    within = leaf.get("within")
    return None if within is None else parse_window(within, f"{where}: within")


def counter_key(leaf: Mapping[str, Any]) -> str:
    """The hidden count trait of an event leaf, named by what it counts (event, where, within) and nothing else: leaves
    asking the same question share one state, and the name stays put across restarts and definition changes."""
    counted = {"event": leaf["event"], "where": leaf.get("where"), "within": leaf.get("within")}
    return COUNTER + hashlib.sha1(orjson.dumps(counted, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def counter_definition(leaf: Mapping[str, Any]) -> TraitDefinition:
    """The count trait behind a (checked) event leaf."""
    window_ms = _window_ms(leaf, f"event {leaf['event']!r}")
    return TraitDefinition(key=counter_key(leaf), kind="count", event=leaf["event"], window_ms=window_ms,
                           where=leaf.get("where"))  # fmt: skip


def build_catalog(traits: Sequence[Any], audiences: Sequence[Any]) -> Catalog:
    """Parse and check every definition; ConfigError names the first problem (a duplicate, a dangling reference, a
    cycle). Audiences come out after every audience they read, otherwise in definition order."""
    parsed_traits = _unique("trait", [parse_trait(raw) for raw in traits])
    parsed_audiences = _unique("audience", [parse_audience(raw) for raw in audiences])
    for key in parsed_traits:
        if key.startswith(COUNTER):
            raise ConfigError(f"trait {key!r}: keys starting with {COUNTER!r} are reserved for hidden event counters")
    for audience in parsed_audiences.values():
        _check_references(audience, parsed_traits, parsed_audiences)
    ordered = _dependency_order(parsed_audiences)
    event_leaves = [leaf for a in ordered.values() for _, leaf in leaves(a.when, "when") if _leaf_kind(leaf) == "event"]
    counters = {counter_key(leaf): counter_definition(leaf) for leaf in event_leaves}
    sources = {("trait", d.key): raw for d, raw in zip(parsed_traits.values(), traits)}
    sources.update({("audience", d.key): raw for d, raw in zip(parsed_audiences.values(), audiences)})
    return Catalog(traits=MappingProxyType(parsed_traits), audiences=MappingProxyType(ordered),
                   counters=MappingProxyType(counters), sources=MappingProxyType(sources))  # fmt: skip


def _unique(kind: str, definitions: list[Any]) -> dict[str, Any]:
    by_key: dict[str, Any] = {}
    for definition in definitions:
        if definition.key in by_key:
            raise ConfigError(f"{kind} {definition.key!r} is defined twice")
        by_key[definition.key] = definition
    return by_key


def _check_references(audience: AudienceDefinition, traits: Mapping[str, Any], audiences: Mapping[str, Any]) -> None:
    for where, leaf in leaves(audience.when, "when"):
        kind = _leaf_kind(leaf)
        if kind == "trait" and not leaf["trait"].startswith(IDENTIFY) and leaf["trait"] not in traits:
            raise ConfigError(f"audience {audience.key!r}: {where}: unknown trait {leaf['trait']!r}; computed traits: "
                              f"{_listing(traits)} (identify traits are written traits.<name>)")  # fmt: skip
        if kind == "audience" and leaf["audience"] not in audiences:
            raise ConfigError(f"audience {audience.key!r}: {where}: unknown audience {leaf['audience']!r}; "
                              f"audiences: {_listing(audiences)}")  # fmt: skip


def _listing(keys: Mapping[str, Any], limit: int = 20) -> str:
    """Known keys for an error message, bounded: a 400 body should stay readable with a thousand traits."""
    names = sorted(keys)
    return (", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")) or "none"


def _dependency_order(audiences: Mapping[str, AudienceDefinition]) -> dict[str, AudienceDefinition]:
    """Depth first in definition order, each audience placed after those it reads; a cycle has no order: name it."""
    ordered: dict[str, AudienceDefinition] = {}
    path: list[str] = []

    def visit(key: str) -> None:
        if key in ordered:
            return
        if key in path:
            raise ConfigError(f"audiences form a cycle: {' -> '.join(path[path.index(key):] + [key])}")
        path.append(key)
        for _, leaf in leaves(audiences[key].when, "when"):
            if _leaf_kind(leaf) == "audience":
                visit(leaf["audience"])
        path.pop()
        ordered[key] = audiences[key]

    for key in audiences:
        visit(key)
    return ordered


def requirements(catalog: Catalog, audience_key: str) -> frozenset[str]:
    """Every computed trait and counter key the audience reads, through the audiences it reads: what must change for
    its membership to change. KeyError for an audience the catalog does not have."""
    needed: set[str] = set()
    seen, pending = {audience_key}, [audience_key]
    while pending:
        for _, leaf in leaves(catalog.audiences[pending.pop()].when, "when"):
            if _leaf_kind(leaf) == "trait" and not leaf["trait"].startswith(IDENTIFY):
                needed.add(leaf["trait"])
            elif _leaf_kind(leaf) == "event":
                needed.add(counter_key(leaf))
            elif _leaf_kind(leaf) == "audience" and leaf["audience"] not in seen:
                seen.add(leaf["audience"])
                pending.append(leaf["audience"])
    return frozenset(needed)


def _reads_identify(catalog: Catalog, audience_key: str) -> bool:
    seen, pending = {audience_key}, [audience_key]
    while pending:
        for _, leaf in leaves(catalog.audiences[pending.pop()].when, "when"):
            if _leaf_kind(leaf) == "trait" and leaf["trait"].startswith(IDENTIFY):
                return True
            if _leaf_kind(leaf) == "audience" and leaf["audience"] not in seen:
                seen.add(leaf["audience"])
                pending.append(leaf["audience"])
    return False


Test = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, int], Mapping[str, bool]], bool]


def evaluate(condition: Mapping[str, Any], *, traits: Mapping[str, Any], identify: Mapping[str, Any],
             counters: Mapping[str, int], memberships: Mapping[str, bool],
             counter_keys: Mapping[int, str] = MappingProxyType({})) -> bool:  # fmt: skip
    """A checked `when` on one profile's values: computed traits by key (missing: None), identify traits (nested),
    counter values by counter_key (missing: 0), memberships of audiences evaluated before (missing: False).
    `counter_keys`: the catalog's counter key of each leaf, so they are not hashed again. The engine evaluates an
    audience's `compile_condition` (`Catalog.tests`) instead: the same, without reading the tree each time."""
    return compile_condition(condition, counter_keys)(traits, identify, counters, memberships)


def compile_condition(node: Mapping[str, Any], counter_keys: Mapping[int, str] = MappingProxyType({})) -> Test:
    """A checked `when` as nested functions of (traits, identify, counters, memberships), built once per definition:
    with 50 definitions, walking the tree per evaluation (key tests, the leaf's kind, its operator) was a quarter of
    compute's CPU."""
    if "all" in node:
        every = tuple(compile_condition(part, counter_keys) for part in node["all"])

        def all_of(t: Mapping[str, Any], i: Mapping[str, Any], c: Mapping[str, int], m: Mapping[str, bool]) -> bool:
            for part in every:
                if not part(t, i, c, m):
                    return False
            return True

        return all_of
    if "any" in node:
        some = tuple(compile_condition(part, counter_keys) for part in node["any"])

        def any_of(t: Mapping[str, Any], i: Mapping[str, Any], c: Mapping[str, int], m: Mapping[str, bool]) -> bool:
            for part in some:
                if part(t, i, c, m):
                    return True
            return False

        return any_of
    if "not" in node:
        inner = compile_condition(node["not"], counter_keys)
        return lambda t, i, c, m: not inner(t, i, c, m)
    kind = _leaf_kind(node)
    if kind == "audience":
        audience = node["audience"]
        return lambda t, i, c, m: bool(m.get(audience, False))
    if kind == "event":
        ((op, expected),) = node.get("count", AT_LEAST_ONCE).items()
        key = counter_keys.get(id(node)) or counter_key(node)
        return lambda t, i, c, m: compare(op, c.get(key, 0), expected)
    name = node["trait"]
    op, expected = next((k, v) for k, v in node.items() if k != "trait")
    if name.startswith(IDENTIFY):
        path = name[len(IDENTIFY):]
        return lambda t, i, c, m: compare(op, read_path(i, path), expected)
    return lambda t, i, c, m: compare(op, t.get(name), expected)


def _leaf_kind(leaf: Mapping[str, Any]) -> str | None:
    return next((kind for kind in ("trait", "event", "audience") if kind in leaf), None)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["AudienceDefinition", "Catalog", "build_catalog", "compile_condition", "counter_definition", "counter_key", "evaluate",
           "parse_audience", "requirements"]  # fmt: skip
