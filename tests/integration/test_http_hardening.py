"""Issue 9's HTTP findings, each against a real ingest and a real worker: what answered 500, hung, or accepted what
it should refuse now answers a 4xx whose JSON body names the problem, and the worker's views listen on loopback
unless told otherwise."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from tests.support import WRITE_KEY, Pipeline, free_port

ADMIN = "admin-hardening"


@pytest.fixture(scope="module")
def running(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    audience = {"key": "all", "when": {"trait": "traits.plan", "exists": True}}
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path_factory.mktemp("hardening"), extra_config={"audiences": [audience]})
    pipe.create_topics()
    try:
        pipe.start("ingest")
        pipe.start("worker", CDP_ADMIN_TOKEN=ADMIN)
        yield pipe
    finally:
        pipe.stop_all()


def error_json(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


def worker(pipeline: Pipeline, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{pipeline.web_port}{path}", timeout=30, **kwargs)


def define(pipeline: Pipeline, kinds: str, body: Any, token: str = ADMIN) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(f"http://127.0.0.1:{pipeline.web_port}/v1/definitions/{kinds}", data=data,
                         headers={"Authorization": f"Bearer {token}".encode()}, timeout=30)  # fmt: skip


# -- the ingest --------------------------------------------------------------------------------------------------

def deep(levels: int, leaf: str, open_: str = '{"a":', close: str = "}") -> str:
    """JSON text nesting `levels` deep (written out: JSON libraries refuse to write what is this deep)."""
    return open_ * levels + leaf + close * levels


@pytest.mark.parametrize("levels", [300, 1_000])
def test_properties_nested_hundreds_of_levels_are_a_400_naming_the_field(running: Pipeline, levels: int) -> None:
    data = f'{{"userId": "u", "event": "e", "properties": {deep(levels, "1")}}}'.encode()
    body = error_json(requests.post(f"{running.url}/v1/track", data=data, auth=(WRITE_KEY, ""), timeout=30), 400)
    assert [p["field"] for p in body["errors"]] == ["properties"] and "64 levels" in body["errors"][0]["reason"]


def test_the_ingest_answers_json_for_unknown_paths_wrong_methods_and_bad_encodings(running: Pipeline) -> None:
    error_json(requests.get(f"{running.url}/v1/track", timeout=10), 405)
    error_json(requests.get(f"{running.url}/no/such/path", timeout=10), 404)
    error_json(requests.get(f"{running.url}/v1/projects/nope/settings", timeout=10), 404)
    error_json(requests.post(f"{running.url}/v1/track", data=b"not gzip", headers={"Content-Encoding": "gzip"},
                             auth=(WRITE_KEY, ""), timeout=10), 400)  # fmt: skip
    error_json(requests.post(f"{running.url}/v1/track", data=b"{}", headers={"Authorization": "Basic ключ".encode()}, timeout=10), 401)
    good = gzip.compress(b'{"userId": "u", "event": "e"}')
    assert requests.post(f"{running.url}/v1/track", data=good, headers={"Content-Encoding": "gzip"}, auth=(WRITE_KEY, ""),
                         timeout=10).status_code == 200  # fmt: skip


def trickle(port: int, path: str, headers: str, seconds: float) -> tuple[float, bytes]:
    """Declare a body of 1,000 bytes, send one byte every 2 s; (seconds until the server answered and closed, answer)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n{headers}\r\n".encode())
        conn.settimeout(2.0)
        answer = b""
        while time.monotonic() - start < seconds:
            try:
                chunk = conn.recv(4096)
            except socket.timeout:
                try:
                    conn.sendall(b" ")
                except OSError:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        return time.monotonic() - start, answer


def test_a_body_trickled_byte_by_byte_is_cut_off_with_a_408(running: Pipeline) -> None:
    took, answer = trickle(running.ingest_port, "/v1/track", f"Authorization: Basic {_basic()}\r\n", seconds=60)
    assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer, answer[:200]
    assert took < 25, f"the connection was held {took:.0f}s"


def test_a_definition_trickled_byte_by_byte_is_cut_off_with_a_408(running: Pipeline) -> None:
    took, answer = trickle(running.web_port, "/v1/definitions/traits", f"Authorization: Bearer {ADMIN}\r\n", seconds=60)
    assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer, answer[:200]
    assert took < 25, f"the connection was held {took:.0f}s"


def _basic() -> str:
    import base64

    return base64.b64encode(f"{WRITE_KEY}:".encode()).decode()


