"""Commands delivered within a poll cycle (topology/runtime/in_cycle.py), against a ledger of every command sent.

Toy commands hop between partitions: each delivery may send new ones. Whatever the partitions in the cycle, the
ones that may join it, the ones that refuse (RETRIED) at some point and the round limit, every command sent is
either delivered exactly once or left in an outbox exactly once (for Kafka); none reaches a partition that could
not take part, or one after it refused; and what is left for a partition that could take more is only left when
the rounds ran out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.compute.backfill import DefinitionsBehind
from agents.identity.rules import IdentityRules
from tests import stage_harness
from tests.poison import CODECS
from topology.runtime import in_cycle
from topology.runtime.stage_commands import ToPartition
from topology.runtime.stage_io import Decision, Output


@dataclass(frozen=True)
class Hop:
    target: int
    hops_left: int
    ident: int


def decision() -> Decision:
    return Decision(tx=None, out=Output(), letters=[], applied=1)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    partitions=st.integers(1, 6),
    in_poll=st.sets(st.integers(0, 5), min_size=1),
    joinable=st.sets(st.integers(0, 5)),
    refuse_at=st.dictionaries(st.integers(0, 5), st.integers(0, 6)),
    seeds=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 4)), max_size=12),
    rounds=st.integers(1, 8),
)
def test_every_command_is_delivered_once_or_left_for_kafka_once(partitions: int, in_poll: set[int], joinable: set[int],
        refuse_at: dict[int, int], seeds: list[tuple[int, int, int]], rounds: int) -> None:  # fmt: skip
    ids = itertools.count()
    sent: dict[int, Hop] = {}
    delivered: list[tuple[int, Hop]] = []
    refused: dict[int, int] = {}  # partition -> index in `delivered` when it refused
    taken: dict[int, int] = {}
    in_poll = {p % partitions for p in in_poll}
    decisions = {p: decision() for p in sorted(in_poll)}

    def send(out: Output, target: int, hops_left: int) -> None:
        hop = Hop(target % partitions, hops_left, next(ids))
        sent[hop.ident] = hop
        out.sealed.append((hop, b"{}"))

    for source, target, hops in seeds:
        send(decisions[sorted(in_poll)[source % len(in_poll)]].out, target, hops)
    decisions[min(in_poll)].out.sealed.append(("not a command", b"{}"))

    def join(partition: int) -> Decision | None:
        return decision() if partition in joinable else None

    def take(partition: int, entry: tuple[object, bytes], into: Decision) -> bool:
        hop = entry[0]
        assert isinstance(hop, Hop) and hop.target == partition
        if taken.get(partition, 0) == refuse_at.get(partition, -1) and partition not in refused:
            refused[partition] = len(delivered)  # once: a wait is short, the next command would be taken
            return False
        taken[partition] = taken.get(partition, 0) + 1
        delivered.append((partition, hop))
        if hop.hops_left:
            send(into.out, hop.ident * 7 + partition, hop.hops_left - 1)
            if hop.hops_left % 2:
                send(into.out, hop.ident + 3, hop.hops_left - 1)
        return True

    count = in_cycle.deliver(decisions, lambda item: item.target if isinstance(item, Hop) else None, join, take, rounds)

    left = [item for d in decisions.values() for item, _ in d.out.sealed if isinstance(item, Hop)]
    assert count == len(delivered)
    assert sorted([h.ident for _, h in delivered] + [h.ident for h in left]) == sorted(sent)  # each exactly once
    for partition, _ in delivered:
        assert partition in in_poll or partition in joinable
    for partition, at in refused.items():
        assert all(p != partition for p, _ in delivered[at:])  # nothing after a refusal
    if rounds > 5:  # a chain is at most 5 hops long: only the unreachable and the refusing are left for Kafka
        assert all(h.target not in in_poll | joinable or h.target in refused for h in left)
    assert set(decisions) <= in_poll | joinable
    assert ("not a command", b"{}") in decisions[min(in_poll)].out.sealed


def test_a_chain_of_hops_finishes_in_one_cycle_when_the_rounds_allow() -> None:
    decisions = {0: decision(), 1: decision()}
    decisions[0].out.sealed.append((Hop(1, 9, 0), b"{}"))
    trail: list[int] = []

    def take(partition: int, entry: tuple[object, bytes], into: Decision) -> bool:
        hop = entry[0]
        assert isinstance(hop, Hop)
        trail.append(partition)
        if hop.hops_left:
            into.out.sealed.append((Hop(1 - partition, hop.hops_left - 1, hop.ident + 1), b"{}"))
        return True

    assert in_cycle.deliver(decisions, lambda item: item.target, lambda p: None, take) == 10
    assert trail == [1, 0] * 5
    assert all(not d.out.sealed for d in decisions.values())
    decisions[0].out.sealed.append((Hop(1, 9, 0), b"{}"))
    assert in_cycle.deliver(decisions, lambda item: item.target, lambda p: None, take, rounds=4) == 4
    left = [item for d in decisions.values() for item, _ in d.out.sealed]
    assert [h.hops_left for h in left] == [5]  # the fifth hop goes out on Kafka


# -- a stage's side: one command delivered within the cycle ----------------------------------------------------

def sealed(key: str, command: dict[str, object]) -> tuple[ToPartition, bytes]:
    item = ToPartition(key, command)
    return item, orjson.dumps(item)


def test_a_command_that_fails_within_the_cycle_is_dead_lettered_alone_and_changes_nothing(tmp_path: Path) -> None:
    run = stage_harness.identity(tmp_path, IdentityRules())
    decision = run.stage.decide(0, run.store, [])
    claim = {"kind": "claim", "message_id": "m1", "index": 0, "type": "user_id", "value": "u1", "candidate": "p-1"}
    assert in_cycle.take_command(run.stage, 0, sealed("user_id:u1", claim), decision)
    assert decision.tx.get("i|user_id|u1") == {"p": "p-1"} and not decision.letters
    assert in_cycle.take_command(run.stage, 0, sealed("user_id:u2", {"kind": "claim", "message_id": "m2"}), decision)
    [letter] = [CODECS["dead_letter"].decode(record.value) for record in decision.letters]
    assert (letter["topic"], letter["partition"], letter["offset"]) == ("t.identity.commands", 0, -1)
    assert letter["key"] == b"user_id:u2" and b"m2" in letter["value"]
    assert [k for k in decision.tx.changes if k.startswith("i|")] == ["i|user_id|u1"]
    [answer] = [item.command for item, _ in decision.out.sealed]
    assert answer["kind"] == "claimed" and answer["holder"] == "p-1"
    run.close()


def test_a_command_the_receiver_must_wait_for_is_refused_untouched(tmp_path: Path) -> None:
    run = stage_harness.compute(tmp_path, [])

    def behind(command: object, tx: object, out: object) -> None:
        tx.put("x|half-done", {})  # type: ignore[attr-defined]
        raise DefinitionsBehind("the feed is behind")

    run.stage.apply_command = behind  # type: ignore[method-assign]
    decision = run.stage.decide(0, run.store, [])
    before = dict(decision.tx.changes)
    assert not in_cycle.take_command(run.stage, 0, sealed("p-1", {"kind": "fold_out"}), decision)
    assert decision.tx.changes == before and not decision.letters and not decision.out.sealed
    run.close()
