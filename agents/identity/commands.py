"""What each identity command carries, checked before the protocol acts on one (agents/checks.py says why).

A command that fails is never applied; the protocol settles what it leaves behind (`IdentityProtocol.apply`).
Beside the fields, the protocol's one ordering invariant is checked: a join is decided at the *older* profile,
so an offer's `old` sorts before its `young` and an accepted merge's `root` before the profile it absorbs —
merge chains only ever point at older profiles and can't form a cycle, whatever a command says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents import checks
from agents.checks import boolean, obj, optional, text, texts, whole
from agents.errors import InvalidRecord


def _identifiers(record: Mapping[str, Any], field: str) -> None:
    """[[type, value, added_at], ...] as a profile keeps them."""
    value = record.get(field)
    if not isinstance(value, list) or not all(
        isinstance(i, list) and len(i) == 3 and isinstance(i[0], str) and isinstance(i[1], str) and isinstance(i[2], int)
        for i in value
    ):
        raise InvalidRecord(f"{field} must be a list of [type, value, added_at], not {value!r:.60}")


def _pairs(record: Mapping[str, Any], field: str) -> None:
    """[[type, value], ...]: the identifiers a join links."""
    value = record.get(field)
    if not isinstance(value, list) or not all(isinstance(i, list) and len(i) == 2 and all(isinstance(x, str) for x in i) for i in value):
        raise InvalidRecord(f"{field} must be a list of [type, value], not {value!r:.60}")


def _index(record: Mapping[str, Any], field: str) -> None:
    whole(record, field)
    if record[field] < 0:
        raise InvalidRecord(f"{field} must not be negative, not {record[field]}")


def _event(record: Mapping[str, Any], field: str) -> None:
    checks.raw_event(record.get(field))


def _summary(record: Mapping[str, Any], field: str) -> None:
    summary = record.get(field)
    checks.shape(summary, {"ids": _identifiers, "merges": whole, "merged_from": texts, "log": _entries}, field)


def _entries(record: Mapping[str, Any], field: str) -> None:
    if not isinstance(record.get(field), list) or not all(isinstance(e, dict) for e in record[field]):
        raise InvalidRecord(f"{field} must be a list of merge-log entries")


_SAGA = {"message_id": text}
_JOIN = {**_SAGA, "request": text, "a": text, "b": text, "at": whole, "link": _pairs}
FIELDS: Mapping[str, Mapping[str, checks.Check]] = {
    "event": {"event": _event},
    "claim": {**_SAGA, "index": _index, "type": text, "value": text, "candidate": text},
    "claimed": {**_SAGA, "index": _index, "failed": optional(text), "type": optional(text), "value": optional(text)},
    "create": {**_SAGA, "profile": text, "at": whole, "ids": _identifiers},
    "join": _JOIN,
    "offer": {**_JOIN, "young": text, "old": text, "summary": _summary},
    "offered": {"message_id": optional(text), "request": text, "young": text, "accepted": boolean, "root": optional(text),
                "rule": text, "entry": optional(obj)},  # no message_id: a settled offer whose saga is unknown
    "joined": {**_SAGA, "request": text, "accepted": boolean, "root": optional(text), "rule": text},
    "repoint": {"type": text, "value": text, "profile": text},
}


def check_command(command: Any) -> None:
    """InvalidRecord naming what is wrong with `command`, or nothing."""
    kind = command.get("kind") if isinstance(command, dict) else None
    if kind not in FIELDS:
        raise InvalidRecord(f"unknown identity command kind {kind!r}; kinds: {', '.join(FIELDS)}")
    checks.shape(command, FIELDS[kind], f"a {kind} command")
    if kind == "claimed" and command.get("failed") is None:
        checks.shape(command, {"holder": text, "fresh": boolean}, "a claimed command")
    if kind == "offer" and not command["old"] < command["young"]:
        raise InvalidRecord(f"an offer goes from the younger profile to the older: old {command['old']!r} must sort "
                            f"before young {command['young']!r}")  # fmt: skip
    if kind in ("offered", "joined") and command["accepted"]:
        checks.shape(command, {"root": text}, f"an accepted {kind} command")
        if kind == "offered" and not command["root"] < command["young"]:
            raise InvalidRecord(f"a merge goes into an older profile: root {command['root']!r} must sort before "
                                f"{command['young']!r}")  # fmt: skip
