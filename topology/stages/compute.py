"""The compute stage: the engine (agents/compute/engine.py) on a PartitionedStage, with a clock for sliding windows.

The stage reads cdp.events.resolved, cdp.identity.merges (both keyed by profile id) and cdp.compute.commands
with the same partition count, so everything about a profile meets at one partition and its store (changelog
cdp.compute.state). Trait and membership changes are written *inside* the batch's changelog transaction:
read_committed consumers (sync, tests) see each change exactly once, with the profile's sequence number.
Commands to other partitions (merged state handed over, forwarded events) go in the same transaction.

`tick` runs on a timer: each owned partition re-evaluates the profiles whose oldest window bucket has left its
window (the engine's due index), so a member leaves an audience on the clock, without any new event.

Backfill: when a partition first meets a definition version (a generation, agents/compute/generations.py) it
records a run: the state ids to compute and `until`, the partition's live position in cdp.events.resolved then.
Live processing counts every later event for them; a background task per partition re-reads the partition from
its start up to `until` in chunks, each applied like a batch (under the partition's lock, in one transaction
with its progress), counting for the new state ids only the copy of each messageId that live processing counted
(its offset is kept with the messageId), so nothing is counted twice or missed, and a crash resumes from the
last chunk. Then it settles every profile of the partition: values and memberships are emitted once complete.
The runs' bookkeeping (the `b|` record: generations met, phases, progress) is agents/compute/backfill.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from agents import memo
from agents.compute.commands import check_resolved
from agents.compute.backfill import Backfills, DefinitionsBehind
from agents.compute.engine import DUE, PROFILES, SEEN_MEMOS, Cause, Changes, ComputeEngine
from agents.compute.generations import Live
from agents.errors import UndecodableError
from agents.events import ResolvedEvent
from agents.state import Overlay
from topology.codecs import AvroCodec
from topology.runtime.dead_letters import DeadLetters
from topology.runtime.input_feed import InputFeed
from topology.runtime.stage import Timer
from topology.spec import StageSpec, Wiring
from topology.topics import (
    AUDIENCE_MEMBERSHIP, COMPUTE_COMMANDS, COMPUTE_STATE, DEFINITIONS, EVENTS_DEAD_LETTER, EVENTS_RESOLVED,
    IDENTITY_MERGES, PROFILE_CHANGES,
)  # fmt: skip
from topology.runtime.partition_reader import catch_up_consumer, read_range
from topology.runtime.partitioned_stage import PartitionedStage
from topology.runtime.stage_io import Failure, Output, StageIO
from topology.runtime.stage_commands import ToPartition, command_bytes, command_records, commands_of
from topology.runtime.producer import MAX_RECORD_BYTES, AsyncProducer, Record
from topology.runtime.stalls import RETRIED
from topology.runtime.state_store import StateStore, Transaction

log = logging.getLogger(__name__)
TICK_S = 5.0  # how often windows are checked: exits happen within TICK_S + one bucket (window / 60) of due
DUE_PER_TICK = 5_000  # profiles re-evaluated per partition per tick (the rest wait for the next one)
BACKFILL_CHUNK = 2_000  # past events per backfill transaction
SETTLE_CHUNK = 500  # profiles settled per transaction once a backfill has read its history


@dataclass(frozen=True)
class ComputeTopics:
    resolved: str
    merges: str
    commands: str
    state: str
    changes: str
    membership: str
    dead_letter: str


@dataclass(frozen=True)
class ComputeCodecs:
    resolved: AvroCodec
    merges: AvroCodec
    command: AvroCodec
    state: AvroCodec
    changes: AvroCodec
    membership: AvroCodec
    dead_letter: AvroCodec


@dataclass
class ComputeCounters:
    """What the stage did since start; served on /metrics."""

    events: int = 0
    duplicates: int = 0
    merges: int = 0
    commands: int = 0
    in_cycle: int = 0  # of those, delivered within the poll cycle that sent them (no Kafka record)
    trait_changes: int = 0
    membership_changes: int = 0
    expired: int = 0
    backfill_read: int = 0
    backfill_counted: int = 0
    dead_lettered: int = 0
    failed: int = 0  # commands that failed and were settled (dead-lettered), profiles a timer or backfill skipped
    caught_up: int = 0


class ComputeStage(PartitionedStage):
    def __init__(
        self,
        *,
        topics: ComputeTopics,
        codecs: ComputeCodecs,
        live: Callable[[], Live],
        live_ready: Callable[[], bool] = lambda: True,
        definitions_exist: Callable[[int], bool] = lambda position: True,
        partitions: int,
        store_dir: Path,
        bootstrap: str,
        producer: Callable[[], AsyncProducer],
        clock: Callable[[], float] = time.time,
        memo_horizon_ms: int | None = None,
    ) -> None:
        io = StageIO(
            name="compute", inputs={topics.resolved: "resolved", topics.merges: "merges", topics.commands: "commands"},
            state_topic=topics.state, state_codec=codecs.state,
            dead_letters=DeadLetters("compute", topics.dead_letter, codecs.dead_letter),
            memos=SEEN_MEMOS, commands=topics.commands,
        )  # fmt: skip
        super().__init__(io=io, partitions=partitions, store_dir=store_dir, bootstrap=bootstrap, producer=producer,
                         memo_horizon_ms=memo_horizon_ms)  # fmt: skip
        self.live, self.live_ready = live, live_ready
        self._snapshot = live()  # the definitions of the batch being applied (see prepare)
        self.topics, self.codecs, self.clock = topics, codecs, clock
        self.engine = ComputeEngine(lambda: self._snapshot, definitions_exist, MAX_RECORD_BYTES)
        self._counters = ComputeCounters()
        self._backfills: dict[int, asyncio.Task[None]] = {}
        self._woken: dict[int, bool] = {}

    @property
    def counters(self) -> ComputeCounters:
        self._counters.dead_lettered, self._counters.caught_up = self.dead_lettered, self.caught_up
        return self._counters

    def memo_clock_ms(self) -> int:
        return self.now()

    def timers(self) -> list[Timer]:
        return [(TICK_S, self.tick), *super().timers()]  # tick never raises: an exception would kill the worker

    def now(self) -> int:
        return int(self.clock() * 1000)

    def apply(self, mark: str, message: Any, tx: Transaction, out: Output) -> None:
        """One input: an event or a merge that can't be taken raises (the stage dead-letters it); the commands of a
        record are applied one by one, and one that fails is settled by the engine and dead-lettered alone."""
        changes, now = Changes(), self.now()
        if mark == "resolved":
            self._counters.events += 1
            resolved = self.decode_resolved(message.value)
            counted = self.engine.event(resolved["profile_id"], resolved["event"], tx, changes, now, message.offset,
                                        resolved.get("identifiers") or ())  # fmt: skip
            self._counters.duplicates += not counted
        elif mark == "merges":
            self._counters.merges += 1
            self.engine.merge(self._decode(self.codecs.merges, message.value), changes)
        else:
            for command in self.decode_commands(message.value):
                self._counters.commands += 1
                self.engine.apply(command, tx, changes, now)  # DefinitionsBehind (a Waiting) retries the batch
            for command, error in changes.failed:
                out.failed.append(Failure(error, message.key, command_bytes(self.codecs.command, command)))
            self._counters.failed += len(changes.failed)
        self._emit(changes, out)

    def apply_command(self, command: Any, tx: Transaction, out: Output) -> None:
        """A command delivered within the poll cycle (topology/runtime/in_cycle.py), as one read from the topic."""
        changes = Changes()
        self._counters.commands += 1
        self._counters.in_cycle += 1
        self.engine.apply(command, tx, changes, self.now())  # DefinitionsBehind (a Waiting): it goes through Kafka
        for failed, error in changes.failed:
            out.failed.append(Failure(error, None, command_bytes(self.codecs.command, failed)))
        self._counters.failed += len(changes.failed)
        self._emit(changes, out)

    def command_value(self, command: Any) -> bytes | None:
        return command_bytes(self.codecs.command, command)

    def decode_resolved(self, value: bytes | None) -> ResolvedEvent:
        """The stage's decode step for cdp.events.resolved: a ResolvedEvent whose event is a RawEvent as the ingest
        writes it, or a BadEventError."""
        resolved = self._decode(self.codecs.resolved, value)
        check_resolved(resolved)
        return resolved  # type: ignore[return-value]

    def decode_commands(self, value: bytes | None) -> list[Any]:
        """The stage's decode step for cdp.compute.commands: the record's commands (each checked when applied)."""
        return commands_of(self._decode(self.codecs.command, value)["body"])

    @staticmethod
    def _decode(codec: AvroCodec, value: bytes | None) -> dict[str, Any]:
        if value is None:
            raise UndecodableError("empty record (no value)")
        return codec.decode(value)

    def _emit(self, changes: Changes, out: Output) -> None:
        out.outbox.extend(ToPartition(key, command) for key, command in changes.commands)
        for change in changes.traits:
            out.atomic.append(Record(self.topics.changes, change["profile_id"].encode(), self.codecs.changes.encode(change)))
        for change in changes.memberships:
            out.atomic.append(Record(self.topics.membership, change["profile_id"].encode(), self.codecs.membership.encode(change)))
        self._counters.trait_changes += len(changes.traits)
        self._counters.membership_changes += len(changes.memberships)

    def outbox_records(self, items: Sequence[ToPartition]) -> list[Record]:
        return command_records(items, self.topics.commands, self.codecs.command, self.partitions)

    def stored_item(self, item: Any) -> ToPartition:
        key, command = item  # [key, command], as the outbox kept it
        return ToPartition(key, command)

    async def run(self, feed: InputFeed) -> None:
        """Not before the definitions feed has read the whole topic: a definition missing for a moment would look
        new when it comes back, and be backfilled over events already counted for it."""
        while not self.live_ready():
            await asyncio.sleep(0.1)
        await super().run(feed)

    async def tick(self) -> None:
        """Re-evaluate every owned partition's profiles whose window slid; never raises (a timer must not die)."""
        if not self.live_ready():
            return
        for partition in sorted(self.owned()):
            try:
                await self.run_in(partition, self._expire_due)
                store = self.readable_store(partition)
                if store is not None and Backfills.load(store).runs:
                    self._start_backfill(partition)  # a run recorded while the last task was finishing
            except Exception:
                log.exception("compute: partition %d: the window clock failed; trying again next tick", partition)

    def _expire_due(self, tx: Transaction, out: Output) -> None:
        now, changes, done = self.now(), Changes(), 0
        for key in tx.store.keys(DUE):
            _, at, profile_id = key.split("|", 2)
            if not at.isdigit():  # not a time this stage writes (event times are taken within [0, now])
                tx.delete(key)
                continue
            if int(at) > now or done >= DUE_PER_TICK:
                break
            expire = lambda state, step, profile_id=profile_id, at=int(at): self.engine.expire(profile_id, at, state, step, now)  # noqa: E731
            changes.extend(self._guarded(tx, key, f"expiring the windows of {profile_id}", expire) or Changes())
            done += 1
        self._counters.expired += done
        self._emit(changes, out)

    def _guarded(self, tx: Transaction, drop: str | None, what: str,
                 step: Callable[[Overlay, Changes], None]) -> Changes | None:  # fmt: skip
        """One profile's step of a timer or backfill, all or nothing; what it changed (None: it failed). These have
        no input record to dead-letter, so a profile whose step fails is logged, counted and skipped (`drop`, its due
        key, is deleted so the clock does not pick it again): the partition goes on."""
        attempt, changes = Overlay(tx), Changes()
        try:
            step(attempt, changes)
            self.engine.fits(attempt, changes)
        except Exception:
            log.exception("compute: %s failed; skipped", what)
            self._counters.failed += 1
            if drop is not None:
                tx.delete(drop)
            return None
        attempt.commit()
        return changes

    # -- backfill ----------------------------------------------------------------------------------------------

    def prepare(self, partition: int, tx: Transaction) -> None:
        """Fix the definitions for this batch, and start a backfill run for each generation the partition has not
        met (see the module's docstring). One snapshot per batch: a definition arriving mid-batch would otherwise
        count some of the batch's events live *and* again in its backfill (they are below its `until`)."""
        live = self._snapshot = self.live()
        backfills = Backfills.load(tx)
        until = (tx.get("w|resolved") or {"next": 0})["next"]  # the live position: a new run reads up to here
        try:
            started = backfills.meet(live.generations, live.sids.values(), live.position, until, self.now())
        except DefinitionsBehind as behind:
            raise DefinitionsBehind(f"partition {partition}: {behind}") from None
        if started is None:
            return
        backfills.save(tx)
        if started:
            self._start_backfill(partition)

    def on_ready(self, partition: int, store: StateStore) -> None:
        if Backfills.load(store).runs:
            self._start_backfill(partition)

    def _start_backfill(self, partition: int) -> None:
        self._woken[partition] = True
        task = self._backfills.get(partition)
        if task is None or task.done():
            self._backfills[partition] = asyncio.ensure_future(self._backfill(partition))

    def backfills(self, partition: int) -> list[dict[str, Any]] | None:
        """The runs under way in a partition this worker has ready; None when it has not."""
        store = self.readable_store(partition)
        return None if store is None else Backfills.load(store).runs

    async def _backfill(self, partition: int) -> None:
        """Work through the partition's runs, one chunk per transaction, until none is left or the partition goes."""
        await asyncio.sleep(0)  # let the transaction that recorded the run commit first
        while not self.live_ready():  # the definitions must be complete before a run counts or settles anything
            await asyncio.sleep(0.1)
        consumer = None
        try:
            while self.owns(partition):
                store = self.readable_store(partition)
                runs = None if store is None else Backfills.load(store).runs
                if store is None:
                    await asyncio.sleep(0.5)
                    continue
                if not runs:
                    if self._woken.pop(partition, False):  # a run may be in a transaction not committed yet
                        await asyncio.sleep(0.2)
                        continue
                    return
                run = runs[0]
                try:
                    if run["phase"] == "events":
                        consumer = consumer or catch_up_consumer(self.bootstrap, f"{self.topics.resolved}.backfill")
                        await self._backfill_events(partition, run, consumer)
                    else:
                        await self.run_in(partition, lambda tx, out, gen=run["gen"]: self._settle_chunk(tx, out, gen))
                except Exception:  # a background task must not die quietly: log, wait, go on
                    log.exception("compute: partition %d: backfill of %s failed; retrying", partition, run["gen"])
                    await asyncio.sleep(2.0)
        finally:
            if consumer is not None:
                consumer.close()

    async def _backfill_events(self, partition: int, run: dict[str, Any], consumer: Any) -> None:
        low, _ = await asyncio.to_thread(consumer.get_watermark_offsets, TopicPartition(self.topics.resolved, partition), 30)
        start = max(run["next"] or 0, low)  # what retention deleted meanwhile can't be read: go on from the oldest kept
        messages, reached = await asyncio.to_thread(read_range, consumer, self.topics.resolved, partition, start, run["until"], BACKFILL_CHUNK)
        records = [(m.offset(), m.value()) for m in messages]
        await self.run_in(partition, lambda tx, out: self._backfill_chunk(tx, out, run["gen"], run["next"], start, records, reached))

    def _backfill_chunk(self, tx: Transaction, out: Output, gen: str, expected_next: int | None, start: int,
                        records: list[tuple[int, bytes]], reached: int) -> None:  # fmt: skip
        backfills = Backfills.load(tx)
        run = backfills.run(gen)
        if run is None or run["next"] != expected_next:
            return  # done or moved on meanwhile (another owner): this chunk is stale
        changes, now, counted = Changes(), self.now(), 0
        for offset, value in records:
            try:
                resolved = self.decode_resolved(value)
            except RETRIED:
                raise  # the schema registry away: the chunk is read again, nothing skipped
            except Exception:
                continue  # dead-lettered when it was read live
            event = resolved["event"]
            _, seen = memo.seen(tx, "s", event, event["message_id"])
            if seen is None or seen.get("o") != offset:
                continue  # a repeated copy (live processing counted the first), or one live processing refused
            step = self._guarded(tx, None, f"backfill {gen} of {event['message_id']}", lambda state, step, resolved=resolved:
                                 self.engine.backfill_event(resolved["profile_id"], resolved["event"], run["sids"], state, step, now))  # fmt: skip
            if step is not None:
                changes.commands.extend(step.commands)  # values and memberships are emitted when the run settles
                counted += 1
        backfills.events_read(run, start, reached, len(records), counted)
        backfills.save(tx)
        self._counters.backfill_read += len(records)
        self._counters.backfill_counted += counted
        self._emit(changes, out)

    def _settle_chunk(self, tx: Transaction, out: Output, gen: str) -> None:
        backfills = Backfills.load(tx)
        run = backfills.run(gen)
        if run is None or run["phase"] != "settle":
            return
        changes, now = Changes(), self.now()
        profiles = [key[len(PROFILES):] for key in islice(tx.store.keys(PROFILES, run["after"]), SETTLE_CHUNK)]
        for profile in profiles:
            changes.extend(self._guarded(tx, None, f"settling {profile} after backfill {gen}", lambda state, step, profile=profile:
                                         self.engine.settle(profile, state, step, now, Cause(f"definition {gen}", now))) or Changes())  # fmt: skip
        if backfills.settled(run, profiles, SETTLE_CHUNK, now):
            log.info("compute: backfill of %s done: %d past events read, %d counted, %d profiles settled",
                     gen, run["read"], run["counted"], run["settled"])  # fmt: skip
        backfills.save(tx)
        self._emit(changes, out)


