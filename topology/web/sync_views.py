"""GET /v1/destinations from any worker: every worker's part summed, so the answer is the destination's, not the
answering worker's.

Each worker knows its own partitions' backlog and its own attempts since start (SyncStage.status). The answering
worker asks every other owner of the sync stage's partitions for theirs (/v1/internal/sync/destinations) and adds
them up: counts summed, the newest last error, `disabled` or `retrying` if any worker says so. Partitions whose
owner did not answer are named in `missing_partitions`, so a partial answer never passes for a whole one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from topology.web.routing import Answer, Router

INTERNAL = "/v1/internal/sync/destinations"
SUMMED = ("backlog", "delivered", "retried", "dead_lettered", "attempts")
STATUS_RANK = {"ok": 0, "retrying": 1, "disabled": 2}


class SyncViews:
    def __init__(self, router: Router, local: Callable[[], list[dict[str, Any]]]) -> None:
        self.router, self.local = router, local

    def mine(self) -> dict[str, Any]:
        """This worker's part (the internal view)."""
        return {"destinations": self.local(), "partitions": sorted(self.router.stage.owned())}

    async def destinations(self, hops: int) -> Answer:
        parts = [self.mine()]
        others = sorted({url for p in range(self.router.partitions) if not self.router.stage.owns(p) and (url := self.router.owner(p))})
        answers = await asyncio.gather(*(self.router.call(url, INTERNAL, hops) for url in others))
        parts += [body for status, body in answers if status == 200]
        covered = {p for part in parts for p in part["partitions"]}
        return 200, {"destinations": merged([part["destinations"] for part in parts]),
                     "missing_partitions": sorted(set(range(self.router.partitions)) - covered), "workers": len(parts)}  # fmt: skip


def merged(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each destination's rows from several workers as one row."""
    by_name: dict[str, dict[str, Any]] = {}
    for rows in parts:
        for row in rows:
            held = by_name.get(row["name"])
            if held is None:
                by_name[row["name"]] = {**row, "partitions": sorted(row["partitions"])}
                continue
            for key in SUMMED:
                held[key] += row[key]
            held["partitions"] = sorted({*held["partitions"], *row["partitions"]})
            if STATUS_RANK.get(row["status"], 0) > STATUS_RANK.get(held["status"], 0):
                held["status"] = row["status"]
            held["disabled"] = held["disabled"] or row["disabled"]
            if (row["last_error_at"] or 0) > (held["last_error_at"] or 0):
                held["last_error"], held["last_error_at"] = row["last_error"], row["last_error_at"]
    return [by_name[name] for name in sorted(by_name)]
