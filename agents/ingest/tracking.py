"""Segment Tracking API messages -> RawEvent payloads, with Segment's rules and limits.

Reads:  one JSON message (single-call endpoints) or a batch body (`/v1/batch`, `/v1/import`).
Yields: RawEvent dicts (see schemas/raw_event.avsc), or every problem found as (index, field, reason).
State:  none; the caller passes the receive time, the source and the messageId generator, so this is pure.
Errors: InvalidMessage for one bad message; a whole request is rejected when any of its messages is bad.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from agents.checks import json_depth
from agents.errors import InvalidMessage
from agents.events import RawEvent

CALL_TYPES = ("track", "identify", "page", "screen", "group", "alias")
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2_500
MAX_MESSAGE_ID_CHARS = 100
MAX_JSON_DEPTH = 64  # levels of objects and arrays in a message, itself included; Segment's payloads use a handful
_OBJECT_FIELDS = {"properties": "properties", "traits": "traits", "context": "context", "integrations": "integrations"}
_KNOWN_FIELDS = {
    "type", "userId", "anonymousId", "messageId", "event", "name", "category", "groupId", "previousId",
    "properties", "traits", "context", "integrations", "timestamp", "originalTimestamp", "sentAt",
    "receivedAt", "writeKey",
}  # fmt: skip


@dataclass(frozen=True)
class MessageProblem:
    """What is wrong with one message of a request; `index` is None for the request as a whole."""

    index: int | None
    field: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class Envelope:
    """What a batch body contributes to each of its messages (Segment merges these into every message)."""

    context: Mapping[str, Any]
    integrations: Mapping[str, Any]
    sent_at: int | None


NO_ENVELOPE = Envelope(context={}, integrations={}, sent_at=None)


def new_message_id() -> str:
    """A messageId for a message that came without one (Segment does the same)."""
    return f"cdp-{uuid.uuid4()}"


def parse_time_ms(value: Any, field: str) -> int:
    """Epoch milliseconds of an ISO-8601 time; a time without a zone is taken as UTC, as Segment does."""
    if not isinstance(value, str):
        raise InvalidMessage(field, f"must be an ISO-8601 date string, not {type(value).__name__}")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidMessage(field, f"{value!r} is not an ISO-8601 date (e.g. 2024-05-01T12:00:00.000Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    ms = int(moment.timestamp() * 1000)
    if ms < 0:
        raise InvalidMessage(field, f"{value!r} is before 1970-01-01, which Segment does not accept")
    return ms


def envelope_of(body: Mapping[str, Any]) -> Envelope:
    """The batch-level context, integrations and sentAt of a batch body."""
    _check_depth({"context": body.get("context"), "integrations": body.get("integrations")}, MAX_JSON_DEPTH)
    context = _object(body, "context")
    integrations = _object(body, "integrations")
    sent_at = parse_time_ms(body["sentAt"], "sentAt") if body.get("sentAt") is not None else None
    return Envelope(context=context, integrations=integrations, sent_at=sent_at)


def to_raw_event(
    message: Any,
    *,
    call_type: str | None,
    source: str,
    received_at: int,
    envelope: Envelope = NO_ENVELOPE,
    make_id: Callable[[], str] = new_message_id,
    client_ip: str | None = None,
) -> RawEvent:
    """The RawEvent for one message; `call_type` is fixed by the endpoint, None for batch items.

    `client_ip` (the request's address) fills `context.ip` when the message has none, as Segment's servers do.
    """
    if not isinstance(message, dict):
        raise InvalidMessage("message", f"must be a JSON object, not {type(message).__name__}")
    _check_depth(message, MAX_JSON_DEPTH)
    size = len(orjson.dumps(message))
    if size > MAX_EVENT_BYTES:
        raise InvalidMessage("message", f"is {size} bytes; Segment's limit is {MAX_EVENT_BYTES} bytes (32 KB) per event")
    kind = _call_type(message, call_type)
    user_id = _identifier(message, "userId")
    anonymous_id = _identifier(message, "anonymousId")
    if user_id is None and anonymous_id is None:
        raise InvalidMessage("userId", "userId or anonymousId is required")
    event = _text(message, "event")
    if kind == "track" and not event:
        raise InvalidMessage("event", "a track call needs a non-empty event name")
    group_id = _identifier(message, "groupId")
    if kind == "group" and group_id is None:
        raise InvalidMessage("groupId", "a group call needs a groupId")
    previous_id = _identifier(message, "previousId")
    if kind == "alias" and (previous_id is None or user_id is None):
        raise InvalidMessage("previousId" if previous_id is None else "userId", "an alias call needs previousId and userId")
    objects = {name: _object(message, key) for key, name in _OBJECT_FIELDS.items()}
    timestamp, original, sent_at = _times(message, envelope, received_at)
    context = {**envelope.context, **objects["context"]}
    if client_ip and not context.get("ip"):
        context["ip"] = client_ip
    return RawEvent(
        message_id=_message_id(message, make_id),
        type=kind,
        source=source,
        user_id=user_id,
        anonymous_id=anonymous_id,
        event=event if kind == "track" else None,
        name=_text(message, "name") if kind in ("page", "screen") else None,
        category=_text(message, "category") if kind == "page" else None,
        group_id=group_id if kind == "group" else None,
        previous_id=previous_id if kind == "alias" else None,
        properties=objects["properties"],
        traits=objects["traits"],
        context=context,
        integrations={**envelope.integrations, **objects["integrations"]},
        timestamp=timestamp,
        original_timestamp=original,
        sent_at=sent_at,
        received_at=received_at,
        extra={key: value for key, value in message.items() if key not in _KNOWN_FIELDS},
    )


def batch_to_raw_events(
    body: Any, *, source: str, received_at: int, make_id: Callable[[], str] = new_message_id, client_ip: str | None = None
) -> tuple[list[RawEvent], list[MessageProblem]]:
    """Every message of a batch body, or every problem in it: a batch is accepted whole or not at all."""
    if not isinstance(body, dict):
        return [], [MessageProblem(None, "body", f"must be a JSON object, not {type(body).__name__}")]
    messages = body.get("batch")
    if not isinstance(messages, list):
        return [], [MessageProblem(None, "batch", "must be an array of messages")]
    if len(messages) > MAX_BATCH_EVENTS:
        reason = f"has {len(messages)} messages; Segment's limit is {MAX_BATCH_EVENTS} per batch"
        return [], [MessageProblem(None, "batch", reason)]
    try:
        envelope = envelope_of(body)
    except InvalidMessage as exc:
        return [], [MessageProblem(None, exc.field, exc.reason)]
    events: list[RawEvent] = []
    problems: list[MessageProblem] = []
    for index, message in enumerate(messages):
        try:
            events.append(
                to_raw_event(
                    message, call_type=None, source=source, received_at=received_at, envelope=envelope,
                    make_id=make_id, client_ip=client_ip,
                )  # fmt: skip
            )
        except InvalidMessage as exc:
            problems.append(MessageProblem(index, exc.field, exc.reason))
    return (events, []) if not problems else ([], problems)


def _check_depth(message: Mapping[str, Any], limit: int) -> None:
    """InvalidMessage naming the first field that nests deeper than `limit` levels (the message itself is one)."""
    if json_depth(message, limit) <= limit:
        return
    field = next(key for key, value in message.items() if json_depth(value, limit - 1) > limit - 1)
    raise InvalidMessage(str(field), f"nests deeper than {limit} levels of objects and arrays (counting the message); "
                                     f"that is the limit")  # fmt: skip


def _call_type(message: Mapping[str, Any], call_type: str | None) -> str:
    declared = message.get("type")
    if call_type is not None:
        if declared is not None and declared != call_type:
            raise InvalidMessage("type", f"is {declared!r} but the endpoint is /v1/{call_type}")
        return call_type
    if declared not in CALL_TYPES:
        raise InvalidMessage("type", f"must be one of {', '.join(CALL_TYPES)}, not {declared!r}")
    return str(declared)


def _identifier(message: Mapping[str, Any], field: str) -> str | None:
    """An id as a string; numbers are accepted and stringified as Segment's libraries do."""
    value = message.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidMessage(field, f"must be a string, not {type(value).__name__}")
    return str(value)


def _text(message: Mapping[str, Any], field: str) -> str | None:
    value = message.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessage(field, f"must be a string, not {type(value).__name__}")
    return value


def _object(message: Mapping[str, Any], field: str) -> dict[str, Any]:
    value = message.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMessage(field, f"must be a JSON object, not {type(value).__name__}")
    return value


def _message_id(message: Mapping[str, Any], make_id: Callable[[], str]) -> str:
    value = message.get("messageId")
    if value is None or value == "":
        return make_id()
    if not isinstance(value, str):
        raise InvalidMessage("messageId", f"must be a string, not {type(value).__name__}")
    if len(value) > MAX_MESSAGE_ID_CHARS:
        raise InvalidMessage("messageId", f"is {len(value)} characters; the limit is {MAX_MESSAGE_ID_CHARS}")
    return value


def _times(message: Mapping[str, Any], envelope: Envelope, received_at: int) -> tuple[int, int | None, int | None]:
    """(timestamp, original_timestamp, sent_at) with Segment's clock-skew correction.

    The client's own time of the call is its originalTimestamp, or the timestamp it sent; with the client's
    sentAt we know how far its clock is off and move the call onto the server's clock:
    timestamp = receivedAt - (sentAt - originalTimestamp).
    """
    explicit = parse_time_ms(message["timestamp"], "timestamp") if message.get("timestamp") is not None else None
    original = (
        parse_time_ms(message["originalTimestamp"], "originalTimestamp")
        if message.get("originalTimestamp") is not None
        else explicit
    )
    sent_at = parse_time_ms(message["sentAt"], "sentAt") if message.get("sentAt") is not None else envelope.sent_at
    if original is not None and sent_at is not None:
        return received_at - (sent_at - original), original, sent_at
    if original is not None:
        return original, original, sent_at
    return received_at, None, sent_at
