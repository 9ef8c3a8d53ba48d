"""`cdp bench sync`: the sync stage delivering to a local webhook receiver, beside its floor in the same run.

- floor: a plain aiohttp loop POSTing the same payloads to the same receiver, as many requests in flight as the
  destination's `concurrency` — what HTTP and the receiver cost with none of our work;
- single / batched: one `cdp worker` with a webhook destination (batch size 1, then 100). The audience changes are
  written straight to cdp.audience.membership (the sync stage's input; the stages before it are idle), 4 per
  profile, and timed from the receiver's first delivery to its last: deliveries/s and the worker's CPU per delivery;
- latency: changes written at a steady rate (half the single mode's rate, at most 500/s), each stamped with its
  write time; change → delivered p50 / p99 at the receiver;
- postgres: a postgres destination (batches of 500) loading the same kind of changes into a local Postgres
  (topology/ops/postgres_local.py), timed from the first row to the last change's; beside its floor, a plain
  asyncpg COPY of as many rows, in batches of 500 with as many connections, into a table of the same shape.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import requests
from confluent_kafka import Producer

from bench.common import REPO_ROOT, Bench, bench_pipeline, commit, cpu_seconds, machine, produce_all, write_report
from bench.compute import group_stable, percentile
from bench.identity import workers
from topology.codecs import Codecs
from topology.config import Settings
from topology.ops.kafka_local import free_ports
from topology.ops.postgres_local import PostgresServer
from topology.runtime.producer import producer_config
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
PG_BATCH = 500


def config(dsn: str) -> dict[str, Any]:
    """One destination per mode, each taking only its own audience (defined, never computed: no events flow)."""
    return {
        "audiences": [{"key": mode, "when": {"trait": "traits.bench", "eq": mode}} for mode in (*MODES, "warehouse")],
        "destinations": [*({"name": mode, "kind": "webhook", "url": "", "secret": SECRET, "concurrency": CONCURRENCY,
                            "batch": {"size": size}, "subscribe": ["audience_membership"], "audiences": [mode]}
                           for mode, size in MODES.items()),
                         {"name": "warehouse", "kind": "postgres", "dsn": dsn, "concurrency": CONCURRENCY,
                          "batch": {"size": PG_BATCH}, "subscribe": ["audience_membership"], "audiences": ["warehouse"]}],
    }  # fmt: skip


async def _fetch(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def postgres_load(bench: Bench, dsn: str, pid: int, count: int) -> dict[str, Any]:
    """Changes of the `warehouse` audience, 4 per profile, loaded by the postgres destination."""
    produce_all(bench.settings, AUDIENCE_MEMBERSHIP.name(bench.settings), changes(Codecs(bench.settings), count, "warehouse", "pg"))
    done = "SELECT count(*) FROM warehouse.audience_memberships WHERE seq = 4"
    deadline = time.monotonic() + TIMEOUT_S
    while asyncio.run(_fetch(dsn, "SELECT count(*) FROM warehouse.audience_memberships")) == 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the postgres destination wrote nothing")
        time.sleep(0.02)
    first, cpu = time.perf_counter(), cpu_seconds(pid)
    while asyncio.run(_fetch(dsn, done)) < count // 4:
        if time.monotonic() > deadline:
            raise TimeoutError("the postgres destination did not load every change")
        time.sleep(0.05)
    seconds, cpu = time.perf_counter() - first, cpu_seconds(pid) - cpu
    return {"batch": PG_BATCH, "deliveries": count, "seconds": round(seconds, 2), "deliveries_per_s": round(count / seconds, 1),
            "rows_upserted_per_s": round(2 * count / seconds, 1), "worker_cpu_us_per_delivery": round(cpu / count * 1e6, 1)}  # fmt: skip


def postgres_floor(dsn: str, rows: int) -> dict[str, Any]:
    """A plain COPY of `rows` membership rows, PG_BATCH per transaction, CONCURRENCY connections."""

    async def run() -> float:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE SCHEMA IF NOT EXISTS floor; DROP TABLE IF EXISTS floor.audience_memberships;"
                           " CREATE TABLE floor.audience_memberships (LIKE warehouse.audience_memberships INCLUDING ALL)")  # fmt: skip
        await conn.close()
        pool = await asyncpg.create_pool(dsn, min_size=CONCURRENCY, max_size=CONCURRENCY)
        now = datetime.now(UTC)
        batches = [[(f"floor-p{n}", "warehouse", True, now, 1, f"u-{n}", None, f"p{n}@example.com") for n in range(first, min(rows, first + PG_BATCH))]
                   for first in range(0, rows, PG_BATCH)]  # fmt: skip
        columns = ["profile_id", "audience", "member", "since", "seq", "user_id", "anonymous_id", "email"]

        async def copy(batch: list[tuple[Any, ...]]) -> None:
            async with pool.acquire() as c, c.transaction():
                await c.copy_records_to_table("audience_memberships", schema_name="floor", columns=columns, records=batch)

        started = time.perf_counter()
        for first in range(0, len(batches), CONCURRENCY):
            await asyncio.gather(*(copy(b) for b in batches[first : first + CONCURRENCY]))
        seconds = time.perf_counter() - started
        await pool.close()
        return seconds

    seconds = asyncio.run(run())
    return {"rows": rows, "rows_per_s": round(rows / seconds, 1)}


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
    """One producer for the run (a producer made per tick costs its start-up, ~0.5 s, in every change's latency)."""
    codecs, topic = Codecs(bench.settings), AUDIENCE_MEMBERSHIP.name(bench.settings)
    producer = Producer(producer_config(bench.settings.kafka_bootstrap, 60_000))
    base, total, started = receiver.count(), int(rate / 10) * int(seconds * 10), time.perf_counter()
    for tick in range(int(seconds * 10)):  # a tenth of a second's changes at a time
        for key, value in changes(codecs, int(rate / 10), "steady", f"steady{tick}", stamp=time.time()):
            producer.produce(topic, value, key)
        producer.poll(0)
        time.sleep(max(0.0, started + (tick + 1) / 10 - time.perf_counter()))
    if producer.flush(60):
        raise RuntimeError(f"{topic}: changes not acknowledged within 60 s")
    receiver.wait(base + total)
    waits = [(arrived - sent / 1000) * 1000 for arrived, sent in receiver.arrivals(base)]
    return {"rate": rate, "deliveries": len(waits), "p50_ms": round(percentile(waits, 0.5), 1), "p90_ms": round(percentile(waits, 0.9), 1),
            "p99_ms": round(percentile(waits, 0.99), 1), "max_ms": round(max(waits), 1)}  # fmt: skip


def run_sync_bench(settings: Settings, *, deliveries: int, latency_seconds: float, out: Path | None) -> str:
    receiver, postgres = Receiver(), PostgresServer().start()
    report: dict[str, Any] = {"benchmark": "sync", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "commit": commit()}
    extra = config(postgres.dsn)
    for destination in extra["destinations"]:
        if destination["kind"] == "webhook":
            destination["url"] = receiver.url(destination["name"])
    with bench_pipeline(settings, extra) as bench, workers(bench, 1) as processes:
        group_stable(bench.settings)
        report["floor"] = floor(receiver, deliveries)
        for mode in ("single", "batched"):
            report[mode] = throughput(bench, receiver, processes[0].pid, deliveries, mode)
            report[mode]["x_floor"] = round(report[mode]["deliveries_per_s"] / report["floor"]["deliveries_per_s"], 3)
        if latency_seconds > 0:
            report["latency"] = latency(bench, receiver, min(500.0, report["single"]["deliveries_per_s"] / 2), latency_seconds)
        report["postgres"] = postgres_load(bench, postgres.dsn, processes[0].pid, deliveries)
        report["postgres_floor"] = postgres_floor(postgres.dsn, deliveries)
        report["postgres"]["x_floor"] = round(report["postgres"]["deliveries_per_s"] / report["postgres_floor"]["rows_per_s"], 3)
    receiver.close()
    postgres.stop()
    return write_report(report, out)
