"""Segment Tracking API rules: required fields, types, limits, batch merging and clock-skew correction."""

from __future__ import annotations

import pytest

from agents.errors import InvalidMessage
from agents.ingest.tracking import MAX_BATCH_EVENTS, batch_to_raw_events, parse_time_ms, to_raw_event

RECEIVED = parse_time_ms("2024-05-01T12:00:10.000Z", "t")


def raw(message: dict, call_type: str | None = "track") -> dict:
    return to_raw_event(message, call_type=call_type, source="web", received_at=RECEIVED, make_id=lambda: "generated")


def test_a_track_call_keeps_its_fields_and_gets_defaults() -> None:
    event = raw({"userId": "u1", "event": "Order Completed", "properties": {"total": 30}, "messageId": "m1", "version": 2})
    assert event["type"] == "track" and event["user_id"] == "u1" and event["anonymous_id"] is None
    assert event["event"] == "Order Completed" and event["properties"] == {"total": 30}
    assert event["message_id"] == "m1" and event["source"] == "web"
    assert event["timestamp"] == RECEIVED and event["received_at"] == RECEIVED
    assert event["extra"] == {"version": 2}


def test_a_missing_message_id_is_generated() -> None:
    assert raw({"anonymousId": "a1", "event": "x"})["message_id"] == "generated"


def test_timestamp_is_corrected_for_the_client_clock() -> None:
    # The client's clock runs one hour ahead; the call happened 5 s before it was sent.
    event = raw({"userId": "u", "event": "x", "originalTimestamp": "2024-05-01T13:00:00Z", "sentAt": "2024-05-01T13:00:05Z"})
    assert event["timestamp"] == RECEIVED - 5_000
    assert event["original_timestamp"] == parse_time_ms("2024-05-01T13:00:00Z", "t")


def test_a_sent_timestamp_counts_as_the_original_time_when_sent_at_is_known() -> None:
    # A historical import from a server whose clock is 30 s ahead: the call is moved by the same 30 s.
    event = raw({"userId": "u", "event": "x", "timestamp": "2024-04-01T00:00:00Z", "sentAt": "2024-05-01T12:00:40Z"})
    assert event["timestamp"] == parse_time_ms("2024-04-01T00:00:00Z", "t") - 30_000
    assert event["original_timestamp"] == parse_time_ms("2024-04-01T00:00:00Z", "t")


def test_the_request_address_fills_context_ip_only_when_absent() -> None:
    filled = to_raw_event({"userId": "u", "event": "x"}, call_type="track", source="web", received_at=RECEIVED, client_ip="10.9.8.7")
    kept = to_raw_event({"userId": "u", "event": "x", "context": {"ip": "1.1.1.1"}}, call_type="track", source="web",
                        received_at=RECEIVED, client_ip="10.9.8.7")  # fmt: skip
    assert filled["context"] == {"ip": "10.9.8.7"} and kept["context"] == {"ip": "1.1.1.1"}


def test_an_explicit_timestamp_without_sent_at_is_kept() -> None:
    assert raw({"userId": "u", "event": "x", "timestamp": "2020-01-01T00:00:00+02:00"})["timestamp"] == 1577829600000


@pytest.mark.parametrize(
    ("message", "call_type", "field"),
    [
        ({"event": "x"}, "track", "userId"),
        ({"userId": "", "anonymousId": None, "event": "x"}, "track", "userId"),
        ({"userId": "u"}, "track", "event"),
        ({"userId": "u", "event": 5}, "track", "event"),
        ({"userId": {"id": 1}, "event": "x"}, "track", "userId"),
        ({"userId": "u", "event": "x", "properties": [1]}, "track", "properties"),
        ({"userId": "u", "event": "x", "context": "web"}, "track", "context"),
        ({"userId": "u", "event": "x", "timestamp": "yesterday"}, "track", "timestamp"),
        ({"userId": "u", "event": "x", "timestamp": "1960-01-01T00:00:00Z"}, "track", "timestamp"),
        ({"userId": "u", "event": "x", "messageId": "m" * 101}, "track", "messageId"),
        ({"userId": "u"}, "group", "groupId"),
        ({"userId": "u"}, "alias", "previousId"),
        ({"anonymousId": "a", "previousId": "p"}, "alias", "userId"),
        ({"userId": "u", "type": "identify"}, "track", "type"),
        ({"userId": "u", "type": "purchase"}, None, "type"),
        ({"userId": "u", "event": "x", "properties": {"blob": "x" * 33_000}}, "track", "message"),
    ],
)
def test_bad_messages_name_the_field(message: dict, call_type: str | None, field: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        raw(message, call_type)
    assert caught.value.field == field and caught.value.reason


def test_numeric_ids_are_stringified_like_segment_libraries_do() -> None:
    assert raw({"userId": 42, "event": "x"})["user_id"] == "42"


def test_per_type_fields_land_on_their_own_call_types_only() -> None:
    page = raw({"userId": "u", "name": "Home", "category": "Docs", "event": "ignored"}, "page")
    assert (page["name"], page["category"], page["event"]) == ("Home", "Docs", None)
    screen = raw({"userId": "u", "name": "Settings", "category": "ignored"}, "screen")
    assert (screen["name"], screen["category"]) == ("Settings", None)
    group = raw({"userId": "u", "groupId": 7, "traits": {"plan": "pro"}}, "group")
    assert (group["group_id"], group["traits"]) == ("7", {"plan": "pro"})
    alias = raw({"userId": "u", "previousId": "anon"}, "alias")
    assert alias["previous_id"] == "anon"


def test_batch_context_and_integrations_merge_into_each_message_and_sent_at_applies() -> None:
    body = {
        "batch": [
            {"type": "track", "userId": "u", "event": "a", "context": {"ip": "1.2.3.4"}, "originalTimestamp": "2024-05-01T13:00:00Z"},
            {"type": "identify", "userId": "u", "traits": {"email": "u@x.io"}, "integrations": {"All": False}},
        ],
        "context": {"library": {"name": "analytics-python"}, "ip": "9.9.9.9"},
        "integrations": {"All": True, "Mixpanel": False},
        "sentAt": "2024-05-01T13:00:05Z",
    }
    events, problems = batch_to_raw_events(body, source="web", received_at=RECEIVED)
    assert problems == []
    assert events[0]["context"] == {"library": {"name": "analytics-python"}, "ip": "1.2.3.4"}
    assert events[1]["integrations"] == {"All": False, "Mixpanel": False}
    assert events[0]["timestamp"] == RECEIVED - 5_000
    assert events[1]["traits"] == {"email": "u@x.io"}


def test_a_batch_with_one_bad_message_is_rejected_whole_naming_each_problem() -> None:
    body = {"batch": [{"type": "track", "userId": "u", "event": "ok"}, {"type": "track", "userId": "u"}, {"type": "page"}]}
    events, problems = batch_to_raw_events(body, source="web", received_at=RECEIVED)
    assert events == []
    assert [(p.index, p.field) for p in problems] == [(1, "event"), (2, "userId")]


def test_a_batch_over_2500_messages_is_rejected() -> None:
    body = {"batch": [{"type": "track", "userId": "u", "event": "e"}] * (MAX_BATCH_EVENTS + 1)}
    events, problems = batch_to_raw_events(body, source="web", received_at=RECEIVED)
    assert events == [] and problems[0].field == "batch" and "2500" in problems[0].reason


def test_a_batch_must_be_a_list() -> None:
    _, problems = batch_to_raw_events({"batch": {"type": "track"}}, source="web", received_at=RECEIVED)
    assert problems[0].field == "batch"
