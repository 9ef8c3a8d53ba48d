"""The HTTP ingest against real Kafka: every kind of bad request gets its status and a clear error, nothing of
it reaches a topic, and valid requests in between keep succeeding."""

from __future__ import annotations

import gzip
import threading
import time
import uuid

import orjson
import requests

from tests.support import WRITE_KEY, Pipeline, free_port


def track(user: str, **fields: object) -> dict:
    return {"userId": user, "event": "Clicked", **fields}


def test_bad_requests_are_rejected_and_leave_no_trace(pipeline: Pipeline) -> None:
    pipeline.start("ingest")
    run = uuid.uuid4().hex[:8]
    good: list[str] = []
    bad: list[str] = []

    def ok(n: int) -> None:
        user = f"good-{run}-{n}"
        good.append(user)
        response = pipeline.post("/v1/track", track(user))
        assert response.status_code == 200, response.text
        assert response.json() == {"success": True}

    def rejected(status: int, response: requests.Response, field: str | None = None) -> dict:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["success"] is False and body["error"]
        if field is not None:
            assert field in [problem["field"] for problem in body["errors"]], body
        return body

    ok(0)
    response = requests.post(f"{pipeline.url}/v1/track", data=b'{"userId": "x", "event": ', auth=(WRITE_KEY, ""), timeout=10)
    rejected(400, response, "body")
    ok(1)
    bad.append(f"bad-{run}-noid")
    rejected(400, pipeline.post("/v1/track", {"event": "Clicked", "properties": {"marker": bad[-1]}}), "userId")
    bad.append(f"bad-{run}-noevent")
    rejected(400, pipeline.post("/v1/track", {"userId": bad[-1]}), "event")
    ok(2)
    bad.append(f"bad-{run}-types")
    rejected(400, pipeline.post("/v1/identify", {"userId": bad[-1], "traits": ["not", "an", "object"]}), "traits")
    bad.append(f"bad-{run}-ts")
    rejected(400, pipeline.post("/v1/page", {"userId": bad[-1], "timestamp": 1714564800}), "timestamp")
    bad.append(f"bad-{run}-oversize-event")
    body = rejected(400, pipeline.post("/v1/track", track(bad[-1], properties={"blob": "x" * 40_000})))
    assert "limit" in body["error"]
    ok(3)
    bad.append(f"bad-{run}-oversize-batch")
    big = [{"type": "track", "userId": bad[-1], "event": "e", "properties": {"blob": "y" * 20_000}} for _ in range(30)]
    rejected(400, pipeline.post("/v1/batch", {"batch": big}))
    bad.append(f"bad-{run}-2501")
    rejected(400, pipeline.post("/v1/batch", {"batch": [{"type": "track", "userId": bad[-1], "event": "e"}] * 2_501}), "batch")
    bad.append(f"bad-{run}-mixed")
    mixed = [{"type": "track", "userId": bad[-1], "event": "fine"}, {"type": "track", "userId": bad[-1]}]
    body = rejected(400, pipeline.post("/v1/batch", {"batch": mixed}), "event")
    assert body["errors"] == [{"index": 1, "field": "event", "reason": "a track call needs a non-empty event name"}]
    ok(4)
    bad.append(f"bad-{run}-key")
    body = rejected(401, pipeline.post("/v1/track", track(bad[-1]), write_key="wk_nobody"))
    assert "write key" in body["error"]
    bad.append(f"bad-{run}-nokey")
    rejected(401, pipeline.post("/v1/track", track(bad[-1]), write_key=None))
    ok(5)

    records = pipeline.read("events.accepted", until=lambda rs: {r.value["user_id"] for r in rs} >= set(good))
    users = [r.value["user_id"] for r in records]
    assert sorted(users) == sorted(good), "exactly the valid requests reached the topic"
    assert not set(users) & set(bad)


def test_write_key_in_the_body_and_gzip_bodies_are_accepted(pipeline: Pipeline) -> None:
    pipeline.start("ingest")
    user = f"gz-{uuid.uuid4().hex[:8]}"
    body = {"writeKey": WRITE_KEY, "batch": [{"type": "identify", "userId": user, "traits": {"plan": "pro"}}]}
    response = requests.post(
        f"{pipeline.url}/v1/batch", data=gzip.compress(orjson.dumps(body)),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    records = pipeline.read("events.accepted", until=lambda rs: any(r.value["user_id"] == user for r in rs))
    (event,) = [r.value for r in records if r.value["user_id"] == user]
    assert event["traits"] == {"plan": "pro"} and event["type"] == "identify" and event["source"] == "test"


def test_429_with_retry_after_when_kafka_cannot_keep_up(kafka_bootstrap: str, tmp_path) -> None:
    """An ingest whose Kafka is gone: the first request waits for acks, the next one over the budget gets 429."""
    dead = f"127.0.0.1:{free_port()}"
    pipe = Pipeline(bootstrap=dead, root=tmp_path, extra_config={"ingest": {"max_in_flight": 5, "delivery_timeout": "4s"}})
    try:
        pipe.start("ingest")
        waiting: dict[str, requests.Response] = {}
        first = threading.Thread(
            target=lambda: waiting.setdefault("r", pipe.post("/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "e"}] * 5}))
        )
        first.start()
        time.sleep(0.5)
        over = pipe.post("/v1/track", track("u2"))
        assert over.status_code == 429, over.text
        assert over.headers["Retry-After"] == "1"
        first.join(timeout=30)
        assert waiting["r"].status_code == 503, "a write Kafka never acknowledged is not a 200"
        assert waiting["r"].headers["Retry-After"] == "1"
    finally:
        pipe.stop_all()
