"""The key identifiers every compute change names (userId, anonymousId, email): a destination must know whom a change
is about without a lookup per delivery (agents/sync/payloads.py). A profile record keeps the latest of each under
`ids`; these functions keep it, fold it on a merge and read it for a change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Record = dict[str, Any]

KEY_IDENTIFIERS = ("user_id", "anonymous_id", "email")  # what every change says of its profile (whom it is about)


def note_identifiers(record: Record, identifiers: Iterable[Mapping[str, str]]) -> None:
    """Keep the latest value of each key identifier type an event of the profile carried (`record["ids"]`), for the
    changes to name their profile: a destination must know whom a change is about, without a lookup per delivery."""
    held = record.get("ids")
    for identifier in identifiers:
        kind = identifier["type"]
        if kind in KEY_IDENTIFIERS and (held is None or held.get(kind) != identifier["value"]):
            held = record["ids"] = {**(held or {}), kind: identifier["value"]}


def carried(event: Mapping[str, Any]) -> list[dict[str, str]]:
    """The ids an event names itself (a forwarded event travels without identity's list)."""
    return [{"type": kind, "value": event[kind]} for kind in ("user_id", "anonymous_id") if event.get(kind)]


def fold_identifiers(record: Record, other: Record) -> None:
    """A merged profile's key identifiers fill the survivor's gaps (the survivor's own, newer by the merge, win)."""
    theirs = other.get("ids") or {}
    if theirs:
        record["ids"] = {**theirs, **(record.get("ids") or {})}


def who(record: Record) -> Record:
    held = record.get("ids") or {}
    return {kind: held.get(kind) for kind in KEY_IDENTIFIERS}
