"""Destinations do not hold each other up, on real Kafka with real receivers: a healthy destination's latency with a
destination that never answers beside it stays within 2x of its own latency without it, and a `rate_limit` of 50/s
holds within 10 %; with a second worker, GET /v1/destinations on either worker sums both workers' parts.

Latency is measured end to end from the test's side: each identify of a fresh user makes one trait change, and its
delivery's arrival at the receiver minus the moment the test sent the identify is that change's latency (the
pipeline's hops included, the same in both phases). The never-answering destination is a socket that listens and
never accepts: requests hang until the destination's timeout, and are retried.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests

from tests.integration.test_compute_stage import ADMIN, _iso, post_definition
from tests.receivers import Receivers
from tests.support import Pipeline, free_port, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaIsol"
RATE_PER_S, STEADY_S, BURST = 20, 15, 400
LIMIT_PER_S = 50


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    started = Receivers()
    yield started
    started.close()


def steady(pipe: Pipeline, run: str) -> dict[str, float]:
    """Identifies of fresh users at RATE_PER_S for STEADY_S: userId -> when it was sent (epoch seconds)."""
    sent: dict[str, float] = {}
    step, start = 0.25, time.time()
    while time.time() - start < STEADY_S:
        tick = time.time()
        users = [f"{run}-{len(sent) + n}" for n in range(int(RATE_PER_S * step))]
        now = int(tick * 1000)
        batch = [{"type": "identify", "userId": u, "traits": {"tier": run}, "messageId": f"id-{u}", "timestamp": _iso(now)} for u in users]
        assert pipe.post("/v1/batch", {"batch": batch}).status_code == 200
        sent.update(dict.fromkeys(users, tick))
        time.sleep(max(0.0, step - (time.time() - tick)))
    return sent


def latencies(receivers: Receivers, path: str, sent: dict[str, float]) -> list[float]:
    arrived: dict[str, float] = {}
    for r in receivers.got(path):
        user = orjson.loads(r.body).get("userId")
        if r.status == 200 and user in sent:
            arrived.setdefault(user, r.at)
    assert len(arrived) == len(sent), f"{path}: {len(sent) - len(arrived)} of {len(sent)} changes not delivered"
    return sorted(arrived[u] - sent[u] for u in sent)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@pytest.mark.integration
def test_a_destination_that_never_answers_does_not_slow_a_healthy_one_and_a_rate_limit_holds(kafka_bootstrap: str, tmp_path: Any,
                                                                                              receivers: Receivers) -> None:  # fmt: skip
    fast = {"name": "fast", "kind": "webhook", "url": receivers.url("fast"), "secret": SECRET}
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, extra_config={"destinations": [fast]})
    pipe.create_topics()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4096)  # never accepted: connections queue in the kernel, requests hang until the timeout
    try:
        pipe.start("ingest")
        pipe.start("worker", CDP_ADMIN_TOKEN=ADMIN)
        warmup = steady(pipe, "warm")  # the first profiles and deliveries pay for connections and caches
        wait_until(lambda: len(receivers.got("fast")) >= len(warmup), timeout=90, what="the warm-up delivered")
        sent = steady(pipe, "alone")
        wait_until(lambda: len(receivers.got("fast")) >= len(warmup) + len(sent), timeout=90, what="the baseline delivered")
        baseline = latencies(receivers, "fast", sent)

        hung = {"name": "hung", "kind": "webhook", "url": f"http://127.0.0.1:{silent.getsockname()[1]}/hook", "secret": SECRET,
                "timeout": "5s", "retry": {"base": "1s", "cap": "5s"}}  # fmt: skip
        limited = {"name": "limited", "kind": "webhook", "url": receivers.url("limited"), "secret": SECRET, "rate_limit": f"{LIMIT_PER_S}/s"}
        for body in (hung, limited):
            assert post_definition(pipe.web_port, "destinations", body).status_code == 201
        wait_until(lambda: {"hung", "limited"} <= {d["name"] for d in destinations(pipe)}, timeout=30, what="the destinations live")
        sent_beside = steady(pipe, "beside")
        wait_until(lambda: len(receivers.got("fast")) >= len(warmup) + len(sent) + len(sent_beside), timeout=90, what="delivered beside")
        beside = latencies(receivers, "fast", sent_beside)
        shown = {d["name"]: d for d in destinations(pipe)}
        assert shown["hung"]["delivered"] == 0 and shown["hung"]["backlog"] > 0 and "no answer within 5s" in (shown["hung"]["last_error"] or ""), shown["hung"]
        assert p99(beside) <= 2 * p99(baseline), (
            f"fast's p99 {p99(beside):.3f}s beside a hung destination, {p99(baseline):.3f}s alone "
            f"(p50 {statistics.median(beside):.3f}s / {statistics.median(baseline):.3f}s)"
        )

        wait_until(lambda: len(receivers.got("limited")) >= len(sent_beside), timeout=90, what="the limited destination caught up")
        burst = [f"burst-{n}" for n in range(BURST)]
        now = int(time.time() * 1000)
        for first in range(0, BURST, 100):
            calls = [{"type": "identify", "userId": u, "traits": {"tier": "burst"}, "messageId": f"id-{u}", "timestamp": _iso(now)}
                     for u in burst[first : first + 100]]  # fmt: skip
            assert pipe.post("/v1/batch", {"batch": calls}).status_code == 200
        wanted = set(burst)

        def burst_arrivals() -> list[float]:
            return sorted(r.at for r in receivers.got("limited") if orjson.loads(r.body).get("userId") in wanted)

        wait_until(lambda: len(burst_arrivals()) >= BURST, timeout=120, what="the burst delivered to the limited destination")
        arrivals = burst_arrivals()
        rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        assert abs(rate - LIMIT_PER_S) <= 0.1 * LIMIT_PER_S, f"rate_limit {LIMIT_PER_S}/s: delivered at {rate:.1f}/s"
        metrics = requests.get(f"http://127.0.0.1:{pipe.web_port}/metrics", timeout=10).text
        count = next(line for line in metrics.splitlines() if line.startswith('cdp_sync_delivery_seconds_count{destination="fast"}'))
        assert int(count.split()[-1]) == sum(1 for r in receivers.got("fast") if r.status == 200), count

        other = free_port()  # a second worker: GET /v1/destinations is the destination's, whichever worker answers
        pipe.start("worker", CDP_WEB_PORT=str(other), CDP_ADMIN_TOKEN=ADMIN)
        more = [f"more-{n}" for n in range(60)]
        now = int(time.time() * 1000)
        assert pipe.post("/v1/batch", {"batch": [{"type": "identify", "userId": u, "traits": {"tier": "more"}, "messageId": f"id-{u}",
                                                  "timestamp": _iso(now)} for u in more]}).status_code == 200  # fmt: skip

        def whole(port: int) -> tuple[int, list[int], int]:
            body = requests.get(f"http://127.0.0.1:{port}/v1/destinations", timeout=10).json()
            fast_row = next(d for d in body["destinations"] if d["name"] == "fast")
            return body["workers"], body["missing_partitions"], fast_row["delivered"]

        delivered = lambda: len({r.headers["webhook-id"] for r in receivers.got("fast") if r.status == 200})  # noqa: E731  (a rebalance may repeat one)
        wait_until(lambda: all(whole(port) == (2, [], delivered()) for port in (pipe.web_port, other)), timeout=120,
                   what="both workers' parts summed in GET /v1/destinations on either worker")  # fmt: skip
        assert delivered() == len(warmup) + len(sent) + len(sent_beside) + BURST + len(more)
        print(f"\nfast p50/p99 alone {statistics.median(baseline):.3f}/{p99(baseline):.3f}s, beside a hung destination "
              f"{statistics.median(beside):.3f}/{p99(beside):.3f}s; rate_limit {LIMIT_PER_S}/s delivered {rate:.1f}/s")  # fmt: skip
    finally:
        pipe.stop_all()
        silent.close()


def destinations(pipe: Pipeline) -> list[dict[str, Any]]:
    return requests.get(f"http://127.0.0.1:{pipe.web_port}/v1/destinations", timeout=10).json()["destinations"]
