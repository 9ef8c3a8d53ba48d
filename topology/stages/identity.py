"""The identity stage: the protocol's owners on a PartitionedStage (topology/runtime/partitioned_stage.py), Kafka between them.

The stage reads cdp.events.raw (key messageId) and cdp.identity.commands (key: the owner's key) with the same
partition count, so partition N of both lands on one worker and shares store N (changelog cdp.identity.state).
Each input goes through the protocol (agents/identity/protocol.py); its commands, resolved events and merge-log
entries are written in the batch's changelog transaction, so they exist exactly when its decisions do (the
stages read read_committed). An event is never resolved twice to different profiles; the protocol's handlers
still take a repeated command idempotently (an outbox of an earlier version, sent again after a crash).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import checks, memo
from agents.errors import UndecodableError
from agents.events import MergeLogEntry, RawEvent
from agents.identity.protocol import IdentityProtocol, Outputs, Resolved, event_command
from agents.identity.records import CLAIMING, DONE, claiming_record, load_saga, saga_record, store_saga
from agents.state import Overlay
from topology.codecs import AvroCodec
from topology.runtime.dead_letters import DeadLetters
from topology.runtime.partitioned_stage import PartitionedStage
from topology.runtime.stage_io import Failure, Output, StageIO
from topology.runtime.stage_commands import ToPartition, command_bytes, command_records, commands_of
from topology.runtime.partitioning import key_partition, partition_for
from topology.runtime.producer import MAX_RECORD_BYTES, AsyncProducer, Record
from topology.spec import StageSpec, Wiring
from topology.topics import EVENTS_DEAD_LETTER, EVENTS_RAW, EVENTS_RESOLVED, IDENTITY_COMMANDS, IDENTITY_MERGES, IDENTITY_STATE
from topology.runtime.input_feed import InputRecord
from topology.runtime.stage import Timer
from topology.runtime.state_store import StateStore, Transaction

log = logging.getLogger(__name__)
CLAIMING_MAX_S = 60.0  # a claiming saga waiting longer is written durably (`persist_waiting`)
HELD_MAX_S = 60.0  # a durable saga holds cdp.events.raw's committed offset (the lag reading) at most this long
# Claiming sagas in memory only (docs/identity.md, "Claiming sagas") cut identity.state from 4.8 to 3.0 records and
# 2.0 to 0.9 KB per event, but are off: a saga lost in a restart is started again under the identity rules of the
# restarted worker, and if those changed (a blocked value, a limit, a priority, a custom path) an identifier the
# lost saga claimed fresh may point at a profile nobody creates, which later events of it wait on for ever. On
# again once the rules a lost saga was started under are kept with the partition's state. Since commands within a
# poll cycle are delivered in memory (topology/runtime/in_cycle.py), a saga that finishes in its cycle never reaches
# the changelog anyway: this would only spare the sagas that outlive their cycle.
CLAIMS_IN_MEMORY = False


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


@dataclass(frozen=True, slots=True)
class Logged:
    """An outbox item: a merge-log entry for cdp.identity.merges."""

    entry: MergeLogEntry


Outgoing = ToPartition | Resolved | Logged  # what the stage's outbox holds


@dataclass
class IdentityCounters:
    """What the stage did since start; served on /metrics."""

    events: int = 0
    resolved: int = 0
    commands: int = 0
    in_cycle: int = 0  # of those, delivered within the poll cycle that sent them (no Kafka record)
    merged: int = 0
    refused: int = 0
    demoted: int = 0
    dead_lettered: int = 0
    failed: int = 0  # commands that failed and were settled (and dead-lettered)
    unsettled: int = 0  # ... whose settling failed too (logged as errors)
    caught_up: int = 0
    rebuilt: int = 0  # claiming sagas started again from their event after a restart
    persisted: int = 0  # claiming sagas written to e| after waiting CLAIMING_MAX_S for their claims


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
        memo_horizon_ms: int | None = None,
        claims_in_memory: bool = False,
    ) -> None:
        """`claims_in_memory`: keep claiming sagas in memory only (off by default; see CLAIMS_IN_MEMORY)."""
        io = StageIO(
            name="identity", inputs={topics.raw: "raw", topics.commands: "commands"}, state_topic=topics.state,
            state_codec=codecs.state, dead_letters=DeadLetters("identity", topics.dead_letter, codecs.dead_letter),
            memos=(DONE,), volatile=(CLAIMING,) if claims_in_memory else (), commands=topics.commands,
        )  # fmt: skip
        super().__init__(io=io, partitions=partitions, store_dir=store_dir, bootstrap=bootstrap, producer=producer,
                         memo_horizon_ms=memo_horizon_ms)  # fmt: skip
        self.topics, self.codecs, self.protocol = topics, codecs, protocol
        self._counters = IdentityCounters()
        self._claiming: dict[int, dict[str, tuple[int, float]]] = defaultdict(dict)  # partition -> c| key -> (its event's raw offset, noted at)

    @property
    def counters(self) -> IdentityCounters:
        self._counters.dead_lettered, self._counters.caught_up = self.dead_lettered, self.caught_up
        return self._counters

    def apply(self, mark: str, message: Any, tx: Transaction, out: Output) -> None:
        """One input through the protocol. An event that can't be resolved raises (the stage dead-letters it); a
        record of cdp.identity.commands holds one command or a `batch` of several for one partition, each applied
        on its own: one that fails is settled by the protocol and dead-lettered alone (docs/identity.md)."""
        outputs = Outputs()
        if mark == "raw":
            self._counters.events += 1
            event = self.decode_event(message.value)
            self.protocol.handle(event_command(event), tx, outputs)
            self._note_claiming(message, event, tx)
        else:
            for command in self.decode_commands(message.value):
                self._counters.commands += 1
                self.protocol.apply(command, tx, outputs)
        self._settled(outputs, message.key, out)

    COMMANDS_SETTLE_THEMSELVES = True  # the protocol's `apply`: all or nothing, sizes checked, never raises

    def apply_command(self, command: Any, tx: Transaction, out: Output) -> None:
        """A command delivered within the poll cycle (topology/runtime/in_cycle.py), as one read from the topic."""
        self._counters.commands += 1
        self._counters.in_cycle += 1
        outputs = Outputs()
        self.protocol.apply(command, tx, outputs, trusted=True)
        self._settled(outputs, None, out)

    def command_value(self, command: Any) -> bytes | None:
        return command_bytes(self.codecs.command, command)

    def _settled(self, outputs: Outputs, key: bytes | None, out: Output) -> None:
        """What one input left: its failed commands (settled) to dead-letter, the rest to send."""
        for command, error in outputs.failed:
            out.failed.append(Failure(error, key, command_bytes(self.codecs.command, command)))
        for command, error in outputs.unsettled:
            log.error("identity: a failed %s command could not be settled either (%r); its saga may wait: %.300s",
                      command.get("kind") if isinstance(command, dict) else command, error, command)  # fmt: skip
        self._counters.failed += len(outputs.failed)
        self._counters.unsettled += len(outputs.unsettled)
        self._emit(outputs, out)

    def _emit(self, outputs: Outputs, out: Output) -> None:
        out.outbox.extend(ToPartition(key, command) for key, command in outputs.commands)
        out.outbox.extend(outputs.resolved)
        out.outbox.extend(Logged(entry) for entry in outputs.log)

    # -- claiming sagas: in memory only, rebuilt from cdp.events.raw -------------------------------------------

    def _note_claiming(self, message: InputRecord, event: RawEvent, tx: Transaction) -> None:
        """Remember where the event of a saga this record started is: to read it again if the saga is lost (kept in
        memory), and to count the event in the pipeline's lag until it is resolved (`held`)."""
        key = claiming_record(event["message_id"])
        if tx.changes.get(key) is not None:
            self._claiming[message.partition][key] = (message.offset, time.monotonic())

    def reapply(self, mark: str, message: InputRecord, tx: Transaction, out: Output) -> bool:
        """An event read again below the raw watermark (the partition restarted from its oldest claiming saga):
        start its saga again if it was lost claiming, else nothing (finished, or durable at e|)."""
        if mark != "raw" or message.key is None or key_partition(message.key, self.partitions) != message.partition:
            return False
        try:
            event = self.decode_event(message.value)
        except Exception:  # dead-lettered when it was first read
            return False
        message_id = event["message_id"]
        if load_saga(tx, message_id) is not None or memo.seen(tx, DONE, event, message_id)[1] is not None:
            return False
        attempt, outputs = Overlay(tx), Outputs()
        try:
            self.protocol.handle(event_command(event), attempt, outputs)
        except Exception:  # dead-lettered when it was first read
            return False
        attempt.commit()
        self._note_claiming(message, event, tx)
        self._emit(outputs, out)
        self._counters.rebuilt += 1
        return True

    def committed(self, partition: int, store: StateStore) -> None:
        """Commit cdp.events.raw no further than the oldest unfinished saga's event: a restart must read a claiming
        one's event again, and the ingest's backpressure counts an event on cdp.events.raw until it is resolved
        (topology/runtime/pipeline_lag.py) — a saga's event is on no topic while its commands travel."""
        if self.feed is not None:
            self.feed.hold(self.topics.raw, partition, self.held(partition, store))

    def held(self, partition: int, store: StateStore) -> int | None:
        """The raw offset of the oldest unfinished saga's event this worker started (None: none). A saga kept in
        memory is held until it finishes or is durable; a durable one for at most HELD_MAX_S (a saga waiting on a
        lost answer must not hold the lag reading, and so the ingest, for ever), and not across a restart."""
        claiming, now = self._claiming[partition], time.monotonic()
        for key, (offset, at) in list(claiming.items()):  # in the order of their events' offsets
            if store.in_memory(key):
                return offset
            if now - at < HELD_MAX_S and (store.raw(key) is not None or store.raw(saga_record(key[len(CLAIMING):])) is not None):
                return offset
            del claiming[key]  # finished (or lost with a store that was closed, or waiting too long)
        return None

    def timers(self) -> list[Timer]:
        async def persist() -> None:
            await self.persist_waiting(CLAIMING_MAX_S)

        return [*super().timers(), *([(CLAIMING_MAX_S / 4, persist)] if self.io.volatile else [])]

    async def persist_waiting(self, older_than_s: float) -> None:
        """Write claiming sagas waiting longer than `older_than_s` to `e|`, durable: one whose answer is lost (a
        stalled partition, a dead-lettered answer) would otherwise hold cdp.events.raw's committed offset back
        for ever — and the ingest's lag reading with it. Never raises (a timer calls it)."""
        now = time.monotonic()
        for partition in sorted(self.owned()):
            waiting = [key for key, (_, at) in self._claiming[partition].items() if now - at > older_than_s]
            if not waiting:
                continue
            try:
                await self.run_in(partition, lambda tx, out, keys=waiting: self._persist(tx, keys))
                store = self.readable_store(partition)
                if store is not None:
                    self.committed(partition, store)
            except Exception:
                log.exception("identity: partition %d: persisting waiting sagas failed; trying again later", partition)

    def _persist(self, tx: Transaction, keys: Sequence[str]) -> None:
        for key in keys:
            saga = tx.get(key)
            if saga is not None:
                tx.delete(key)
                saga["durable"] = True
                store_saga(tx, saga)
                self._counters.persisted += 1

    def decode_event(self, value: bytes | None) -> RawEvent:
        """The stage's decode step for cdp.events.raw: a RawEvent as the ingest writes it, or a BadEventError."""
        if value is None:
            raise UndecodableError("empty record (no value)")
        event = self.codecs.raw.decode(value)
        checks.raw_event(event)
        return event  # type: ignore[return-value]

    def decode_commands(self, value: bytes | None) -> list[Any]:
        """The stage's decode step for cdp.identity.commands: the record's commands (each checked when applied)."""
        if value is None:
            raise UndecodableError("empty record (no value)")
        return commands_of(self.codecs.command.decode(value)["body"])

    def outbox_records(self, items: Sequence[Outgoing]) -> list[Record]:
        records: list[Record] = []
        commands: list[ToPartition] = []
        for item in items:
            if isinstance(item, ToPartition):
                commands.append(item)
            elif isinstance(item, Resolved):
                value = self.codecs.resolved.encode({"profile_id": item.profile_id, "identifiers": item.identifiers, "event": item.event})
                records.append(Record(self.topics.resolved, item.profile_id.encode(), value))
            else:
                records.append(Record(self.topics.merges, item.entry["survivor_profile_id"].encode(), self.codecs.merges.encode(item.entry)))
        return records + command_records(commands, self.topics.commands, self.codecs.command, self.partitions)

    def stored_item(self, item: Any) -> Outgoing:
        """["c", key, command], ["r", profile, identifiers, event] or ["l", entry], as the outbox kept them."""
        if item[0] == "c":
            return ToPartition(item[1], item[2])
        if item[0] == "r":
            return Resolved(item[1], item[2], item[3])
        return Logged(item[1])

    def sent(self, items: Sequence[Outgoing]) -> None:
        for item in items:
            if isinstance(item, Resolved):
                self._counters.resolved += 1
            elif isinstance(item, Logged):
                setattr(self._counters, item.entry["kind"], getattr(self._counters, item.entry["kind"]) + 1)


