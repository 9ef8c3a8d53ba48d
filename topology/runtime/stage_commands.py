"""Commands between the partitions of one stage (identity's owners, compute's profiles) on its commands topic:
the outbox item that carries one, and the records a batch's commands become — one per partition, not one per
command (the cost of reading is per record), applied in order at the receiver as separate records would be.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agents.errors import InvalidRecord
from topology.codecs import AvroCodec
from topology.runtime.partitioning import partition_for
from topology.runtime.producer import Record

BATCH = "batch"  # a command record carrying several commands for one partition, in order


@dataclass(frozen=True, slots=True)
class ToPartition:
    """An outbox item: a command for the partition of the stage that owns `key` (identity: a profile, an
    identifier or an event; compute: a profile), sent on the stage's commands topic."""

    key: str
    command: dict[str, Any]


def command_records(commands: Sequence[ToPartition], topic: str, codec: AvroCodec, partitions: int) -> list[Record]:
    """Commands for other partitions as one record per partition, not per command: the cost of reading is per
    record, and a `batch` of commands for one partition is applied in order, as separate records would be."""
    by_partition: dict[int, list[ToPartition]] = defaultdict(list)
    for item in commands:
        by_partition[partition_for(item.key, partitions)].append(item)
    records = []
    for owner, items in by_partition.items():
        body = items[0].command if len(items) == 1 else {"kind": BATCH, "commands": [i.command for i in items]}
        records.append(Record(topic, items[0].key.encode(), codec.encode({"kind": body["kind"], "body": body}), owner))
    return records


def commands_of(body: Any) -> list[Any]:
    """The commands a decoded command record carries: itself, or those of a `batch` (each checked when applied)."""
    if body.get("kind") != BATCH:
        return [body]
    if not isinstance(body.get("commands"), list):
        raise InvalidRecord(f"a batch command needs a list of commands, not {body.get('commands')!r:.60}")
    return body["commands"]


def command_bytes(codec: AvroCodec, command: Any) -> bytes | None:
    """One command as a record of its own (for the dead letter of one command of a batch); None if not even JSON."""
    kind = command.get("kind") if isinstance(command, dict) else None
    try:
        return codec.encode({"kind": kind if isinstance(kind, str) else "", "body": command})
    except Exception:  # the dead letter's reason still says what failed
        return None
