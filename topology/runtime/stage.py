"""The contract every worker stage keeps, so the graph wires them all alike (topology/graph.py).

A stage reads its co-partitioned inputs through an InputFeed (topology/runtime/input_feed.py) on the partitions
Faust's group gives the worker, keeps per-partition state, and says what it did on /metrics. PartitionedStage
(identity, compute) and DedupStage keep it; a new stage (sync) keeps it too and is then one spec, one wiring
module and its logic in agents/.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from topology.web.metrics import Metric

if TYPE_CHECKING:
    from topology.runtime.input_feed import InputFeed
    from topology.runtime.stalls import PartitionHealth

Timer = tuple[float, Callable[[], Awaitable[None]]]  # (interval in seconds, a body that never raises)


class Stage(Protocol):
    name: str
    health: PartitionHealth

    def inputs(self) -> list[str]:
        """Its input topics, co-partitioned: the partitions of each that a worker owns are the same numbers."""
        ...

    def on_partitions_assigned(self, partitions: set[int]) -> None:
        """Faust's group gave this worker these partitions (called before its feed reads them)."""
        ...

    async def on_partitions_revoked(self, partitions: set[int]) -> None:
        """These partitions are no longer this worker's (called after its feed stopped reading them)."""
        ...

    async def run(self, feed: InputFeed) -> None:
        """Read the feed for ever."""
        ...

    def applied_offset(self, partition: int, topic: str) -> int | None:
        """The next offset of an input partition it has to decide, if it knows (for the lag on /metrics)."""
        ...

    def timers(self) -> list[Timer]:
        """Its periodic work (window clocks, memo expiry)."""
        ...

    def metrics(self) -> list[Metric]:
        """What it did, for /metrics."""
        ...
