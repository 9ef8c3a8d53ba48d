"""The identity stage: the protocol's owners on a PartitionedStage (topology/partitioned_stage.py), Kafka between them.

One agent reads cdp.events.raw (key messageId) and cdp.identity.commands (key: the owner's key) with the same
partition count, so partition N of both lands on one worker and shares store N (changelog cdp.identity.state).
Each input goes through the protocol (agents/identity/protocol.py); its commands, resolved events and merge-log
entries leave through the outbox once the batch's decisions are in the changelog. A re-sent outbox repeats
them identically, which the protocol's handlers take idempotently and compute dedups by messageId. So an event
is never resolved twice to different profiles: its decision is in the changelog before anything leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.errors import InvalidMessage, UndecodableError
from agents.identity.protocol import IdentityProtocol, Outputs, Resolved, event_command
from topology.codecs import AvroCodec
from topology.partitioned_stage import BATCH, Output, PartitionedStage, StageIO, command_records, partition_for
from topology.producer import AsyncProducer, Record
from topology.state_store import Transaction

@dataclass(frozen=True)
class IdentityTopics:
    raw: str
    commands: str
    state: str
    resolved: str
    merges: str
    dead_letter: str


@dataclass(frozen=True)
class IdentityCodecs:
    raw: AvroCodec
    command: AvroCodec
    state: AvroCodec
    resolved: AvroCodec
    merges: AvroCodec
    dead_letter: AvroCodec


@dataclass
class IdentityCounters:
    """What the stage did since start; served on /metrics."""

    events: int = 0
    resolved: int = 0
    commands: int = 0
    merged: int = 0
    refused: int = 0
    demoted: int = 0
    dead_lettered: int = 0
    caught_up: int = 0


class IdentityStage(PartitionedStage):
    """One instance per worker process; owns a store per assigned partition."""

    def __init__(
        self,
        *,
        topics: IdentityTopics,
        codecs: IdentityCodecs,
        protocol: IdentityProtocol,
        partitions: int,
        store_dir: Path,
        bootstrap: str,
        producer: Callable[[], AsyncProducer],
        batch_size: int = 2_000,
        batch_within: float = 0.02,
    ) -> None:
        io = StageIO(
            name="identity", inputs={topics.raw: "raw", topics.commands: "commands"}, state_topic=topics.state,
            state_codec=codecs.state, dead_letter_topic=topics.dead_letter, dead_letter_codec=codecs.dead_letter,
        )  # fmt: skip
        super().__init__(io=io, partitions=partitions, store_dir=store_dir, bootstrap=bootstrap, producer=producer,
                         batch_size=batch_size, batch_within=batch_within)  # fmt: skip
        self.topics, self.codecs, self.protocol = topics, codecs, protocol
        self._counters = IdentityCounters()

    @property
    def counters(self) -> IdentityCounters:
        self._counters.dead_lettered, self._counters.caught_up = self.dead_lettered, self.caught_up
        return self._counters

    def apply(self, mark: str, message: Any, tx: Transaction, out: Output) -> None:
        """One input through the protocol; each command in it all or nothing (a failing one leaves no half-made
        change). A record of cdp.identity.commands holds one command or a `batch` of several for one partition."""
        value = message.value
        if mark == "raw":
            self._counters.events += 1
        else:
            self._counters.commands += 1
        if value is None:
            raise UndecodableError("empty record (no value)")
        if mark == "raw":
            commands = [event_command(self.codecs.raw.decode(value))]  # type: ignore[arg-type]
        else:
            body = self.codecs.command.decode(value)["body"]
            commands = body["commands"] if body.get("kind") == BATCH else [body]
        for command in commands:
            attempt, attempt_out = Transaction(tx), Outputs()  # type: ignore[arg-type]
            try:
                self.protocol.handle(command, attempt, attempt_out)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                if mark == "raw":  # an event the protocol can't take (e.g. a field of the wrong type): dead-letter it
                    raise InvalidMessage(f"the identity stage can't resolve this event: {exc!r}") from exc
                raise  # a command between owners is ours: a bug must stall the partition, not lose a saga
            tx.changes.update(attempt.changes)
            out.outbox.extend(["c", key, command] for key, command in attempt_out.commands)
            out.outbox.extend(["r", r.profile_id, r.identifiers, r.event] for r in attempt_out.resolved)
            out.outbox.extend(["l", entry] for entry in attempt_out.log)

    def outbox_records(self, items: Sequence[Any]) -> list[Record]:
        records: list[Record] = []
        for item in items:
            if item[0] == "r":
                value = self.codecs.resolved.encode({"profile_id": item[1], "identifiers": item[2], "event": item[3]})
                records.append(Record(self.topics.resolved, item[1].encode(), value))
            elif item[0] == "l":
                records.append(Record(self.topics.merges, item[1]["survivor_profile_id"].encode(), self.codecs.merges.encode(item[1])))
        commands = [(item[1], item[2]) for item in items if item[0] == "c"]
        return records + command_records(commands, self.topics.commands, self.codecs.command, self.partitions)

    def sent(self, items: Sequence[Any]) -> None:
        for item in items:
            if item[0] == "r":
                self._counters.resolved += 1
            elif item[0] == "l":
                setattr(self._counters, item[1]["kind"], getattr(self._counters, item[1]["kind"]) + 1)


__all__ = ["IdentityStage", "IdentityTopics", "IdentityCodecs", "Resolved", "partition_for"]
