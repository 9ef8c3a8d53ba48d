"""The retry loop every stage runs a batch in: what it retries, how a retrying partition shows on /metrics and in
the log, and that it lets go of a partition that moved away."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agents.compute.engine import DefinitionsBehind
from agents.errors import DeliveryFailed
from topology.web.metrics import render
from topology.runtime.stalls import PartitionHealth, blocked_metrics, until_done


def test_a_wait_shows_as_waiting_a_kafka_failure_as_stalled_and_success_clears_both(caplog: pytest.LogCaptureFixture) -> None:
    health = PartitionHealth("compute")
    seen: list[str] = []
    failures = [DefinitionsBehind("feed at 3, needs 5"), DeliveryFailed("broker away"), DeliveryFailed("broker away")]

    async def work() -> None:
        seen.append(render(blocked_metrics([health])))
        if failures:
            raise failures.pop(0)

    with caplog.at_level(logging.INFO, logger="topology.runtime.stalls"):
        assert asyncio.run(until_done(health, 3, work)) is True
    assert 'cdp_partitions_waiting{reason="DefinitionsBehind",stage="compute"} 1' in seen[1]
    assert 'cdp_partitions_stalled{reason="DeliveryFailed",stage="compute"} 1' in seen[2]
    assert 'cdp_partitions_stalled{reason="DeliveryFailed",stage="compute"} 1' in seen[3] and "cdp_partitions_waiting{" not in seen[3]
    assert health.blocked == {} and "cdp_partitions_stalled{" not in render(blocked_metrics([health]))
    messages = [r.getMessage() for r in caplog.records]
    assert any("partition 3 is waiting: DefinitionsBehind: feed at 3, needs 5" in m for m in messages)
    assert sum("is stalled: DeliveryFailed: broker away" in m for m in messages) == 1, "a repeat is not logged again at once"
    assert any("goes on after" in m for m in messages)


def test_a_partition_that_moved_away_is_let_go() -> None:
    health, wanted = PartitionHealth("identity"), [True, True, False]

    async def work() -> None:
        raise DeliveryFailed("fenced")

    assert asyncio.run(until_done(health, 0, work, still_wanted=lambda: wanted.pop(0))) is False
    assert health.blocked == {}

