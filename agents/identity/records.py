"""The identity stage's records and outputs, shared by the protocol's handlers and by what settles a failed command.

Record keys (each owned by the partition of its Kafka key, agents/identity/protocol.py says why):
`i|type|value` an identifier, `p|<id>` a profile, `c|<messageId>` an event's saga while its claims are out,
`e|<messageId>` the saga once it has asked for a join, `r@<hour>|<messageId>` its resolution, `d|<request>` how a
join request was decided.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.events import MergeLogEntry, RawEvent
from agents.state import State

Command = dict[str, Any]
Record = dict[str, Any]
LOG_KEPT = 500  # merge-log entries kept on a profile for its web view (the topic has them all)


@dataclass(frozen=True)
class Resolved:
    """An event with the profile it resolved to."""

    profile_id: str
    identifiers: list[dict[str, str]]
    event: RawEvent


@dataclass
class Outputs:
    """What handling commands produced: commands for other owners, resolved events, merge-log entries; commands that
    failed (settled, for the dead-letter topic) and the few whose settling failed too (for the log)."""

    commands: list[tuple[str, Command]] = field(default_factory=list)
    resolved: list[Resolved] = field(default_factory=list)
    log: list[MergeLogEntry] = field(default_factory=list)
    failed: list[tuple[Command, BaseException]] = field(default_factory=list)
    unsettled: list[tuple[Command, BaseException]] = field(default_factory=list)

    def send(self, key: str, command: Command) -> None:
        self.commands.append((key, command))

    def extend(self, other: Outputs) -> None:
        self.commands.extend(other.commands)
        self.resolved.extend(other.resolved)
        self.log.extend(other.log)
        self.failed.extend(other.failed)
        self.unsettled.extend(other.unsettled)


def profile_id_for(message_id: str, created_at: int) -> str:
    """Derived from the creating event, so a replay creates the same id; sorts by creation time, then hash."""
    return f"p-{min(max(created_at, 0), 10**15 - 1):015d}-{hashlib.sha1(message_id.encode()).hexdigest()[:16]}"


def identifier_key(type_: str, value: str) -> str:
    """The Kafka key (and so the owner partition) of an identifier."""
    return f"{type_}:{value}"


def identifier_record(type_: str, value: str) -> str:
    return f"i|{type_}|{value}"


def profile_record(profile_id: str) -> str:
    return f"p|{profile_id}"


def saga_record(message_id: str) -> str:
    """A saga that has asked for a join (or was written by a version that kept every saga durable)."""
    return f"e|{message_id}"


CLAIMING = "c|"


def claiming_record(message_id: str) -> str:
    """A saga whose claims are still out: it has sent nothing but claims, which are answered the same however often
    they are sent, so the stage may keep it in memory only and, after a crash, start it again from its event
    (topology/stages/identity.py)."""
    return f"{CLAIMING}{message_id}"


def load_saga(state: State, message_id: str) -> Record | None:
    """The event's saga under way, wherever it is kept (`c|` while claiming, `e|` after). The durable one first:
    should a claiming copy linger in memory beside it, the durable one is the later."""
    saga = state.get(saga_record(message_id))
    if saga is not None:
        saga["durable"] = True  # kept at e| from now on (an earlier version's claiming sagas too)
        return saga
    return state.get(claiming_record(message_id))


def answers_its_claim(saga: Record, command: Command) -> bool:
    """Whether a `claimed` answer is about the identifier the saga has at that index: a saga started again after a
    restart under changed identity rules may list other identifiers than the one whose claims were answered. An
    answer without `type` and `value` (written before answers carried them) is taken as before."""
    index = command.get("index")
    if not isinstance(index, int) or not 0 <= index < len(saga["ids"]):
        return False
    if "type" not in command and "value" not in command:
        return True
    return saga["ids"][index] == [command.get("type"), command.get("value")]


def store_saga(state: State, saga: Record) -> None:
    """Claiming sagas at `c|`; from its first join request on (or once durable), at `e|`."""
    message_id = saga["event"]["message_id"]
    if saga["step"] == 0 and not saga.get("durable"):
        state.put(claiming_record(message_id), saga)
        return
    if not saga.get("durable"):
        state.delete(claiming_record(message_id))
        saga["durable"] = True
    state.put(saga_record(message_id), saga)


def drop_saga(state: State, saga: Record) -> None:
    message_id = saga["event"]["message_id"]
    state.delete(saga_record(message_id) if saga.get("durable") else claiming_record(message_id))


DONE = "r"  # the memo kind of an event's resolution (agents/memo.py): r@<hour of received_at>|<messageId>


def event_command(event: RawEvent) -> Command:
    """The command an event from cdp.events.raw becomes (its owner is its messageId's partition)."""
    return {"kind": "event", "event": event}


LEFT_OUT = ""  # a saga's holder for an identifier whose claim failed: it links nothing


def log_entry(kind: str, survivor: str, merged: str | None, identifiers: Sequence[Sequence[str]], message_id: str, at: int,
           rule: str) -> MergeLogEntry:  # fmt: skip
    unique = list(dict.fromkeys((t, v) for t, v in identifiers))
    return MergeLogEntry(
        kind=kind,  # type: ignore[typeddict-item]
        survivor_profile_id=survivor,
        merged_profile_id=merged,
        identifiers=[{"type": t, "value": v} for t, v in unique],
        message_id=message_id,
        timestamp=at,
        rule=rule,
    )
