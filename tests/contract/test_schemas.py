"""Contract tests for schemas/: the single source of truth of every topic payload.

They pin what other programs rely on: every schema parses in two Avro implementations, follows the naming
conventions, keeps every released version readable (schemas/history, backward-transitive), matches the
TypedDicts the stages use, and survives the codec's round trip in both framings.
"""

from __future__ import annotations

import json
import re
import types
import typing
import warnings
from typing import Any

import avro.errors
import avro.schema
import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro.schema import to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import events
from tests.avro_strategies import strategy_for
from topology.codecs import AvroCodec, SchemaRepository

REPOSITORY = SchemaRepository.load()
NAMES = REPOSITORY.names()
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def avro_parse(schema: dict[str, Any]) -> avro.schema.Schema:
    """Parse with the reference implementation; it warns that `json` is unknown to it, which is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", avro.errors.IgnoredLogicalType)
        return avro.schema.parse(json.dumps(schema))


def reads(reader: dict[str, Any], writer: dict[str, Any]) -> tuple[bool, str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(avro_parse(reader), avro_parse(writer))
    return result.compatibility is SchemaCompatibilityType.compatible, f"{result.messages} at {result.locations}"


def named_types(schema: Any, namespace: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every record, enum and fixed defined in `schema`, as (full name, definition), outermost first."""
    if isinstance(schema, list):
        return [found for branch in schema for found in named_types(branch, namespace)]
    if not isinstance(schema, dict):
        return []
    found: list[tuple[str, dict[str, Any]]] = []
    if schema.get("type") in ("record", "enum", "fixed"):
        namespace = schema.get("namespace", namespace)
        found.append((f"{namespace}.{schema['name']}" if namespace else schema["name"], schema))
    for field in schema.get("fields", []):
        found += named_types(field["type"], namespace)
    for key in ("items", "values"):
        found += named_types(schema.get(key), namespace)
    if isinstance(schema.get("type"), (dict, list)):
        found += named_types(schema["type"], namespace)
    return found


