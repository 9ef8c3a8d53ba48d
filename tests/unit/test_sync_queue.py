"""A destination's queue and schedule, driven against a simulated destination that fails at random: whatever it
answers, each profile's deliveries are sent one at a time in seq order, every queued delivery ends exactly once
(delivered or given up), nothing is sent past its max_age, and the queue count matches the queue."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.sync.destinations import parse_destination
from agents.sync.payloads import Delivery
from agents.sync.queue import HOLD_MS, QUEUED, enqueue, expire, queue_prefix, queued, read_change, release_held, requeue, settle
from agents.sync.retry import Attempt, backoff_ms
from agents.sync.schedule import Schedule
from topology.destinations import CHECKS
from tests.unit.test_sync_destinations import GOOD

DESTINATION = parse_destination({**GOOD, "retry": {"base": "10ms", "cap": "80ms"}, "max_age": "1s"}, CHECKS)
ANSWERS = {"ok": Attempt(200), "busy": Attempt(503, "HTTP 503"), "slow": Attempt(None, "no answer"),
           "limited": Attempt(429, "HTTP 429", retry_after_ms=30), "bad": Attempt(400, "HTTP 400", response="no")}  # fmt: skip


class DictState:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.records[key] = value

    def delete(self, key: str) -> None:
        self.records.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        return sorted(key for key in self.records if key.startswith(prefix))


def refresh(state: DictState, schedule: Schedule, profile: str, done: str | None = None) -> None:
    keys = state.keys(queue_prefix("crm", profile))
    if keys:
        schedule.set_head(0, profile, keys[0], state.records[keys[0]]["due"], done=done)
    else:
        schedule.clear(0, profile)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.one_of(
        st.tuples(st.just("change"), st.sampled_from(["p0", "p1", "p2"])),
        st.tuples(st.just("take"), st.integers(1, 4)),
        st.tuples(st.just("answer"), st.sampled_from(list(ANSWERS))),
        st.tuples(st.just("wait"), st.integers(1, 400)),
        st.tuples(st.just("lose"), st.none()),
    ), max_size=80),
    seed=st.integers(0, 2**32),
    first_seq=st.sampled_from([0, 7, 97]),
)  # fmt: skip
def test_each_delivery_ends_once_in_order_per_profile_whatever_the_destination_answers(steps: list[Any], seed: int, first_seq: int) -> None:
    """Attempts are in flight across steps (taken, then answered later, oldest first) while changes keep coming; an
    attempt whose answer was lost (its outcome not written) is released and sent again."""
    rnd, state, schedule, now = random.Random(seed), DictState(), Schedule(), 0
    seqs: dict[str, int] = {}
    queued_ids: list[str] = []
    in_flight: list[tuple[str, str]] = []  # (profile, key), oldest first
    sent: dict[str, list[int]] = {}  # profile -> seqs of the deliveries it was sent, in order
    ended: dict[str, str] = {}  # delivery id -> "delivered" | "dead"

    def take(count: int) -> None:
        for _, profile, key in schedule.take(now, count):
            assert profile not in {p for p, _ in in_flight}  # one at a time per profile
            assert key == state.keys(queue_prefix("crm", profile))[0]  # always the profile's first delivery
            item = state.records[key]
            assert item["due"] <= now
            if now - item["queued_at"] > DESTINATION.max_age_ms:
                end(profile, key, expire(state, DESTINATION, key, now))
                continue
            sent.setdefault(profile, []).append(item["seq"])
            in_flight.append((profile, key))

    def answer(how: str) -> None:
        profile, key = in_flight.pop(0)
        end(profile, key, settle(state, DESTINATION, key, ANSWERS[how], now, rnd.random()))

    def end(profile: str, key: str, settled: Any) -> None:
        assert settled is not None
        if settled.outcome != "retry":
            assert settled.item["id"] not in ended
            ended[settled.item["id"]] = "delivered" if settled.outcome == "delivered" else "dead"
        refresh(state, schedule, profile, done=key)

    for step in steps:
        if step[0] == "change":
            profile = step[1]
            seqs[profile] = seqs.get(profile, first_seq) + 1
            delivery = Delivery(f"{profile}-{seqs[profile]}", profile, seqs[profile], "identify", "audience:a", {}, now)
            assert enqueue(state, DESTINATION, delivery, {"topic": "t", "partition": 0, "offset": 0}, now, limit=10_000)
            queued_ids.append(delivery.id)
            refresh(state, schedule, profile)
        elif step[0] == "take":
            take(step[1])
        elif step[0] == "answer" and in_flight:
            answer(step[1])
        elif step[0] == "wait":
            now += step[1]
        elif step[0] == "lose" and in_flight:
            schedule.release(0, in_flight.pop(0)[0])
        assert queued(state, "crm") == len(state.keys(QUEUED))
    for _ in range(500):  # the destination recovers: everything drains
        while in_flight:
            answer("ok")
        now += backoff_ms(40, DESTINATION.retry_base_ms, DESTINATION.retry_cap_ms, 30, 1.0)
        take(10)
        if not state.keys(QUEUED) and not in_flight:
            break
    assert not state.keys(QUEUED) and queued(state, "crm") == 0
    assert sorted(ended) == sorted(queued_ids)
    for profile, order in sent.items():
        assert order == sorted(order), f"{profile} was sent {order}"


def test_a_full_backlog_refuses_and_a_refusal_gives_up_at_once() -> None:
    state = DictState()
    first = Delivery("d1", "p", 1, "identify", "trait:x", {}, 0)
    assert enqueue(state, DESTINATION, first, {}, 0, limit=1)
    assert not enqueue(state, DESTINATION, Delivery("d2", "p", 2, "identify", "trait:x", {}, 0), {}, 0, limit=1)
    settled = settle(state, DESTINATION, state.keys(QUEUED)[0], ANSWERS["bad"], 5, 0.5)
    assert settled is not None and settled.outcome == "dead" and settled.item["status"] == 400 and settled.item["response"] == "no"
    assert queued(state, "crm") == 0 and not state.keys(QUEUED)


def test_a_retry_waits_at_least_what_retry_after_asks() -> None:
    state = DictState()
    enqueue(state, DESTINATION, Delivery("d1", "p", 1, "identify", "trait:x", {}, 0), {}, 0, limit=5)
    key = state.keys(QUEUED)[0]
    settled = settle(state, DESTINATION, key, Attempt(429, "HTTP 429", retry_after_ms=500), 100, 0.0)
    assert settled is not None and settled.outcome == "retry" and state.records[key]["due"] == 600


def test_a_dead_letter_handed_back_is_superseded_by_a_newer_delivered_change_of_its_subject() -> None:
    state = DictState()
    old = Delivery("d1", "p", 1, "identify", "audience:a", {}, 0)
    newer = Delivery("d3", "p", 3, "identify", "audience:a", {}, 0)
    other = Delivery("d2", "p", 2, "identify", "audience:b", {}, 0)
    for delivery in (newer, other):
        enqueue(state, DESTINATION, delivery, {}, 0, limit=10)
        settle(state, DESTINATION, state.keys(QUEUED)[0], ANSWERS["ok"], 1, 0.5)
    assert requeue(state, DESTINATION, old, {}, 2, limit=10) == "superseded"  # `a` got seq 3 since
    assert requeue(state, DESTINATION, Delivery("d0", "p", 1, "identify", "audience:b", {}, 0), {}, 2, limit=10) == "superseded"
    assert requeue(state, DESTINATION, Delivery("d4", "p", 4, "identify", "audience:a", {}, 0), {}, 2, limit=10) == "queued"
    assert requeue(state, DESTINATION, Delivery("d4", "p", 4, "identify", "audience:a", {}, 0), {}, 2, limit=10) == "queued already"
    assert requeue(state, DESTINATION, Delivery("d5", "q", 1, "identify", "audience:a", {}, 0), {}, 2, limit=1) == "full"


def test_a_change_read_before_an_earlier_one_is_held_until_the_gap_fills_or_times_out() -> None:
    """Compute numbers a profile's changes 1, 2, 3 over both topics; a poll may bring seq 2 before seq 1."""
    state = DictState()
    ready, upto = read_change(state, "p", 2, 0)
    assert (ready, upto) == (False, None)
    enqueue(state, DESTINATION, Delivery("d2", "p", 2, "identify", "audience:a", {}, 0), {}, 0, limit=10, held=True)
    assert state.records[state.keys(QUEUED)[0]]["due"] == HOLD_MS
    assert read_change(state, "p", 1, 10) == (True, 2)  # 1 fills the gap: everything up to 2 was read
    assert release_held(state, "crm", "p", 2, 10) and state.records[state.keys(QUEUED)[0]]["due"] == 10
    assert read_change(state, "p", 1, 11) == (True, None)  # a repeat
    assert read_change(state, "p", 5, 20) == (False, None)  # 3 and 4 never come ...
    assert read_change(state, "p", 6, 21) == (False, None)
    assert read_change(state, "p", 7, 20 + HOLD_MS + 1) == (True, 7)  # ... so after HOLD_MS the count goes past them
    assert read_change(state, "p", 8, 30 + HOLD_MS) == (True, None)  # in order again: nothing can be held
    assert [read_change(state, "q", seq, 0) for seq in (1, 2, 3)] == [(True, None)] * 3
