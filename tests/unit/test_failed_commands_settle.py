"""A failed identity command leaves nobody waiting: sagas finish, locks are released, queues drain.

A command that fails — malformed, or hitting a bug — is dropped whole, dead-lettered, and what it leaves behind is
settled (agents/identity/protocol.py, docs/identity.md). Here a faulty protocol fails a random share of the
commands it handles (some after doing part of their work, which must be rolled back), on many partitions with
duplicates and late deliveries, and the cluster must still end quiet: no saga unfinished, no profile locked,
queued or waiting for its creation; every event resolved to one profile, or dead-lettered (an event whose own
first step failed); every identifier pointing at a profile that exists. Failures may keep apart identifiers an
event linked (a refused join), never join what no event linked: each profile's identifiers lie within one
connected component of the events.
"""

from __future__ import annotations

import os
import random
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.identity.protocol import IdentityProtocol, Outputs
from agents.state import Overlay
from tests.unit.test_identity_protocol import POOL, UNLIMITED, Cluster, _DictState, union_find


class FaultyProtocol(IdentityProtocol):
    """Fails `rate` of the commands it handles: before any work, or after doing it (the work must be dropped)."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        super().__init__(UNLIMITED)
        self.rng, self.rate = rng, rate
        self.failed_kinds: set[str] = set()

    def handle(self, command: dict[str, Any], state: Any, out: Outputs) -> None:
        if self.rng.random() < self.rate / 2:
            raise RuntimeError(f"injected before {command.get('kind')}")
        super().handle(command, state, out)
        if self.rng.random() < self.rate / 2:
            raise RuntimeError(f"injected after {command.get('kind')}")


class StageCluster(Cluster):
    """The Cluster, fed the way the stage feeds the protocol: events all or nothing (a failure dead-letters the
    event), commands through `apply` (a failure is settled)."""

    def __init__(self, protocol: FaultyProtocol, partitions: int, seed: int, duplicate: float, late: float) -> None:
        super().__init__(UNLIMITED, partitions, seed, duplicate, shuffled=False, late=late)
        self.protocol = protocol
        self.dead: set[str] = set()
        self.failures = 0

    def _deliver(self, partition: int, command: dict[str, Any]) -> None:
        state, out = _DictState(self.states[partition]), Outputs()
        if command["kind"] == "event":
            attempt = Overlay(state)
            try:
                self.protocol.handle(command, attempt, out)
            except RuntimeError:
                self.dead.add(command["event"]["message_id"])
                return
            attempt.commit()
        else:
            self.protocol.apply(command, state, out)
        assert not out.unsettled, f"a settle failed: {out.unsettled}"
        self.failures += len(out.failed)
        self.protocol.failed_kinds.update(c.get("kind") for c, _ in out.failed)
        self._route(out)


def run_with_faults(batches: list[list[tuple[str, str]]], partitions: int, seed: int, rate: float, duplicate: float,
                    late: float) -> StageCluster:  # fmt: skip
    cluster = StageCluster(FaultyProtocol(random.Random(seed), rate), partitions, seed, duplicate, late)
    sent = [cluster.send(batch) for batch in batches]
    cluster.run()
    cluster.assert_quiet()
    for message_id in sent:
        if message_id in cluster.dead:
            assert message_id not in cluster.resolved, f"{message_id} was both dead-lettered and resolved"
        else:
            assert len(set(cluster.resolved.get(message_id, []))) == 1, f"{message_id} resolved {cluster.resolved.get(message_id)}"
    components = union_find(batches)
    for group in cluster.groups():
        assert any(group <= component for component in components), f"{sorted(group)} were joined by no event"
    for type_, value in cluster.identifiers():
        assert cluster.roots().get(cluster.holder(type_, value)) is not None, f"{type_}:{value} points at no live profile"
    return cluster


@settings(max_examples=int(os.environ.get("CDP_POISON_EXAMPLES", "300")), deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), max_size=30),
    st.integers(1, 5), st.integers(0, 2**32), st.sampled_from([0.05, 0.2, 0.5]), st.sampled_from([0.0, 0.2]),
    st.sampled_from([0.0, 0.05]),
)  # fmt: skip
def test_failed_commands_leave_no_saga_lock_or_queue_behind(batches: list[list[tuple[str, str]]], partitions: int, seed: int,
                                                            rate: float, duplicate: float, late: float) -> None:  # fmt: skip
    run_with_faults(batches, partitions, seed, rate, duplicate, late)


def test_every_kind_of_command_failed_somewhere_and_was_settled() -> None:
    """The property above is not vacuous: across these runs each kind of command failed at least once."""
    rng, kinds, failures = random.Random(42), set(), 0
    for seed in range(60):
        batches = [rng.sample(POOL, rng.randint(1, 3)) for _ in range(25)]
        cluster = run_with_faults(batches, rng.randint(1, 4), seed, 0.3, 0.1, 0.0)
        kinds |= cluster.protocol.failed_kinds
        failures += cluster.failures
    assert kinds >= {"claim", "claimed", "create", "join", "offer", "offered", "joined", "repoint"}, kinds
    assert failures > 100


def test_without_faults_the_settled_path_is_never_taken() -> None:
    cluster = run_with_faults([[("user_id", "u1"), ("anonymous_id", "a1")], [("anonymous_id", "a1"), ("email", "e1")]],
                              3, 7, 0.0, 0.0, 0.0)  # fmt: skip
    assert cluster.failures == 0 and not cluster.dead and cluster.groups() == union_find(
        [[("user_id", "u1"), ("anonymous_id", "a1")], [("anonymous_id", "a1"), ("email", "e1")]])


def test_a_command_that_would_outgrow_a_state_record_is_settled_like_any_failure() -> None:
    """A hub profile without limits grows with every merge; once a merge would make its record larger than records
    may be, that offer fails and is settled (refused: the younger profile unlocks, the saga goes on) instead of the
    whole batch record being dead-lettered with nobody told."""
    protocol = FaultyProtocol(random.Random(1), 0.0)
    protocol.max_record_bytes = 4_000
    cluster = StageCluster(protocol, 3, 1, 0.0, 0.0)
    sent = [cluster.send([("anonymous_id", "hub"), ("anonymous_id", f"spoke-{n:03d}-{'x' * 40}")]) for n in range(80)]
    cluster.run()
    cluster.assert_quiet()
    assert cluster.failures > 0 and protocol.failed_kinds <= {"offer", "join", "create", "claimed", "joined", "offered", "claim"}
    assert all(len(set(cluster.resolved[m])) == 1 for m in sent) and not cluster.dead
    assert max(len(orjson.dumps(r)) for s in cluster.states for r in s.values()) <= 4_000
    refused = [e for e in cluster.log if e["kind"] == "refused" and e["rule"].startswith("failed: InvalidRecord")]
    assert refused, "the merges that would not fit are in the merge log, refused, with the reason"