SPEC = StageSpec(
    "compute", "cdp worker (stage 'compute', read in batches beneath Faust)", (EVENTS_RESOLVED, IDENTITY_MERGES, COMPUTE_COMMANDS, DEFINITIONS),
    (PROFILE_CHANGES, AUDIENCE_MEMBERSHIP, COMPUTE_COMMANDS, COMPUTE_STATE, EVENTS_DEAD_LETTER),
    ("trait states, memberships, merge forwards: RocksDB per partition, changelog = compute.state",),
    "computed traits and audiences per profile, folded on merges, windows slid by a clock; changes exactly once",
    (EVENTS_RESOLVED, IDENTITY_MERGES, COMPUTE_COMMANDS, COMPUTE_STATE),
)  # fmt: skip


def wire(w: Wiring) -> ComputeStage:
    """events.resolved, identity.merges and compute.commands (co-partitioned) into one store per partition,
    counting by the definitions the worker follows."""
    settings, codecs, definitions = w.settings, w.codecs, w.definitions
    topics = ComputeTopics(
        resolved=EVENTS_RESOLVED.name(settings), merges=IDENTITY_MERGES.name(settings),
        commands=COMPUTE_COMMANDS.name(settings), state=COMPUTE_STATE.name(settings),
        changes=PROFILE_CHANGES.name(settings), membership=AUDIENCE_MEMBERSHIP.name(settings),
        dead_letter=EVENTS_DEAD_LETTER.name(settings),
    )  # fmt: skip
    return ComputeStage(
        topics=topics,
        codecs=ComputeCodecs(
            resolved=codecs.for_topic(EVENTS_RESOLVED), merges=codecs.for_topic(IDENTITY_MERGES),
            command=codecs.for_topic(COMPUTE_COMMANDS), state=codecs.for_topic(COMPUTE_STATE),
            changes=codecs.for_topic(PROFILE_CHANGES), membership=codecs.for_topic(AUDIENCE_MEMBERSHIP),
            dead_letter=codecs.for_topic(EVENTS_DEAD_LETTER),
        ),  # fmt: skip
        live=lambda: definitions.live,
        live_ready=definitions.caught_up.is_set,
        definitions_exist=definitions.exists,
        partitions=EVENTS_RESOLVED.partition_count(settings),
        store_dir=w.stage_dir("compute"),
        memo_horizon_ms=settings.topics.memo_horizon,
        bootstrap=settings.kafka_bootstrap,
        producer=w.producer,
    )
