"""Bounded state: a fixed population of profiles sends events for longer than the memo horizon, and the per-event
memos (compute's `s@`, identity's `r@`) leave the store — as tombstones in the changelog transaction — so the
state per profile stays flat; while an event's memo is kept, a copy of it changes nothing.

The stages run on one partition without Kafka (tests/stage_harness.py: the same `decide` a worker runs), with
a clock that moves an hour per round and a horizon of three hours (`topics.memo_horizon` of a short retention).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.errors import ConfigError
from agents.memo import HOUR_MS, expired, memo_key, seen
from tests import stage_harness
from tests.poison import CODECS, raw_event
from topology.config import Settings
from topology.runtime.state_store import Transaction

T0 = 1_750_000_000_000 - 1_750_000_000_000 % HOUR_MS
HORIZON = 3 * HOUR_MS
PROFILES, PER_HOUR, HOURS = 20, 3, 14
TRAITS = [{"key": "orders", "kind": "count", "event": "Order Completed"}]


@pytest.fixture(autouse=True)
def an_event_loop() -> Iterator[None]:
    """The compute stage schedules its backfill runs with asyncio.ensure_future when it meets definitions: give
    it a loop of its own (the harness never runs it; the tasks are cancelled before they start)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()
        asyncio.set_event_loop(None)


def state_size(harness: stage_harness.OnePartition) -> tuple[int, int]:
    """(records, key + value bytes) in the partition's store."""
    keys = list(harness.store.keys(""))
    return len(keys), sum(len(key) + len(harness.store.raw(key) or b"") for key in keys)


def sweep(harness: stage_harness.OnePartition, now_ms: int) -> int:
    """What a worker's timer does: expire memos in one transaction; returns the tombstones it wrote."""
    tx = Transaction(harness.store)
    count = harness.stage.expire_memos_in(tx, now_ms)
    assert sum(1 for value in tx.changes.values() if value is None) == count == len(tx.changes)
    harness.store.apply(tx.changes, (harness.store.changelog_next or 0) + 1)
    return count


def order(profile: str, hour: int, n: int) -> dict[str, Any]:
    at = T0 + hour * HOUR_MS + n
    return {"profile_id": profile, "identifiers": [], "event": raw_event(
        message_id=f"m-{profile}-{hour}-{n}", user_id=profile, anonymous_id=None, event="Order Completed", timestamp=at, received_at=at)}


def test_compute_memos_expire_and_state_per_profile_stays_flat(tmp_path: Path) -> None:
    harness = stage_harness.compute(tmp_path, TRAITS, now_s=T0 / 1000)
    harness.stage.memo_horizon_ms = HORIZON
    sizes, swept = [], 0
    for hour in range(HOURS):
        now = T0 + (hour + 1) * HOUR_MS
        harness.stage.clock = lambda now=now: now / 1000
        for profile in (f"p{i}" for i in range(PROFILES)):
            for n in range(PER_HOUR):
                resolved = order(profile, hour, n)
                harness.write("t.events.resolved", profile.encode(), CODECS["resolved_event"].encode(resolved))
        harness.run()
        swept += sweep(harness, now)
        sizes.append(state_size(harness))
    # every memo older than the horizon went; those within it stay
    memos = [key for key in harness.store.keys("s@")]
    assert len(memos) == PROFILES * PER_HOUR * 3
    assert swept == PROFILES * PER_HOUR * (HOURS - 3)
    # flat: once the horizon is reached, records and bytes stop growing with the events
    assert sizes[-1][0] == sizes[5][0] and abs(sizes[-1][1] - sizes[5][1]) <= sizes[5][1] * 0.02, sizes
    # counts are untouched by the expiry, and a copy of an event still within the horizon changes nothing
    changes = harness.read("t.profile.changes", "profile_change")
    assert max(c["new_value"] for c in changes if c["profile_id"] == "p0") == HOURS * PER_HOUR
    copy = order("p0", HOURS - 1, 0)
    harness.write("t.events.resolved", b"p0", CODECS["resolved_event"].encode(copy))
    harness.run()
    assert len(harness.read("t.profile.changes", "profile_change")) == len(changes)


def test_identity_resolutions_expire_and_a_replay_within_the_horizon_resolves_alike(tmp_path: Path) -> None:
    harness = stage_harness.identity(tmp_path, Settings().identity)
    harness.stage.memo_horizon_ms = HORIZON
    sizes = []
    for hour in range(HOURS):
        for i in range(PROFILES):
            for n in range(PER_HOUR):
                at = T0 + hour * HOUR_MS + n
                event = raw_event(message_id=f"m-{i}-{hour}-{n}", user_id=f"u{i}", anonymous_id=None, timestamp=at, received_at=at)
                harness.write("t.events.raw", event["message_id"].encode(), CODECS["raw_event"].encode(event))
        harness.run()
        sweep(harness, T0 + (hour + 1) * HOUR_MS)
        sizes.append(state_size(harness))
    assert len(list(harness.store.keys("r@"))) == PROFILES * PER_HOUR * 3
    assert sizes[-1][0] == sizes[5][0], sizes
    resolved = harness.read("t.events.resolved", "resolved_event")
    assert len(resolved) == PROFILES * PER_HOUR * HOURS
    last = resolved[-1]
    harness.write("t.events.raw", last["event"]["message_id"].encode(), CODECS["raw_event"].encode(last["event"]))
    harness.run()
    again = harness.read("t.events.resolved", "resolved_event")
    assert len(again) == len(resolved) + 1 and again[-1]["profile_id"] == last["profile_id"]
    assert len(list(harness.store.keys("p|"))) == PROFILES  # no new profile: the memo answered


def test_memo_keys_file_under_the_hour_received_and_old_memos_are_still_found() -> None:
    event = {"received_at": T0 + 5 * HOUR_MS + 17, "timestamp": 1}
    key = memo_key("s", event, "m1")
    assert key == f"s@{(T0 + 5 * HOUR_MS) // HOUR_MS:08d}|m1"
    legacy = {"s|m1": {"at": 1}}
    assert seen(legacy, "s", event, "m1") == (key, {"at": 1})  # type: ignore[arg-type]
    assert seen({}, "s", event, "m1") == (key, None)  # type: ignore[arg-type]
    keys = sorted([memo_key("s", {"received_at": T0 + h * HOUR_MS}, f"m{h}") for h in range(6)] + ["s@zz-not-ours"])
    listing = lambda prefix: iter([k for k in keys if k.startswith(prefix)])  # noqa: E731
    assert expired(listing, "s", T0 + 6 * HOUR_MS, 2 * HOUR_MS, 100) == keys[:4]  # hours 0-3 ended before now - 2h
    assert expired(listing, "s", T0 + 6 * HOUR_MS, 2 * HOUR_MS, 3) == keys[:3]


def test_the_memo_horizon_defaults_to_twice_the_retention_plus_a_segment_and_never_less_than_twice() -> None:
    from topology.config import _topics

    assert _topics({"retention": "2d"}).memo_horizon == (2 * 2 + 7) * 24 * HOUR_MS
    assert _topics({"retention": "2d", "memo_horizon": "5d"}).memo_horizon == 5 * 24 * HOUR_MS
    with pytest.raises(ConfigError, match="at least twice topics.retention"):
        _topics({"retention": "2d", "memo_horizon": "3d"})
