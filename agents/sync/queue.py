"""Each destination's deliveries in one partition's state, queued per profile in the order of the profile's changes.

    queued    "q|<destination>|<profile>|<seq, 15 digits>|<call>" -> the delivery, its attempts and when it is due
    count     "n|<destination>"                                   -> {"n": deliveries queued in this partition}
    delivered "v|<destination>|<profile>|<subject>"               -> {"seq": the newest change delivered for it}
    read      "c|<profile>"                                       -> {"seq": every change up to it read, "ahead": [...]}

Keys sort by (destination, profile, seq, call), so a profile's first key for a destination is the one to deliver
next: while it waits for a retry, the profile's later changes for that destination wait behind it; other profiles
and destinations go on. A delivery leaves the queue once its outcome is settled (`settle`), in the same Kafka
transaction as the outcome record (and dead letter): a crash before that sends it again, with the same id.

Compute numbers a profile's changes 1, 2, 3, ... across both change topics, written in one transaction, but a poll
may bring one topic's records of it before the other's. So a delivery whose earlier changes have not all been read
(`read_change`) is queued *held* (due HOLD_MS later); once the gap fills, its profile's held deliveries are
released (`release_held`) and go in seq order. A gap that does not fill within HOLD_MS (a profile whose first
changes predate the destination) is given up: the deliveries go, and the count jumps past it.

A dead letter handed back (`cdp sync redeliver`) is queued again with its id, in its seq's place — unless a newer
change of the same profile, destination and subject (audience or trait) was delivered since: then it is
*superseded* and skipped, so an `entered` is never redelivered after its `exited`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.state import State, keys_under
from agents.sync.destinations import Destination
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt, backoff_ms, verdict

QUEUED = "q|"
MAX_RESPONSE_CHARS = 1_000


def queue_prefix(destination: str, profile_id: str | None = None) -> str:
    return f"{QUEUED}{destination}|" if profile_id is None else f"{QUEUED}{destination}|{profile_id}|"


def queue_key(destination: str, profile_id: str, seq: int, call: str) -> str:
    return f"{QUEUED}{destination}|{profile_id}|{seq:015d}|{call}"


def split_key(key: str) -> tuple[str, str]:
    """(destination, profile) of a queue key."""
    _, destination, profile, _, _ = key.split("|")
    return destination, profile


def count_key(destination: str) -> str:
    return f"n|{destination}"


def delivered_key(destination: str, profile_id: str, subject: str) -> str:
    return f"v|{destination}|{profile_id}|{subject}"


def queued(state: State, destination: str) -> int:
    return (state.get(count_key(destination)) or {"n": 0})["n"]


HOLD_MS = 5_000


def read_key(profile_id: str) -> str:
    return f"c|{profile_id}"


def read_change(state: State, profile_id: str, seq: int, now: int) -> tuple[bool, int | None]:
    """Note that the profile's change `seq` was read: (whether every earlier change of the profile was read too, the
    seq up to which held deliveries may now go, if that moved past changes read ahead of a gap — only those are
    held, so the common case, changes read in order, never looks for held ones: that look scans the batch's
    writes, and once per change it cost more than the rest of the stage)."""
    record = state.get(read_key(profile_id)) or {"seq": 0, "ahead": [], "since": None}
    if seq <= record["seq"]:
        return True, None
    upto, ahead = record["seq"], sorted({*record["ahead"], seq})
    while ahead and ahead[0] == upto + 1:
        upto = ahead.pop(0)
    if ahead and record["since"] is not None and now - record["since"] > HOLD_MS:
        upto, ahead = ahead[-1], []  # a gap that never filled: go on past it
    state.put(read_key(profile_id), {"seq": upto, "ahead": ahead, "since": (record["since"] or now) if ahead else None})
    return seq <= upto, upto if upto > record["seq"] and record["ahead"] else None  # held ones exist only past a gap


def release_held(state: State, destination: str, profile_id: str, upto: int, now: int) -> bool:
    """Make the profile's held deliveries up to seq `upto` due now; whether there were any."""
    released = False
    for key in keys_under(state, queue_prefix(destination, profile_id)):
        item = state.get(key)
        if item is not None and item.get("held") and item["seq"] <= upto:
            state.put(key, {**item, "held": False, "due": min(item["due"], now)})
            released = True
    return released


