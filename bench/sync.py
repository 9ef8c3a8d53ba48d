"""`cdp bench sync`: the sync stage delivering to a local webhook receiver, beside its floor in the same run.

- floor: a plain aiohttp loop POSTing the same payloads to the same receiver, as many requests in flight as the
  destination's `concurrency` — what HTTP and the receiver cost with none of our work;
- single / batched: one `cdp worker` with a webhook destination (batch size 1, then 100). The audience changes are
  written straight to cdp.audience.membership (the sync stage's input; the stages before it are idle), 4 per
  profile, and timed from the receiver's first delivery to its last: deliveries/s and the worker's CPU per delivery;
- latency: changes written at a steady rate (half the single mode's rate, at most 500/s), each stamped with its
  write time; change → delivered p50 / p99 at the receiver.
Postgres rows/s comes with the postgres destination kind.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import requests

from bench.common import REPO_ROOT, Bench, bench_pipeline, commit, cpu_seconds, machine, produce_all, write_report
from bench.compute import group_stable, percentile
from bench.identity import workers
from topology.codecs import Codecs
from topology.config import Settings
from topology.ops.kafka_local import free_ports
from topology.topics import AUDIENCE_MEMBERSHIP

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONCURRENCY = 4
TIMEOUT_S = 300


class Receiver:
    """The webhook receiver in a process of its own (`python -m bench.sync_receiver PORT`), so neither the floor's
    client nor the worker shares its CPU: counts deliveries (a batch's items each) and when each arrived."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.process = subprocess.Popen([sys.executable, "-m", "bench.sync_receiver", str(self.port)], cwd=REPO_ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.count()
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def count(self) -> int:
        return int(requests.get(f"http://127.0.0.1:{self.port}/count", timeout=5).text)

    def arrivals(self, since: int) -> list[tuple[float, int]]:
        """(arrival time, change timestamp ms) of the deliveries after the first `since`."""
        return [tuple(pair) for pair in requests.get(f"http://127.0.0.1:{self.port}/arrivals?since={since}", timeout=30).json()]  # type: ignore[misc]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def wait(self, count: int, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.count()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver got {got} of {count} deliveries within {timeout:.0f}s")
            time.sleep(0.05)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def changes(codecs: Codecs, count: int, audience: str, run: str, stamp: float | None = None) -> list[tuple[bytes, bytes]]:
    """`count` changes of `audience`, 4 per profile (entered, exited, ...) with their seq."""
    codec = codecs.for_topic(AUDIENCE_MEMBERSHIP)
    out = []
    for n in range(count):
        profile, seq = f"{run}-p{n // 4}", n % 4 + 1
        out.append((profile.encode(), codec.encode({
            "profile_id": profile, "audience": audience, "transition": "entered" if seq % 2 else "exited",
            "timestamp": int((stamp or time.time()) * 1000), "seq": seq, "reason": "bench", "message_id": None,
            "user_id": f"u-{profile}", "anonymous_id": None, "email": f"{profile}@example.com",
        })))  # fmt: skip
    return out


def floor(receiver: Receiver, requests: int) -> dict[str, Any]:
    """A plain aiohttp POST loop, CONCURRENCY in flight, payloads of the same size."""
    payload = orjson.dumps({"type": "identify", "userId": "u-bench-p0", "traits": {"big_spenders": True, "email": "p@example.com"},
                            "context": {"personas": {"computation_class": "audience", "computation_key": "big_spenders"}},
                            "timestamp": "2026-12-01T00:00:00.000Z", "messageId": "msg_" + "0" * 32})  # fmt: skip
    start_count = receiver.count()

    async def run() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
            async def one() -> None:
                async with session.post(receiver.url("floor"), data=payload, headers={"content-type": "application/json"}) as r:
                    await r.read()

            for first in range(0, requests, CONCURRENCY * 25):
                await asyncio.gather(*(one() for _ in range(min(CONCURRENCY * 25, requests - first))))

    started, cpu = time.perf_counter(), time.process_time()
    asyncio.run(run())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert receiver.count() - start_count == requests
    return {"requests": requests, "deliveries_per_s": round(requests / seconds, 1), "client_cpu_us_per_delivery": round(cpu / requests * 1e6, 1)}


MODES = {"single": 1, "batched": 100, "steady": 1}  # destination (and the audience only it takes) -> batch size


def config() -> dict[str, Any]:
    """One destination per mode, each taking only its own audience (defined, never computed: no events flow)."""
    return {
        "audiences": [{"key": mode, "when": {"trait": "traits.bench", "eq": mode}} for mode in MODES],
        "destinations": [{"name": mode, "kind": "webhook", "url": "", "secret": SECRET, "concurrency": CONCURRENCY,
                          "batch": {"size": size}, "subscribe": ["audience_membership"], "audiences": [mode]}
                         for mode, size in MODES.items()],
    }  # fmt: skip


def throughput(bench: Bench, receiver: Receiver, pid: int, count: int, mode: str) -> dict[str, Any]:
    base = receiver.count()
    produce_all(bench.settings, AUDIENCE_MEMBERSHIP.name(bench.settings), changes(Codecs(bench.settings), count, mode, mode))
    receiver.wait(base + 1)
    first, cpu = time.perf_counter(), cpu_seconds(pid)
    receiver.wait(base + count)
    seconds, cpu = time.perf_counter() - first, cpu_seconds(pid) - cpu
    return {"batch": MODES[mode], "deliveries": count, "seconds": round(seconds, 2), "deliveries_per_s": round(count / seconds, 1),
            "worker_cpu_us_per_delivery": round(cpu / count * 1e6, 1)}  # fmt: skip


def latency(bench: Bench, receiver: Receiver, rate: float, seconds: float) -> dict[str, Any]:
    codecs, topic = Codecs(bench.settings), AUDIENCE_MEMBERSHIP.name(bench.settings)
    base, total, started = receiver.count(), int(rate / 10) * int(seconds * 10), time.perf_counter()
    for tick in range(int(seconds * 10)):  # a tenth of a second's changes at a time
        produce_all(bench.settings, topic, changes(codecs, int(rate / 10), "steady", f"steady{tick}", stamp=time.time()))
        time.sleep(max(0.0, started + (tick + 1) / 10 - time.perf_counter()))
    receiver.wait(base + total)
    waits = [(arrived - sent / 1000) * 1000 for arrived, sent in receiver.arrivals(base)]
    return {"rate": rate, "deliveries": len(waits), "p50_ms": round(percentile(waits, 0.5), 1), "p90_ms": round(percentile(waits, 0.9), 1),
            "p99_ms": round(percentile(waits, 0.99), 1), "max_ms": round(max(waits), 1)}  # fmt: skip


def run_sync_bench(settings: Settings, *, deliveries: int, latency_seconds: float, out: Path | None) -> str:
    receiver = Receiver()
    report: dict[str, Any] = {"benchmark": "sync", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "commit": commit()}
    extra = config()
    for destination in extra["destinations"]:
        destination["url"] = receiver.url(destination["name"])
    with bench_pipeline(settings, extra) as bench, workers(bench, 1) as processes:
        group_stable(bench.settings)
        report["floor"] = floor(receiver, deliveries)
        for mode in ("single", "batched"):
            report[mode] = throughput(bench, receiver, processes[0].pid, deliveries, mode)
            report[mode]["x_floor"] = round(report[mode]["deliveries_per_s"] / report["floor"]["deliveries_per_s"], 3)
        if latency_seconds > 0:
            report["latency"] = latency(bench, receiver, min(500.0, report["single"]["deliveries_per_s"] / 2), latency_seconds)
    receiver.close()
    return write_report(report, out)
