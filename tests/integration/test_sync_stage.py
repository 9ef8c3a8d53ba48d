"""The sync stage on real Kafka with real processes and real HTTP receivers (aiohttp servers of the test).

One pipeline, one stream of events (anonymous visitors who identify later: merges, trait changes, audience entries
and exits), four webhook destinations: a healthy one (identify and track for audiences, identify for traits), a
flaky one (503 to every second request for its first FLAKY_S seconds), a refusing one (400) and one answering 503
until its deliveries pass max_age (3 s); a Kafka destination (a topic of the same cluster), a Postgres warehouse (a real server, topology/ops/postgres_local.py) and one
whose database is unreachable. Against the change topics (read_committed) as the oracle of what must be delivered:
each change reaches the healthy and the flaky receiver exactly once by webhook-id, every signature verifies with the
`standardwebhooks` library, each profile's deliveries arrive in the order of its changes, the receivers' view of
every profile equals the topics' last values, the refusing destination's deliveries are dead-lettered at once with
status and body, the Kafka topic holds each delivery once, keyed by profile, with its id in the `cdp-delivery-id`
header, and the warehouse's tables hold each profile's newest values while the unreachable one retries saying why.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
import requests
import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import NewTopic
from standardwebhooks import Webhook

from agents.sync.payloads import delivery_id
from agents.sync.warehouse import column_name
from tests.integration.test_compute_stage import ADMIN, _iso, people_stream, post_definition, send
from topology.ops.postgres_local import PostgresServer, free_port
from tests.receivers import Receivers, Received
from tests.support import Pipeline, wait_until

SECRETS = {path: "whsec_" + ("MfKQ9r8GKYqrTwjUPD8ILPZIo2La" + path[:4].ljust(4, "x")) for path in ("healthy", "flaky", "refusing", "crash", "expiring")}
FLAKY_S = 60
TRAITS = [{"key": "orders", "kind": "count", "event": "Order Completed"},
          {"key": "revenue", "kind": "sum", "event": "Order Completed", "property": "amount"}]  # fmt: skip
AUDIENCES = [{"key": "buyers", "when": {"trait": "orders", "gte": 2}},
             {"key": "browsers", "when": {"all": [{"not": {"audience": "buyers"}}, {"event": "Page Viewed", "count": {"gte": 1}}]}}]  # fmt: skip
FAST_RETRY = {"retry": {"base": "100ms", "cap": "1s"}}


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    started = Receivers()
    yield started
    started.close()


@pytest.fixture(scope="module")
def synced(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory, receivers: Receivers, postgres: PostgresServer) -> Iterator[Pipeline]:
    first: list[float] = []

    def flaky(count: int) -> tuple[int, str, dict[str, str]]:
        first.append(time.monotonic()) if not first else None
        failing = time.monotonic() - first[0] < FLAKY_S and count % 2 == 0
        return (503, "busy", {}) if failing else (200, "ok", {})

    receivers.on("flaky", flaky)
    receivers.on("refusing", lambda count: (400, "bad request: no thanks", {}))
    receivers.on("expiring", lambda count: (503, "down for good", {}))
    destinations = [
        {"name": "healthy", "kind": "webhook", "url": receivers.url("healthy"), "secret": SECRETS["healthy"],
         "audience_calls": ["identify", "track"], **FAST_RETRY},
        {"name": "flaky", "kind": "webhook", "url": receivers.url("flaky"), "secret": SECRETS["flaky"], **FAST_RETRY},
        {"name": "refusing", "kind": "webhook", "url": receivers.url("refusing"), "secret": SECRETS["refusing"],
         "subscribe": ["audience_membership"]},
        {"name": "expiring", "kind": "webhook", "url": receivers.url("expiring"), "secret": SECRETS["expiring"],
         "subscribe": ["audience_membership"], "max_age": "3s", "retry": {"base": "200ms", "cap": "1s"}},
        {"name": "warehouse", "kind": "postgres", "dsn": postgres.dsn, "batch": {"size": 50}, **FAST_RETRY},
        {"name": "offline", "kind": "postgres", "dsn": f"postgresql://cdp:x@127.0.0.1:{free_port()}/postgres", "timeout": "2s"},
        {"name": "stream", "kind": "kafka", "topic": "PREFIX.crm-feed", "audience_calls": ["identify", "track"]},
    ]  # fmt: skip
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path_factory.mktemp("sync"),
                    extra_config={"traits": TRAITS, "audiences": AUDIENCES, "destinations": destinations})  # fmt: skip
    destinations[-1]["topic"] = pipe.topic("crm-feed")
    pipe.config_path.write_text(yaml.safe_dump({**yaml.safe_load(pipe.config_path.read_text()), "destinations": destinations}))
    pipe.create_topics()
    pipe.admin.create_topics([NewTopic(pipe.topic("crm-feed"), 2, 1)])[pipe.topic("crm-feed")].result()
    try:
        pipe.start("ingest")
        pipe.start("worker", CDP_ADMIN_TOKEN=ADMIN)
        send(pipe, people_stream(seed=11, count=400, run="sync", start_ms=int(time.time() * 1000) - 600_000))
        yield pipe
    finally:
        pipe.stop_all()


def drained(pipe: Pipeline, suffixes: tuple[str, ...]) -> bool:
    """The worker group has committed every record of these topics (their stages decided all of them)."""
    consumer = Consumer({"bootstrap.servers": pipe.bootstrap, "group.id": "probe"})
    try:
        for suffix in suffixes:
            ends = {p: consumer.get_watermark_offsets(TopicPartition(pipe.topic(suffix), p), timeout=10)[1] for p in range(pipe.partitions)}
            committed = pipe.committed(suffix)
            if any(end and committed.get(p, -1) < end - 1 for p, end in ends.items()):  # -1: a transaction marker
                return False
        return True
    finally:
        consumer.close()


def changes(pipe: Pipeline) -> list[dict[str, Any]]:
    """Every change compute emitted, each with its topic, in per-profile seq order."""
    wait_until(lambda: drained(pipe, ("events.accepted", "events.raw", "events.resolved", "profile.changes", "audience.membership")),
               timeout=180, what="every stage to have decided its inputs", interval=1)  # fmt: skip
    found = [{**r.value, "topic": "traits"} for r in pipe.read("profile.changes", until=lambda rs: False, timeout=5)]
    found += [{**r.value, "topic": "audiences"} for r in pipe.read("audience.membership", until=lambda rs: False, timeout=5)]
    return sorted(found, key=lambda c: (c["profile_id"], c["seq"]))


def expected_ids(found: list[dict[str, Any]], destination: str, calls: tuple[str, ...], traits: bool) -> dict[str, dict[str, Any]]:
    out = {}
    for change in found:
        if change["topic"] == "audiences":
            for call in calls:
                out[delivery_id(destination, change["profile_id"], change["seq"], call)] = change
        elif traits:
            out[delivery_id(destination, change["profile_id"], change["seq"], "identify")] = change
    return out


def last_values(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per profile, each audience's and trait's last value on the change topics: what a receiver must end with."""
    last: dict[str, dict[str, Any]] = defaultdict(dict)
    for change in found:
        subject = change.get("audience") or change.get("trait")
        last[change["profile_id"]][subject] = (change["transition"] == "entered") if change["topic"] == "audiences" else change["new_value"]
    return last


