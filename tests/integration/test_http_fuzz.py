"""A bounded, seeded fuzz run against a running ingest and worker: 5,000 requests of generated methods, paths,
query strings, headers and bodies (mutated Segment calls and definitions, random and broken JSON, deep nesting,
bad encodings, odd characters). It must end with no response of 500 or more, both processes alive, every 4xx a
JSON body naming the problem, and nothing of a rejected request on any topic: the ingest topic holds exactly
the events of the requests it answered 200, and the definitions topic exactly the definitions answered 201.

`CDP_FUZZ_SEED` and `CDP_FUZZ_REQUESTS` change the run (a failure prints its seed and the offending requests).
"""

from __future__ import annotations

import gzip
import os
import random
import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import requests

from tests.support import WRITE_KEY, Pipeline, wait_until
from topology.runtime.partitioning import partition_for

ADMIN = "fuzz-admin"
SEED = int(os.environ.get("CDP_FUZZ_SEED", "9"))
REQUESTS = int(os.environ.get("CDP_FUZZ_REQUESTS", "5000"))
WEIRD = ["", "0", "-1", "1e3", "0x1", "%00", "%2F", "..", "abc", "99999999999999999999", "١", "é", "ключ", "\u202e",
         "a" * 300, "%ED%A0%80", "%FF", "p-000000000000001-aaaa", "traits.plan", "~x", " ", "a b", "null", "true",
         "1" * 5_000, "0:" + "7" * 5_000]  # fmt: skip  (int() refuses more than 4,300 digits)
CALLS = ["track", "identify", "page", "screen", "group", "alias"]
INGEST_PATHS = ["/v1/{call}", "/v1/{call}", "/v1/{call}", "/v1/batch", "/v1/b", "/v1/import", "/v1/t", "/v1/i",
                "/v1/projects/{w}/settings", "/health", "/metrics", "/v1/{w}", "/{w}", "/"]  # fmt: skip
WORKER_PATHS = ["/v1/profiles/{w}", "/v1/profiles/{w}/merges", "/v1/identifiers/{w}/{w}", "/v1/audiences",
                "/v1/audiences/{w}/members", "/v1/audiences/buyers/members", "/v1/internal/compute/sizes/{w}",
                "/v1/internal/compute/backfills/{w}", "/v1/internal/compute/members/{w}/{w}", "/v1/internal/compute/profiles/{w}",
                "/v1/definitions/{kinds}", "/v1/backfills", "/health", "/metrics", "/", "/router/{w}", "/table/{w}",
                "/graph", "/stats", "/{w}"]  # fmt: skip


@dataclass
class Sent:
    """One fuzz request and what came back."""

    n: int
    target: str
    method: str
    path: str
    events: int = 0  # messages in an ingest body (accepted only if the answer is 200)
    definition: bool = False
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"#{self.n} {self.method} {self.target}{self.path} -> {self.status} {self.body[:200]!r}"