SPEC = StageSpec(
    "identity", "cdp worker (stage 'identity', read in batches beneath Faust)", (EVENTS_RAW, IDENTITY_COMMANDS),
    (EVENTS_RESOLVED, IDENTITY_MERGES, IDENTITY_COMMANDS, IDENTITY_STATE, EVENTS_DEAD_LETTER),
    ("identifiers, profiles, sagas: RocksDB per partition, changelog = identity.state",),
    "resolves every identifier to one profile; owners per identifier/profile/event talk over identity.commands",
    (EVENTS_RAW, IDENTITY_COMMANDS, IDENTITY_STATE),
)  # fmt: skip


def wire(w: Wiring) -> IdentityStage:
    """events.raw and identity.commands (co-partitioned) into one store per partition, by the configured rules."""
    settings, codecs = w.settings, w.codecs
    topics = IdentityTopics(
        raw=EVENTS_RAW.name(settings), commands=IDENTITY_COMMANDS.name(settings), state=IDENTITY_STATE.name(settings),
        resolved=EVENTS_RESOLVED.name(settings), merges=IDENTITY_MERGES.name(settings),
        dead_letter=EVENTS_DEAD_LETTER.name(settings),
    )  # fmt: skip
    return IdentityStage(
        topics=topics,
        codecs=IdentityCodecs(
            raw=codecs.for_topic(EVENTS_RAW), command=codecs.for_topic(IDENTITY_COMMANDS), state=codecs.for_topic(IDENTITY_STATE),
            resolved=codecs.for_topic(EVENTS_RESOLVED), merges=codecs.for_topic(IDENTITY_MERGES),
            dead_letter=codecs.for_topic(EVENTS_DEAD_LETTER),
        ),  # fmt: skip
        protocol=IdentityProtocol(settings.identity, max_record_bytes=MAX_RECORD_BYTES),
        partitions=IDENTITY_COMMANDS.partition_count(settings),
        store_dir=w.stage_dir("identity"),
        memo_horizon_ms=settings.topics.memo_horizon,
        claims_in_memory=CLAIMS_IN_MEMORY,
        bootstrap=settings.kafka_bootstrap,
        producer=w.producer,
    )


__all__ = ["SPEC", "IdentityCodecs", "IdentityStage", "IdentityTopics", "Resolved", "partition_for", "wire"]
