"""Per-event memo keys, and when they may go: what makes a stage count each event once, without keeping every
event it ever saw.

A memo ("this event was counted here", "this messageId resolved to that profile") guards against copies of an
event: a re-sent outbox after a crash, `cdp replay`, a backfill re-reading history. A copy can only come from a
topic that still holds one, so a memo is needed as long as the topics it guards may: its key carries the hour of
the event's `received_at` (set once by the ingest; every copy carries the same), `<kind>@<hour>|<rest>`, and
once that hour is more than the *memo horizon* in the past every memo of the hour is deleted — from the store
and from the changelog, where a batch's memos of one hour are one record (topology/runtime/memo_packs.py) — in
key order, a range at a time, without reading any value.

The horizon (`topics.memo_horizon`, default 2 × `topics.retention` + 7 days) covers a copy written as late as
possible: an event in events.raw for a retention, replayed at its very end into a copy that lives another
retention, plus Kafka's segment roll (`segment.ms`, 7 days by default), which keeps records readable up to that
much past their retention. An event copied again by a replay of a replay beyond the horizon would count again.

Memos written before keys carried an hour (`<kind>|<rest>`) are still found (`seen`) but never expire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from agents.state import Readable

HOUR_MS = 3_600_000
RETENTION_SEGMENT_MS = 7 * 24 * HOUR_MS  # Kafka's default segment.ms: how long past retention a record may stay


def default_horizon_ms(retention_ms: int) -> int:
    return 2 * retention_ms + RETENTION_SEGMENT_MS


def received_hour(event: Mapping[str, Any]) -> int:
    """The hour a memo of `event` is filed under: its received_at (its timestamp for a record without one)."""
    at = event.get("received_at")
    return max(int(at if at is not None else event["timestamp"]), 0) // HOUR_MS


def memo_key(kind: str, event: Mapping[str, Any], rest: str) -> str:
    return f"{kind}@{received_hour(event):08d}|{rest}"


def seen(state: Readable, kind: str, event: Mapping[str, Any], rest: str) -> tuple[str, dict[str, Any] | None]:
    """(the memo's key, its record or None): the key to write is the hour-filed one, whichever form was found."""
    key = memo_key(kind, event, rest)
    record = state.get(key)
    if record is None:
        record = state.get(f"{kind}|{rest}")  # a memo from before keys carried an hour
    return key, record


def expired(keys: Callable[[str], Iterator[str]], kind: str, now_ms: int, horizon_ms: int, limit: int) -> list[str]:
    """Up to `limit` memo keys of `kind` whose hour ended more than `horizon_ms` before `now_ms`, oldest first."""
    prefix = f"{kind}@"
    before = (now_ms - horizon_ms) // HOUR_MS  # hours before this one are past the horizon once it starts
    found: list[str] = []
    for key in keys(prefix):
        hour = key[len(prefix) : len(prefix) + 8]
        if not hour.isdigit() or int(hour) >= before or len(found) >= limit:
            break
        found.append(key)
    return found