def enqueue(state: State, destination: Destination, delivery: Delivery, origin: dict[str, Any], now: int, limit: int,
            held: bool = False) -> bool:  # fmt: skip
    """Queue a delivery behind the profile's earlier ones (`held`: an earlier change is not read yet); False if the
    partition's share of the destination's backlog is full (the caller dead-letters it: a dead endpoint must not
    fill the disk)."""
    count = queued(state, destination.name)
    if count >= limit:
        return False
    state.put(queue_key(destination.name, delivery.profile_id, delivery.seq, delivery.call), {
        "id": delivery.id, "profile": delivery.profile_id, "seq": delivery.seq, "call": delivery.call,
        "subject": delivery.subject, "payload": delivery.payload, "happened_at": delivery.happened_at,
        "queued_at": now, "attempts": 0, "due": now + HOLD_MS if held else now, "held": held, "status": None, "error": None,
        "response": None, "origin": origin,
    })  # fmt: skip
    state.put(count_key(destination.name), {"n": count + 1})
    return True


def requeue(state: State, destination: Destination, delivery: Delivery, origin: dict[str, Any], now: int, limit: int) -> str:
    """A dead letter handed back: "queued", "superseded" (a newer change for its subject was delivered since),
    "queued already" (it is in the queue now: a redelivery repeated) or "full" (the backlog)."""
    newest = state.get(delivered_key(destination.name, delivery.profile_id, delivery.subject))
    if newest is not None and newest["seq"] > delivery.seq:
        return "superseded"
    if state.get(queue_key(destination.name, delivery.profile_id, delivery.seq, delivery.call)) is not None:
        return "queued already"
    return "queued" if enqueue(state, destination, delivery, origin, now, limit) else "full"


@dataclass(frozen=True)
class Settled:
    """What an attempt did to a queued delivery."""

    item: dict[str, Any]  # the delivery as queued, with its attempts counted
    outcome: str  # "delivered", "retry", "dead" (given up: 4xx, max_age, destination gone), "gone" (a 410)
    reason: str | None  # why it was given up, for the dead letter


def settle(state: State, destination: Destination, key: str, attempt: Attempt, now: int, jitter: float) -> Settled | None:
    """Apply an attempt's answer to the queued delivery at `key`; None if it is not queued any more (settled by an
    earlier owner of the partition)."""
    item = state.get(key)
    if item is None:
        return None
    item["attempts"] += 1
    item["status"], item["error"] = attempt.status, attempt.error
    item["response"] = None if attempt.response is None else attempt.response[:MAX_RESPONSE_CHARS]
    outcome, reason = verdict(attempt), None
    if outcome == "delivered":
        seen = delivered_key(destination.name, item["profile"], item["subject"])
        newest = state.get(seen)
        if newest is None or newest["seq"] < item["seq"]:
            state.put(seen, {"seq": item["seq"]})
    if outcome == "retry":
        due = now + backoff_ms(item["attempts"], destination.retry_base_ms, destination.retry_cap_ms, attempt.retry_after_ms, jitter)
        if due - item["queued_at"] > destination.max_age_ms:
            outcome, reason = "dead", f"still failing after {item['attempts']} attempts, past max_age ({attempt.error})"
        else:
            item["due"] = due
            state.put(key, item)
            return Settled(item, "retry", None)
    elif outcome == "dead":
        reason = f"refused: {attempt.error}"
    elif outcome == "gone":
        reason = f"the destination is gone: {attempt.error}; it is disabled until its definition is POSTed again"
    _remove(state, destination.name, key)
    return Settled(item, outcome, reason)


def expire(state: State, destination: Destination, key: str, now: int) -> Settled | None:
    """Give up a queued delivery older than the destination's max_age without trying it (it waited behind a failing
    one, or the destination was off); None if it is younger or not queued."""
    item = state.get(key)
    if item is None or now - item["queued_at"] <= destination.max_age_ms:
        return None
    _remove(state, destination.name, key)
    return Settled(item, "dead", f"not delivered within max_age ({item['attempts']} attempts; last: {item['error']})")


def _remove(state: State, destination: str, key: str) -> None:
    state.delete(key)
    state.put(count_key(destination), {"n": max(queued(state, destination) - 1, 0)})
