"""One destination's sending, on its own: a Courier takes its due deliveries from the schedule (agents/sync/schedule.py),
sends them through the kind's Sender with the destination's concurrency and rate limit, and reports each attempt.

Every destination has its own Courier task, connection pool, concurrency and rate limit, so a slow, failing or hung
destination only ever holds up itself. A 429 pauses the whole destination (its rate limit is what was hit) for its
Retry-After, or one retry step. The rate limit is the destination's: each worker takes the share of it that its
partitions are of the whole, so N workers together keep to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from agents.sync.destinations import Destination
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt, TokenBucket
from agents.sync.schedule import Schedule
from topology.destinations import Sender

log = logging.getLogger(__name__)
IDLE_S = 0.5  # the longest a courier sleeps without looking at its schedule
BURST_S = 0.1  # a rate limit's burst: this many seconds of its rate at once


class Courier:
    def __init__(self, destination: Destination, sender: Sender, schedule: Schedule, *,
                 load: Callable[[int, str], dict[str, Any] | None],
                 report: Callable[[str, int, str, Attempt | None], None],
                 share: Callable[[], float], clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        """`load(partition, key)`: the queued delivery (None: not readable now); `report(destination, partition, key,
        attempt)`: an attempt's answer, or None for a delivery found past its max_age (settled without sending);
        `share()`: this worker's share of the destination's partitions (0..1)."""
        self.destination, self.sender, self.schedule = destination, sender, schedule
        self._load, self._report, self._share, self._clock = load, report, share, clock
        self._slots = asyncio.Semaphore(destination.concurrency)
        self._wake = asyncio.Event()
        self._bucket = None if destination.rate_per_s is None else TokenBucket(destination.rate_per_s, 1.0, clock())
        self._paused_until = 0.0
        self.gone = False  # a 410: nothing more is sent until the destination is defined anew (a new Courier)
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.in_flight = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        tasks = [task for task in (self._task, *self._sending) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sender.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the destination for good: log, wait, go on
                log.exception("sync: %s: sending failed; going on", self.destination.name)
                await asyncio.sleep(1.0)

    async def _round(self) -> None:
        now = self._clock()
        if self.destination.disabled is not None or self.gone:
            await asyncio.sleep(IDLE_S)
            return
        if now < self._paused_until:
            await self._sleep(min(IDLE_S, self._paused_until - now))
            return
        await self._slots.acquire()
        batch = self.schedule.take(int(now * 1000), self.sender.max_batch)
        if not batch:
            self._slots.release()
            due = self.schedule.next_due()
            await self._sleep(IDLE_S if due is None else min(IDLE_S, max(due / 1000 - now, 0.001)))
            return
        if self._bucket is not None:
            self._bucket.set_rate(self.destination.rate_per_s * max(self._share(), 0.01))  # type: ignore[operator]
            self._bucket.burst = max(1.0, self._bucket.rate * BURST_S)
            wait = self._bucket.reserve(self._clock())
            if wait > 0:
                await asyncio.sleep(wait)
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _send(self, batch: Sequence[tuple[int, str, str]]) -> None:
        self.in_flight += len(batch)
        try:
            deliveries: list[tuple[int, str, Delivery]] = []
            now_ms = int(self._clock() * 1000)
            for partition, profile, key in batch:
                item = self._load(partition, key)
                if item is None:
                    self.schedule.release(partition, profile)
                elif now_ms - item["queued_at"] > self.destination.max_age_ms:
                    self._report(self.destination.name, partition, key, None)
                else:
                    deliveries.append((partition, key, _delivery(item)))
            if not deliveries:
                return
            try:
                attempt: Attempt | Sequence[Attempt] = await self.sender.send([delivery for _, _, delivery in deliveries])
            except Exception:  # a Sender never raises for the destination's faults: this is a bug; try again later
                log.exception("sync: %s: the sender failed", self.destination.name)
                attempt = Attempt(None, "the sender failed (see the worker's log)")
            answers = [attempt] * len(deliveries) if isinstance(attempt, Attempt) else list(attempt)
            if any(answer.status == 410 for answer in answers):
                self.gone = True  # at once: the definition saying so reaches every worker a moment later
            for answer in answers:
                if answer.status == 429:
                    pause = (answer.retry_after_ms or self.destination.retry_base_ms) / 1000
                    self._paused_until = max(self._paused_until, self._clock() + pause)
            for (partition, key, _), answer in zip(deliveries, answers, strict=True):
                self._report(self.destination.name, partition, key, answer)
        finally:
            self.in_flight -= len(batch)
            self._slots.release()


def _delivery(item: dict[str, Any]) -> Delivery:
    return Delivery(item["id"], item["profile"], item["seq"], item["call"], item["subject"], item["payload"], item["happened_at"])
