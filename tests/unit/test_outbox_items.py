"""Outbox items are typed (ToPartition, Resolved, Logged); an outbox an earlier version left in the changelog holds
them as positional JSON lists, which `stored_item` reads back: both must become the same Kafka records."""

from __future__ import annotations

from pathlib import Path

import orjson

from agents.identity.records import Resolved
from tests import stage_harness
from tests.poison import raw_event
from tests.unit.test_poison_inputs import TRAITS, UNLIMITED
from topology.runtime.stage_commands import ToPartition
from topology.stages.identity import Logged

ENTRY = {"kind": "merged", "survivor_profile_id": "p-1", "merged_profile_id": "p-2", "identifiers": [{"type": "user_id", "value": "u"}],
         "message_id": "m", "timestamp": 1, "rule": "identifier match"}  # fmt: skip


def records(items: list[object]) -> list[tuple[str, bytes | None, bytes | None]]:
    return sorted((r.topic, r.key, r.value) for r in items)  # type: ignore[attr-defined]


def test_identity_reads_an_earlier_versions_outbox_as_the_items_it_writes(tmp_path: Path) -> None:
    stage = stage_harness.identity(tmp_path, UNLIMITED).stage
    event = raw_event(message_id="m1")
    typed = [ToPartition("user_id:u", {"kind": "claim", "message_id": "m1", "index": 0, "type": "user_id", "value": "u", "candidate": "p-1"}),
             Resolved("p-1", [{"type": "user_id", "value": "u"}], event), Logged(ENTRY)]  # fmt: skip
    stored = [["c", "user_id:u", typed[0].command], ["r", "p-1", [{"type": "user_id", "value": "u"}], event], ["l", ENTRY]]  # type: ignore[union-attr]
    stored = orjson.loads(orjson.dumps(stored))  # as the changelog held it
    assert records(stage.outbox_records([stage.stored_item(i) for i in stored])) == records(stage.outbox_records(typed))  # type: ignore[arg-type]
    stage.sent([stage.stored_item(i) for i in stored])
    assert (stage.counters.resolved, stage.counters.merged) == (1, 1)


def test_compute_reads_an_earlier_versions_outbox_as_the_items_it_writes(tmp_path: Path) -> None:
    stage = stage_harness.compute(tmp_path, TRAITS).stage
    command = {"kind": "forward", "profile": "p-2"}
    assert stage.stored_item(["p-2", command]) == ToPartition("p-2", command)
    assert records(stage.outbox_records([stage.stored_item(["p-2", command])])) == records(stage.outbox_records([ToPartition("p-2", command)]))
