"""The compute engine: computed traits and audience memberships per profile, kept right across merges and time.

One partition's records (the stage keeps them in RocksDB with a changelog, like identity's):

    profile     "p|<id>"            -> trait states, values, identify traits, memberships, seq, expiry, key ids
                                       (`ids`: the latest userId, anonymousId, email, which every change names)
    forwarded   "f|<id>"            -> {"to": survivor}: the profile was merged; what arrives for it goes on
    seen        "s@<hour>|<messageId>" -> an event already counted here (resolved events are at-least-once)
                "sf@<hour>|<id>|<messageId>", "sb@<hour>|<id>|<state ids>|<messageId>" -> the same for forwarded
                events; filed under the hour of the event's received_at and deleted past the memo horizon
                (agents/memo.py)
    folded      "k|<survivor>|<id>" -> the merged profile's state was folded in (merge-log entries repeat too)
    due         "x|<15-digit ms>|<id>" -> when the profile's oldest window bucket leaves its window
    member      "a|<audience>|<id>" -> the profile is in the audience (the member list, paged)
    size        "n|<audience>"      -> {"n": members in this partition}
    backfills   "b|"                -> generations seen, state ids counted live, backfill runs under way

Trait states are kept under state ids (agents/compute/generations.py): a new definition version starts afresh
and is *pending* while its backfill reads the history (its values are kept but not emitted, and audiences that
read it keep their membership) until the backfill settles every profile of the partition.

Inputs: resolved events (key: profile id), merge-log entries (key: survivor) and the stage's own commands
(key: the profile they are for). A `merged` entry reaches the survivor's partition; it asks the merged
profile's partition to hand its state over (`fold_out`), which forwards the state (`fold_in`) and from then on
forwards anything that arrives for the merged profile, so state ends where the survivor lives whatever order
things arrive in. Values are re-computed only for traits whose state changed (an event, a fold) or whose
window slid (the due index); audiences are re-evaluated then, in dependency order, and every change leaves with
the profile's next sequence number.

A command that is malformed or fails (agents/compute/commands.py checks them) is dropped whole and reported in
`Changes.failed` for the dead-letter topic. Compute's commands hold no lock and nobody waits for one, so there is
nothing to release; what is missing is the command's effect, kept in its dead letter (re-send its value to
cdp.compute.commands once the cause is fixed): after a failed `fold_out` the merged profile keeps its own state
and counts its own events; a failed `fold_in` leaves the survivor without the merged profile's state; a failed
forwarded event is not counted. Nothing is settled from a failed command's fields: they may be what was wrong.
Event times are taken within [0, now]: a client clock far off can't make a bucket or a due time out of range.

Pure: no I/O; `now` is given. topology/stages/compute.py runs it on Kafka.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from agents import memo
from agents.compute import traits as trait_state
from agents.compute.backfill import BACKFILLS, Backfills, DefinitionsBehind
from agents.compute.commands import check_command, check_merge
from agents.compute.generations import Live
from agents.compute.identifiers import carried, fold_identifiers, note_identifiers, who
from agents.errors import InvalidRecord, Waiting
from agents.state import Overlay, State, check_sizes

Record = dict[str, Any]
Command = dict[str, Any]
NO_VALUE = {"count": 0, "sum": 0, "unique_list": [], "unique_count": 0}  # what a trait is before any event
SEEN_MEMOS = ("s", "sf", "sb")  # memo kinds of counted events: resolved, forwarded, forwarded by a backfill


@dataclass
class Changes:
    """What one step sends: commands to other partitions, profile changes and membership changes."""

    commands: list[tuple[str, Command]] = field(default_factory=list)
    traits: list[Record] = field(default_factory=list)
    memberships: list[Record] = field(default_factory=list)
    failed: list[tuple[Command, BaseException]] = field(default_factory=list)  # settled, for the dead-letter topic

    def extend(self, other: Changes) -> None:
        self.commands.extend(other.commands)
        self.traits.extend(other.traits)
        self.memberships.extend(other.memberships)
        self.failed.extend(other.failed)


@dataclass(frozen=True)
class Cause:
    """Why a profile is re-evaluated, as the changes carry it."""

    reason: str
    timestamp: int
    message_id: str | None = None


PROFILES = "p|"  # the prefix of profile records: a backfill settles them in key order


def profile_key(profile_id: str) -> str:
    return f"{PROFILES}{profile_id}"


def forward_key(profile_id: str) -> str:
    return f"f|{profile_id}"


def folded_key(survivor: str, merged: str) -> str:
    return f"k|{survivor}|{merged}"


SIZES = "n|"  # the prefix of audience sizes (GET /v1/audiences reads them all)


def size_key(audience: str) -> str:
    return f"{SIZES}{audience}"


DUE = "x|"  # the prefix of the due index: the window clock reads it in time order


def due_key(at: int, profile_id: str) -> str:
    """Sorted by time as text: 15 digits (a due time beyond the year 33658, from a window that long, is put there)."""
    return f"{DUE}{min(max(at, 0), 10**15 - 1):015d}|{profile_id}"


def member_key(audience: str, profile_id: str) -> str:
    return f"a|{audience}|{profile_id}"


def pending(state: State) -> frozenset[str]:
    """State ids whose backfill is still reading history in this partition. Asked for every event: derived once per
    version of the backfills record (it lists every generation and state id seen, a few KB with 50 definitions)."""
    raw = getattr(state, "raw", None)
    return Backfills.load(state).reading() if raw is None else _reading(raw(BACKFILLS))


@functools.lru_cache(maxsize=64)
def _reading(raw: bytes | None) -> frozenset[str]:
    return Backfills(None if raw is None else orjson.loads(raw)).reading()


class ComputeEngine:
    """Applies inputs to one partition's state; `live` is read at each call, so definitions change live."""

    def __init__(self, live: Callable[[], Live], exists: Callable[[int], bool] = lambda position: True,
                 max_record_bytes: int | None = None) -> None:  # fmt: skip
        """`exists(position)`: whether the definitions topic reaches `position` (a command naming one beyond its
        end could never be waited for). `max_record_bytes`: no step may make a state record or a change larger
        (`fits`)."""
        self._live, self._exists, self.max_record_bytes = live, exists, max_record_bytes

    # -- inputs ------------------------------------------------------------------------------------------------

    def event(self, profile_id: str, event: Mapping[str, Any], state: State, out: Changes, now: int, offset: int = -1,
              identifiers: Iterable[Mapping[str, str]] = ()) -> bool:  # fmt: skip
        """A resolved event (at `offset` of its partition, with the identifiers identity found in it); False for one
        counted before (same messageId). The offset of the copy that counted is kept: a backfill re-reading the
        partition counts that copy only."""
        seen, counted = memo.seen(state, "s", event, event["message_id"])
        if counted is not None:
            return False
        state.put(seen, {"at": now, "o": offset})
        self._event_at(profile_id, event, state, out, now, identifiers=identifiers)
        return True

    def merge(self, entry: Mapping[str, Any], out: Changes) -> None:
        """A merge-log entry at the survivor's partition: ask the merged profile's partition for its state."""
        check_merge(entry)
        if entry["kind"] != "merged":
            return
        merged, survivor = entry["merged_profile_id"], entry["survivor_profile_id"]
        out.commands.append((merged, {"kind": "fold_out", "profile": merged, "into": survivor, "at": entry["timestamp"]}))

    def apply(self, command: Command, state: State, out: Changes, now: int) -> None:
        """Check and run one command, all or nothing. One that is malformed or fails is reported in `out.failed` (see
        the module docstring); only DefinitionsBehind (wait and retry) escapes."""
        attempt, attempt_out = Overlay(state), Changes()
        try:
            check_command(command)
            self.command(command, attempt, attempt_out, now)
            self.fits(attempt, attempt_out)
        except Waiting:
            raise
        except Exception as exc:  # a bad command (or a bug it hits) costs that command, never the partition
            out.failed.append((command, exc))
            return
        attempt.commit()
        out.extend(attempt_out)

    def fits(self, step: Overlay, out: Changes) -> None:
        """InvalidRecord if a step's state records or trait changes (old and new value) outgrow `max_record_bytes`:
        refused, the step costs itself rather than stalling its partition."""
        check_sizes(step, self.max_record_bytes)
        if self.max_record_bytes is not None:
            for change in out.traits:
                if len(orjson.dumps(change)) > self.max_record_bytes:
                    raise InvalidRecord(f"the change of {change['trait']!r} of {change['profile_id']} would be over "
                                        f"{self.max_record_bytes} bytes")  # fmt: skip

    def command(self, command: Command, state: State, out: Changes, now: int) -> None:
        """A checked command from another partition. It says which definitions its sender had (`feed`, a position in
        cdp.definitions); a receiver that is behind must not act on it yet (DefinitionsBehind: retry later), so
        a forwarded event counts for exactly the state ids its sender counted it for, and no state is dropped
        as unknown that is merely new."""
        kind, needed = command["kind"], command.get("feed") or 0
        if needed > self._live().position:
            if not self._exists(needed):
                raise InvalidRecord(f"a {kind} command says its sender had definitions up to {needed}, beyond the end of "
                                    "the definitions topic")  # fmt: skip
            raise DefinitionsBehind(f"a {kind} command needs definitions up to {needed}, this worker has "
                                    f"{self._live().position}")  # fmt: skip
        if kind == "event":
            if self._first_forward("sf", command["event"], f"{command['profile']}|{command['event']['message_id']}", state):
                self._event_at(command["profile"], command["event"], state, out, now, only=frozenset(command["sids"]))
        elif kind == "backfill_event":
            seen = f"{command['profile']}|{','.join(sorted(command['sids']))}|{command['event']['message_id']}"
            if self._first_forward("sb", command["event"], seen, state):
                self.backfill_event(command["profile"], command["event"], command["sids"], state, out, now)
        elif kind == "fold_out":
            self._fold_out(command, state, out)
        elif kind == "fold_in":
            self._fold_in(command, state, out, now)
        else:
            raise ValueError(f"unknown compute command {kind!r}")

    @staticmethod
    def _first_forward(kind: str, event: Mapping[str, Any], rest: str, state: State) -> bool:
        """A forwarded event is deduplicated where it arrives, per profile: a re-sent outbox repeats it."""
        key, found = memo.seen(state, kind, event, rest)
        if found is not None:
            return False
        state.put(key, {})
        return True

    def expire(self, profile_id: str, at: int, state: State, out: Changes, now: int) -> None:
        """The due index says a window of this profile slid at `at`: re-compute its windowed traits."""
        state.delete(due_key(at, profile_id))
        record = state.get(profile_key(profile_id))
        if record is None or record.get("x") != at:
            return  # folded away or re-indexed meanwhile
        live = self._live()
        windowed = [live.by_sid[sid][0] for sid in record["t"] if sid in live.by_sid and live.by_sid[sid][1].window_ms is not None]
        self._settle(profile_id, record, windowed, state, out, now, Cause("window expired", at), always=False)

    def backfill_event(self, profile_id: str, event: Mapping[str, Any], sids: Collection[str], state: State, out: Changes, now: int) -> None:
        """A past event counted for the state ids a backfill computes, and for nothing else (the rest counted it)."""
        forward = state.get(forward_key(profile_id))
        if forward is not None:
            out.commands.append((forward["to"], {"kind": "backfill_event", "profile": forward["to"], "event": dict(event),
                                                 "sids": list(sids), "feed": self._live().position}))  # fmt: skip
            return
        self._event_at(profile_id, event, state, out, now, only=frozenset(sids), identify=False)

    def settle(self, profile_id: str, state: State, out: Changes, now: int, cause: Cause) -> None:
        """Re-compute every trait and audience of a profile (a backfill is done: its values may be emitted)."""
        record = state.get(profile_key(profile_id))
        if record is not None:
            self._settle(profile_id, record, list(self._live().catalog.all_traits), state, out, now, cause)

    # -- steps -------------------------------------------------------------------------------------------------

    def _event_at(self, profile_id: str, event: Mapping[str, Any], state: State, out: Changes, now: int,
                  *, only: frozenset[str] | None = None, identify: bool = True,
                  identifiers: Iterable[Mapping[str, str]] = ()) -> None:  # fmt: skip
        live = self._live()
        forward = state.get(forward_key(profile_id))
        if forward is not None:
            sids = sorted(only if only is not None else live.sids.values())
            out.commands.append((forward["to"], {"kind": "event", "profile": forward["to"], "event": dict(event),
                                                 "sids": sids, "feed": live.position}))  # fmt: skip
            return
        stored = state.get(profile_key(profile_id))
        record = stored or _new_record()
        note_identifiers(record, identifiers or carried(event))
        at = min(max(int(event["timestamp"]), 0), now)  # a client clock ahead of ours counts now, not in a future bucket
        counted = {**event, "timestamp": at} if at != event["timestamp"] else event
        touched = []
        name = trait_state.event_name(event)
        all_traits = live.catalog.all_traits
        for key in live.catalog.observers(name, event["type"] == "track"):  # only the traits this event can count
            sid = live.sids[key]
            if only is not None and sid not in only:
                continue
            before = record["t"].get(sid)
            after = trait_state.observe(all_traits[key], before, counted)
            if after is not before:
                record["t"][sid] = after
                touched.append(key)
        cause = Cause(f"event {name or event['type']}", int(event["timestamp"]), event["message_id"])
        identified = False
        if event["type"] == "identify" and identify:  # a group call's traits are the account's, not the person's
            identified = self._identify(profile_id, record, event, out, cause)
        # A new profile meets every audience once (a `not` may hold for it); after that an audience is re-evaluated
        # only when something it reads changed (new and removed audiences are settled for every profile by their
        # backfill run, agents/compute/generations.py).
        self._settle(profile_id, record, touched, state, out, now, cause, always=stored is None, identified=identified)

    def _identify(self, profile_id: str, record: Record, event: Mapping[str, Any], out: Changes, cause: Cause) -> bool:
        """Identify traits: the latest call's value per trait wins (by timestamp, then messageId). True if a value
        changed."""
        stamp = [int(event["timestamp"]), event["message_id"]]
        changed = False
        for name, value in (event.get("traits") or {}).items():
            held = record["i"].get(name)
            if held is not None and held[:2] >= stamp:
                continue
            record["i"][name] = [*stamp, value]
            if held is None or held[2] != value:
                old = None if held is None else held[2]
                out.traits.append(_change(profile_id, name, "identify", old, value, record, cause))
                changed = True
        return changed

    def _fold_out(self, command: Command, state: State, out: Changes) -> None:
        merged, survivor = command["profile"], command["into"]
        if state.get(forward_key(merged)) is not None:
            return  # handed over before (a repeated merge-log entry)
        record = state.get(profile_key(merged))
        state.put(forward_key(merged), {"to": survivor})
        if record is not None:
            cause = Cause(f"merged into {survivor}", int(command["at"]))
            for audience in sorted(record["m"]):
                self._leave(merged, audience, record, state, out, cause)
            if record.get("x") is not None:
                state.delete(due_key(record["x"], merged))
            state.delete(profile_key(merged))
        out.commands.append((survivor, {"kind": "fold_in", "profile": survivor, "from": merged, "record": record, "at": command["at"],
                                        "feed": self._live().position}))  # fmt: skip

    def _fold_in(self, command: Command, state: State, out: Changes, now: int) -> None:
        survivor, merged = command["profile"], command["from"]
        folded = folded_key(survivor, merged)
        if state.get(folded) is not None:
            return  # a repeat: this profile took it before, and handed it on in its own record if merged since
        forward = state.get(forward_key(survivor))
        if forward is not None:  # the survivor was merged on meanwhile: its own survivor takes it
            out.commands.append((forward["to"], {**command, "profile": forward["to"]}))
            return
        state.put(folded, {})
        other = command.get("record")
        if other is None:
            return
        record = state.get(profile_key(survivor)) or _new_record()
        fold_identifiers(record, other)
        live, touched = self._live(), []
        for sid, part in other["t"].items():
            if sid in live.by_sid:
                key, definition = live.by_sid[sid]
                record["t"][sid] = trait_state.fold(definition, record["t"].get(sid), part)
                touched.append(key)
        cause = Cause(f"merge of {merged}", int(command["at"]))
        for name, held in other["i"].items():
            mine = record["i"].get(name)
            if mine is None or held[:2] > mine[:2]:
                record["i"][name] = held
                if mine is None or mine[2] != held[2]:
                    out.traits.append(_change(survivor, name, "identify", None if mine is None else mine[2], held[2], record, cause))
        self._settle(survivor, record, touched, state, out, now, cause)

    def _settle(
        self, profile_id: str, record: Record, touched: Iterable[str], state: State, out: Changes, now: int, cause: Cause,
        *, always: bool = True, identified: bool = False,
    ) -> None:
        """Re-compute the touched traits, emit what changed, re-evaluate audiences — every one when `always` (a
        fold, a settle run, a new profile), else those that read a value that changed (`identified`: an identify
        trait did) — re-index, store."""
        live = self._live()
        waiting = pending(state)
        for sid in [sid for sid in record["t"] if sid not in live.by_sid]:  # an old version's state: gone
            del record["t"][sid]
        changed: set[str] = set()
        for key in touched:
            definition, sid = live.catalog.all_traits[key], live.sids[key]
            if sid in record["t"]:
                record["t"][sid] = trait_state.expire(definition, record["t"][sid], now)
                if record["t"][sid] is None:
                    del record["t"][sid]
            if sid in waiting:
                continue  # its backfill is still reading history: the value is not complete yet
            new = trait_state.value(definition, record["t"].get(sid), now)
            old = record["v"].get(key, NO_VALUE.get(definition.kind))
            if new == old:
                continue
            changed.add(key)
            if new == NO_VALUE.get(definition.kind):
                record["v"].pop(key, None)
            else:
                record["v"][key] = new
            if key in live.catalog.traits:
                out.traits.append(_change(profile_id, key, "computed", _shown(definition.kind, old), _shown(definition.kind, new), record, cause))
        for key in [key for key in record["v"] if key not in live.catalog.all_traits]:
            del record["v"][key]
        for key in [key for key in record["m"] if key not in live.catalog.audiences]:  # a deleted audience: forget it
            self._leave(profile_id, key, record, state, None, cause)
        if changed or always or identified:
            self._evaluate(profile_id, record, live, waiting, state, out, cause, None if always else (changed, identified))
        self._index_due(profile_id, record, live, state)
        state.put(profile_key(profile_id), record)

    def _evaluate(self, profile_id: str, record: Record, live: Live, waiting: frozenset[str], state: State, out: Changes,
                  cause: Cause, changed: tuple[set[str], bool] | None) -> None:  # fmt: skip
        """Every audience (`changed` None), or those reading a changed trait or (changed[1]) identify traits."""
        catalog = live.catalog
        identify = {name: held[2] for name, held in record["i"].items()}
        values = _Values(record["v"], catalog.all_traits)
        members: dict[str, bool] = {}
        tests = catalog.tests
        for key in catalog.audiences:
            if waiting and live.audience_sids[key] & waiting:  # reads a trait still being backfilled: keep what it was
                members[key] = key in record["m"]
                continue
            if changed is not None:
                reads, reads_identify = catalog.audience_inputs[key]
                if not (reads_identify and changed[1]) and reads.isdisjoint(changed[0]):
                    members[key] = key in record["m"]  # nothing it reads changed: neither did it
                    continue
            members[key] = tests[key](values, identify, values, members)
            if members[key] and key not in record["m"]:
                self._enter(profile_id, key, record, state, out, cause)
            elif not members[key] and key in record["m"]:
                self._leave(profile_id, key, record, state, out, cause)

    def _enter(self, profile_id: str, audience: str, record: Record, state: State, out: Changes, cause: Cause) -> None:
        record["m"][audience] = True
        state.put(member_key(audience, profile_id), {})
        size = state.get(size_key(audience)) or {"n": 0}
        state.put(size_key(audience), {"n": size["n"] + 1})
        out.memberships.append(_membership(profile_id, audience, "entered", record, cause))

    def _leave(self, profile_id: str, audience: str, record: Record, state: State, out: Changes | None, cause: Cause) -> None:
        del record["m"][audience]
        state.delete(member_key(audience, profile_id))
        size = state.get(size_key(audience)) or {"n": 1}
        state.put(size_key(audience), {"n": max(size["n"] - 1, 0)})
        if out is not None:
            out.memberships.append(_membership(profile_id, audience, "exited", record, cause))

    def _index_due(self, profile_id: str, record: Record, live: Live, state: State) -> None:
        due = None
        for sid, part in record["t"].items():
            definition = live.by_sid[sid][1]
            if definition.window_ms is None or not part or not part.get("b"):
                continue
            size = trait_state.bucket_ms(definition.window_ms)
            leaves = (min(int(index) for index in part["b"]) + math.ceil(definition.window_ms / size)) * size
            due = leaves if due is None else min(due, leaves)
        if due != record.get("x"):
            if record.get("x") is not None:
                state.delete(due_key(record["x"], profile_id))
            if due is not None:
                state.put(due_key(due, profile_id), {})
            record["x"] = due