class Fuzzer:
    def __init__(self, rng: random.Random, run: str) -> None:
        self.rng, self.run = rng, run

    def text(self) -> Any:
        rng = self.rng
        return rng.choice([rng.choice(WEIRD), "".join(rng.choice(string.printable) for _ in range(rng.randrange(12))),
                           rng.randrange(-(2**70), 2**70), rng.random() * 10.0 ** rng.randrange(-5, 308), None, True, [], {}])  # fmt: skip

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        if depth > 3 or rng.random() < 0.6:
            return self.text()
        if rng.random() < 0.5:
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        return {str(self.text()): self.value(depth + 1) for _ in range(rng.randrange(4))}

    def message(self, n: int, i: int, call: str | None) -> Any:
        """A Segment call (of the endpoint's type), usually valid, often with one thing wrong; marked so it can be
        found on the topic."""
        rng = self.rng
        message: Any = {"type": call if call is not None and rng.random() < 0.95 else rng.choice(CALLS), "userId": f"fz-{self.run}", "anonymousId": "a1", "event": "Order Completed",
                                   "groupId": "g1", "previousId": "old", "messageId": f"fz-{self.run}-{n}-{i}",
                                   "properties": {"revenue": 12.5, "currency": "USD"}, "traits": {"email": "x@example.com"},
                                   "context": {"ip": "10.0.0.1"}, "timestamp": "2026-11-30T10:00:00Z"}  # fmt: skip
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            key = rng.choice([*message, "sentAt", "originalTimestamp", "integrations", "writeKey", "name", str(self.text())])
            mutation = rng.randrange(6)
            if mutation == 0:
                message.pop(key, None)
            elif mutation == 1:
                message[key] = self.value()
            elif mutation == 2:
                message[key] = _deep(rng.choice([10, 63, 70, 300, 900]))
            elif mutation == 3:
                message[key] = "x" * rng.choice([10, 40_000])
            elif mutation == 4:
                message[key] = rng.choice(["2026-13-45", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "1969-01-01"])
            else:
                return self.value()  # not a message at all
        message["fuzzMarker"] = f"fzm-{self.run}-{n}"  # kept in `extra`: findable on the topic
        return message

    def ingest_body(self, n: int, call: str | None) -> tuple[bytes, int]:
        rng = self.rng
        if call is None:
            messages = [self.message(n, i, None) for i in range(rng.choice([0, 1, 3, 20]))]
            body: Any = {"batch": messages}
            if rng.random() < 0.3:
                body[rng.choice(["context", "integrations", "sentAt", "batch"])] = self.value()
            count = len(body["batch"]) if isinstance(body.get("batch"), list) else 0
        else:
            body, count = self.message(n, 0, call), 1
        try:
            data = orjson.dumps(body)
        except (TypeError, orjson.JSONEncodeError):
            data, count = b"{", 0
        return self._mangle(data), count

    def definition_body(self) -> bytes:
        rng = self.rng
        trait = {"key": rng.choice(["fz1", "fz2", str(self.text())]), "kind": rng.choice(["count", "sum", "median", None]),
                 "property": "revenue", "event": "Order Completed"}  # fmt: skip
        for _ in range(rng.choice([0, 1, 2])):
            trait[rng.choice(["window", "where", "key", "kind", "property", "extra"])] = rng.choice(
                [self.value(), "30d", 5, "99999999999d", {"property": "p", "in": list(range(rng.choice([3, 2_000])))},
                 {"all": [_deep(rng.choice([5, 100]))]}])  # fmt: skip
        audience = {"key": "fza", "when": rng.choice([{"trait": "traits.plan", "exists": True}, self.value(), _deep_all(rng.choice([3, 100, 600]))])}
        try:
            data = orjson.dumps(rng.choice([trait, audience, self.value()]))
        except (TypeError, orjson.JSONEncodeError):
            data = b"["
        return self._mangle(data)

    def _mangle(self, data: bytes) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return data[: rng.randrange(len(data) + 1)]
        if roll < 0.08:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        if roll < 0.10:
            return data.replace(b'"', b"'", 1)
        return data

    def request(self, n: int, ingest: str, worker: str) -> tuple[Sent, dict[str, Any]]:
        rng = self.rng
        target = ingest if rng.random() < 0.6 else worker
        paths = INGEST_PATHS if target == ingest else WORKER_PATHS
        call = rng.choice(CALLS)
        path = rng.choice(paths).replace("{call}", call).replace("{kinds}", rng.choice(["traits", "audiences", "destinations", "x"]))
        while "{w}" in path:
            path = path.replace("{w}", rng.choice(WEIRD).replace("/", "%2F").replace("?", "%3F").replace("#", "%23") or "x", 1)
        method = rng.choices(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"], [30, 55, 4, 4, 4, 3])[0]
        sent = Sent(n, target, method, path)
        headers: dict[str, Any] = {}
        auth = rng.random()
        if target == ingest:
            if auth < 0.7:
                headers["Authorization"] = "Basic " + _b64(f"{WRITE_KEY}:")
            elif auth < 0.8:
                headers["Authorization"] = rng.choice(["Basic !!!", "Basic " + _b64("nope:"), "Bearer x", "Basic ключ".encode()])
        elif auth < 0.6:
            headers["Authorization"] = f"Bearer {ADMIN}"
        elif auth < 0.7:
            headers["Authorization"] = rng.choice(["Bearer ключ".encode(), "Bearer wrong", "Basic x"])
        if rng.random() < 0.1:
            headers["X-CDP-Hops"] = rng.choice(["abc", "-1", "8", "9", "", "1", "1" * 5_000])
        if rng.random() < 0.05:
            headers["X-Forwarded-For"] = rng.choice(["", ",,,", "ключ".encode(), "1.2.3.4, 5.6.7.8"])
        data = b""
        if method in ("POST", "PUT"):
            if target == ingest:
                single = {"/v1/t": "track", "/v1/i": "identify", f"/v1/{call}": call}.get(path)
                data, sent.events = self.ingest_body(n, single)
            else:
                data = self.definition_body()
                sent.definition = "/v1/definitions/" in path
            if rng.random() < 0.1:
                headers["Content-Encoding"] = "gzip"
                data = gzip.compress(data) if rng.random() < 0.6 else data
        query = {}
        if rng.random() < 0.3:
            query = {rng.choice(["limit", "cursor", "after", "x", ""]): rng.choice([*WEIRD, "5", "100000000"]) for _ in range(rng.randrange(1, 3))}
        return sent, {"method": method, "url": target + path, "params": query, "headers": headers, "data": data}


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def _deep_all(levels: int) -> Any:
    value: Any = {"trait": "traits.plan", "exists": True}
    for _ in range(levels):
        value = {"all": [value]}
    return value


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def running(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    config = {"traits": [{"key": "orders", "kind": "count", "event": "Order Completed"}],
              "audiences": [{"key": "buyers", "when": {"trait": "orders", "gte": 1}}]}  # fmt: skip
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path_factory.mktemp("fuzz"), extra_config=config)
    pipe.create_topics()
    try:
        pipe.start("ingest")
        pipe.start("worker", CDP_ADMIN_TOKEN=ADMIN)
        worker = f"http://127.0.0.1:{pipe.web_port}"
        ready = f"{worker}/v1/backfills"  # every partition of compute answers
        wait_until(lambda: requests.get(ready, timeout=10).status_code == 200, timeout=90, what="the worker's views")
        # ... and of identity: a profile id on each of its partitions (404: caught up, none such; 503: catching up)
        ids = {partition_for(f"p{n}", pipe.partitions): f"p{n}" for n in range(200)}
        assert len(ids) == pipe.partitions
        wait_until(lambda: all(requests.get(f"{worker}/v1/profiles/{i}", timeout=10).status_code != 503 for i in ids.values()),
                   timeout=90, what="identity's views")  # fmt: skip
        yield pipe
    finally:
        pipe.stop_all()


def test_fuzzed_requests_never_get_a_5xx_and_leave_nothing_of_what_was_refused(running: Pipeline) -> None:
    rng = random.Random(SEED)
    run = f"{SEED}-{rng.randrange(10**6)}"
    fuzzer = Fuzzer(rng, run)
    worker = f"http://127.0.0.1:{running.web_port}"
    planned = [fuzzer.request(n, running.url, worker) for n in range(REQUESTS)]

    def send(item: tuple[Sent, dict[str, Any]]) -> Sent:
        sent, request = item
        try:
            response = requests.request(**request, timeout=60)
        except requests.RequestException as exc:
            sent.status, sent.body = -1, repr(exc).encode()
            return sent
        sent.status, sent.body, sent.headers = response.status_code, response.content, dict(response.headers)
        return sent

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, planned))

    failed = [s.describe() for s in results if s.status >= 500 or s.status < 0]
    assert not failed, f"seed {SEED}: {len(failed)} requests failed:\n" + "\n".join(failed[:20])
    for process in running.processes:
        assert process.poll() is None, "a process crashed"
    not_json = [s.describe() for s in results if 400 <= s.status < 500 and s.method != "HEAD" and not _names_problem(s.body)]
    assert not not_json, f"seed {SEED}: 4xx without a JSON error:\n" + "\n".join(not_json[:20])
    statuses = sorted({s.status for s in results})
    assert len([s for s in results if s.status == 200 and s.events]) > REQUESTS // 50 and 400 in statuses, statuses  # it reached both

    accepted = sum(s.events for s in results if s.status == 200 and s.target == running.url and s.method == "POST")
    records = running.read("events.accepted", until=lambda rs: len(rs) >= accepted, timeout=60, decode=False)
    if len(records) != accepted:
        present = b"".join(r.raw or b"" for r in records)
        missing = [s for s in results if s.status == 200 and s.events and f'"fzm-{run}-{s.n}"'.encode() not in present]
        raise AssertionError(f"events.accepted holds {len(records)} records; requests answered 200 carried {accepted}; "
                             f"not found: {[(m.describe(), planned[m.n][1]['data'][:300]) for m in missing[:3]]}")  # fmt: skip
    refused = {f'"fzm-{run}-{s.n}"'.encode() for s in results if s.status != 200 and s.target == running.url}
    leaked = [r.raw for r in records if any(marker in (r.raw or b"") for marker in refused)]
    assert not leaked, f"events of refused requests reached the topic: {leaked[:3]}"
    created = sum(1 for s in results if s.definition and s.status == 201)
    definitions = running.read("definitions", until=lambda rs: len(rs) >= created, timeout=30, decode=False)
    assert len(definitions) == created, f"{len(definitions)} definition records for {created} answers 201"


def _names_problem(body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and bool(parsed["error"])
