"""A compute partition's backfill bookkeeping: which definition generations it has met, and the runs that compute a
new generation over the history still in Kafka. Pure: the `b|` record in, the `b|` record out; the stage
(topology/stages/compute.py) reads the history and applies each chunk in a transaction with this record.

A run goes through two phases:
  `events`  re-read cdp.events.resolved of the partition from its start up to `until` (the live position when
            the run began), counting each past event for the run's state ids only (`next` is where it stands);
  `settle`  re-evaluate every profile of the partition in key order (`after` is the last one done), so values and
            memberships are emitted once complete; then the run moves to `done` (the last DONE_KEPT are kept
            for GET /v1/backfills and `cdp backfill`).
A generation that is no longer live drops its run (nothing left to count for); a state id no longer defined
is forgotten, so a definition that returns is new again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from agents.errors import Waiting
from agents.state import Readable, State

BACKFILLS = "b|"  # the partition's one backfill record
DONE_KEPT = 50  # finished runs kept per partition


class DefinitionsBehind(Waiting):
    """This worker's definitions are older than the ones a command or a partition was handled with (it moved here
    from a worker further ahead): wait for the feed rather than take them for new."""


Run = dict[str, Any]


class Backfills:
    """The `b|` record of one partition: {"gens", "sids", "runs", "done", "feed"}."""

    def __init__(self, record: dict[str, Any] | None) -> None:
        self.record = record if record is not None else {"gens": [], "sids": [], "runs": []}

    @classmethod
    def load(cls, state: Readable) -> Backfills:
        return cls(state.get(BACKFILLS))

    def save(self, state: State) -> None:
        state.put(BACKFILLS, self.record)

    @property
    def runs(self) -> list[Run]:
        return list(self.record.get("runs", []))

    @property
    def done(self) -> list[Run]:
        return list(self.record.get("done", []))

    def run(self, gen: str) -> Run | None:
        return next((run for run in self.record.get("runs", []) if run["gen"] == gen), None)

    def reading(self) -> frozenset[str]:
        """State ids whose run is still reading history (their values are not complete yet)."""
        return frozenset(sid for run in self.record.get("runs", []) if run["phase"] == "events" for sid in run["sids"])

    def meet(self, generations: Mapping[str, Sequence[str]], known_sids: Collection[str], position: int, until: int,
             now: int) -> bool | None:  # fmt: skip
        """Take the live definitions (`generations`: id -> state ids, read up to `position` of cdp.definitions):
        a run for each generation not met yet, from the live position `until`; none for those gone. Whether the
        runs changed (True: the stage has work), only the feed position (False), or nothing (None). Raises
        DefinitionsBehind if the partition was handled with definitions this feed has not read."""
        record = self.record
        if record.get("feed", 0) > position:
            raise DefinitionsBehind(f"it was handled with definitions up to {record['feed']}; this worker's feed is at {position}")
        new = [gen for gen in generations if gen not in record["gens"]]
        superseded = [run for run in record["runs"] if run["gen"] not in generations]
        if not new and not superseded:
            if record.get("feed", 0) < position:
                record["feed"] = position
                return False
            return None
        record["feed"] = position
        record["runs"] = [run for run in record["runs"] if run["gen"] in generations]
        known = set(known_sids)
        record["sids"] = [sid for sid in record["sids"] if sid in known]
        for gen in new:
            sids = [sid for sid in generations[gen] if sid not in record["sids"]]
            record["sids"].extend(sids)
            record["gens"].append(gen)
            record["runs"].append({"gen": gen, "sids": sids, "until": until, "next": None,
                                   "phase": "events" if sids and until else "settle", "after": "", "read": 0,
                                   "counted": 0, "settled": 0, "started": now})  # fmt: skip
        record["gens"] = [gen for gen in record["gens"] if gen in generations]
        return True

    def events_read(self, run: Run, start: int, reached: int, read: int, counted: int) -> None:
        """A chunk of past events from `start` read up to `reached`: settle once `until` is reached."""
        run.setdefault("from", start)
        run["next"], run["read"], run["counted"] = reached, run["read"] + read, run["counted"] + counted
        if reached >= run["until"]:
            run["phase"] = "settle"

    def settled(self, run: Run, profiles: Sequence[str], chunk: int, now: int) -> bool:
        """A chunk of profiles settled (a short chunk was the last): whether the run is done now."""
        run["settled"] += len(profiles)
        if len(profiles) == chunk:
            run["after"] = profiles[-1]
            return False
        self.record["runs"] = [r for r in self.record["runs"] if r["gen"] != run["gen"]]
        self.record["done"] = [*self.record.get("done", [])[-(DONE_KEPT - 1):], {**run, "finished": now}]
        return True