class _Values(Mapping[str, Any]):
    """A profile's trait and counter values as audiences read them (a trait without one: its kind's NO_VALUE),
    looked up on demand: an evaluation reads a few of them, not every definition's."""

    __slots__ = ("_held", "_definitions")

    def __init__(self, held: Mapping[str, Any], definitions: Mapping[str, Any]) -> None:
        self._held, self._definitions = held, definitions

    def __getitem__(self, key: str) -> Any:
        if key in self._held:
            return self._held[key]
        return NO_VALUE.get(self._definitions[key].kind)  # KeyError for a key that is no trait, as a dict would

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._held or key in self._definitions else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._definitions)

    def __len__(self) -> int:
        return len(self._definitions)


def _new_record() -> Record:
    return {"t": {}, "v": {}, "i": {}, "m": {}, "seq": 0, "x": None}


def _shown(kind: str, value: Any) -> Any:
    """What a change says: a trait with nothing counted yet (count 0, an empty list) is 'no value', as before its
    first event; a real 0 of min, max, avg, first or last stays 0."""
    return None if kind in NO_VALUE and value == NO_VALUE[kind] else value


def _change(profile_id: str, trait: str, origin: str, old: Any, new: Any, record: Record, cause: Cause) -> Record:
    record["seq"] += 1
    return {"profile_id": profile_id, "trait": trait, "origin": origin, "old_value": old, "new_value": new,
            "timestamp": cause.timestamp, "message_id": cause.message_id, "seq": record["seq"], **who(record)}  # fmt: skip


def _membership(profile_id: str, audience: str, transition: str, record: Record, cause: Cause) -> Record:
    record["seq"] += 1
    return {"profile_id": profile_id, "audience": audience, "transition": transition, "timestamp": cause.timestamp,
            "seq": record["seq"], "reason": cause.reason, "message_id": cause.message_id, **who(record)}  # fmt: skip