def warehouse(dsn: str, schema: str) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Per profile, its trait columns and audiences as the warehouse's tables hold them (nulls left out); and its seq."""

    async def read() -> tuple[list[Any], list[Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return (await conn.fetch(f"SELECT * FROM {schema}.profiles"), await conn.fetch(f"SELECT * FROM {schema}.audience_memberships"))
        finally:
            await conn.close()

    try:
        profiles, memberships = asyncio.run(read())
    except asyncpg.UndefinedTableError:
        return {}, {}
    own = {"profile_id", "user_id", "anonymous_id", "email", "seq", "updated_at", "uuid_ts", "_seqs"}
    view: dict[str, dict[str, Any]] = defaultdict(dict)
    for row in profiles:
        view[row["profile_id"]].update({f"trait:{k}": float(v) if isinstance(v, Decimal) else v for k, v in row.items() if k not in own and v is not None})
    for row in memberships:
        view[row["profile_id"]][f"audience:{row['audience']}"] = row["member"]
    return dict(view), {row["profile_id"]: row["seq"] for row in profiles}


def warehouse_oracle(found: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """What `warehouse` must read: each profile's last value per trait column and audience on the change topics, and
    its newest seq (no row older than its newest change)."""
    view: dict[str, dict[str, Any]] = defaultdict(dict)
    for change in found:  # in seq order per profile
        audience = change["topic"] == "audiences"
        subject = f"audience:{change['audience']}" if audience else f"trait:{column_name(change['trait'])}"
        view[change["profile_id"]][subject] = change["transition"] == "entered" if audience else change["new_value"]
    return ({p: {k: v for k, v in values.items() if v is not None} for p, values in view.items()},
            {c["profile_id"]: c["seq"] for c in found})  # fmt: skip


def refusals(pipe: Pipeline) -> list[Any]:
    return [r for r in pipe.read("sync.dead-letter", until=lambda rs: False, timeout=5) if r.value["destination"] == "refusing"]


def verified(received: list[Received], path: str) -> list[dict[str, Any]]:
    hook = Webhook(SECRETS[path])
    return [hook.verify(r.body, {k.lower(): v for k, v in r.headers.items()}) for r in received]


@pytest.mark.integration
def test_every_change_reaches_each_destination_once_in_order_signed_and_refusals_are_dead_lettered(synced: Pipeline, receivers: Receivers) -> None:
    found = changes(synced)
    assert any(c["topic"] == "audiences" and c["transition"] == "exited" for c in found), "the stream must make audience exits"
    assert any(c["topic"] == "traits" for c in found)
    plans = {"healthy": expected_ids(found, "healthy", ("identify", "track"), True),
             "flaky": expected_ids(found, "flaky", ("identify",), True),
             "refusing": expected_ids(found, "refusing", ("identify",), False)}  # fmt: skip

    def delivered(path: str) -> set[str]:
        return {r.headers["webhook-id"] for r in receivers.got(path) if r.status == 200}

    wait_until(lambda: delivered("healthy") >= set(plans["healthy"]) and delivered("flaky") >= set(plans["flaky"])
               and len(receivers.got("refusing")) >= len(plans["refusing"]), timeout=180,
               what="every change to reach the receivers", interval=1)  # fmt: skip
    time.sleep(2)  # anything sent twice would arrive by now
    for path in ("healthy", "flaky"):
        got = receivers.got(path)
        bodies = verified(got, path)
        successes = Counter(r.headers["webhook-id"] for r in got if r.status == 200)
        assert set(successes) == set(plans[path]) and max(successes.values()) == 1, f"{path}: a change delivered twice or one not wanted"
        assert all(body["messageId"] == r.headers["webhook-id"] for body, r in zip(bodies, got, strict=True))
        order: dict[str, list[int]] = defaultdict(list)
        view: dict[str, dict[str, Any]] = defaultdict(dict)
        for body, r in zip(bodies, got, strict=True):
            if r.status != 200:
                continue
            change = plans[path][r.headers["webhook-id"]]
            order[change["profile_id"]].append(change["seq"])
            if body["type"] == "identify":
                view[change["profile_id"]].update({k: v for k, v in body["traits"].items() if k != "email"})
            who = {key: change[field] for key, field in (("userId", "user_id"), ("anonymousId", "anonymous_id")) if change[field]}
            assert who and all(body[key] == value for key, value in who.items()), f"{path}: {body} does not say whom it is about"
        assert all(seqs == sorted(seqs) for seqs in order.values()), f"{path}: a profile's deliveries out of order"
        assert view == last_values(found), f"{path}: the receiver's view differs from the change topics"
    assert any(r.status == 503 for r in receivers.got("flaky")), "the flaky receiver never failed: the test proves nothing"

    refused = receivers.got("refusing")
    assert Counter(r.headers["webhook-id"] for r in refused) == Counter(set(plans["refusing"])), "a 400 must not be retried"
    wait_until(lambda: len(refusals(synced)) >= len(plans["refusing"]), timeout=60, what="the refusals dead-lettered")
    letters = refusals(synced)
    assert len(letters) == len(plans["refusing"])
    for letter in letters:
        value = letter.value
        assert (value["destination"], value["http_status"], value["attempts"], value["stage"]) == ("refusing", 400, 1, "sync")
        assert "no thanks" in value["response"] and orjson.loads(value["value"])["id"] in plans["refusing"]
    outcomes = synced.read("sync.outcomes", until=lambda rs: False, timeout=5)
    assert sum(1 for o in outcomes if o.value["destination"] == "refusing" and o.value["status"] == "dead_lettered") == len(plans["refusing"])
    assert sum(1 for o in outcomes if o.value["destination"] == "flaky" and o.value["status"] == "retrying") >= 1

    streamed = synced.read("crm-feed", until=lambda rs: len(rs) >= len(plans["healthy"]), timeout=60, decode=False)
    ids = Counter(dict(r.headers)["cdp-delivery-id"].decode() for r in streamed)
    want = {delivery_id("stream", c["profile_id"], c["seq"], call): c for i, c in plans["healthy"].items()
            for call in (("identify", "track") if c["topic"] == "audiences" else ("identify",))}  # fmt: skip
    assert set(ids) == set(want) and max(ids.values()) == 1, "the Kafka destination: each change once, by its delivery id"
    for r in streamed:
        body, change = orjson.loads(r.raw), want[dict(r.headers)["cdp-delivery-id"].decode()]
        assert r.key == change["profile_id"].encode() and body["messageId"] == dict(r.headers)["cdp-delivery-id"].decode()

    status = {d["name"]: d for d in requests.get(f"http://127.0.0.1:{synced.web_port}/v1/destinations", timeout=10).json()["destinations"]}
    assert status["healthy"]["delivered"] == len(plans["healthy"]) and status["healthy"]["backlog"] == 0
    assert status["refusing"]["dead_lettered"] == len(plans["refusing"]) and status["refusing"]["last_error"] == "HTTP 400"
    shown = requests.get(f"http://127.0.0.1:{synced.web_port}/v1/definitions/destinations", timeout=10).json()["destinations"]
    assert all(d["definition"]["secret"] == "<redacted>" for d in shown if d["definition"]["kind"] == "webhook")


@pytest.mark.integration
def test_the_warehouse_holds_each_profiles_newest_values_and_an_unreachable_one_retries_saying_why(synced: Pipeline, postgres: PostgresServer) -> None:
    want = warehouse_oracle(changes(synced))
    assert want[0] and any(k.startswith("audience:") for v in want[0].values() for k in v), "the stream must make traits and audiences"
    wait_until(lambda: warehouse(postgres.dsn, "warehouse") == want, timeout=120, what="the warehouse to hold the topics' last values")
    status = {d["name"]: d for d in destinations(synced.web_port)}
    offline = status["offline"]
    assert offline["status"] == "retrying" and offline["backlog"] > 0 and offline["delivered"] == 0, offline
    assert "postgres offline" in offline["last_error"] and "Connect" in offline["last_error"], offline["last_error"]
    assert status["warehouse"]["backlog"] == 0 and status["warehouse"]["delivered"] > 0 and status["healthy"]["backlog"] == 0


@pytest.mark.integration
def test_a_delivery_failing_past_max_age_is_dead_lettered_with_its_last_answer(synced: Pipeline, receivers: Receivers) -> None:
    plan = expected_ids(changes(synced), "expiring", ("identify",), False)

    def letters() -> dict[str, dict[str, Any]]:
        return {orjson.loads(r.value["value"])["id"]: r.value for r in synced.read("sync.dead-letter", until=lambda rs: False, timeout=5)
                if r.value["destination"] == "expiring"}  # fmt: skip

    wait_until(lambda: set(letters()) >= set(plan), timeout=90, what="every delivery to `expiring` given up past max_age", interval=1)
    given_up = letters()
    assert set(given_up) == set(plan)
    for letter in given_up.values():  # one that waited behind its profile's failing delivery expires untried
        assert "max_age" in letter["reason"], letter
        assert letter["attempts"] == 0 or (letter["http_status"] == 503 and "down for good" in letter["response"]), letter
    attempts = Counter(r.headers["webhook-id"] for r in receivers.got("expiring"))
    assert set(attempts) <= set(plan) and all(r.status == 503 for r in receivers.got("expiring"))
    assert max(attempts.values()) >= 2, "retried before it was given up"
    assert next(d for d in destinations(synced.web_port) if d["name"] == "expiring")["backlog"] == 0


@pytest.mark.integration
def test_redelivery_after_the_fix_delivers_the_dead_letters_and_skips_those_a_newer_change_superseded(synced: Pipeline, receivers: Receivers) -> None:
    """New people browse (they enter `browsers`; the refusing receiver dead-letters that), then it is fixed and they
    order (they enter `buyers` and exit `browsers`, delivered now); then `cdp sync redeliver refusing` hands the dead
    letters back: the `browsers` entries a delivered exit superseded are never sent, the rest are delivered, and the
    receiver's last word on every audience is the topics'."""
    now = int(time.time() * 1000)
    people = [f"v{n}-sup" for n in range(4)]
    send(synced, [{"type": "page", "name": "Home", "userId": user, "messageId": f"page-{user}", "timestamp": _iso(now - 2000)} for user in people])
    plan = expected_ids(changes(synced), "refusing", ("identify",), False)

    def dead_lettered() -> set[str]:
        return {orjson.loads(r.value["value"])["id"] for r in synced.read("sync.dead-letter", until=lambda rs: False, timeout=5)
                if r.value["destination"] == "refusing"}  # fmt: skip

    wait_until(lambda: dead_lettered() >= set(plan), timeout=60, what="the browsers' entries dead-lettered", interval=1)
    letters = dead_lettered()
    shown = requests.get(f"http://127.0.0.1:{synced.web_port}/v1/destinations/refusing/dead-letters?limit=1000", timeout=30).json()
    assert {d["delivery"]["id"] for d in shown["dead_letters"]} == letters and all(d["http_status"] == 400 for d in shown["dead_letters"])
    receivers.on("refusing", lambda count: (200, "fixed", {}))
    send(synced, [{"type": "track", "event": "Order Completed", "userId": user, "messageId": f"order-{user}-{n}",
                   "properties": {"amount": 5}, "timestamp": _iso(now - 1000 + n)} for user in people for n in range(2)])  # fmt: skip
    found = changes(synced)
    plan = expected_ids(found, "refusing", ("identify",), False)
    fresh = set(plan) - letters
    assert len(fresh) >= 2 * len(people), "the orders must move the new people into buyers and out of browsers"
    wait_until(lambda: {r.headers["webhook-id"] for r in receivers.got("refusing") if r.status == 200} >= fresh, timeout=120,
               what="the new changes delivered to the fixed receiver")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "topology.ops.cli", "sync", "redeliver", "refusing", "--timeout", "120"],
                            env=synced.env(), capture_output=True, text=True, timeout=200)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"redelivered {len(letters):,} dead letters of refusing" in result.stdout and "superseded" in result.stdout, result.stdout
    plan = expected_ids(found, "refusing", ("identify",), False)
    delivered = [r for r in receivers.got("refusing") if r.status == 200]
    redelivered = {r.headers["webhook-id"] for r in delivered} & letters
    superseded = letters - redelivered
    assert superseded and redelivered, f"{len(superseded)} superseded, {len(redelivered)} redelivered"
    for ident in superseded:  # a newer change of its profile and audience was delivered
        change = plan[ident]
        assert any(plan[r.headers["webhook-id"]]["profile_id"] == change["profile_id"] and plan[r.headers["webhook-id"]]["audience"] == change["audience"]
                   and plan[r.headers["webhook-id"]]["seq"] > change["seq"] for r in delivered)  # fmt: skip
    view: dict[tuple[str, str], bool] = {}
    for r in delivered:
        change = plan[r.headers["webhook-id"]]
        view[(change["profile_id"], change["audience"])] = change["transition"] == "entered"
    last = {(c["profile_id"], c["audience"]): c["transition"] == "entered" for c in found if c["topic"] == "audiences"}
    assert view == last, "the receiver's last word on an audience is not the topics'"


@pytest.mark.integration
def test_a_destination_posted_at_run_time_is_live_and_a_410_turns_it_off_until_posted_again(synced: Pipeline, receivers: Receivers) -> None:
    port = synced.web_port
    for bad, named in (({"kind": "fax"}, "unknown kind 'fax'"), ({"url": "nope"}, "url must be"), ({"secret": None}, "secret is required"),
                       ({"audiences": ["no_such"]}, "unknown audience 'no_such'")):  # fmt: skip
        refused = post_definition(port, "destinations", {"name": "gone", "kind": "webhook", "url": receivers.url("gone"),
                                                         "secret": SECRETS["healthy"], **bad})  # fmt: skip
        assert refused.status_code == 400 and named in refused.json()["error"], refused.text
    receivers.on("gone", lambda count: (410, "this hook was removed", {}))
    body = {"name": "gone", "kind": "webhook", "url": receivers.url("gone"), "secret": SECRETS["healthy"], "subscribe": ["trait_changes"]}
    created = post_definition(port, "destinations", body)
    assert created.status_code == 201 and created.json()["definition"]["secret"] == "<redacted>", created.text
    wait_until(lambda: any(d["name"] == "gone" for d in destinations(port)), timeout=30, what="the new destination to be live")
    send(synced, people_stream(seed=12, count=60, run="gone", start_ms=int(time.time() * 1000) - 60_000))

    def off() -> bool:
        return next(d for d in destinations(port) if d["name"] == "gone")["status"] == "disabled"

    try:
        wait_until(off, timeout=90, what="a 410 to turn the destination off")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the receiver got {[r.status for r in receivers.got('gone')]} from `gone`; "
                             f"status {destinations(port)}") from None
    shown = next(d for d in requests.get(f"http://127.0.0.1:{port}/v1/definitions/destinations", timeout=10).json()["destinations"]
                 if d["definition"]["name"] == "gone")  # fmt: skip
    assert "410" in shown["definition"]["disabled"]["reason"]
    assert 'cdp_sync_disabled{destination="gone"} 1' in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    asked = len(receivers.got("gone"))
    send(synced, people_stream(seed=13, count=40, run="gone2", start_ms=int(time.time() * 1000) - 30_000))
    time.sleep(5)
    assert len(receivers.got("gone")) == asked, "a disabled destination was called"
    letters = synced.read("sync.dead-letter", until=lambda rs: False, timeout=5)
    assert any(r.value["destination"] == "gone" and r.value["http_status"] == 410 for r in letters)
    assert any(r.value["destination"] == "gone" and "disabled" in r.value["reason"] for r in letters), "changes while off are dead-lettered"

    receivers.on("gone", lambda count: (200, "back", {}))
    assert post_definition(port, "destinations", body).status_code == 201
    wait_until(lambda: not off(), timeout=30, what="a POST to turn it on again")
    before = len(receivers.got("gone"))
    send(synced, people_stream(seed=14, count=40, run="gone3", start_ms=int(time.time() * 1000) - 20_000))
    wait_until(lambda: any(r.status == 200 for r in receivers.got("gone")[before:]), timeout=90, what="deliveries once it is on again")


