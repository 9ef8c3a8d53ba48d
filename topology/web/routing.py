"""Which worker owns a key, and asking it: how every web view answers from any worker.

Routing is by the raw key's murmur2 partition of the stage's input topic (the same hash Kafka and our producers
use), and the owner of that partition comes from the Faust assignor's view of the group. Faust's own
`table_route` is not used: it hashes JSON-encoded keys, so it would send a raw key to the wrong worker (faust
#514). A request carries how many hops it has made, so a map that is out of date can't bounce it for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from topology.runtime.partitioned_stage import PartitionedStage
from topology.runtime.partitioning import partition_for
from topology.runtime.state_store import StateStore

HOPS_HEADER = "X-CDP-Hops"
MAX_HOPS = 8
Answer = tuple[int, dict[str, Any]]


class Router:
    """Owners of one stage's partitions, as the assignor sees them (url -> {topic: [partitions]})."""

    def __init__(self, stage: PartitionedStage, topic: str, partitions: int, owners: Callable[[], dict[str, Any]]) -> None:
        self.stage, self.topic, self.partitions = stage, topic, partitions
        self._owners = owners
        self._session: aiohttp.ClientSession | None = None

    def partition(self, key: str) -> int:
        return partition_for(key, self.partitions)

    async def local_or_remote(self, key: str, path: str, hops: int) -> tuple[StateStore | None, Answer]:
        """(the store, _) when this worker owns `key`; (None, the owner's answer) otherwise."""
        return await self.at_partition(self.partition(key), path, hops)

    async def at_partition(self, partition: int, path: str, hops: int) -> tuple[StateStore | None, Answer]:
        store = self.stage.readable_store(partition)
        if store is not None:
            return store, (0, {})
        owner = None if self.stage.owns(partition) else self.owner(partition)  # ours but catching up: no self-call
        if owner is None or hops >= MAX_HOPS:
            return None, (503, {"error": f"partition {partition} of {self.topic} has no ready owner yet "
                                         "(a worker is catching up or partitions are moving); retry"})  # fmt: skip
        return None, await self.call(owner, path, hops)

    async def call(self, owner: str, path: str, hops: int) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.get(owner.rstrip("/") + path, headers={HOPS_HEADER: str(hops + 1)}) as response:
                return response.status, await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return 503, {"error": f"the worker at {owner} did not answer: {exc}; retry"}

    def owner(self, partition: int) -> str | None:
        for url, topics in self._owners().items():
            if partition in topics.get(self.topic, ()):
                return str(url)
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
