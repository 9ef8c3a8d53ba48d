"""Commands between partitions of one poll cycle, handed over in memory instead of through the commands topic.

A stage's partitions talk through its commands topic (identity's owners, compute's profiles). When sender and
receiver both take part in one cycle's transaction (topology/runtime/partitioned_stage.py), a record would only
carry a command from one partition's decision to another's, and it costs: a produce and a consume, an Avro encode
and decode, one poll cycle of latency per hop — an identity saga takes three to six — and changelog records, since
a saga written in one cycle and deleted in a later one is two records where within one cycle it is none. So the
cycle delivers them itself, round after round until none is left (at most ROUNDS), and what is left goes out on
Kafka as before.

Why it is safe:
- the receiver's changes commit in the same transaction as the sender's, all or nothing: as if the record had
  been written and read at once. If the transaction fails, every partition decides its inputs again alone, and
  its commands then go through Kafka;
- the stages' logic takes commands in any order (tests/unit/test_identity_protocol.py shuffles them), so a command
  delivered here may overtake one of the same sender still on Kafka;
- the receiver gets the command as the JSON it would have been sent as, decoded afresh: sender and receiver
  share no object;
- a command the receiver can't take now (it raises RETRIED, e.g. compute's definitions are behind) goes out on
  Kafka, and so does everything else for that partition in this cycle; one that fails is dead-lettered alone,
  like one command of a record. Anything else that escapes (an output too large for Kafka) fails the whole
  cycle before anything is written, and its partitions decide their inputs again alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import orjson

from agents.state import Overlay
from topology.runtime.partitioning import partition_for
from topology.runtime.producer import Record
from topology.runtime.stage_commands import ToPartition
from topology.runtime.stage_io import Decision, Output, StageIO, check_outputs
from topology.runtime.stalls import RETRIED
from topology.runtime.state_store import Transaction

ROUNDS = 64  # hops per cycle: a saga with joins takes a dozen; one still going after this goes on through Kafka

Sealed = tuple[Any, bytes]  # an outbox item and its JSON (stage_io.Output.sealed)


def deliver(
    decisions: MutableMapping[int, Decision],
    target_of: Callable[[Any], int | None],
    join: Callable[[int], Decision | None],
    take: Callable[[int, Sealed, Decision], bool],
    rounds: int = ROUNDS,
) -> int:
    """Deliver the commands the decisions' outboxes hold for partitions of this cycle; how many were delivered.

    `target_of(item)`: the partition an outbox item is a command for, None if it is no command. `join(partition)`:
    a Decision for a partition not in `decisions` that can take part in the transaction (added to `decisions`),
    None if it can't. `take(partition, item, decision)`: apply one command to that partition's decision; False if
    it can't be taken now (it and the partition's later commands then go out on Kafka)."""
    closed: set[int] = set()  # partitions that can't take commands in this cycle
    scanned: dict[int, int] = defaultdict(int)  # per decision: its outbox items looked at already
    delivered = 0
    for _ in range(rounds):
        inbox: dict[int, list[Sealed]] = defaultdict(list)
        for partition, decision in list(decisions.items()):
            sealed = decision.out.sealed
            start = scanned[partition]
            kept = sealed[:start]
            for entry in sealed[start:]:
                target = target_of(entry[0])
                if target is None or target in closed or (target not in decisions and not _joined(decisions, join, target, closed)):
                    kept.append(entry)
                else:
                    inbox[target].append(entry)
            sealed[:] = kept
            scanned[partition] = len(kept)
        if not inbox:
            break
        for target, entries in inbox.items():
            decision = decisions[target]
            for index, entry in enumerate(entries):
                if target in closed or not take(target, entry, decision):
                    closed.add(target)
                    decision.out.sealed.extend(entries[index:])  # on Kafka, in order (closed: never scanned for here)
                    break
                delivered += 1
    return delivered


def _joined(decisions: MutableMapping[int, Decision], join: Callable[[int], Decision | None], partition: int,
            closed: set[int]) -> bool:  # fmt: skip
    decision = join(partition)
    if decision is None:
        closed.add(partition)
        return False
    decisions[partition] = decision
    return True


# -- a stage's side: one command taken by its receiver ---------------------------------------------------------


class Receiver(Protocol):
    """What a stage gives the cycle to take a command (topology/runtime/partitioned_stage.py's hooks)."""

    io: StageIO
    COMMANDS_SETTLE_THEMSELVES: bool  # `apply_command` is all or nothing, checks its sizes and never raises

    def apply_command(self, command: Any, tx: Transaction, out: Output) -> None: ...

    def command_value(self, command: Any) -> bytes | None: ...


def target(item: Any, partitions: int) -> int | None:
    """The partition an outbox item is a command for; None if it is no command."""
    return partition_for(item.key, partitions) if isinstance(item, ToPartition) else None


def take_command(stage: Receiver, partition: int, entry: Sealed, decision: Decision) -> bool:
    """One command delivered within the cycle, all or nothing like an input record; False if it must wait (RETRIED):
    it goes out on Kafka instead. One that fails is dead-lettered (offset -1: it was never on the topic). A stage
    whose `apply_command` settles its own failures (identity's protocol) applies it straight to the partition's
    transaction, without an overlay of its own; an output too large for Kafka then fails the cycle, whose partitions
    go on alone, where it is dead-lettered with its input."""
    item, encoded = entry
    command = orjson.loads(encoded)["command"]  # what the receiver would have decoded: a copy of its own
    if stage.COMMANDS_SETTLE_THEMSELVES:
        attempt_out = Output()
        stage.apply_command(command, decision.tx, attempt_out)
        decision.out.take(attempt_out)
    else:
        attempt, attempt_out = Overlay(decision.tx), Output()
        try:
            stage.apply_command(command, attempt, attempt_out)
            check_outputs(attempt, attempt_out)
        except RETRIED:
            return False
        except Exception as exc:
            decision.letters.append(_letter(stage.io, exc, partition, item.key.encode(), stage.command_value(command)))
            return True
        attempt.commit()
        decision.out.take(attempt_out)
    decision.letters.extend(_letter(stage.io, f.error, partition, f.key or item.key.encode(), f.value) for f in attempt_out.failed)
    return True


def _letter(io: StageIO, error: BaseException, partition: int, key: bytes, value: bytes | None) -> Record:
    return io.dead_letters.record(error, topic=io.commands or "", partition=partition, offset=-1, key=key, value=value)