def destinations(port: int) -> list[dict[str, Any]]:
    return requests.get(f"http://127.0.0.1:{port}/v1/destinations", timeout=10).json()["destinations"]


@pytest.mark.integration
def test_a_worker_killed_mid_delivery_loses_nothing_and_repeats_only_with_the_same_id(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory,
                                                                                      receivers: Receivers, postgres: PostgresServer) -> None:  # fmt: skip
    """A slow receiver (each answer takes 30 ms, 2 in flight) keeps deliveries in flight; the worker is SIGKILLed
    twice while they are, and while a warehouse loads batches of 20. Everything the change topics hold arrives, every
    request is one of them (a repeat carries its change's id), the receiver's view equals the topics', and so do
    the warehouse's rows (no row older than its profile's newest change)."""

    def slow(count: int) -> tuple[int, str, dict[str, str]]:
        time.sleep(0.03)  # the receiver's thread: requests queue behind each other
        return 200, "ok", {}

    receivers.on("crash", slow)
    destination = {"name": "crash", "kind": "webhook", "url": receivers.url("crash"), "secret": SECRETS["crash"], "concurrency": 2}
    loaded = {"name": "crash-dw", "kind": "postgres", "dsn": postgres.dsn, "batch": {"size": 20}, "concurrency": 2}
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path_factory.mktemp("sync-crash"),
                    extra_config={"traits": TRAITS, "audiences": AUDIENCES, "destinations": [destination, loaded]})  # fmt: skip
    pipe.create_topics()
    try:
        pipe.start("ingest")
        worker = pipe.start("worker")
        send(pipe, people_stream(seed=21, count=600, run="crash", start_ms=int(time.time() * 1000) - 600_000))
        for _ in range(2):
            seen = len(receivers.got("crash"))
            wait_until(lambda seen=seen: len(receivers.got("crash")) > seen + 20, timeout=120, what="deliveries under way")
            pipe.stop(worker, signal.SIGKILL)
            worker = pipe.start("worker")
        found = changes(pipe)
        plan = expected_ids(found, "crash", ("identify",), True)
        wait_until(lambda: {r.headers["webhook-id"] for r in receivers.got("crash") if r.status == 200} >= set(plan), timeout=180,
                   what="every change delivered after the kills", interval=1)  # fmt: skip
        got = receivers.got("crash")
        verified(got, "crash")
        assert {r.headers["webhook-id"] for r in got} == set(plan), "a request that is no change's delivery"
        assert len(got) < len(plan) * 2, "repeats beyond what was in flight at the kills"
        view: dict[str, dict[str, Any]] = defaultdict(dict)
        last_seq: dict[tuple[str, str], int] = {}
        for r in got:  # a repeat can come after a later change was delivered: the seq says which value is newer
            change = plan[r.headers["webhook-id"]]
            for subject, value in orjson.loads(r.body)["traits"].items():
                if subject != "email" and change["seq"] >= last_seq.get((change["profile_id"], subject), -1):
                    view[change["profile_id"]][subject] = value
                    last_seq[(change["profile_id"], subject)] = change["seq"]
        assert view == last_values(found)
        want = warehouse_oracle(found)
        wait_until(lambda: warehouse(postgres.dsn, "crash_dw") == want, timeout=120, what="the warehouse to hold the topics' last values")
    finally:
        pipe.stop_all()