def records(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [definition for _, definition in named_types(schema) if definition["type"] == "record"]


@pytest.mark.parametrize("name", NAMES)
def test_parses_with_fastavro_and_avro(name: str) -> None:
    schema = REPOSITORY.current(name)
    fastavro.parse_schema(schema, named_schemas={})
    assert avro_parse(schema).fullname == f"cdp.{schema['name']}"


@pytest.mark.parametrize("name", NAMES)
def test_follows_the_naming_conventions(name: str) -> None:
    schema = REPOSITORY.current(name)
    assert schema["namespace"] == "cdp"
    assert re.sub(r"(?<!^)(?=[A-Z])", "_", schema["name"]).lower() == name, "file name = snake_case(record name)"
    assert re.search(r"Value of .*cdp\.[a-z]+.*key", schema["doc"]), "the doc names its topic and its key"
    for record in records(schema):
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", record["name"]), record["name"]
        for field in record["fields"]:
            assert SNAKE.match(field["name"]), f"{record['name']}.{field['name']} is not snake_case"


def test_every_topic_has_a_schema() -> None:
    from topology.topics import ALL_TOPICS

    assert {topic.schema for topic in ALL_TOPICS} <= set(NAMES)


def test_a_named_type_means_the_same_everywhere() -> None:
    """ResolvedEvent embeds RawEvent, Identifier appears twice: each copy must equal the others exactly."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in NAMES:
        for fullname, definition in named_types(REPOSITORY.current(name)):
            first = seen.setdefault(fullname, (name, definition))
            assert definition == first[1], f"{fullname} differs between {first[0]}.avsc and {name}.avsc"
    assert seen["cdp.RawEvent"][1] == REPOSITORY.current("raw_event")


# --- history: every released version stays readable --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_latest_history_version_is_the_current_schema(name: str) -> None:
    history = REPOSITORY.history(name)
    assert history, f"schemas/history/{name}.v1.avsc is missing"
    assert to_parsing_canonical_form(history[-1]) == to_parsing_canonical_form(REPOSITORY.current(name)), (
        f"schemas/{name}.avsc changed: freeze it as schemas/history/{name}.v{len(history) + 1}.avsc"
    )


@pytest.mark.parametrize("name", NAMES)
def test_current_reads_every_released_version(name: str) -> None:
    for version, writer in enumerate(REPOSITORY.history(name), start=1):
        ok, why = reads(REPOSITORY.current(name), writer)
        assert ok, f"{name}.avsc can't read data written with v{version}: {why}"


@pytest.mark.parametrize("name", NAMES)
def test_each_version_reads_the_one_before(name: str) -> None:
    history = REPOSITORY.history(name)
    for version, (older, newer) in enumerate(zip(history, history[1:]), start=2):
        ok, why = reads(newer, older)
        assert ok, f"{name} v{version} can't read v{version - 1}: {why}"


def test_the_compatibility_check_can_fail() -> None:
    """A field added without a default breaks old data; the checker must say so, or the tests above prove nothing."""
    current = REPOSITORY.current("raw_event")
    broken = {**current, "fields": [*current["fields"], {"name": "tenant", "type": "string"}]}
    assert not reads(broken, current)[0]


# --- TypedDicts in agents/events.py ------------------------------------------------------------------------
def _hint_allows_none(hint: Any) -> bool:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return hint is Any or (union and type(None) in typing.get_args(hint))


def _enum_symbols(field_type: Any) -> list[str] | None:
    return field_type["symbols"] if isinstance(field_type, dict) and field_type.get("type") == "enum" else None


@pytest.mark.parametrize("name", NAMES)
def test_typed_dicts_match_the_schema(name: str) -> None:
    for record in records(REPOSITORY.current(name)):
        typed = getattr(events, record["name"], None)
        assert typed is not None, f"agents/events.py has no TypedDict {record['name']}"
        hints = typing.get_type_hints(typed)
        assert list(hints) == [f["name"] for f in record["fields"]], f"{record['name']}: fields differ from the schema"
        for field in record["fields"]:
            hint, nullable = hints[field["name"]], isinstance(field["type"], list) and "null" in field["type"]
            assert _hint_allows_none(hint) == nullable, f"{record['name']}.{field['name']}: optional in one only"
            if (symbols := _enum_symbols(field["type"])) is not None:
                assert list(typing.get_args(hint)) == symbols, f"{record['name']}.{field['name']}: Literal != symbols"


# --- round trips --------------------------------------------------------------------------------------------
T0 = 1_700_000_000_000
RAW: events.RawEvent = {
    "message_id": "m-1", "type": "track", "source": "web", "user_id": "u-1", "anonymous_id": "a-1",
    "event": "Order Completed", "name": None, "category": None, "group_id": None, "previous_id": None,
    "properties": {"revenue": 12.5, "currency": "USD", "items": [{"sku": "s-1", "qty": 2}]}, "traits": {},
    "context": {"ip": "203.0.113.7", "library": {"name": "analytics.js", "version": "4.1.0"}}, "integrations": {},
    "timestamp": T0, "original_timestamp": T0 - 5, "sent_at": T0 + 10, "received_at": T0 + 20, "extra": {"version": 2},
}  # fmt: skip
IDS: list[events.Identifier] = [{"type": "user_id", "value": "u-1"}, {"type": "email", "value": "a@example.com"}]
SAMPLES: dict[str, dict[str, Any]] = {
    "raw_event": dict(RAW),
    "dead_letter": {
        "stage": "identity", "reason": "raw_event: unknown framing, first bytes 7b 22", "error": "UndecodableError",
        "topic": "cdp.events.raw", "partition": 3, "offset": 42, "key": b"m-1", "value": b'{"x":1}',
        "destination": None, "attempts": 0, "failed_at": T0, "http_status": None, "response": None,
    },  # fmt: skip
    "resolved_event": {"profile_id": "p-1", "identifiers": IDS, "event": dict(RAW)},
    "merge_log_entry": {
        "kind": "merged", "survivor_profile_id": "p-1", "merged_profile_id": "p-2", "identifiers": IDS[1:],
        "message_id": "m-1", "timestamp": T0, "rule": "identifier match",
    },  # fmt: skip
    "identity_command": {"kind": "claim", "body": {"kind": "claim", "message_id": "m-1", "index": 0, "type": "email",
                                                   "value": "a@b.io", "candidate": "p-1"}},
    "identity_state": {"record": {"p": "p-1"}},
    "compute_command": {"kind": "fold_out", "body": {"kind": "fold_out", "profile": "p-2", "into": "p-1", "at": T0}},
    "sync_state": {"record": {"n": 3}},
    "compute_state": {"record": {"t": {"orders": {"a": 2}}, "v": {"orders": 2}, "i": {}, "m": {}, "seq": 3, "x": None}},
    "profile_change": {
        "profile_id": "p-1", "trait": "orders_30d", "origin": "computed", "old_value": None,
        "new_value": {"count": 3}, "timestamp": T0, "message_id": "m-1", "seq": 7,
        "user_id": "u-1", "anonymous_id": "a-1", "email": "a@b.io",
    },  # fmt: skip
    "audience_membership_change": {
        "profile_id": "p-1", "audience": "big_spenders", "transition": "entered", "timestamp": T0, "seq": 8,
        "reason": "trait ltv", "message_id": None, "user_id": None, "anonymous_id": "a-1", "email": None,
    },  # fmt: skip
    "delivery_outcome": {
        "destination": "crm", "idempotency_key": "p-1:big_spenders:8", "profile_id": "p-1", "status": "retrying",
        "http_status": 503, "attempt": 2, "attempted_at": T0, "next_attempt_at": T0 + 4000, "error": "HTTP 503",
    },  # fmt: skip
    "definition": {
        "kind": "trait", "key": "orders_30d", "body": {"key": "orders_30d", "kind": "count", "window": "30d"},
        "version": 3, "updated_at": T0, "deleted": False,
    },  # fmt: skip
}


def codecs(name: str) -> list[AvroCodec]:
    registry = SchemaRegistryClient.new_client({"url": "mock://"})
    return [AvroCodec(name, REPOSITORY), AvroCodec(name, REPOSITORY, registry, f"cdp.{name}-value")]


STRATEGIES = {name: strategy_for(REPOSITORY.current(name)) for name in NAMES}
CODECS = {name: codecs(name) for name in NAMES}


def test_every_schema_has_a_sample() -> None:
    assert sorted(SAMPLES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_sample_round_trips_in_both_framings(name: str) -> None:
    for codec in codecs(name):
        assert codec.decode(codec.encode(SAMPLES[name])) == SAMPLES[name]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_round_trips_in_both_framings(name: str, data: st.DataObject) -> None:
    value = data.draw(STRATEGIES[name], label=name)
    for codec in CODECS[name]:
        assert codec.decode(codec.encode(value)) == value
