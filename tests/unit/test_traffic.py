"""The traffic generator `cdp bench pipeline` (and `cdp generate`) sends: distinct, valid, realistic calls."""

from __future__ import annotations

from collections import defaultdict

from agents.ingest.tracking import to_raw_event
from bench.traffic import Traffic

END_MS = 1_800_000_000_000


def test_calls_are_distinct_valid_and_the_same_for_the_same_seed() -> None:
    calls = Traffic(run="t", end_ms=END_MS).calls(5_000)
    assert len(calls) == 5_000
    assert len({call["messageId"] for call in calls}) == 5_000
    assert calls == Traffic(run="t", end_ms=END_MS).calls(5_000)
    assert calls != Traffic(run="t", seed=8, end_ms=END_MS).calls(5_000)
    for call in calls:  # every call is one the ingest accepts
        to_raw_event(call, call_type=None, source="test", received_at=END_MS)
    stamps = [call["originalTimestamp"] for call in calls]
    assert stamps == sorted(stamps)


def test_visitors_browse_anonymously_then_identify_buy_and_come_back() -> None:
    calls = Traffic(run="t", end_ms=END_MS).calls(20_000)
    kinds = defaultdict(int)
    devices: dict[str, set[str]] = defaultdict(set)
    identified: set[str] = set()
    for call in calls:
        kinds[call.get("event") or call["type"]] += 1
        anonymous = call["anonymousId"]
        if call["type"] == "identify":
            identified.add(anonymous)
            devices[call["userId"]].add(anonymous)
        elif "userId" in call:  # a visitor's calls after identify carry the userId; only after it
            assert anonymous in identified
        if call.get("event") == "Order Completed":
            assert call["properties"]["revenue"] > 0 and "userId" in call
    assert set(kinds) == {"page", "Product Viewed", "identify", "Order Completed"}
    assert min(kinds.values()) > 1_000
    assert sum(1 for anonymous_ids in devices.values() if len(anonymous_ids) == 2) > 50  # merges of two profiles
