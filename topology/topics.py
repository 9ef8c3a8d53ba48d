"""Every topic of the product, declared once with its payload schema and its key.

The names are state: renaming one empties it for every consumer, so rename only with a migration. Keys are
plain UTF-8 strings, never JSON-encoded, so a key hashes to the same partition in Faust (aiokafka, murmur2)
and in our confluent-kafka producers (`partitioner=murmur2_random`).
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.config import Settings


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its name under the prefix, the schema of its values, what its key is, and its shape."""

    suffix: str
    schema: str
    key: str
    doc: str
    compacted: bool = False
    partitions: int | None = None  # None: the configured `topics.partitions`

    def name(self, settings: Settings) -> str:
        return settings.topic_name(self.suffix)

    def partition_count(self, settings: Settings) -> int:
        return self.partitions or settings.topics.partitions


EVENTS_ACCEPTED = TopicSpec(
    "events.accepted", "raw_event", "message_id",
    "every call the HTTP ingest acknowledged, duplicates included; same partition count as events.raw",
)  # fmt: skip
EVENTS_RAW = TopicSpec(
    "events.raw", "raw_event", "message_id",
    "deduplicated calls (first sighting of each messageId within the dedup window); the identity stage's input",
)  # fmt: skip
EVENTS_DEAD_LETTER = TopicSpec(
    "events.dead-letter", "dead_letter", "the original key",
    "records a stage could not decode or process, with the reason and the original bytes",
)  # fmt: skip
EVENTS_RESOLVED = TopicSpec("events.resolved", "resolved_event", "profile_id", "events with their canonical profile")
IDENTITY_MERGES = TopicSpec("identity.merges", "merge_log_entry", "survivor profile_id", "the merge log")
IDENTITY_COMMANDS = TopicSpec(
    "identity.commands", "identity_command", "owner key",
    "the identity protocol's messages between owners; same partition count as events.raw",
)  # fmt: skip
IDENTITY_STATE = TopicSpec(
    "identity.state", "identity_state", "record key", "changelog of the identity stores, partition by partition",
    compacted=True,
)  # fmt: skip
COMPUTE_COMMANDS = TopicSpec(
    "compute.commands", "compute_command", "profile_id",
    "the compute stage's messages between partitions (merged state handed over, forwarded events); same partition "
    "count as events.resolved",
)  # fmt: skip
COMPUTE_STATE = TopicSpec(
    "compute.state", "compute_state", "record key", "changelog of the compute stores, partition by partition",
    compacted=True,
)  # fmt: skip
PROFILE_CHANGES = TopicSpec("profile.changes", "profile_change", "profile_id", "trait changes, only on change")
AUDIENCE_MEMBERSHIP = TopicSpec(
    "audience.membership", "audience_membership_change", "profile_id", "audience entered/exited, once per change"
)  # fmt: skip
SYNC_STATE = TopicSpec(
    "sync.state", "sync_state", "record key", "changelog of the sync stores (deliveries queued per destination and "
    "profile), partition by partition", compacted=True,
)  # fmt: skip
SYNC_REDELIVERIES = TopicSpec(
    "sync.redeliveries", "dead_letter", "profile_id",
    "dead letters `cdp sync redeliver` hands back to the sync stage; same partition count as profile.changes",
)  # fmt: skip
SYNC_OUTCOMES = TopicSpec("sync.outcomes", "delivery_outcome", "destination name", "every delivery attempt's outcome")
SYNC_DEAD_LETTER = TopicSpec("sync.dead-letter", "dead_letter", "destination name", "deliveries that failed for good")
DEFINITIONS = TopicSpec(
    "definitions", "definition", "<kind>:<key>", "traits, audiences and destinations as data",
    compacted=True, partitions=1,
)  # fmt: skip

ALL_TOPICS: tuple[TopicSpec, ...] = (
    EVENTS_ACCEPTED, EVENTS_RAW, EVENTS_DEAD_LETTER, EVENTS_RESOLVED, IDENTITY_MERGES, IDENTITY_COMMANDS, IDENTITY_STATE,
    COMPUTE_COMMANDS, COMPUTE_STATE, PROFILE_CHANGES, AUDIENCE_MEMBERSHIP, SYNC_STATE, SYNC_REDELIVERIES, SYNC_OUTCOMES,
    SYNC_DEAD_LETTER,
    DEFINITIONS,
)  # fmt: skip
