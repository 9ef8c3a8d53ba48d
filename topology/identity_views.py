"""The identity web views: any worker answers, reading the owner's store or asking the owner over HTTP.

Routing is by the raw key's murmur2 partition of cdp.identity.commands (the same hash Kafka and our producers
use), and the owner of that partition comes from the Faust assignor's view of the group. Faust's own
`table_route` is not used: it hashes JSON-encoded keys, so it would send a raw key to the wrong worker (faust
#514). A merged profile answers with its survivor (`requested_profile_id` says what was asked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from agents.identity.protocol import identifier_key, identifier_record, profile_record
from topology.identity_stage import IdentityStage
from topology.partitioned_stage import partition_for

HOPS_HEADER = "X-CDP-Hops"
MAX_HOPS = 8
Answer = tuple[int, dict[str, Any]]


class IdentityViews:
    """GET /v1/identifiers/{type}/{value}, /v1/profiles/{id}, /v1/profiles/{id}/merges."""

    def __init__(self, stage: IdentityStage, partitions: int, owners: Callable[[], dict[str, Any]]) -> None:
        self.stage = stage
        self.partitions = partitions
        self._owners = owners  # url -> {topic: [partitions]}, from the assignor
        self._session: aiohttp.ClientSession | None = None

    async def identifier(self, type_: str, value: str, hops: int) -> Answer:
        key = identifier_key(type_, value)
        store, answer = await self._local_or_remote(key, f"/v1/identifiers/{quote(type_, safe='')}/{quote(value, safe='')}", hops)
        if store is None:
            return answer
        record = store.get(identifier_record(type_, value))
        if record is None:
            return 404, {"error": f"no profile has the identifier {type_}:{value}"}
        return await self.profile(record["p"], hops, merges=False)

    async def profile(self, profile_id: str, hops: int, *, merges: bool, requested: str | None = None) -> Answer:
        path = f"/v1/profiles/{quote(profile_id, safe='')}" + ("/merges" if merges else "")
        store, answer = await self._local_or_remote(profile_id, path, hops)
        if store is None:
            if requested is not None and answer[0] == 200:
                answer[1]["requested_profile_id"] = requested
            return answer
        record = store.get(profile_record(profile_id))
        if record is None or record["status"] == "expected":
            return 404, {"error": f"no profile {profile_id}"}
        if record["status"] == "merged":
            return await self.profile(record["into"], hops, merges=merges, requested=requested or profile_id)
        body: dict[str, Any] = {"profile_id": profile_id}
        if requested is not None:
            body["requested_profile_id"] = requested
        if merges:
            body["merges"] = record["log"]
        else:
            body.update(
                created_at=record["created_at"],
                identifiers=[{"type": t, "value": v, "added_at": at} for t, v, at in record["ids"]],
                merged_from=record["merged_from"],
                merges=record["merges"],
            )
        return 200, body

    async def _local_or_remote(self, key: str, path: str, hops: int) -> tuple[Any, Answer]:
        """(the store, _) when this worker owns `key`; (None, the owner's answer) otherwise."""
        partition = partition_for(key, self.partitions)
        store = self.stage.readable_store(partition)
        if store is not None:
            return store, (0, {})
        owner = None if self.stage.owns(partition) else self._owner(partition)  # ours but catching up: no self-call
        if owner is None or hops >= MAX_HOPS:
            return None, (503, {"error": f"partition {partition} of {self.stage.topics.commands} has no ready owner yet "
                                         "(a worker is catching up or partitions are moving); retry"})  # fmt: skip
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.get(owner.rstrip("/") + path, headers={HOPS_HEADER: str(hops + 1)}) as response:
                return None, (response.status, await response.json())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return None, (503, {"error": f"the owner of partition {partition} ({owner}) did not answer: {exc}; retry"})

    def _owner(self, partition: int) -> str | None:
        for url, topics in self._owners().items():
            if partition in topics.get(self.stage.topics.commands, ()):
                return str(url)
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
