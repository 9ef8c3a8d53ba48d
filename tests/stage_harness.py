"""A stateful stage on one partition without Kafka: its own decode, guards and logic, with Kafka's part played here.

`OnePartition` appends records to the stage's input topics, lets the stage decide each batch
(`PartitionedStage.decide`: the same code a worker runs), applies the batch's state changes to its RocksDB store
as a committed transaction would, and routes what it sends: records for the stage's own inputs (identity's and
compute's commands) come back as input, the rest (resolved events, merge-log entries, changes, dead letters) are
kept for the test to read. Fast enough for property tests with many examples; tests/integration runs the same
stages on real Kafka.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.compute.catalog import build_catalog
from agents.compute.generations import Live
from agents.identity.protocol import IdentityProtocol
from agents.identity.rules import IdentityRules
from tests.poison import CODECS
from topology.stages.compute import ComputeCodecs, ComputeStage, ComputeTopics
from topology.stages.identity import IdentityCodecs, IdentityStage, IdentityTopics
from topology.runtime.input_feed import InputRecord as Message
from topology.runtime.partitioned_stage import PartitionedStage
from topology.runtime.producer import Record
from topology.runtime.state_store import StateStore

DEAD_LETTER = "t.events.dead-letter"


@dataclass
class OnePartition:
    stage: PartitionedStage
    store: StateStore
    logs: dict[str, list[Message]] = field(default_factory=dict)
    outputs: list[Record] = field(default_factory=list)
    pending: deque[Message] = field(default_factory=deque)

    def write(self, topic: str, key: bytes | None, value: bytes | None) -> Message:
        log = self.logs.setdefault(topic, [])
        message = Message(topic, 0, len(log), key, value)
        log.append(message)
        self.pending.append(message)
        return message

    def run(self, batch: int = 50, max_batches: int = 20_000) -> None:
        """Decide batches until nothing is left (commands the stage sends itself included)."""
        for _ in range(max_batches):
            if not self.pending:
                return
            records = [self.pending.popleft() for _ in range(min(batch, len(self.pending)))]
            decision = self.stage.decide(0, self.store, records)
            self.store.apply(decision.tx.changes, (self.store.changelog_next or 0) + 1)
            items = [item for item, _ in decision.out.sealed]
            for record in [*decision.letters, *decision.out.atomic, *self.stage.outbox_records(items)]:
                if record.topic in self.stage.io.inputs:
                    self.write(record.topic, record.key, record.value)
                else:
                    self.outputs.append(record)
        raise AssertionError(f"still busy after {max_batches} batches: something loops")

    def read(self, topic: str, schema: str) -> list[dict[str, Any]]:
        return [CODECS[schema].decode(r.value) for r in self.outputs if r.topic == topic and r.value is not None]

    @property
    def dead_letters(self) -> list[dict[str, Any]]:
        return self.read(DEAD_LETTER, "dead_letter")

    def close(self) -> None:
        self.store.close()


def _codec(schema: str) -> Any:
    return CODECS[schema]


def identity(root: Path, rules: IdentityRules, claims_in_memory: bool = False) -> OnePartition:
    topics = IdentityTopics(raw="t.events.raw", commands="t.identity.commands", state="t.identity.state",
                            resolved="t.events.resolved", merges="t.identity.merges", dead_letter=DEAD_LETTER)  # fmt: skip
    codecs = IdentityCodecs(raw=_codec("raw_event"), command=_codec("identity_command"), state=_codec("identity_state"),
                            resolved=_codec("resolved_event"), merges=_codec("merge_log_entry"), dead_letter=_codec("dead_letter"))  # fmt: skip
    stage = IdentityStage(topics=topics, codecs=codecs, protocol=IdentityProtocol(rules), partitions=1, store_dir=root,
                          bootstrap="unused:0", producer=_no_kafka, claims_in_memory=claims_in_memory)  # fmt: skip
    return OnePartition(stage, StateStore(root / "identity-0", stage.io.volatile))


def compute(root: Path, traits: Sequence[Any], audiences: Sequence[Any] = (), now_s: float = 1_700_000_100.0) -> OnePartition:
    topics = ComputeTopics(resolved="t.events.resolved", merges="t.identity.merges", commands="t.compute.commands",
                           state="t.compute.state", changes="t.profile.changes", membership="t.audience.membership",
                           dead_letter=DEAD_LETTER)  # fmt: skip
    codecs = ComputeCodecs(resolved=_codec("resolved_event"), merges=_codec("merge_log_entry"), command=_codec("compute_command"),
                           state=_codec("compute_state"), changes=_codec("profile_change"),
                           membership=_codec("audience_membership_change"), dead_letter=_codec("dead_letter"))  # fmt: skip
    live = Live.of_catalog(build_catalog(list(traits), list(audiences)))
    stage = ComputeStage(topics=topics, codecs=codecs, live=lambda: live, definitions_exist=lambda position: position <= 0,
                         partitions=1, store_dir=root, bootstrap="unused:0", producer=_no_kafka, clock=lambda: now_s)  # fmt: skip
    return OnePartition(stage, StateStore(root / "compute-0"))


def _no_kafka() -> Any:
    raise AssertionError("the harness plays Kafka: the stage must not write by itself")
