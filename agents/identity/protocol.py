"""The identity protocol: resolving events against an identity graph spread over many partitions, race-free.

Every piece of identity state has exactly one owner partition and changes only there, one command at a time:

    identifier   "i|type|value" -> {"p": the profile it points at}          owner: partition of key "type:value"
    profile      "p|<id>"       -> identifiers, merges, pointer, lock, queue owner: partition of key "<id>"
    event saga   "c|<messageId>"-> the event's resolution, claims out        owner: partition of key "<messageId>"
                 "e|<messageId>"   ... once it asked for a join (durable from then on, see below)
    decision     "d|<request>"  -> how a join request was decided (memo)     owners: the survivor's and the younger's
    resolution   "r@<hour>|<messageId>" -> the profile the event was resolved to, owner: partition of key "<messageId>";
                 filed under the hour of its received_at, deleted past the memo horizon (agents/memo.py)

Owners talk through commands on one internal topic, keyed by the owner's key (`Outputs.commands`). An event:
  1. claims each of its identifiers at the identifier's owner: a free one is taken for the event's own fresh
     profile id, a taken one answers the profile it points at;
  2. creates its fresh profile if it took any identifier;
  3. joins, in its identifiers' priority order, the profile of each identifier into the profile of the most
     trusted one. A join is decided at the *older* profile (ids sort by creation time) with the younger one
     locked meanwhile: the younger sends its summary, the older checks the rules and absorbs it or refuses.
     A refused join demotes that identifier for this event (Segment's "drop the least trusted identifier");
  4. resolves to the survivor and is written out with its merge-log entries.

Why this is race-free: a profile changes only at its owner and only while unlocked; a locked or not yet created
profile queues what it is asked and answers in order once free. Locks are only ever waited on from a younger
profile towards an older one (a total order), so waits can't form a cycle, and every join ends. Without limits
every join is accepted, so identifiers that ever shared an event end in one profile: the connected components,
whatever the partition count and interleaving (tests/unit/test_identity_protocol.py checks it against a
union-find oracle). With limits, every join is checked at the single owner of the survivor with the younger
profile frozen, so no profile ever holds more than a rule allows.

Why it survives crashes: handlers are idempotent against a command delivered twice (a claim answers the same
holder, a join locked by the same request is not locked again, a decided request answers its memo), so the
stage may re-send its outbox after a SIGKILL. Ids are deterministic: a profile's id derives from the event that
created it, a join request's id from the event and step. A saga whose claims are still out (`c|`) has sent
nothing else, and a claim sent again takes nothing new (only a free identifier, for the event's deterministic
profile id), so the stage may keep it in memory only: lost in a crash, it is started again from its event, and
answers to the lost one are dropped or taken as the new one's — as long as the identity rules did not change
across the restart, which is why that is off for now (docs/identity.md, "Claiming sagas"). Once a saga asks for
a join it lives at `e|`, durable, since a join request's id must not be reused for another pair
(tests/unit/test_identity_protocol.py loses claiming sagas at random against the same oracles).

Why a bad command can't leave anyone waiting: `apply` checks a command (agents/identity/commands.py) and handles
it all or nothing; one that is malformed or fails (a bug, a record no version of us wrote, a state record it would
grow past `max_record_bytes`) is reported in `Outputs.failed` for the dead-letter topic, and what it leaves behind
is settled (agents/identity/settle.py): its waiters get the answer it would have given, refused or left out.
Queued commands are drained through `apply` too, so one of them failing can't undo the command that frees them.
Record keys and outputs are in agents/identity/records.py.

Pure: no I/O. The stage (topology/stages/identity.py) feeds commands, keeps `State` in RocksDB with a changelog,
and writes `Outputs` to Kafka.
"""

from __future__ import annotations

from collections.abc import Sequence

