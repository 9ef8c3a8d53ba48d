"""A stateful stage on a Faust stream: one RocksDB store per partition, mirrored from a compacted changelog, with
every batch's decisions made durable before anything leaves. The identity and compute stages are built on it.

The stage reads co-partitioned input topics (topology/runtime/input_feed.py, beneath Faust, on the partitions Faust's
group assigned), so partition N of each lands on one worker and shares store N. Per poll, partition by partition:
  1. catch up the store from its changelog partition (read_committed) when the partition is (re)assigned — at
     once, not at its next input — and send an outbox an earlier version left behind (below);
  2. apply every input not applied yet (an input watermark per topic lives in the state, `w|<mark>`) through the
     subclass's `apply`, each all or nothing: whatever one record raises (it does not decode, it breaks what its
     topic promises, its key belongs to another partition, it would make a state record larger than Kafka takes,
     or it hits a bug) dead-letters that
     record and the batch goes on — only Kafka failures and deliberate waits (agents/errors.py) retry the batch
     (topology/runtime/stalls.py), so no record can stall its partition;
  3. write the changes and every output of all the poll's partitions — to other partitions of the stage
     (`Output.outbox`, turned into records by the subclass, a partition's commands batched into one record) and
     to the outside (`Output.atomic`) — in one Kafka transaction that also commits the inputs' offsets as the
     group's member, which fences a previous owner (topology/runtime/transactional.py), then apply the changes
     locally. A partition that can't join the poll's transaction (it waits, or the transaction failed) goes on
     alone, retried until written.
A SIGKILL before 3 commits re-reads the inputs (nothing was decided: the transaction is all or nothing); after
it, the watermark skips them. So nothing is lost, nothing is decided twice, and every reader — the stages read
their inputs read_committed (topology/runtime/input_feed.py) — sees each output once.

Until the stages read read_committed, outputs to other partitions went out *after* the transaction, from an
outbox kept in the changelog (`o|0`, `o|1`, ...) and deleted by the next batch; a store that still holds one
(written by that version) sends it when the partition is assigned, then deletes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException

from agents.errors import DeliveryFailed, InvalidRecord
from agents.state import Overlay
from topology.runtime.input_feed import InputFeed, InputRecord, Polled, drive_cycles
from topology.runtime.stage import Timer
from topology.web.metrics import Metric
from topology.runtime import in_cycle, memo_packs
from topology.runtime.changelog_catch_up import catch_up, wait_settled
from topology.runtime.partitioning import key_partition
from topology.runtime.producer import AsyncProducer, Record
from topology.runtime.stage_cpu import CycleTimes, spent_by
from topology.runtime.stalls import RETRIED, PartitionHealth, until_done
from topology.runtime.stage_io import Decision, Output, Part, StageIO, check_outputs, outbox_chunks
from topology.runtime.state_store import StateStore, Transaction
from topology.runtime.transactional import ABORT_SWEEP_MS, TRANSACTION_TIMEOUT_MS, TransactionalWriter, transactional_id

log = logging.getLogger(__name__)
OUTBOX = "o|"  # outbox records of an earlier version: o|0, o|1, ... (see the module docstring)
MEMOS_PER_RUN = 20_000  # memo tombstones per partition and transaction (≈ 1 MB): a backlog of them goes in steps
MEMO_SWEEP_S = 10.0  # how often a stage drops memos past the horizon (agents/memo.py)
SETTLE_TIMEOUT_S = (TRANSACTION_TIMEOUT_MS + ABORT_SWEEP_MS) / 1000 + 5  # a dead owner's open transaction is aborted by then


class PartitionedStage:
    """One instance per worker process; owns a StateStore per assigned partition. Subclasses decide what an input
    does (`apply`) and what an outbox item is on Kafka (`outbox_records`)."""

    def __init__(
        self,
        *,
        io: StageIO,
        partitions: int,
        store_dir: Path,
        bootstrap: str,
        producer: Callable[[], AsyncProducer],
        memo_horizon_ms: int | None = None,
    ) -> None:
        """`memo_horizon_ms`: how long after an event's received_at its memos are kept (None: for ever)."""
        self.io, self.partitions, self.store_dir, self.bootstrap = io, partitions, store_dir, bootstrap
        self._producer = producer
        self.memo_horizon_ms = memo_horizon_ms
        self.memos_expired = 0
        self.transactions = 0  # Kafka transactions committed: each costs the broker a marker per partition it touched
        self.cycles = CycleTimes()
        self.dead_lettered = 0
        self.caught_up = 0
        self.health = PartitionHealth(io.name)
        self._stores: dict[int, StateStore] = {}
        self._stale: set[int] = set()
        self._locks: dict[int, asyncio.Lock] = {}
        self._assigned: set[int] = set()
        self._writer: TransactionalWriter | None = None
        self._writing = asyncio.Lock()  # one transaction at a time on the stage's producer
        self.feed: InputFeed | None = None

    @property
    def name(self) -> str:
        return self.io.name

    # -- the stage contract (topology/runtime/stage.py) --------------------------------------------------------

    def inputs(self) -> list[str]:
        return list(self.io.inputs)

    def timers(self) -> list[Timer]:
        async def sweep() -> None:
            await self.expire_memos(self.memo_clock_ms())

        return [(MEMO_SWEEP_S, sweep)] if self.io.memos and self.memo_horizon_ms is not None else []

    def memo_clock_ms(self) -> int:
        """The time memos expire by (compute: its stream clock)."""
        return int(time.time() * 1000)

    def metrics(self) -> list[Metric]:
        work = Metric(f"cdp_{self.name}_total", "counter", f"{self.name} stage work, by what was done")
        for name, count in vars(self.counters).items():
            work.add(count, what=name)
        memos = Metric("cdp_memos_expired_total", "counter", "per-event memo keys deleted past the memo horizon")
        transactions = Metric("cdp_transactions_total", "counter", "Kafka transactions committed (one per poll cycle, and per timer run)")
        return [work, memos.add(self.memos_expired, stage=self.name), transactions.add(self.transactions, stage=self.name),
                *self.cycles.metrics(self.name)]

    @property
    def counters(self) -> Any:
        """What the stage did since start (a dataclass of counts)."""
        raise NotImplementedError

    # -- what subclasses decide --------------------------------------------------------------------------------

    def apply(self, mark: str, message: InputRecord, tx: Transaction, out: Output) -> None:
        """Apply one input record. Whatever it raises dead-letters the record (its changes are
        dropped), except a RETRIED error, which retries the batch. A part that fails on its own (one command of
        several) is settled by the subclass and reported in `out.failed`."""
        raise NotImplementedError

    def outbox_records(self, items: Sequence[Any]) -> list[Record]:
        """The Kafka records of a chunk of outbox items."""
        raise NotImplementedError

    def stored_item(self, item: Any) -> Any:
        """An outbox item as an earlier version kept it in the changelog (JSON: a positional list) as the item."""
        return item

    def sent(self, items: Sequence[Any]) -> None:
        """Called once an outbox chunk was committed (for counters)."""

    def on_ready(self, partition: int, store: StateStore) -> None:
        """Called each time a partition's store is caught up and readable."""

    def prepare(self, partition: int, tx: Transaction) -> None:
        """Called at the start of every batch and timer run, before any input (e.g. to notice new definitions)."""

    def apply_command(self, command: Any, tx: Transaction, out: Output) -> None:
        """Apply one command of the stage's commands topic (`StageIO.commands`) delivered within a poll cycle, as
        `apply` applies each command of a record read from it; raises like `apply`."""
        raise NotImplementedError

    COMMANDS_SETTLE_THEMSELVES = False  # `apply_command` is all or nothing, checks its sizes and never raises

    def command_value(self, command: Any) -> bytes | None:
        """One command as a record of the commands topic would carry it (for its dead letter)."""
        return None

    def reapply(self, mark: str, message: InputRecord, tx: Transaction, out: Output) -> bool:
        """An input read again that was applied before (its partition restarted below the watermark): rebuild what
        it left in volatile records, if anything; whether it did. Nothing by default; must not raise for a bad
        record (it was dead-lettered when first applied)."""
        return False

    def committed(self, partition: int, store: StateStore) -> None:
        """Called after each batch of the partition was made durable (e.g. to hold back an input's commits)."""

    # -- partitions --------------------------------------------------------------------------------------------

    def on_partitions_assigned(self, partitions: set[int]) -> None:
        """Catch up now, not at the partition's next input: its views must answer (and an earlier version's outbox
        must go out) even if no new record ever arrives on it."""
        self._assigned |= partitions
        self._stale |= partitions
        for partition in partitions:
            asyncio.ensure_future(self._warm(partition))

    async def on_partitions_revoked(self, partitions: set[int]) -> None:
        """Wait for each partition's running work (batch or warm-up), then close its store.

        The local copy is kept (Faust's rebalances are eager: every partition is revoked and most come straight
        back), and caught up from its changelog offset when it is assigned again — unless it is older than
        compaction keeps tombstones (changelog_catch_up.STALE_AFTER_MS), then it is rebuilt from scratch."""
        self._assigned -= partitions
        self._stale |= partitions
        self.health.forget(partitions)
        for partition in partitions:
            async with self._lock(partition):
                if partition in self._assigned:
                    continue  # assigned again meanwhile
                store = self._stores.pop(partition, None)
                if store is not None:
                    store.close()

    def _lock(self, partition: int) -> asyncio.Lock:
        return self._locks.setdefault(partition, asyncio.Lock())

    async def _warm(self, partition: int) -> None:
        """Catch up (and send an earlier version's outbox) until it works or the partition is gone."""

        async def attempt() -> None:
            async with self._lock(partition):
                if partition in self._assigned:
                    await self._ready_store(partition)

        await until_done(self.health, partition, attempt, still_wanted=lambda: partition in self._assigned)

    def readable_store(self, partition: int) -> StateStore | None:
        """The store of a partition this worker owns and has caught up, for the web views; else None."""
        return None if partition in self._stale else self._stores.get(partition)

    def owns(self, partition: int) -> bool:
        return partition in self._assigned

    def owned(self) -> set[int]:
        return set(self._assigned)

    def applied_offset(self, partition: int, topic: str) -> int | None:
        store = self.readable_store(partition)
        if store is None or topic not in self.io.inputs:
            return None
        mark = store.get(f"w|{self.io.inputs[topic]}")
        return 0 if mark is None else int(mark["next"])

    # -- reading the inputs -----------------------------------------------------------------------------------

    async def run(self, feed: InputFeed) -> None:
        """Read the stage's inputs for ever: batches of records from every input, each partition's in offset order."""
        self.feed = feed
        await drive_cycles(feed, self._cycle, self.cycles)

    async def _cycle(self, batches: list[Polled]) -> None:
        """A poll's partitions decided one by one and made durable in one transaction (its cost to the broker is a
        commit marker per partition it wrote, whatever the number of partitions it serves); commands between them
        are delivered in memory (`_deliver_in_cycle`). A partition that can't join it — it waits (RETRIED), or the
        transaction fails — goes on alone, retried until written (`_take`)."""
        alone: list[Polled] = []
        async with AsyncExitStack() as locks:
            decided: dict[int, tuple[Polled | None, Decision, StateStore]] = {}
            for batch in sorted(batches, key=lambda b: b.partition):  # locks in one order: timers take one at a time
                lock = self._lock(batch.partition)
                if batch.partition in self._stale or lock.locked():
                    alone.append(batch)  # a catch-up (up to SETTLE_TIMEOUT_S) or a timer must not hold up the others
                    continue
                await locks.enter_async_context(lock)
                if self.feed is not None and not self.feed.current(batch):
                    continue  # read before a rebalance: the partition's new assignment reads these again, in order
                try:
                    store = await self._ready_store(batch.partition)
                    with spent_by(self.io.name):
                        decision = self.decide(batch.partition, store, batch.records)
                except Exception:  # a wait, Kafka, or a bug: that partition is retried alone (stalls.until_done)
                    alone.append(batch)
                    continue
                decided[batch.partition] = (batch, decision, store)
            parts: list[tuple[int, Polled | None, Decision, StateStore]] = []
            try:
                received = await self._deliver_in_cycle(decided, locks) if self.io.commands is not None else set()
                parts = [(p, b, d, s) for p, (b, d, s) in sorted(decided.items()) if d.applied or d.rebuilt or p in received]
                await self._write_decided(parts)
            except Exception as exc:
                log.info("%s: a cycle failed (%s); its %d partitions go on one by one", self.io.name, exc, len(decided))
                self._stale.update(p for p, _, _, _ in parts)  # it may have committed: catch up
                alone.extend(batch for batch, _, _ in decided.values() if batch is not None)
        for batch in sorted(alone, key=lambda b: b.partition):
            await self._take(batch)

    async def _deliver_in_cycle(self, decided: dict[int, tuple[Polled | None, Decision, StateStore]],
                                locks: AsyncExitStack) -> set[int]:  # fmt: skip
        """Deliver the cycle's commands to partitions in the same transaction (topology/runtime/in_cycle.py): those
        of the poll, and any other this worker reads and has ready whose lock is free (taken now, in partition
        order, so a timer waits for the cycle instead of running beside it). The partitions that received any."""
        read = self._assigned if self.feed is None else self._assigned & self.feed.owned()
        free = [p for p in sorted(read - decided.keys()) if p not in self._stale and p in self._stores and not self._lock(p).locked()]
        for partition in free:
            await locks.enter_async_context(self._lock(partition))
        joinable = set(free)
        decisions = {p: decision for p, (_, decision, _) in decided.items()}
        received: set[int] = set()

        def join(partition: int) -> Decision | None:
            if partition not in joinable:
                return None
            store = self._stores[partition]
            decided[partition] = (None, self.decide(partition, store, []), store)
            return decided[partition][1]

        def take(partition: int, entry: tuple[Any, bytes], decision: Decision) -> bool:
            received.add(partition)
            return in_cycle.take_command(self, partition, entry, decision)

        with spent_by(self.io.name):
            in_cycle.deliver(decisions, lambda item: in_cycle.target(item, self.partitions), join, take)
        return received

    async def _write_decided(self, decided: Sequence[tuple[int, Polled | None, Decision, StateStore]]) -> None:
        if not decided:
            return
        letters = [letter for _, _, decision, _ in decided for letter in decision.letters]
        if letters:  # at-least-once, before the changelog: a crash may write one twice, never lose one
            await self._producer().write_all(letters)
            self.dead_lettered += len(letters)
        await self._finish([Part(partition, store, decision.tx.changes, decision.out, decision.tx.unlogged)
                            for partition, _, decision, store in decided])  # fmt: skip
        for partition, _, _, store in decided:
            self.committed(partition, store)

    async def _take(self, polled: Polled) -> None:
        await self._until_written(polled.partition, self._process, polled)

    async def run_in(self, partition: int, work: Callable[[Transaction, Output], None]) -> bool:
        """Run `work` on a partition's state like a batch (for timers); False when the partition is not ours.
        `work` must not raise for a bad record (it has no input to dead-letter): guard each item it handles."""
        if partition not in self._assigned:
            return False

        async def attempt(partition: int, _: Any) -> None:
            part = await self._worked(partition, lambda p, tx, out: work(tx, out))
            if part.changes or part.out.outbox or part.out.atomic:
                await self._finish([part])

        await self._until_written(partition, attempt, None)
        return True

    async def run_across(self, partitions: Sequence[int], work: Callable[[int, Transaction, Output], None]) -> list[int]:
        """Run `work` on several partitions' state in one transaction (sync's delivery outcomes): the partitions it
        ran on — those this worker owns with their store ready, locked in partition order like a cycle. Raises if the
        transaction failed (its partitions catch up before their next work: it may have committed), so the caller
        keeps what it wanted written and tries again; `work` must be idempotent on the state and must not raise."""
        parts: list[Part] = []
        async with AsyncExitStack() as locks:
            for partition in sorted(set(partitions)):
                if partition not in self._assigned or partition in self._stale:
                    continue
                await locks.enter_async_context(self._lock(partition))
                if partition not in self._assigned:
                    continue
                parts.append(await self._worked(partition, work))
            changed = [part for part in parts if part.changes or part.out.outbox or part.out.atomic]
            try:
                if changed:
                    await self._finish(changed)
            except Exception:
                self._stale.update(part.partition for part in parts)
                raise
        return [part.partition for part in parts]

    async def _worked(self, partition: int, work: Callable[[int, Transaction, Output], None]) -> Part:
        """A partition's share of a timer's (or run_across's) transaction: `work` on its ready store, like a batch."""
        store = await self._ready_store(partition)
        tx, out = Transaction(store), Output()
        with spent_by(self.io.name):
            self.prepare(partition, tx)
            work(partition, tx, out)
        return Part(partition, store, tx.changes, out, tx.unlogged)

    def expire_memos_in(self, tx: Transaction, now_ms: int) -> int:
        """Delete the partition's memos past the horizon, oldest first, at most MEMOS_PER_RUN keys; how many memos.
        They leave the store, and their packs the changelog as tombstones in this transaction."""
        if self.memo_horizon_ms is None:
            return 0
        return memo_packs.expire(tx, self.io.memos, now_ms, self.memo_horizon_ms, MEMOS_PER_RUN)

    async def expire_memos(self, now_ms: int) -> None:
        """`expire_memos_in` on every partition this worker owns; never raises (a timer calls it)."""
        for partition in sorted(self._assigned):
            try:
                await self.run_in(partition, lambda tx, out: self._count_expired(self.expire_memos_in(tx, now_ms)))
            except Exception:
                log.exception("%s: partition %d: expiring memos failed; trying again later", self.io.name, partition)

    def _count_expired(self, count: int) -> None:
        self.memos_expired += count

    async def _until_written(self, partition: int, process: Callable[[int, Any], Any], batch: Any) -> None:
        """Retry until Kafka takes it: giving up would let Faust commit inputs whose effects were lost. A partition
        that moved to another worker meanwhile is left to its new owner, which re-reads these inputs from the
        committed offset (retrying here could only be refused: the group fences a past generation's transactions)."""

        async def attempt() -> None:
            async with self._lock(partition):
                await process(partition, batch)

        await until_done(self.health, partition, attempt, still_wanted=lambda: partition in self._assigned,
                         on_retry=lambda: self._stale.add(partition))  # fmt: skip

    async def _process(self, partition: int, polled: Polled) -> None:
        if self.feed is not None and not self.feed.current(polled):
            return  # read before a rebalance: the partition's new assignment reads these again, in order
        store = await self._ready_store(partition)
        with spent_by(self.io.name):
            decision = self.decide(partition, store, polled.records)
        if not decision.applied and not decision.rebuilt:
            return
        await self._write_decided([(partition, polled, decision, store)])

    def decide(self, partition: int, store: StateStore, records: Sequence[InputRecord]) -> Decision:
        """What a batch of a partition's input records decides, before anything is written: the state changes, the
        outputs and the dead letters. Raises only what retries the batch (RETRIED)."""
        tx, out = Transaction(store), Output()
        self.prepare(partition, tx)
        letters: list[Record] = []
        applied = rebuilt = 0
        for message in records:
            mark = self.io.inputs[message.topic]
            watermark = tx.get(f"w|{mark}")
            if watermark is not None and message.offset < watermark["next"]:
                rebuilt += self.reapply(mark, message, tx, out)  # applied before: its durable effects are in the store
                continue
            letters.extend(self._apply_one(mark, message, partition, tx, out))
            tx.put(f"w|{mark}", {"next": message.offset + 1})
            applied += 1
        return Decision(tx, out, letters, applied, rebuilt)

    def _apply_one(self, mark: str, message: InputRecord, partition: int, tx: Transaction, out: Output) -> list[Record]:
        """One input record, all or nothing; the dead letters it leaves (itself, or the parts that failed)."""
        attempt, attempt_out = Overlay(tx), Output()
        where = {"topic": message.topic, "partition": partition, "offset": message.offset}
        try:
            if message.key is None or key_partition(message.key, self.partitions) != partition:
                raise InvalidRecord(f"its key {message.key!r:.80} does not belong to partition {partition}: every input is "
                                    "keyed by the owner of the state it changes, which lives at its key's partition")  # fmt: skip
            self.apply(mark, message, attempt, attempt_out)
            check_outputs(attempt, attempt_out)
        except RETRIED:
            raise
        except Exception as exc:  # anything else is this record's fault (or a bug it hits): it alone is given up
            return [self.io.dead_letters.record(exc, key=message.key, value=message.value, **where)]
        attempt.commit()
        out.take(attempt_out)
        return [self.io.dead_letters.record(f.error, key=f.key, value=f.value, **where) for f in attempt_out.failed]

    async def _finish(self, parts: Sequence[Part]) -> None:
        """The parts' changes and outputs (outbox items turned into records of bounded size) in one transaction."""
        atomic: list[Record] = []
        sent: list[list[Any]] = []
        for part in parts:
            part.out.seal()
            chunks = [[item for item, _ in chunk] for chunk in outbox_chunks(part.out.sealed)]
            with spent_by(self.io.name):
                atomic += [*part.out.atomic, *(record for chunk in chunks for record in self.outbox_records(chunk))]
            sent += chunks
        await self._commit(parts, atomic)
        for chunk in sent:
            self.sent(chunk)

    async def _commit(self, parts: Sequence[Part], atomic: Sequence[Record] = ()) -> None:
        """Changes (and atomic outputs) to Kafka in one transaction with the parts' input offsets, committed as the
        group's member (what fences a worker that lost its partitions), then (committed) to the local stores.
        Memos go to the changelog in packs (topology/runtime/memo_packs.py); `unlogged` changes stay local."""
        encode = self.io.state_codec.encode_json_record  # the record's JSON as it is: no parse, no re-encoding
        records: list[tuple[int, bytes, bytes | None]] = []
        applied: list[tuple[Part, dict[str, bytes | None]]] = []
        for part in parts:
            if part.partition not in self._assigned:
                raise DeliveryFailed(f"{self.io.state_topic}[{part.partition}] is no longer ours")
            with spent_by(self.io.name):
                logged, markers = memo_packs.split(part.changes, self.io.memos, part.unlogged)
                records += [(part.partition, key.encode(), None if value is None else encode(value))
                            for key, value in logged.items() if part.store.logs(key, value)]  # fmt: skip
            applied.append((part, {**part.changes, **markers} if markers else part.changes))
        feed = self.feed
        group = None if feed is None else feed.group_metadata()
        if feed is None or group is None:
            raise DeliveryFailed(f"{self.io.name}: not a member of the group yet: a transaction could not be fenced")
        offsets = feed.commit_point(part.partition for part in parts)
        async with self._writing:
            writer = await self._ready_writer()

            def write() -> dict[int, int]:
                with spent_by(self.io.name):
                    return writer.write(self.io.state_topic, records, atomic, offsets, group)

            after = await asyncio.to_thread(write)
        self.transactions += 1
        feed.committed(offsets)  # what the group now holds: the next offset commit takes it further
        with spent_by(self.io.name):
            for part, changes in applied:
                part.store.apply(changes, after.get(part.partition, part.store.changelog_next or 0))

    async def _ready_writer(self) -> TransactionalWriter:
        """The stage's transactional producer (under `_writing`); a new one aborts what an earlier one of this
        worker (a broken producer, or the process before a restart) left open."""
        if self._writer is None or self._writer.broken:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                await asyncio.to_thread(writer.close)
            transactional = transactional_id(self.store_dir, self.io.state_topic)
            self._writer = await asyncio.to_thread(TransactionalWriter, self.bootstrap, transactional)
        return self._writer

    async def _send_outbox(self, partition: int, store: StateStore, keys: list[str], chunks: list[list[Any]]) -> None:
        """Send an outbox an earlier version committed (and maybe sent: the receivers take a repeat), then delete it."""
        records = [record for chunk in chunks for record in self.outbox_records(chunk)]
        if records:
            await self._producer().write_all(records)
        await self._commit([Part(partition, store, dict.fromkeys(keys))])
        for chunk in chunks:
            self.sent(chunk)

    # -- store recovery ----------------------------------------------------------------------------------------

    def _open_store(self, partition: int) -> StateStore:
        store = self._stores.get(partition)
        if store is None:
            store = self._stores[partition] = StateStore(self.store_dir / f"{self.io.state_topic}-{partition}", self.io.volatile)
            self._stale.add(partition)
        return store

    async def _ready_store(self, partition: int) -> StateStore:
        store = self._open_store(partition)
        if partition in self._stale:
            # A transaction the previous owner still has open would otherwise sit beyond the read_committed end of
            # the catch-up and commit after it, and those changes would never be read here: wait until it is
            # committed or aborted (this worker's own earlier one is aborted by starting the stage's producer).
            async with self._writing:
                await self._ready_writer()
            try:
                await asyncio.to_thread(wait_settled, self.bootstrap, self.io.state_topic, partition, SETTLE_TIMEOUT_S)
                found = await asyncio.to_thread(self._catch_up, partition, store)
            except KafkaException as exc:
                raise DeliveryFailed(f"can't read {self.io.state_topic}[{partition}] to catch up: {exc}") from exc
            self.caught_up += found
            if found and store.forget_volatile() and self.feed is not None:
                # The changelog moved under records kept in memory: a transaction reported failed had committed
                # (or another owner wrote). They are rebuilt from the inputs, read again from where the stage holds
                # them (`reapply`); the batch being retried is stale from here on.
                log.info("%s: partition %d: the changelog moved on under its in-memory records; reading its inputs again",
                         self.io.name, partition)  # fmt: skip
                await self.feed.read_again(partition)
            keys = sorted(store.keys(OUTBOX), key=lambda k: int(k[len(OUTBOX):]))
            if keys:  # left by an earlier version, which sent outputs after the transaction
                log.info("%s: partition %d sends an outbox of %d records left by an earlier version", self.io.name, partition, len(keys))
                chunks = [[self.stored_item(item) for item in chunk["items"]] for chunk in map(store.get, keys) if chunk]
                await self._send_outbox(partition, store, keys, chunks)
            self._stale.discard(partition)
            self.on_ready(partition, store)
        return store

    def _catch_up(self, partition: int, store: StateStore) -> int:
        return catch_up(store, self.bootstrap, self.io.state_topic, partition, self.io.state_codec, self.io.name, self.io.memos)

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
