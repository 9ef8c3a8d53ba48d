"""Segment's own SDKs, pointed at the ingest, deliver every call type; the raw-event topic (behind the dedup
stage, so the worker runs too) holds each event with the right fields."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone

from segment.analytics import Client

from tests.support import REPO_ROOT, WRITE_KEY, Pipeline

NODE_CLIENT = REPO_ROOT / "tests" / "clients" / "node"


def raw_events(pipeline: Pipeline, run: str, count: int) -> list[dict]:
    """The decoded raw events of this run (its user ids carry `run`), once `count` of them arrived."""
    mine = lambda r: run in (r.value["user_id"] or "") or run in (r.value["anonymous_id"] or "")  # noqa: E731
    records = pipeline.read("events.raw", until=lambda rs: sum(1 for r in rs if mine(r)) >= count, timeout=90)
    return [r.value for r in records if mine(r)]


def check_common(event: dict, before_ms: int) -> None:
    assert event["source"] == "test"
    assert event["message_id"]
    assert before_ms <= event["received_at"] <= int(time.time() * 1000)
    assert event["sent_at"] is not None and event["original_timestamp"] is not None
    assert event["timestamp"] == event["received_at"] - (event["sent_at"] - event["original_timestamp"])
    assert event["context"].get("ip"), "filled from the request when the SDK sends none"


def test_segment_analytics_python(pipeline: Pipeline) -> None:
    pipeline.start("ingest")
    pipeline.start("worker")
    run = uuid.uuid4().hex[:8]
    user, anon = f"py-{run}", f"anon-py-{run}"
    before = int(time.time() * 1000)
    errors: list[str] = []
    client = Client(WRITE_KEY, host=pipeline.url, on_error=lambda e, batch: errors.append(str(e)), max_retries=1, upload_interval=0.1)
    past = datetime.now(timezone.utc) - timedelta(days=2)
    client.track(user, "Order Completed", {"total": 42.5, "currency": "USD"}, context={"ip": "10.1.2.3"}, timestamp=past)
    client.identify(user, {"email": f"{run}@example.com", "plan": "pro"})
    client.page(user, category="Docs", name="Install", properties={"path": "/install"})
    client.screen(user, name="Settings", properties={"tab": "privacy"})
    client.group(user, f"org-{run}", {"name": "Acme"})
    client.alias(anon, user)  # previous_id=anon, user_id=user
    client.track(anonymous_id=anon, event="Viewed", properties={"n": 1})
    client.flush()
    client.join()
    assert errors == []

    events = raw_events(pipeline, run, 7)
    by_type = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
        check_common(event, before - 1)
    order = next(e for e in by_type["track"] if e["event"] == "Order Completed")
    assert order["user_id"] == user and order["properties"] == {"total": 42.5, "currency": "USD"}
    assert order["context"]["ip"] == "10.1.2.3" and order["context"]["library"]["name"] == "analytics-python"
    assert abs(order["timestamp"] - past.timestamp() * 1000) < 60_000, "a historical timestamp stays historical"
    assert by_type["identify"][0]["traits"] == {"email": f"{run}@example.com", "plan": "pro"}
    page = by_type["page"][0]
    assert (page["name"], page["category"], page["properties"]["path"]) == ("Install", "Docs", "/install")
    assert by_type["screen"][0]["name"] == "Settings"
    assert by_type["group"][0]["group_id"] == f"org-{run}" and by_type["group"][0]["traits"] == {"name": "Acme"}
    alias = by_type["alias"][0]
    assert (alias["previous_id"], alias["user_id"]) == (anon, user)
    live = [e for e in events if e is not order]
    assert all(abs(e["timestamp"] - e["received_at"]) < 30_000 for e in live), "a call made now is timed now"
    viewed = next(e for e in by_type["track"] if e["event"] == "Viewed")
    assert viewed["anonymous_id"] == anon and viewed["user_id"] is None
    assert len({e["message_id"] for e in events}) == 7


def test_segment_analytics_node(pipeline: Pipeline) -> None:
    assert (NODE_CLIENT / "node_modules" / "@segment" / "analytics-node").exists(), "run `make install` (npm ci)"
    pipeline.start("ingest")
    pipeline.start("worker")
    run = uuid.uuid4().hex[:8]
    user, anon = f"node-{run}", f"anon-node-{run}"
    calls = [
        {"method": "track", "params": {"userId": user, "event": "Signed Up", "properties": {"plan": "free"}, "context": {"locale": "de-DE"}}},
        {"method": "identify", "params": {"userId": user, "traits": {"email": f"{run}@example.org"}}},
        {"method": "page", "params": {"userId": user, "name": "Pricing", "category": "Marketing", "properties": {"url": "https://x.io/p"}}},
        {"method": "screen", "params": {"userId": user, "name": "Home"}},
        {"method": "group", "params": {"userId": user, "groupId": f"team-{run}", "traits": {"seats": 5}}},
        {"method": "alias", "params": {"userId": user, "previousId": anon}},
        {"method": "track", "params": {"anonymousId": anon, "event": "Opened", "messageId": f"node-msg-{run}"}},
    ]
    before = int(time.time() * 1000)
    done = subprocess.run(
        ["node", "send.mjs", pipeline.url, WRITE_KEY], input=json.dumps(calls), cwd=NODE_CLIENT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = raw_events(pipeline, run, len(calls))
    for event in events:
        check_common(event, before - 1)
        assert event["context"]["library"]["name"] == "@segment/analytics-node"
        assert abs(event["timestamp"] - event["received_at"]) < 30_000, "a call made now is timed now"
    by_type = {e["type"]: e for e in events if e["type"] != "track"}
    tracks = {e["event"]: e for e in events if e["type"] == "track"}
    assert tracks["Signed Up"]["properties"] == {"plan": "free"} and tracks["Signed Up"]["context"]["locale"] == "de-DE"
    assert tracks["Opened"]["message_id"] == f"node-msg-{run}" and tracks["Opened"]["anonymous_id"] == anon
    assert by_type["identify"]["traits"] == {"email": f"{run}@example.org"}
    assert (by_type["page"]["name"], by_type["page"]["category"]) == ("Pricing", "Marketing")
    assert by_type["screen"]["name"] == "Home"
    assert by_type["group"]["group_id"] == f"team-{run}" and by_type["group"]["traits"] == {"seats": 5}
    assert (by_type["alias"]["previous_id"], by_type["alias"]["user_id"]) == (anon, user)