from agents import memo
from agents.errors import InvalidRecord
from agents.events import RawEvent
from agents.identity.commands import check_command
from agents.identity.identifiers import extract
from agents.identity.records import (
    DONE, LEFT_OUT, LOG_KEPT, Command, Outputs, Record, Resolved, answers_its_claim, claiming_record, drop_saga,
    event_command, identifier_key, identifier_record, load_saga, log_entry, profile_id_for, profile_record, saga_record,
    store_saga,
)  # fmt: skip
from agents.identity.rules import IdentityRules
from agents.identity.settle import Settling
from agents.state import Overlay, State, check_sizes

__all__ = ["IdentityProtocol", "Outputs", "Resolved", "claiming_record", "event_command", "identifier_key",
           "identifier_record", "load_saga", "profile_id_for", "profile_record", "saga_record"]  # fmt: skip


class IdentityProtocol(Settling):
    """The handlers; `handle` applies one command to the owner's state and collects what it causes."""

    def __init__(self, rules: IdentityRules, max_record_bytes: int | None = None) -> None:
        """`max_record_bytes`: no command may make a state record larger (agents.state.check_sizes); one that would
        fails, and is settled, like any other."""
        self.rules, self.max_record_bytes = rules, max_record_bytes

    def apply(self, command: Command, state: State, out: Outputs, *, trusted: bool = False) -> None:
        """Check and handle one command, all or nothing; never raises. A command that is malformed or fails is
        reported in `out.failed` and what it leaves behind is settled (see the module docstring). `trusted`: the
        command was built by this process's handlers (delivered within a poll cycle, never on a topic), so its
        shape is theirs and is not checked again (a check costs about a tenth of the stage's CPU)."""
        attempt, attempt_out = Overlay(state), Outputs()
        try:
            if not trusted:
                check_command(command)
            self.handle(command, attempt, attempt_out)
            check_sizes(attempt, self.max_record_bytes)
        except Exception as exc:  # a bad command (or a bug it hits) costs that command, never the partition
            out.failed.append((command, exc))
            self._settle_failed(command, exc, state, out)
            return
        attempt.commit()
        out.extend(attempt_out)

    def handle(self, command: Command, state: State, out: Outputs) -> None:
        """Handle one checked command; raises on anything it can't do (`apply` is the safe way in)."""
        handler = _HANDLERS.get(command.get("kind", ""))
        if handler is None:
            raise InvalidRecord(f"unknown identity command kind {command.get('kind')!r}")
        handler(self, command, state, out)

    # -- the event's saga, at the messageId's owner ---------------------------------------------------------

    def _on_event(self, command: Command, state: State, out: Outputs) -> None:
        event: RawEvent = command["event"]
        message_id, at = event["message_id"], int(event["timestamp"])
        if load_saga(state, message_id) is not None:
            return  # already under way (the same event re-read)
        _, done = memo.seen(state, DONE, event, message_id)
        if done is not None:  # resolved before (a replay): the same answer, so compute sees the same record again
            out.resolved.append(Resolved(done["p"], done["ids"], event))
            return
        extracted = [i for i in extract(event, self.rules) if not i.blocked]
        linkable, demoted = self._within_limits([(i.type, i.value) for i in extracted])
        saga: Record = {
            "event": event,
            "at": at,
            "pid": profile_id_for(message_id, at),
            "all": [[i.type, i.value] for i in extracted],
            "ids": [list(i) for i in linkable],
            "holders": [None] * len(linkable),
            "fresh": [],
            "step": 0,
            "current": None,
            "joined": [],
            "refused": {},
            "demoted": demoted,
        }
        if not linkable:  # nothing links (all blocked): a profile of its own
            out.send(saga["pid"], {"kind": "create", "profile": saga["pid"], "at": at, "ids": [], "message_id": message_id})
            saga["current"] = saga["pid"]
            self._finish(saga, state, out)
            return
        for index, (type_, value) in enumerate(linkable):
            out.send(
                identifier_key(type_, value),
                {"kind": "claim", "message_id": message_id, "index": index, "type": type_, "value": value, "candidate": saga["pid"]},
            )
        store_saga(state, saga)

    def _within_limits(self, identifiers: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[list[str]]]:
        """An event alone can't break a rule: beyond a type's limit or the identifier cap, the rest is demoted."""
        kept: list[tuple[str, str]] = []
        demoted: list[list[str]] = []
        per_type: dict[str, int] = {}
        for type_, value in identifiers:
            limit = self.rules.rule(type_).limit
            if per_type.get(type_, 0) >= limit.count:
                demoted.append([type_, value, self.rules.describe_limit(type_)])
            elif len(kept) >= self.rules.max_identifiers:
                demoted.append([type_, value, f"max_identifiers {self.rules.max_identifiers}"])
            else:
                per_type[type_] = per_type.get(type_, 0) + 1
                kept.append((type_, value))
        return kept, demoted

    def _on_claimed(self, command: Command, state: State, out: Outputs) -> None:
        saga = load_saga(state, command["message_id"])
        index = command["index"]
        if saga is not None and index >= len(saga["holders"]):
            raise InvalidRecord(f"claimed answers identifier {index} of {command['message_id']}, which has {len(saga['holders'])}")
        if saga is None or saga["step"] != 0 or saga["holders"][index] is not None or not answers_its_claim(saga, command):
            return  # an answer delivered twice, or to a saga since started again with other identifiers
        if command.get("failed") is not None:  # the claim failed at the identifier's owner: it links nothing
            saga["holders"][index] = LEFT_OUT
            saga["demoted"].append([*saga["ids"][index], command["failed"]])
        else:
            saga["holders"][index] = command["holder"]
            if command["fresh"]:
                saga["fresh"].append(index)
        if any(holder is None for holder in saga["holders"]):
            store_saga(state, saga)
            return
        self._create_own(saga, out)
        saga["current"], saga["step"] = next((h for h in saga["holders"] if h != LEFT_OUT), saga["pid"]), 1
        self._advance(saga, state, out)

    def _create_own(self, saga: Record, out: Outputs) -> None:
        """Create the saga's own profile when an identifier was claimed for it, or when a claim failed: then nothing
        else may hold the event, and a copy of that claim delivered again later may yet point its identifier here."""
        fresh = sorted(saga["fresh"])
        if fresh or LEFT_OUT in saga["holders"]:
            ids = [[*saga["ids"][i], saga["at"]] for i in fresh]
            out.send(saga["pid"], {"kind": "create", "profile": saga["pid"], "at": saga["at"], "ids": ids,
                                   "message_id": saga["event"]["message_id"]})  # fmt: skip

    def _advance(self, saga: Record, state: State, out: Outputs) -> None:
        """Join the next identifier's profile into the event's, or finish when none is left."""
        message_id = saga["event"]["message_id"]
        while saga["step"] < len(saga["ids"]):
            holder = saga["holders"][saga["step"]]
            if holder == saga["current"] or holder in saga["joined"] or holder == LEFT_OUT:
                saga["step"] += 1  # nothing to join (a left-out identifier was demoted when its claim failed)
            elif holder in saga["refused"]:
                saga["demoted"].append([*saga["ids"][saga["step"]], saga["refused"][holder]])
                saga["step"] += 1
            else:
                request = f"{message_id}#{saga['step']}"
                link = [saga["ids"][0], saga["ids"][saga["step"]]]
                join = {"kind": "join", "request": request, "message_id": message_id, "a": saga["current"], "b": holder,
                        "at": saga["at"], "link": link}  # fmt: skip
                out.send(max(saga["current"], holder), join)
                store_saga(state, saga)
                return
        self._finish(saga, state, out)

    def _on_joined(self, command: Command, state: State, out: Outputs) -> None:
        saga = load_saga(state, command["message_id"])
        if saga is None or saga["step"] == 0 or command["request"] != f"{command['message_id']}#{saga['step']}":
            return  # an answer delivered twice
        holder = saga["holders"][saga["step"]]
        if command["accepted"]:
            saga["joined"].extend([holder, saga["current"]])
            saga["current"] = command["root"]
        else:
            saga["refused"][holder] = command["rule"]
            saga["demoted"].append([*saga["ids"][saga["step"]], command["rule"]])
        saga["step"] += 1
        self._advance(saga, state, out)

    def _finish(self, saga: Record, state: State, out: Outputs) -> None:
        event, profile_id = saga["event"], saga["current"]
        identifiers = [{"type": t, "value": v} for t, v in saga["all"]]
        out.resolved.append(Resolved(profile_id, identifiers, event))
        state.put(memo.memo_key(DONE, event, event["message_id"]), {"p": profile_id, "ids": identifiers})
        for type_, value, rule in saga["demoted"]:
            out.log.append(log_entry("demoted", profile_id, None, [[type_, value]], event["message_id"], saga["at"], rule))
        drop_saga(state, saga)

    # -- identifiers, at the identifier's owner ---------------------------------------------------------------

    def _on_claim(self, command: Command, state: State, out: Outputs) -> None:
        key = identifier_record(command["type"], command["value"])
        record = state.get(key)
        if record is None:
            record = {"p": command["candidate"]}
            state.put(key, record)
        answer = {"kind": "claimed", "message_id": command["message_id"], "index": command["index"], "type": command["type"],
                  "value": command["value"], "holder": record["p"], "fresh": record["p"] == command["candidate"]}  # fmt: skip
        out.send(command["message_id"], answer)

    def _on_repoint(self, command: Command, state: State, out: Outputs) -> None:
        """After a merge: point straight at the survivor (older wins, so late repoints can't go backwards)."""
        key = identifier_record(command["type"], command["value"])
        record = state.get(key)
        if record is not None and command["profile"] < record["p"]:
            state.put(key, {"p": command["profile"]})

    # -- profiles, at the profile's owner ---------------------------------------------------------------------

    def _on_create(self, command: Command, state: State, out: Outputs) -> None:
        key = profile_record(command["profile"])
        record = state.get(key)
        if record is not None and record["status"] != "expected":
            return  # created already
        queued = record["queue"] if record is not None else []
        state.put(key, {"status": "live", "created_at": command["at"], "ids": command["ids"], "merges": 0, "merged_from": [],
                        "into": None, "lock": None, "queue": [], "log": []})  # fmt: skip
        self._drain(key, queued, state, out)

    def _on_join(self, command: Command, state: State, out: Outputs) -> None:
        """At the younger profile: lock it and offer it to the older one, or wait, or follow its merge."""
        young, old = max(command["a"], command["b"]), min(command["a"], command["b"])
        memo = state.get(f"d|{command['request']}")
        if memo is not None:  # a late duplicate of a decided request: the same answer, not a new decision
            self._answer(command, accepted=memo["accepted"], root=memo["root"], rule=memo["rule"], out=out)
            return
        if young == old:
            self._answer(command, accepted=True, root=old, rule="already joined", out=out)
            return
        key = profile_record(young)
        record = self._record(key, state)
        if record["status"] == "merged":
            moved = {**command, "a": record["into"], "b": old}
            out.send(max(record["into"], old), moved)
            return
        if record["status"] == "expected" or record["lock"] is not None:
            if record["lock"] != command["request"]:
                record["queue"].append(command)
                state.put(key, record)
            return
        record["lock"] = command["request"]
        state.put(key, record)
        summary = {"ids": record["ids"], "merges": record["merges"], "merged_from": record["merged_from"], "log": record["log"]}
        out.send(old, {**command, "kind": "offer", "young": young, "old": old, "summary": summary})

    def _on_offer(self, command: Command, state: State, out: Outputs) -> None:
        """At the older profile: the single place that decides whether the younger one may join it."""
        memo = state.get(f"d|{command['request']}")
        if memo is not None:
            self._reply_offer(command, memo, out)
            return
        key = profile_record(command["old"])
        record = self._record(key, state)
        if record["status"] == "merged":
            out.send(record["into"], {**command, "old": record["into"]})
            return
        if record["status"] == "expected" or record["lock"] is not None:
            record["queue"].append(command)
            state.put(key, record)
            return
        summary, survivor, young = command["summary"], command["old"], command["young"]
        attach = young == profile_id_for(command["message_id"], command["at"]) and not summary["merged_from"]
        merges = record["merges"] + (0 if attach else 1 + summary["merges"])
        rule = self.rules.broken_rule(record["ids"], summary["ids"], merges, command["at"])
        if rule is None:
            rule = "new identifiers" if attach else "identifier match"
            entry = log_entry("merged", survivor, young, command["link"], command["message_id"], command["at"], rule)
            held = {(t, v) for t, v, _ in record["ids"]}
            record["ids"] = record["ids"] + [i for i in summary["ids"] if (i[0], i[1]) not in held]
            record["merges"] = merges
            record["merged_from"] = record["merged_from"] + ([] if attach else [young]) + summary["merged_from"]
            record["log"] = (record["log"] + summary["log"] + [entry])[-LOG_KEPT:]
            for type_, value, _ in summary["ids"]:
                out.send(identifier_key(type_, value), {"kind": "repoint", "type": type_, "value": value, "profile": survivor})
            memo = {"accepted": True, "root": survivor, "rule": rule, "entry": entry}
        else:
            entry = log_entry("refused", survivor, young, command["link"], command["message_id"], command["at"], rule)
            record["log"] = (record["log"] + [entry])[-LOG_KEPT:]
            memo = {"accepted": False, "root": survivor, "rule": rule, "entry": entry}
        out.log.append(entry)
        state.put(key, record)
        state.put(f"d|{command['request']}", memo)
        self._reply_offer(command, memo, out)

    def _reply_offer(self, command: Command, memo: Record, out: Outputs) -> None:
        out.send(command["young"], {"kind": "offered", "request": command["request"], "message_id": command["message_id"],
                                    "young": command["young"], **memo})  # fmt: skip

    def _on_offered(self, command: Command, state: State, out: Outputs) -> None:
        """Back at the younger profile: merged (a pointer now) or refused (free again); then serve its queue."""
        key = profile_record(command["young"])
        record = state.get(key)
        if record is None or record["lock"] != command["request"]:
            return  # an answer delivered twice
        record["lock"] = None
        state.put(f"d|{command['request']}", {k: command.get(k) for k in ("accepted", "root", "rule", "entry")})
        if command["accepted"]:
            record.update(status="merged", into=command["root"], ids=[], log=[])
        elif command.get("entry") is not None:
            record["log"] = (record["log"] + [command["entry"]])[-LOG_KEPT:]
        queued, record["queue"] = record["queue"], []
        state.put(key, record)
        if command.get("message_id") is not None:
            self._answer(command, accepted=command["accepted"], root=command["root"], rule=command["rule"], out=out)
        self._drain(key, queued, state, out)

    def _answer(self, command: Command, *, accepted: bool, root: str | None, rule: str, out: Outputs) -> None:
        out.send(command["message_id"], {"kind": "joined", "request": command["request"], "message_id": command["message_id"],
                                         "accepted": accepted, "root": root, "rule": rule})  # fmt: skip

    def _record(self, key: str, state: State) -> Record:
        """A profile's record; one not created yet is `expected`: what it is asked waits in its queue."""
        record = state.get(key)
        return record if record is not None else {"status": "expected", "lock": None, "queue": []}

    def _drain(self, key: str, queued: list[Command], state: State, out: Outputs) -> None:
        for command in queued:  # in arrival order; one may lock the profile again and queue the rest anew
            self.apply(command, state, out)  # each on its own: one failing can't undo what freed the queue


_HANDLERS = {
    "event": IdentityProtocol._on_event,
    "claim": IdentityProtocol._on_claim,
    "claimed": IdentityProtocol._on_claimed,
    "create": IdentityProtocol._on_create,
    "join": IdentityProtocol._on_join,
    "offer": IdentityProtocol._on_offer,
    "offered": IdentityProtocol._on_offered,
    "joined": IdentityProtocol._on_joined,
    "repoint": IdentityProtocol._on_repoint,
}
