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
    bad.append(f"bad-{run}-oversize-in-batch")
    one_big = [{"type": "track", "userId": bad[-1], "event": "e"}, {"type": "track", "userId": bad[-1], "event": "e", "properties": {"blob": "z" * 33_000}}]
    body = rejected(400, pipeline.post("/v1/batch", {"batch": one_big}), "message")
    assert body["errors"][0]["index"] == 1 and "32 KB" in body["errors"][0]["reason"]
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


def test_batch_envelope_write_key_in_the_body_gzip_and_client_ip(pipeline: Pipeline) -> None:
    """What reaches Kafka from a gzip'd batch: batch-level context/integrations merged into each message,
    batch-level sentAt applied (clock-skew corrected timestamp), the caller's address as context.ip."""
    pipeline.start("ingest")
    run = uuid.uuid4().hex[:8]
    body = {
        "writeKey": WRITE_KEY,
        "batch": [
            {"type": "identify", "userId": f"a-{run}", "traits": {"plan": "pro"}, "context": {"locale": "fr-FR"},
             "originalTimestamp": "2030-01-01T00:00:00Z"},
            {"type": "track", "userId": f"b-{run}", "event": "Paid", "integrations": {"Mixpanel": True},
             "originalTimestamp": "2030-01-01T00:00:02Z"},
        ],
        "context": {"library": {"name": "raw-http"}, "locale": "en-US"},
        "integrations": {"All": False, "Mixpanel": False},
        "sentAt": "2030-01-01T00:00:05Z",  # this client's clock is years ahead
    }  # fmt: skip
    response = requests.post(
        f"{pipeline.url}/v1/batch", data=gzip.compress(orjson.dumps(body)),
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain", "X-Forwarded-For": "203.0.113.9, 10.0.0.1"},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    records = pipeline.read("events.accepted", until=lambda rs: sum(run in r.value["user_id"] for r in rs) == 2)
    a, b = sorted((r.value for r in records if run in r.value["user_id"]), key=lambda e: e["user_id"])
    assert a["context"] == {"library": {"name": "raw-http"}, "locale": "fr-FR", "ip": "203.0.113.9"}
    assert b["context"] == {"library": {"name": "raw-http"}, "locale": "en-US", "ip": "203.0.113.9"}
    assert a["integrations"] == {"All": False, "Mixpanel": False} and b["integrations"] == {"All": False, "Mixpanel": True}
    assert a["traits"] == {"plan": "pro"} and a["source"] == "test"
    assert b["received_at"] - b["timestamp"] == 3_000 and a["received_at"] - a["timestamp"] == 5_000
    assert abs(b["received_at"] - time.time() * 1000) < 60_000


def test_analytics_js_settings_point_the_browser_back_here(pipeline: Pipeline) -> None:
    pipeline.start("ingest")
    settings = requests.get(f"{pipeline.url}/v1/projects/{WRITE_KEY}/settings", timeout=10)
    assert settings.status_code == 200
    segment = settings.json()["integrations"]["Segment.io"]
    assert segment["apiKey"] == WRITE_KEY and segment["apiHost"] == f"127.0.0.1:{pipeline.ingest_port}/v1"
    assert requests.get(f"{pipeline.url}/v1/projects/wk_nobody/settings", timeout=10).status_code == 404


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
