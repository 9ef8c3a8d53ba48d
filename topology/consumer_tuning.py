"""Faust's consumer, with the one setting it hard-codes that costs us latency: how long a fetch may wait.

faust-streaming 0.15 creates its aiokafka consumer with `fetch_max_wait_ms=1500`. aiokafka sends one fetch per
broker at a time and leaves out of it every partition whose records are still being processed; a partition
left out waits until the in-flight fetch returns, which on a quiet topic is the full wait. Each hop of the
pipeline (dedup, identity and its commands, compute) can lose up to 1.5 s that way: the "1.5 s mode" the compute
benchmark saw. With `FETCH_MAX_WAIT_MS` a quiet worker sends a few more (empty) fetches per second; a busy one
gets data at once either way.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

FETCH_MAX_WAIT_MS = 50


def shorten_fetch_wait() -> None:
    """Make every Faust worker consumer created from now on wait at most FETCH_MAX_WAIT_MS per fetch."""
    thread = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread, "_cdp_fetch_wait", None) is not None:
        return
    create = thread._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher (aiokafka 0.14)
        return consumer

    thread._create_worker_consumer = create_worker_consumer
    thread._cdp_fetch_wait = FETCH_MAX_WAIT_MS
