"""Synthetic Segment traffic against an ingest: `cdp generate`, and the load side of `cdp bench ingest`.

Runs as its own process in benchmarks (`python -m bench.load ...` prints JSON), so the load generator does
not share an event loop, or a core's time accounting, with the ingest it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.traffic import Traffic


@dataclass
class LoadResult:
    """What one load run saw from the client side."""

    events: int = 0
    requests: int = 0
    failed: int = 0
    retried: int = 0  # answers 429/503, each sent again after Retry-After
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        data.update(
            events_per_s=round(self.events / self.seconds, 1) if self.seconds else 0,
            p50_ms=round(self.percentile(50), 2), p99_ms=round(self.percentile(99), 2),
        )  # fmt: skip
        return data

    def summary(self) -> str:
        data = self.as_json()
        return (
            f"{self.events} events in {self.requests} requests, {self.seconds:.1f}s: {data['events_per_s']} events/s, "
            f"p50 {data['p50_ms']} ms, p99 {data['p99_ms']} ms, failed {self.failed} {self.statuses}"
        )


async def _run(url: str, write_key: str, events: int, batch_size: int, concurrency: int, rate: float) -> LoadResult:
    result = LoadResult()
    traffic = Traffic(run=uuid.uuid4().hex[:8])
    bodies = [orjson.dumps(body) for body in traffic.batches(max(1, events // batch_size) * batch_size, batch_size)]
    todo = len(bodies)
    auth = aiohttp.BasicAuth(write_key, "")
    interval = batch_size / rate if rate else 0.0
    start = time.perf_counter()

    async def worker(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal todo
        while todo > 0:
            todo -= 1
            sent = len(bodies) - todo - 1  # each body once: its messageIds are new
            if interval:
                await asyncio.sleep(max(0.0, start + sent * interval - time.perf_counter()))
            body = bodies[sent]
            while True:  # as every Segment SDK does: a 429 or 503 is sent again after its Retry-After
                t0 = time.perf_counter()
                retry_after = None
                try:
                    async with session.post(f"{url}/v1/batch", data=body, auth=auth, headers={"Content-Type": "application/json"}) as response:
                        await response.read()
                        status, retry_after = str(response.status), response.headers.get("Retry-After")
                except aiohttp.ClientError as exc:
                    status = type(exc).__name__
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                result.requests += 1
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status not in ("429", "503"):
                    break
                result.retried += 1
                await asyncio.sleep(float(retry_after or 1))
            if status == "200":
                result.events += batch_size
            else:
                result.failed += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session, i) for i in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


def generate(url: str, write_key: str, *, events: int, batch_size: int = 100, concurrency: int = 8, rate: float = 0) -> LoadResult:
    """Send about `events` distinct, realistic calls (bench/traffic.py) in /v1/batch requests; `rate` events/s,
    0 for flat out. A 429 or 503 is retried after its Retry-After, as Segment's SDKs do."""
    return asyncio.run(_run(url, write_key, events, batch_size, concurrency, rate))


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("url")
    args.add_argument("write_key")
    args.add_argument("--events", type=int, default=100_000)
    args.add_argument("--batch-size", type=int, default=100)
    args.add_argument("--concurrency", type=int, default=8)
    options = args.parse_args()
    result = generate(options.url, options.write_key, events=options.events, batch_size=options.batch_size, concurrency=options.concurrency)
    json.dump(result.as_json(), sys.stdout)


if __name__ == "__main__":
    main()
