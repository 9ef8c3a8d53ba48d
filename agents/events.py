"""The payloads that travel on the topics, as the plain dicts the stages work on.

These TypedDicts mirror schemas/*.avsc, which is the source of truth: a record `cdp.ProfileChange` in
`schemas/profile_change.avsc` is the TypedDict `ProfileChange` here, with the same field names (a contract
test checks that), enums as Literal types, `["null", T]` as `T | None`. The codec (topology/codecs.py) turns
bytes into exactly these shapes: JSON fields (logicalType json) are Python objects, times are int epoch
milliseconds UTC. Every key is present in a decoded payload, defaults included.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

JsonObject = dict[str, Any]
"""A free-form JSON object (properties, traits, context, ...)."""

Json = Any
"""Any JSON value: object, array, string, number, boolean (null is spelled None and means "no value")."""

EpochMs = int
"""Milliseconds since 1970-01-01 UTC (Avro timestamp-millis)."""

CallType = Literal["track", "identify", "page", "screen", "group", "alias"]
MergeKind = Literal["merged", "refused", "demoted"]
TraitOrigin = Literal["computed", "identify"]
AudienceTransition = Literal["entered", "exited"]
DeliveryStatus = Literal["succeeded", "retrying", "failed", "dead_lettered", "superseded"]
DefinitionKind = Literal["trait", "audience", "destination"]


class RawEvent(TypedDict):
    """One Tracking API call as accepted by the ingest; cdp.events.accepted and cdp.events.raw, key message_id."""

    message_id: str
    type: CallType
    source: str
    user_id: str | None
    anonymous_id: str | None
    event: str | None
    name: str | None
    category: str | None
    group_id: str | None
    previous_id: str | None
    properties: JsonObject
    traits: JsonObject
    context: JsonObject
    integrations: JsonObject
    timestamp: EpochMs
    original_timestamp: EpochMs | None
    sent_at: EpochMs | None
    received_at: EpochMs
    extra: JsonObject


class IdentityCommand(TypedDict):
    """A message between identity owners (agents/identity/protocol.py); cdp.identity.commands, key: owner key."""

    kind: str
    body: JsonObject


class IdentityState(TypedDict):
    """One record of an identity partition's state; cdp.identity.state (compacted), key: record key."""

    record: JsonObject


class ComputeCommand(TypedDict):
    """A message between compute partitions (agents/compute/engine.py); cdp.compute.commands, key: profile id."""

    kind: str
    body: JsonObject


class ComputeState(TypedDict):
    """One record of a compute partition's state; cdp.compute.state (compacted), key: record key."""

    record: JsonObject


class SyncState(TypedDict):
    """One record of a sync partition's state; cdp.sync.state (compacted), key: record key."""

    record: JsonObject


class DeadLetter(TypedDict):
    """A record a stage gave up on, with the reason and its original bytes; the dead-letter topics."""

    stage: str
    reason: str
    error: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    destination: str | None
    attempts: int
    failed_at: EpochMs
    http_status: int | None
    response: str | None


class Identifier(TypedDict):
    """One identifier of a profile, e.g. {"type": "email", "value": "a@example.com"}."""

    type: str
    value: str


class ResolvedEvent(TypedDict):
    """A RawEvent with its canonical profile; cdp.events.resolved, key profile_id."""

    profile_id: str
    identifiers: list[Identifier]
    event: RawEvent


class MergeLogEntry(TypedDict):
    """A merge, refused merge or demotion decided by identity; cdp.identity.merges, key survivor_profile_id."""

    kind: MergeKind
    survivor_profile_id: str
    merged_profile_id: str | None
    identifiers: list[Identifier]
    message_id: str
    timestamp: EpochMs
    rule: str


class ProfileChange(TypedDict):
    """A trait of a profile changed value; cdp.profile.changes, key profile_id."""

    profile_id: str
    trait: str
    origin: TraitOrigin
    old_value: Json | None
    new_value: Json | None
    timestamp: EpochMs
    message_id: str | None
    seq: int
    user_id: str | None
    anonymous_id: str | None
    email: str | None


class AudienceMembershipChange(TypedDict):
    """A profile entered or exited an audience; cdp.audience.membership, key profile_id."""

    profile_id: str
    audience: str
    transition: AudienceTransition
    timestamp: EpochMs
    seq: int
    reason: str
    message_id: str | None
    user_id: str | None
    anonymous_id: str | None
    email: str | None


class DeliveryOutcome(TypedDict):
    """The outcome of one delivery attempt; cdp.sync.outcomes, key destination."""

    destination: str
    idempotency_key: str
    profile_id: str | None
    status: DeliveryStatus
    http_status: int | None
    attempt: int
    attempted_at: EpochMs
    next_attempt_at: EpochMs | None
    error: str | None


class Definition(TypedDict):
    """A trait, audience or destination definition; compacted cdp.definitions, key '<kind>:<key>'."""

    kind: DefinitionKind
    key: str
    body: JsonObject
    version: int
    updated_at: EpochMs
    deleted: bool

