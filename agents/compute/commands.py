"""What the compute stage reads, checked before the engine acts on it (agents/checks.py says why): resolved events,
merge-log entries and the stage's own commands.

Beside the fields, the merge order that keeps forwarding finite is checked: identity always merges the younger
profile into the older, so a merge's survivor (a fold's `into`) sorts before the merged profile. Forward
pointers (`f|<merged>` -> survivor) therefore only point at older profiles, and a chain of them always ends —
a merge entry or command that says otherwise (a profile merged into itself, a cycle) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents import checks
from agents.checks import obj, optional, text, texts, whole
from agents.errors import InvalidRecord


def _event(record: Mapping[str, Any], field: str) -> None:
    checks.raw_event(record.get(field))


def _profile_state(record: Mapping[str, Any], field: str) -> None:
    """A profile's state handed over in a fold (or null: the merged profile had none)."""
    state = record.get(field)
    if state is None:
        return
    checks.shape(state, {"t": obj, "i": obj, "m": obj}, field)
    for sid, part in state["t"].items():
        if not isinstance(part, dict) or ("a" in part) == ("b" in part) or not isinstance(part.get("b", {}), dict):
            raise InvalidRecord(f"{field}: trait state {sid!r} is not a trait state: {part!r:.60}")
    if not all(isinstance(held, list) and len(held) == 3 for held in state["i"].values()):
        raise InvalidRecord(f"{field}: identify traits must be [timestamp, messageId, value] each")


_FORWARDED = {"profile": text, "event": _event, "sids": texts, "feed": optional(whole)}
FIELDS: Mapping[str, Mapping[str, checks.Check]] = {
    "event": _FORWARDED,
    "backfill_event": _FORWARDED,
    "fold_out": {"profile": text, "into": text, "at": whole, "feed": optional(whole)},
    "fold_in": {"profile": text, "from": text, "record": _profile_state, "at": whole, "feed": optional(whole)},
}


def check_command(command: Any) -> None:
    """InvalidRecord naming what is wrong with a compute command, or nothing."""
    kind = command.get("kind") if isinstance(command, dict) else None
    if kind not in FIELDS:
        raise InvalidRecord(f"unknown compute command kind {kind!r}; kinds: {', '.join(FIELDS)}")
    checks.shape(command, FIELDS[kind], f"a {kind} command")
    if kind == "fold_out":
        _older(command["into"], command["profile"])
    elif kind == "fold_in":
        _older(command["profile"], command["from"])


def check_resolved(resolved: Any) -> None:
    checks.shape(resolved, {"profile_id": text, "event": _event}, "a ResolvedEvent")


def check_merge(entry: Any) -> None:
    """A merge-log entry compute acts on (`merged`) names two profiles, the survivor the older."""
    checks.shape(entry, {"kind": text, "survivor_profile_id": text, "timestamp": whole}, "a MergeLogEntry")
    if entry["kind"] == "merged":
        checks.shape(entry, {"merged_profile_id": text}, "a merged MergeLogEntry")
        _older(entry["survivor_profile_id"], entry["merged_profile_id"])


def _older(survivor: str, merged: str) -> None:
    if not survivor < merged:
        raise InvalidRecord(f"profile {merged!r} can't be merged into {survivor!r}: the survivor is always the older "
                            "profile, whose id sorts first")  # fmt: skip
