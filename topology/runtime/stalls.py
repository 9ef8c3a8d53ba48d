"""The one retry loop of every stage, and the partitions it is retrying, with why: for the log and /metrics.

A batch is retried only when it *must* not be given up: Kafka did not take its writes (broker unreachable, a
fenced writer: DeliveryFailed, KafkaException) — giving up would let Faust commit inputs whose effects were
lost — or the stage deliberately waits (agents.errors.Waiting, e.g. compute's definitions feed is behind a
record). Bad records never get here: the stages dead-letter them (topology/runtime/dead_letters.py). While a batch
retries, its partition is *waiting* (a Waiting) or *stalled* (anything else), on /metrics as
`cdp_partitions_waiting{stage,reason}` / `cdp_partitions_stalled{stage,reason}` (reason: the error's class)
and in the log: the first failure with its message, then a reminder every minute while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from confluent_kafka import KafkaException

from agents.errors import DeliveryFailed, Waiting
from topology.runtime.dead_letters import describe
from topology.web.metrics import Metric

log = logging.getLogger(__name__)
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
REMIND_EVERY_S = 60.0
RETRIED = (Waiting, DeliveryFailed, KafkaException)  # what retries a batch; anything else a record raises costs it


@dataclass
class Blocked:
    """A partition whose work is being retried."""

    state: str  # "stalled" or "waiting"
    reason: str  # the error's class
    message: str
    since: float  # time.monotonic()
    attempts: int = 1
    reminded: float = 0.0


class PartitionHealth:
    """Which of one stage's partitions are retrying, and why."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.blocked: dict[int, Blocked] = {}

    def failed(self, partition: int, error: BaseException) -> Blocked:
        state = "waiting" if isinstance(error, Waiting) else "stalled"
        now = time.monotonic()
        blocked = self.blocked.get(partition)
        if blocked is None or (blocked.state, blocked.reason) != (state, type(error).__name__):
            blocked = self.blocked[partition] = Blocked(state, type(error).__name__, describe(error), now, reminded=now)
            expected = isinstance(error, (Waiting, DeliveryFailed, KafkaException))
            log.log(logging.INFO if state == "waiting" else logging.WARNING, "%s: partition %d is %s: %s: %s; retrying",
                    self.stage, partition, state, blocked.reason, blocked.message, exc_info=None if expected else error)  # fmt: skip
        else:
            blocked.attempts += 1
            blocked.message = describe(error)
            if now - blocked.reminded >= REMIND_EVERY_S:
                blocked.reminded = now
                log.warning("%s: partition %d still %s after %d attempts (%.0fs): %s: %s", self.stage, partition,
                            state, blocked.attempts, now - blocked.since, blocked.reason, blocked.message)  # fmt: skip
        return blocked

    def ok(self, partition: int) -> None:
        blocked = self.blocked.pop(partition, None)
        if blocked is not None:
            log.info("%s: partition %d goes on after %d attempts (%.1fs %s: %s)", self.stage, partition,
                     blocked.attempts, time.monotonic() - blocked.since, blocked.state, blocked.reason)  # fmt: skip

    def forget(self, partitions: set[int]) -> None:
        """Partitions this worker no longer owns: their work is someone else's now."""
        for partition in partitions:
            self.blocked.pop(partition, None)

    def counts(self, state: str) -> Counter[str]:
        return Counter(b.reason for b in self.blocked.values() if b.state == state)


def blocked_metrics(healths: list[PartitionHealth]) -> list[Metric]:
    """The two gauges, one sample per stage and reason (none when nothing is blocked)."""
    stalled = Metric("cdp_partitions_stalled", "gauge", "partitions whose batch is retried because Kafka did not take it, by error class")
    waiting = Metric("cdp_partitions_waiting", "gauge", "partitions deliberately waiting (e.g. for newer definitions), by reason")
    for health in healths:
        for metric, state in ((stalled, "stalled"), (waiting, "waiting")):
            for reason, count in sorted(health.counts(state).items()):
                metric.add(count, stage=health.stage, reason=reason)
    return [stalled, waiting]


async def until_done(
    health: PartitionHealth,
    partition: int,
    work: Callable[[], Awaitable[None]],
    *,
    still_wanted: Callable[[], bool] = lambda: True,
    on_retry: Callable[[], None] = lambda: None,
) -> bool:
    """Run `work` until it succeeds (True) or the partition is no longer wanted here (False). `on_retry` runs after
    each failure (e.g. to catch up before deciding again)."""
    backoff = FIRST_BACKOFF_S
    while True:
        if not still_wanted():
            health.forget({partition})
            return False
        try:
            await work()
        except Exception as exc:  # retried: see the module docstring for why nothing else gets here
            health.failed(partition, exc)
            on_retry()
        else:
            health.ok(partition)
            return True
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)
