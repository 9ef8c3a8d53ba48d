"""Claiming sagas kept in memory only (agents/identity/records.py, `claiming_record`; off in a worker until rule
changes are safe, topology/stages/identity.py CLAIMS_IN_MEMORY): a restart loses them, and the identity stage
starts them again from their events, read again from the oldest one's offset (`held`).

The stage runs on one partition without Kafka (tests/stage_harness.py): a batch of events is decided (their
claims are out), then the worker "crashes" — its store is reopened, so the in-memory sagas are gone, while the
durable records and the claims already sent stay — and cdp.events.raw is read again from the held offset. Against
a union-find oracle: every event resolved exactly once, the same profiles as without the crash. The same on real
Kafka, with SIGKILL: tests/integration/test_identity_stage.py and tests/integration/test_pipeline_crash.py.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests import stage_harness
from tests.poison import encode
from tests.unit.test_identity_protocol import union_find
from tests.unit.test_poison_inputs import POOL, UNLIMITED, _grouping, identified
from topology.runtime.state_store import StateStore, Transaction
from topology.stages.identity import HELD_MAX_S

RAW = "t.events.raw"


@settings(max_examples=40, deadline=None)
@given(
    good=st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), min_size=2, max_size=25),
    first=st.integers(1, 25),
    answers_first=st.booleans(),
)
def test_sagas_lost_in_a_crash_are_started_again_and_resolve_each_event_once(
    good: list[list[tuple[str, str]]], first: int, answers_first: bool
) -> None:
    with tempfile.TemporaryDirectory() as root:
        run = stage_harness.identity(Path(root), UNLIMITED, claims_in_memory=True)
        for index, ids in enumerate(good):
            run.write(RAW, f"g{index}".encode(), encode("raw_event", identified(f"g{index}", ids)))
        raw = list(run.pending)
        run.pending.clear()
        batch = raw[:first]
        decision = run.stage.decide(0, run.store, batch)  # the first events: their claims go out, sagas claiming
        run.store.apply(decision.tx.changes, 1)
        items = [item for item, _ in decision.out.sealed]
        in_flight = [r for r in run.stage.outbox_records(items) if r.topic in run.stage.io.inputs]
        held = run.stage.held(0, run.store)
        claiming = [m.offset for m in batch if run.store.in_memory(f"c|g{m.offset}")]
        assert held == (min(claiming) if claiming else None)

        run.store.close()  # the crash: what was in memory is gone
        run.store = StateStore(Path(root) / "identity-0", run.stage.io.volatile)
        again = [m for m in raw if held is not None and m.offset >= held or m.offset >= first]
        answers = in_flight
        if answers_first:  # answers to the lost sagas arrive before or after their events are read again
            for record in answers:
                run.write(record.topic, record.key, record.value)
            run.pending.extend(again)
        else:
            run.pending.extend(again)
            for record in answers:
                run.write(record.topic, record.key, record.value)
        run.run()

        _resolved_once(run, good)
        assert run.stage.counters.rebuilt == len(claiming)
        event("sagas lost" if claiming else "none lost")
        run.close()


def _first_batch(run: stage_harness.OnePartition, good: list[list[tuple[str, str]]]) -> tuple[list, list]:
    """Write the events, decide them as one batch (their claims go out) and apply it; the raw records and the
    claims in flight."""
    for index, ids in enumerate(good):
        run.write(RAW, f"g{index}".encode(), encode("raw_event", identified(f"g{index}", ids)))
    raw = list(run.pending)
    run.pending.clear()
    decision = run.stage.decide(0, run.store, raw)
    run.store.apply(decision.tx.changes, 1)
    items = [item for item, _ in decision.out.sealed]
    return raw, [r for r in run.stage.outbox_records(items) if r.topic in run.stage.io.inputs]


def _resolved_once(run: stage_harness.OnePartition, good: list[list[tuple[str, str]]]) -> None:
    resolved: dict[str, list[str]] = {}
    for record in run.read(run.stage.topics.resolved, "resolved_event"):
        resolved.setdefault(record["event"]["message_id"], []).append(record["profile_id"])
    for index in range(len(good)):
        assert len(resolved.get(f"g{index}", ())) == 1, f"g{index} resolved {resolved.get(f'g{index}')}"
    assert _grouping(run, {i for ids in good for i in ids}) == union_find(good)
    assert not any(run.store.in_memory(f"c|g{i}") for i in range(len(good)))


GOOD = [[POOL[0], POOL[5]], [POOL[1], POOL[5], POOL[3]], [POOL[2]], [POOL[6], POOL[0]], [POOL[7], POOL[8], POOL[4]]]


def test_a_commit_reported_failed_that_went_through_rebuilds_the_sagas_from_the_inputs(tmp_path: Path) -> None:
    """The answers' batch commits on the broker but the stage hears a failure: its catch-up then reads that
    transaction (the durable part) while memory still holds the claiming sagas as before it. The stage forgets
    them and reads its inputs again from the hold (PartitionedStage._ready_store); every event resolves once."""
    run = stage_harness.identity(tmp_path, UNLIMITED, claims_in_memory=True)
    raw, claims = _first_batch(run, GOOD)
    for record in claims:
        run.write(record.topic, record.key, record.value)
    claims_in = list(run.pending)  # the claims, answered (on this one partition the answers come back as input)
    run.pending.clear()
    claimed = run.stage.decide(0, run.store, claims_in)
    run.store.apply(claimed.tx.changes, 2)
    for record in run.stage.outbox_records([i for i, _ in claimed.out.sealed]):
        run.write(record.topic, record.key, record.value)
    answers = list(run.pending)
    run.pending.clear()
    decision = run.stage.decide(0, run.store, answers)  # the answers: sagas finish, or ask for joins
    durable = {k: v for k, v in decision.tx.changes.items() if not run.store.is_volatile(k)}
    run.store.apply(durable, 3)  # what the catch-up reads back of the transaction; memory is as before it
    for record in decision.out.atomic + run.stage.outbox_records([i for i, _ in decision.out.sealed]):
        (run.write(record.topic, record.key, record.value) if record.topic in run.stage.io.inputs else run.outputs.append(record))
    held = run.stage.held(0, run.store)
    assert held is not None and run.store.forget_volatile()
    run.pending.extend(m for m in raw if m.offset >= held)  # the feed reads raw again from the hold
    run.run()
    _resolved_once(run, GOOD)


def test_a_saga_waiting_too_long_is_written_durably_and_releases_the_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = stage_harness.identity(tmp_path, UNLIMITED, claims_in_memory=True)
    _, claims = _first_batch(run, GOOD)
    assert run.stage.held(0, run.store) == 0
    tx = Transaction(run.store)
    run.stage._persist(tx, [f"c|g{i}" for i in range(len(GOOD))])
    run.store.apply(tx.changes, 2)
    assert not any(run.store.in_memory(f"c|g{i}") for i in range(len(GOOD))), "nothing claiming is left in memory"
    assert run.stage.held(0, run.store) == 0, "an unfinished saga's event still counts in the pipeline's lag"
    later = time.monotonic() + HELD_MAX_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)  # a minute on: a durable saga holds nothing any more
    assert run.stage.held(0, run.store) is None
    monkeypatch.undo()
    assert all(run.store.get(f"e|g{i}") is not None for i in range(len(GOOD)))
    for record in claims:  # the answers come after all: the durable sagas take them
        run.write(record.topic, record.key, record.value)
    run.run()
    _resolved_once(run, GOOD)
    assert not any(run.store.get(f"e|g{i}") for i in range(len(GOOD)))


def test_unfinished_durable_sagas_hold_the_raw_offsets_until_resolved(tmp_path: Path) -> None:
    """Claiming sagas kept durably (the default) hold cdp.events.raw too: an event whose saga waits for answers is on
    no topic, and the ingest's backpressure must still count it (topology/runtime/pipeline_lag.py)."""
    run = stage_harness.identity(tmp_path, UNLIMITED)
    _, claims = _first_batch(run, GOOD)
    assert not any(run.store.in_memory(f"c|g{i}") for i in range(len(GOOD)))
    assert run.stage.held(0, run.store) == 0
    for record in claims:
        run.write(record.topic, record.key, record.value)
    run.run()
    _resolved_once(run, GOOD)
    assert run.stage.held(0, run.store) is None
