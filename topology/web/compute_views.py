"""The compute web views: a profile's computed traits and audiences, audience sizes and member lists.

Every answer is assembled from the owners of the compute partitions (topology/web/routing.py, by partition of
cdp.events.resolved): a profile from its partition's owner, an audience's size as the sum over all partitions,
its members partition by partition in key order, so a cursor (`<partition>:<last profile id>`) walks the whole
list exactly once whichever worker each page is asked of. A partition without a ready owner makes the answer
503 (retry), never a silently partial one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from agents.compute import traits as trait_state
from agents.compute.backfill import Backfills
from agents.compute.engine import SIZES, member_key, profile_key
from agents.compute.generations import Live
from topology.web.routing import Answer, Router
from topology.runtime.state_store import StateStore

INTERNAL = "/v1/internal/compute"
PAGE_DEFAULT, PAGE_MAX = 100, 1_000


class ComputeViews:
    def __init__(self, router: Router, live: Callable[[], Live], clock_ms: Callable[[], int]) -> None:
        self.router, self._live, self._clock_ms = router, live, clock_ms

    # -- a profile ---------------------------------------------------------------------------------------------

    async def profile(self, profile_id: str, hops: int) -> Answer:
        """{traits, computed_traits, audiences} of a profile (empty ones for a profile compute has not seen)."""
        store, answer = await self.router.local_or_remote(profile_id, f"{INTERNAL}/profiles/{quote(profile_id, safe='')}", hops)
        if store is None:
            return answer
        record = store.get(profile_key(profile_id)) or {"t": {}, "i": {}, "m": {}}
        now, live = self._clock_ms(), self._live()
        catalog = live.catalog
        computed = {key: trait_state.value(d, record["t"].get(live.sids[key]), now) for key, d in catalog.traits.items()}
        return 200, {
            "traits": {name: held[2] for name, held in sorted(record["i"].items())},
            "computed_traits": computed,
            "audiences": sorted(key for key in record["m"] if key in catalog.audiences),
        }

    async def enrich(self, profile_id: str, hops: int) -> dict[str, Any]:
        status, body = await self.profile(profile_id, hops)
        return body if status == 200 else {"computed_traits_error": body.get("error", f"HTTP {status}")}

    # -- audiences ---------------------------------------------------------------------------------------------

    async def audiences(self, hops: int) -> Answer:
        """Every audience with its size: the sum of its member counts over all partitions."""
        sizes = {key: 0 for key in self._live().catalog.audiences}
        for partition in range(self.router.partitions):
            status, body = await self.sizes_in(partition, hops)
            if status != 200:
                return status, body
            for key, n in body["sizes"].items():
                if key in sizes:
                    sizes[key] += n
        return 200, {"audiences": [{"key": key, "size": size} for key, size in sizes.items()]}

    async def sizes_in(self, partition: int, hops: int) -> Answer:
        store, answer = await self.router.at_partition(partition, f"{INTERNAL}/sizes/{partition}", hops)
        if store is None:
            return answer
        return 200, {"sizes": {key[len(SIZES):]: store.get(key)["n"] for key in store.keys(SIZES)}}  # type: ignore[index]

    async def backfills(self, hops: int) -> Answer:
        """Backfill runs under way and recently done, partition by partition, with their progress."""
        runs, done = [], []
        for partition in range(self.router.partitions):
            status, body = await self.backfills_in(partition, hops)
            if status != 200:
                return status, body
            runs.extend({"partition": partition, **run} for run in body["runs"])
            done.extend({"partition": partition, **run} for run in body["done"])
        return 200, {"partitions": self.router.partitions, "runs": runs, "done": done}

    async def backfills_in(self, partition: int, hops: int) -> Answer:
        store, answer = await self.router.at_partition(partition, f"{INTERNAL}/backfills/{partition}", hops)
        if store is None:
            return answer
        backfills = Backfills.load(store)
        return 200, {"runs": backfills.runs, "done": backfills.done}

    async def members(self, audience: str, cursor: str | None, limit: int, hops: int) -> Answer:
        """One page of an audience's members and the cursor of the next (None after the last)."""
        if audience not in self._live().catalog.audiences:
            return 404, {"error": f"no audience {audience!r}"}
        limit = max(1, min(limit, PAGE_MAX))
        partition, after = 0, ""
        if cursor:
            head, _, after = cursor.partition(":")
            if not (head.isascii() and head.isdigit() and len(head) <= 12) or int(head) >= self.router.partitions:
                return 400, {"error": f"bad cursor {cursor!r}: use the next_cursor of the previous page"}
            partition = int(head)
        page: list[str] = []
        while partition < self.router.partitions and len(page) < limit:
            status, body = await self.members_in(audience, partition, after, limit - len(page), hops)
            if status != 200:
                return status, body
            page.extend(body["members"])
            if body["more"]:
                return 200, {"audience": audience, "members": page, "next_cursor": f"{partition}:{page[-1]}"}
            partition, after = partition + 1, ""
        next_cursor = f"{partition}:" if partition < self.router.partitions else None
        return 200, {"audience": audience, "members": page, "next_cursor": next_cursor}

    async def members_in(self, audience: str, partition: int, after: str, limit: int, hops: int) -> Answer:
        path = f"{INTERNAL}/members/{quote(audience, safe='')}/{partition}?after={quote(after, safe='')}&limit={limit}"
        store, answer = await self.router.at_partition(partition, path, hops)
        if store is None:
            return answer
        return 200, _page(store, audience, after, limit)


def _page(store: StateStore, audience: str, after: str, limit: int) -> dict[str, Any]:
    prefix = member_key(audience, "")
    members: list[str] = []
    for key in store.keys(prefix, after):
        profile_id = key[len(prefix):]
        if len(members) == limit:
            return {"members": members, "more": True}
        members.append(profile_id)
    return {"members": members, "more": False}
