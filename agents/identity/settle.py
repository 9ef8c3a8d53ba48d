"""Settling what a failed identity command leaves behind, so nobody waits on it for ever (docs/identity.md, "Bad
records and failed commands").

`IdentityProtocol.apply` runs a command all or nothing; one that is malformed or fails is reported, and then
`_settle` does for its waiters what it would have done, from the fields it can still read: a failed claim answers
its saga that the identifier is left out; a failed join or offer is refused (and that decision kept, so a copy
delivered again is answered the same); a failed create makes the profile exist anyway; a failed `offered` frees
the younger profile as the older decided; a failed answer to a saga finishes the saga with what it has. Never a
link no event asked for.
"""

from __future__ import annotations

from typing import Any

from agents.identity.records import LEFT_OUT, Command, Outputs, answers_its_claim, load_saga, log_entry, profile_record
from agents.state import Overlay, State

RULE_CHARS = 200  # a `failed: <error>` rule is kept on sagas and merge-log entries: bounded


class Settling:
    """Mixed into IdentityProtocol, whose `_finish`, `_drain` and `_answer` it uses."""

    def _settle_failed(self, command: Command, error: BaseException, state: State, out: Outputs) -> None:
        """Run `_settle` all or nothing; if even that fails (the state itself is broken), report it unsettled."""
        attempt, attempt_out = Overlay(state), Outputs()
        try:
            self._settle(command, failed_rule(error), attempt, attempt_out)
        except Exception as exc:
            out.unsettled.append((command, exc))
            return
        attempt.commit()
        out.extend(attempt_out)

    def _settle(self, command: Any, rule: str, state: State, out: Outputs) -> None:
        """Do for the waiters of a failed command what it would have done, as far as its readable fields allow."""
        if not isinstance(command, dict):
            return
        kind, message_id = command.get("kind"), _text(command, "message_id")
        if kind == "claim" and message_id and _index(command):
            answer = {"kind": "claimed", "message_id": message_id, "index": command["index"], "failed": rule}
            if _text(command, "type") and isinstance(command.get("value"), str):
                answer.update(type=command["type"], value=command["value"])
            out.send(message_id, answer)
        elif kind in ("claimed", "joined") and message_id:
            self._abort(message_id, command, rule, state, out)
        elif kind == "create" and _text(command, "profile"):
            self._create_anyway(command, state, out)
        elif kind == "join" and message_id and _text(command, "request"):
            memo = {"accepted": False, "root": None, "rule": rule, "entry": None}
            state.put(f"d|{command['request']}", memo)  # decided: a copy delivered again gets the same answer
            out.send(message_id, {"kind": "joined", "request": command["request"], "message_id": message_id,
                                  "accepted": False, "root": None, "rule": rule})  # fmt: skip
        elif kind == "offer" and _text(command, "young") and _text(command, "request"):
            old, young = _text(command, "old"), command["young"]
            entry = log_entry("refused", old, young, [], message_id, _whole(command, "at"), rule) if old and message_id else None
            if entry is not None:
                out.log.append(entry)
            memo = {"accepted": False, "root": old or None, "rule": rule, "entry": entry}
            state.put(f"d|{command['request']}", memo)  # decided here: a copy delivered again is refused the same
            out.send(young, {"kind": "offered", "request": command["request"], "message_id": message_id, "young": young, **memo})
        elif kind == "offered" and _text(command, "young") and _text(command, "request"):
            self._free(command, rule, state, out)

    def _abort(self, message_id: str, command: Command, rule: str, state: State, out: Outputs) -> None:
        """Finish a saga whose own step failed with what it has: the profile it stands on so far, the rest demoted.
        Only for the answer the saga waits for now (a late duplicate, or a stray, leaves it alone)."""
        saga = load_saga(state, message_id)
        if saga is None:
            return
        if command.get("kind") == "claimed":
            index = command.get("index")
            if saga["step"] != 0 or not _index(command) or index >= len(saga["holders"]) or saga["holders"][index] is not None:
                return
            if not answers_its_claim(saga, command):
                return
        elif saga["step"] == 0 or command.get("request") != f"{message_id}#{saga['step']}":
            return
        if saga["step"] == 0:  # claims still out: stand on the saga's own profile, which late claims may point at
            if command.get("kind") == "claimed" and command.get("fresh") is True and _index(command) and command["index"] < len(saga["holders"]):
                saga["fresh"] = sorted({*saga["fresh"], command["index"]})
            saga["fresh"] = [i for i in saga["fresh"] if 0 <= i < len(saga["ids"])]
            saga["holders"] = [saga["pid"] if i in saga["fresh"] else LEFT_OUT for i in range(len(saga["ids"]))]
            out.send(saga["pid"], {"kind": "create", "profile": saga["pid"], "at": saga["at"],
                                   "ids": [[*saga["ids"][i], saga["at"]] for i in saga["fresh"]], "message_id": message_id})  # fmt: skip
            saga["current"] = saga["pid"]
        linked = {saga["current"], *saga["joined"]}
        for index in range(saga["step"], len(saga["ids"])):
            if saga["holders"][index] not in linked:
                saga["demoted"].append([*saga["ids"][index], rule])
        self._finish(saga, state, out)

    def _create_anyway(self, command: Command, state: State, out: Outputs) -> None:
        """A profile whose create failed exists all the same (without identifiers), so what waits for it goes on."""
        key = profile_record(command["profile"])
        record = state.get(key)
        if record is not None and record.get("status") != "expected":
            return
        queued = record.get("queue", []) if record is not None else []
        state.put(key, {"status": "live", "created_at": _whole(command, "at"), "ids": [], "merges": 0, "merged_from": [],
                        "into": None, "lock": None, "queue": [], "log": []})  # fmt: skip
        self._drain(key, queued, state, out)

    def _free(self, command: Command, rule: str, state: State, out: Outputs) -> None:
        """The younger profile of a join whose answer failed: merged if the older took it, else unlocked."""
        key = profile_record(command["young"])
        record = state.get(key)
        if record is None or record.get("lock") != command["request"]:
            return
        accepted = command.get("accepted") is True and isinstance(command.get("root"), str) and command["root"] < command["young"]
        record["lock"] = None
        if accepted:
            record.update(status="merged", into=command["root"], ids=[], log=[])
        queued, record["queue"] = record.get("queue", []), []
        state.put(key, record)
        if _text(command, "message_id"):
            self._answer(command, accepted=accepted, root=command["root"] if accepted else None,  # type: ignore[arg-type]
                         rule=command["rule"] if accepted and _text(command, "rule") else rule, out=out)
        self._drain(key, queued, state, out)


def failed_rule(error: BaseException) -> str:
    """The rule a settled failure is logged under (saga demotions, refused merges): `failed: <error>`, bounded."""
    text = f"failed: {type(error).__name__}: {error}"
    return text if len(text) <= RULE_CHARS else text[: RULE_CHARS - 1] + "…"


def _text(command: Command, field: str) -> str | None:
    value = command.get(field)
    return value if isinstance(value, str) and value else None


def _whole(command: Command, field: str) -> int:
    value = command.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15 else 0


def _index(command: Command) -> bool:
    value = command.get("index")
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
