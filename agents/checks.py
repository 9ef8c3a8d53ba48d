"""What a decoded record must hold beyond what its Avro schema says, checked where a stage reads it.

Avro guarantees types, not meaning: a RawEvent's `context` is JSON text, but the ingest only ever writes an
object there; a command's `body` is any JSON object. Records on our topics normally come from our own stages,
but topics are open to anyone with a producer (a replay tool, a bug, another version), and one record that a
stage can't take must cost that record, not the partition. So each stage checks what it reads *before* acting:
a record that fails is refused whole with an InvalidRecord naming the field — dead-lettered, never half-applied,
never stored where it would break later records. Checks are plain type tests, cheap beside the decoding.

The field checks below take the record and a field name and raise InvalidRecord; `shape` checks a whole dict
against a table of them (the command tables in agents/identity/commands.py and agents/compute/commands.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agents.errors import InvalidRecord

Check = Callable[[Mapping[str, Any], str], None]
JSON_OBJECT_FIELDS = ("properties", "traits", "context", "integrations", "extra")
LONG = 2**63


def text(record: Mapping[str, Any], field: str) -> None:
    """A non-empty string (an id, a key)."""
    value = record.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidRecord(f"{field} must be a non-empty string, not {_shown(value)}")


def whole(record: Mapping[str, Any], field: str) -> None:
    """An integer that fits a Kafka/Avro long (a time, an index, a count)."""
    value = record.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not -LONG <= value < LONG:
        raise InvalidRecord(f"{field} must be a whole number, not {_shown(value)}")


def boolean(record: Mapping[str, Any], field: str) -> None:
    if not isinstance(record.get(field), bool):
        raise InvalidRecord(f"{field} must be true or false, not {_shown(record.get(field))}")


def obj(record: Mapping[str, Any], field: str) -> None:
    if not isinstance(record.get(field), dict):
        raise InvalidRecord(f"{field} must be a JSON object, not {_shown(record.get(field))}")


def texts(record: Mapping[str, Any], field: str) -> None:
    """A list of non-empty strings (profile ids)."""
    value = record.get(field)
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InvalidRecord(f"{field} must be a list of non-empty strings, not {_shown(value)}")


def optional(check: Check) -> Check:
    """The field may be absent or null; when present it passes `check`."""

    def checked(record: Mapping[str, Any], field: str) -> None:
        if record.get(field) is not None:
            check(record, field)

    return checked


def shape(record: Any, fields: Mapping[str, Check], what: str) -> None:
    """`record` is a JSON object whose `fields` pass their checks; InvalidRecord names `what` and the field."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"{what} must be a JSON object, not {_shown(record)}")
    for field, check in fields.items():
        try:
            check(record, field)
        except InvalidRecord as exc:
            raise InvalidRecord(f"{what}: {exc}") from None


def raw_event(event: Any) -> None:
    """A RawEvent as the ingest writes it: a messageId, and JSON objects where the schema has JSON text."""
    shape(event, {"message_id": text, **{field: obj for field in JSON_OBJECT_FIELDS}}, "a RawEvent")


def json_depth(value: Any, limit: int) -> int:
    """How many levels of objects and arrays `value` nests (a scalar 0, `{}` 1, `{"a": []}` 2), looking no deeper
    than limit + 1 — enough to tell a value over `limit` without walking all of a deep one. Iterative: a value that
    nests 100,000 levels can't overflow the stack."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            break
        pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _shown(value: Any) -> str:
    """A value in an error message, bounded (the value may be 32 KB of JSON)."""
    text_ = repr(value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."