# -- the worker --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("partition", ["abc", "1e3", "0x1", "%00", "-1", "4", "99999999999999999999999", "1" * 5_000])
def test_internal_views_refuse_a_partition_that_is_no_partition(running: Pipeline, partition: str) -> None:
    for path in ("sizes", "backfills", "members/all"):
        body = error_json(worker(running, f"/v1/internal/compute/{path}/{partition}"), 400)
        assert "partition" in body["error"]


def test_limits_are_checked_and_large_ones_cut_to_the_maximum(running: Pipeline) -> None:
    error_json(worker(running, f"/v1/audiences/all/members?cursor={'7' * 5_000}:"), 400)
    for limit in ("abc", "-1", "0", "1.5"):
        error_json(worker(running, f"/v1/internal/compute/members/all/0?limit={limit}"), 400)
        error_json(worker(running, f"/v1/audiences/all/members?limit={limit}"), 400)
    assert worker(running, "/v1/internal/compute/members/all/0?limit=100000000").status_code == 200
    assert worker(running, "/v1/audiences/all/members?limit=100000000").status_code == 200


def test_a_hops_header_that_is_no_number_is_a_400(running: Pipeline) -> None:
    for value in ("abc", "-1", "1000", "1" * 5_000):
        body = error_json(worker(running, "/v1/audiences", headers={"X-CDP-Hops": value}), 400)
        assert "X-CDP-Hops" in body["error"]
    assert worker(running, "/v1/audiences", headers={"X-CDP-Hops": "1"}).status_code == 200


def test_paths_and_methods_the_worker_does_not_serve_answer_json(running: Pipeline) -> None:
    error_json(worker(running, "/no/such/path"), 404)
    error_json(requests.delete(f"http://127.0.0.1:{running.web_port}/v1/audiences", timeout=10), 405)
    error_json(worker(running, "/v1/definitions/nope"), 404)
    error_json(worker(running, "/v1/profiles/%ED%A0%80"), 404)  # not UTF-8: kept as written, and nobody's id


def test_requests_the_http_parser_refuses_are_answered_in_json_too(running: Pipeline) -> None:
    for base in (running.url, f"http://127.0.0.1:{running.web_port}"):
        assert "8190 bytes" in error_json(requests.get(f"{base}/v1/{'x' * 10_000}", timeout=10), 400)["error"]
    with socket.create_connection(("127.0.0.1", running.ingest_port), timeout=5) as conn:
        conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = conn.recv(4096)
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")) and b"application/json" in answer and b'{"error":' in answer, answer


def test_a_token_of_any_characters_is_refused_before_anything_else(running: Pipeline) -> None:
    error_json(define(running, "traits", {"key": "x", "kind": "count"}, token="ключ-é"), 401)


@pytest.mark.parametrize("definition, problem", [
    ({"key": "w", "kind": "count", "window": 5}, "bad window"),
    ({"key": "w", "kind": "count", "window": "99999999999d"}, "bad window"),
    ({"key": "w", "kind": "count", "window": "3651d"}, "ten years"),
    ({"key": "w", "kind": "count", "where": {"property": "p", "eq": ["x"] * 2_000}}, "items"),
    ({"key": "w", "kind": "count", "where": {"property": "p", "eq": ["x" * 20] * 10_000}}, "bytes"),  # the 200 KB list
    ({"key": "w", "kind": "count", "where": {"property": "p", "eq": "y" * 200_000}}, "bytes"),
])  # fmt: skip
def test_definitions_over_a_limit_are_a_400_naming_it(running: Pipeline, definition: dict[str, Any], problem: str) -> None:
    assert problem in error_json(define(running, "traits", definition), 400)["error"]


@pytest.mark.parametrize("levels", [100, 10_000])
def test_an_audience_nested_thousands_of_levels_deep_is_a_400(running: Pipeline, levels: int) -> None:
    when = deep(levels, '{"trait": "traits.plan", "exists": true}', '{"all": [', "]}")
    error_json(define(running, "audiences", f'{{"key": "deep", "when": {when}}}'.encode()), 400)
    assert worker(running, "/health").status_code == 200


def test_the_worker_listens_on_loopback_unless_told_otherwise(running: Pipeline, tmp_path: Path) -> None:
    assert _listening(running.web_port) == {"127.0.0.1"}
    assert _listening(running.ingest_port) == {"0.0.0.0"}
    open_port = free_port()
    running.start("worker", CDP_WEB_PORT=str(open_port), CDP_WEB_BIND="0.0.0.0", CDP_DATA_DIR=str(tmp_path))
    assert _listening(open_port) == {"0.0.0.0"}


def _listening(port: int) -> set[str]:
    """Addresses with a TCP socket listening on `port`, from /proc/net/tcp (state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found
