"""What one batch of a stateful stage decides and sends, as plain data: the stage's I/O description (`StageIO`), a
batch's outputs (`Output`) and decision (`Decision`), one partition's share of a transaction (`Part`), and the
checks and chunking applied to them before anything is written (topology/runtime/partitioned_stage.py runs them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from agents.errors import InvalidRecord
from agents.state import Overlay, check_sizes
from topology.codecs import AvroCodec
from topology.runtime.dead_letters import DeadLetters
from topology.runtime.producer import MAX_RECORD_BYTES, Record
from topology.runtime.state_store import StateStore, Transaction

OUTBOX_CHUNK_BYTES = 256_000  # outputs to the stage's partitions go out in records of at most about this much


@dataclass(frozen=True)
class Failure:
    """A part of an input record that failed and was settled by the stage's logic (e.g. one command of a `batch`
    record): dead-lettered with its own bytes, the rest of the record goes on."""

    error: BaseException
    key: bytes | None
    value: bytes | None


@dataclass
class Output:
    """What one batch sends, inside the changelog's transaction (exactly once for read_committed readers):
    `outbox` items (frozen dataclasses: `ToPartition` and what the stage adds) turned into records by the stage at
    the end of the batch, so a partition's commands of the whole batch share one record; `atomic` records; and
    `failed` parts of inputs to dead-letter."""

    outbox: list[Any] = field(default_factory=list)
    atomic: list[Record] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    sealed: list[tuple[Any, bytes]] = field(default_factory=list)  # outbox items with their JSON, size-checked

    def seal(self) -> None:
        """Encode the outbox items not encoded yet, refusing one Kafka could not carry (InvalidRecord)."""
        for item in self.outbox:
            encoded = orjson.dumps(item)
            if len(encoded) > MAX_RECORD_BYTES:
                raise InvalidRecord(f"an output would be {len(encoded)} bytes; Kafka records hold at most {MAX_RECORD_BYTES}")
            self.sealed.append((item, encoded))
        self.outbox.clear()

    def take(self, other: Output) -> None:
        other.seal()
        self.sealed.extend(other.sealed)
        self.atomic.extend(other.atomic)


@dataclass(frozen=True)
class Decision:
    """What one batch decided (PartitionedStage.decide): to be made durable and sent by the stage."""

    tx: Transaction
    out: Output
    letters: list[Record]
    applied: int  # input records applied (the rest were applied before a crash)
    rebuilt: int = 0  # of those applied before, how many rebuilt volatile records (`PartitionedStage.reapply`)


@dataclass(frozen=True)
class Part:
    """One partition's share of a transaction: its state changes (`unlogged` ones stay local) and outputs."""

    partition: int
    store: StateStore
    changes: dict[str, bytes | None]
    out: Output = field(default_factory=Output)
    unlogged: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class StageIO:
    """Where a stage keeps its state and where its bad inputs go."""

    name: str  # for logs, e.g. "identity"
    inputs: Mapping[str, str]  # input topic -> its watermark mark
    state_topic: str
    state_codec: AvroCodec  # a record {"record": json}
    dead_letters: DeadLetters
    memos: tuple[str, ...] = ()  # kinds of per-event memo keys, deleted past the memo horizon (agents/memo.py)
    volatile: tuple[str, ...] = ()  # key prefixes kept in memory only; the stage rebuilds them (`reapply`)
    commands: str | None = None  # the input topic carrying commands between the stage's partitions (`apply_command`)



def check_outputs(tx: Overlay, out: Output) -> None:
    """Refuse a record whose effects Kafka could never carry (it would stall the partition for good): a state record
    or an output over MAX_RECORD_BYTES, e.g. a profile whose unique_list of 30 KB values keeps growing."""
    check_sizes(tx, MAX_RECORD_BYTES)
    for record in out.atomic:
        if record.value is not None and len(record.value) > MAX_RECORD_BYTES:
            raise InvalidRecord(f"an output to {record.topic} would be {len(record.value)} bytes; Kafka records hold at "
                                f"most {MAX_RECORD_BYTES}")  # fmt: skip
    out.seal()


def outbox_chunks(items: Sequence[tuple[Any, bytes]]) -> list[list[tuple[Any, bytes]]]:
    """The outbox items in lists of bounded JSON size, so they are in the changelog before anything is sent."""
    chunks: list[list[tuple[Any, bytes]]] = []
    chunk: list[tuple[Any, bytes]] = []
    size = 0
    for item, encoded in items:
        if size and size + len(encoded) > OUTBOX_CHUNK_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append((item, encoded))
        size += len(encoded)
    if chunk:
        chunks.append(chunk)
    return chunks
