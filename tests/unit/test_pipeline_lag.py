"""Backpressure without Kafka: the lag arithmetic, the reading kept between polls, the 429 decision, failures that
never refuse, the config key, and the ingest's answers (a fake producer behind the real aiohttp app)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agents.errors import ConfigError
from topology.codecs import AvroCodec, SchemaRepository
from topology.config import IngestSettings, Settings
from topology.web.ingest import IngestServer
from topology.web.metrics import render
from topology.runtime.pipeline_lag import Offsets, PipelineLag, hop_lags, partition_lag
from topology.runtime.producer import Record


def test_a_partition_counts_from_its_committed_offset_else_from_its_low_watermark() -> None:
    assert partition_lag(Offsets(low=0, high=100, committed=40)) == 60
    assert partition_lag(Offsets(low=10, high=100, committed=None)) == 90  # the group never committed here
    assert partition_lag(Offsets(low=50, high=100, committed=40)) == 50  # retention deleted what it had not read
    assert partition_lag(Offsets(low=0, high=100, committed=100)) == 0
    assert partition_lag(Offsets(low=0, high=0, committed=7)) == 0  # topic recreated under the group: never negative


def test_hops_sum_their_partitions() -> None:
    partitions = {("a", 0): Offsets(0, 10, 5), ("a", 1): Offsets(0, 3, None), ("r", 0): Offsets(0, 8, 8), ("x", 0): Offsets(0, 9, 0)}
    assert hop_lags(partitions, {"dedup": "a", "identity": "r", "compute": "c"}) == {"dedup": 8, "identity": 0, "compute": 0}


class Counts:
    """What the ingest process wrote: acknowledged by Kafka, and in flight."""

    def __init__(self) -> None:
        self.acknowledged = self.in_flight = 0


def gate(max_lag: int, readings: list[Any], counts: Counts | None = None) -> PipelineLag:
    counts = counts or Counts()

    def read() -> dict[str, int]:
        reading = readings.pop(0)
        if isinstance(reading, Exception):
            raise reading
        return reading

    return PipelineLag(max_lag, read, lambda: counts.acknowledged, lambda: counts.in_flight)


def test_the_reading_plus_what_this_process_wrote_since_it_began_is_compared_with_max_lag() -> None:
    counts = Counts()
    lag = gate(1_000, [{"dedup": 600, "identity": 300, "compute": 50}], counts)
    assert lag.lag() is None and lag.refuses() is None  # no reading yet: accept
    counts.acknowledged = 5_000  # what this process wrote before the reading began is in the reading already
    lag.poll()
    assert lag.lag() == 950 and lag.refuses() is None
    counts.acknowledged += 40
    counts.in_flight = 10
    assert lag.lag() == 1_000 and lag.refuses() is None  # the bound itself is still accepted
    counts.in_flight = 11
    assert lag.refuses() == 1_001
    assert lag.refuses() == 1_001 and lag.refusals == 2


def test_max_lag_zero_never_refuses() -> None:
    lag = gate(0, [{"dedup": 10**9, "identity": 0, "compute": 0}])
    lag.poll()
    assert lag.lag() == 10**9 and lag.refuses() is None and lag.refusals == 0


def test_a_failed_reading_accepts_logs_once_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    lag = gate(10, [{"dedup": 50}, RuntimeError("broker gone"), RuntimeError("still gone"), {"dedup": 60}])
    lag.poll()
    assert lag.refuses() == 50
    with caplog.at_level(logging.INFO, logger="topology.runtime.pipeline_lag"):
        lag.poll()
        lag.poll()
        assert lag.lag() is None and lag.refuses() is None and lag.error == "still gone"
        lag.poll()
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"], caplog.text
    assert "broker gone" in caplog.records[0].getMessage()
    assert lag.failures == 2 and lag.error is None and lag.refuses() == 60
    text = render(lag.metrics())
    assert "cdp_ingest_lag_read_errors_total 2\n" in text and "cdp_ingest_max_lag 10\n" in text
    assert 'cdp_ingest_pipeline_lag{stage="dedup"} 60\n' in text and "cdp_ingest_lag_refusals_total 2\n" in text


def test_the_thread_polls_until_stopped() -> None:
    readings = [{"dedup": n} for n in range(1_000)]
    lag = PipelineLag(5, lambda: readings.pop(0), lambda: 0, lambda: 0, interval_s=0.01)
    lag.start()
    try:
        deadline = time.monotonic() + 5
        while len(readings) > 990:  # ten readings
            assert time.monotonic() < deadline, "the thread does not poll"
            time.sleep(0.01)
    finally:
        lag.stop()
    left = len(readings)
    time.sleep(0.05)
    assert len(readings) == left and lag.refuses() is not None  # stopped; the last reading is kept


def test_max_lag_is_configured_under_ingest() -> None:
    assert Settings.from_mapping({}).ingest.max_lag == IngestSettings().max_lag == 25_000
    assert Settings.from_mapping({"ingest": {"max_lag": 0}}).ingest.max_lag == 0
    assert Settings.from_mapping({"ingest": {"max_lag": 2_000}}).ingest.max_lag == 2_000
    for bad in (-1, "lots", True, 1.5):
        with pytest.raises(ConfigError, match="ingest.max_lag must be a non-negative integer"):
            Settings.from_mapping({"ingest": {"max_lag": bad}})


class FakeProducer:
    """Acknowledges every write at once."""

    def __init__(self) -> None:
        self.written: list[Record] = []

    async def write_all(self, records: Sequence[Record]) -> None:
        self.written.extend(records)


def test_the_ingest_answers_429_with_retry_after_to_every_event_carrying_request_while_the_lag_is_over() -> None:
    asyncio.run(_ingest_answers())


async def _ingest_answers() -> None:
    producer = FakeProducer()
    readings = [{"dedup": 0}, {"dedup": 0, "identity": 500}, {"dedup": 0}]
    server = IngestServer(
        sources={"wk": "web"}, topic="t.events.accepted", codec=AvroCodec("raw_event", SchemaRepository.load()),
        producer=producer, max_in_flight=10_000, retry_after_s=3, request_timeout_s=5,  # type: ignore[arg-type]
    )  # fmt: skip
    server.lag = lag = PipelineLag(100, lambda: readings.pop(0), lambda: server.events_accepted, lambda: server.in_flight)
    lag.poll()
    async with TestClient(TestServer(server.app())) as client:
        auth = {"Authorization": "Basic d2s6"}  # wk:
        batch = {"batch": [{"type": "track", "userId": f"u{n}", "event": "e"} for n in range(60)]}
        assert (await client.post("/v1/batch", json=batch, headers=auth)).status == 200  # lag 0 + 60 written
        assert (await client.post("/v1/batch", json=batch, headers=auth)).status == 200  # 60 <= 100 before it
        for path, body in (("/v1/track", {"userId": "u", "event": "e"}), ("/v1/batch", batch), ("/v1/identify", {"userId": "u"})):
            response = await client.post(path, json=body, headers=auth)
            assert response.status == 429 and response.headers["Retry-After"] == "3"
            error = (await response.json())["error"]
            assert "120 events behind" in error and "ingest.max_lag (100)" in error, error
        assert (await client.post("/v1/batch", json={"batch": []}, headers=auth)).status == 200  # carries no event
        assert (await client.post("/v1/track", json={"userId": "u"}, headers=auth)).status == 400  # still named
        lag.poll()  # the pipeline took the 120 but is 500 behind elsewhere
        assert (await client.post("/v1/track", json={"userId": "u", "event": "e"}, headers=auth)).status == 429
        lag.poll()  # caught up
        assert (await client.post("/v1/track", json={"userId": "u", "event": "e"}, headers=auth)).status == 200
        text = await (await client.get("/metrics")).text()
    assert len(producer.written) == 121
    assert "cdp_ingest_lag_refusals_total 4\n" in text and "cdp_ingest_max_lag 100\n" in text
    assert 'cdp_ingest_responses_total{status="429"} 4\n' in text
