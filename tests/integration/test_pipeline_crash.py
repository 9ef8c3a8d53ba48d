"""The whole pipeline under crashes: 20,000 events through the real HTTP ingest while one of two workers is
SIGKILLed three times mid-stream (and restarted each time), then every count is checked against an oracle.

The oracle is closed-form: users u0..u399 send only userId track calls (no merges), each with a unique messageId;
a user's `orders` is how many of their acknowledged "Order Completed" calls there are and `ltv` the sum of those
calls' integer `revenue` ("Product Viewed" calls carry a revenue too, which must not count). Both traits only
grow, so each audience over them (`orders >= K`, `ltv >= L`) is entered once by exactly the users whose final
value reaches it, and never exited. What is checked after the pipeline drained:

* each kill landed mid-stream: compute had committed more input than at the previous kill (by the worker
  group's committed offsets on cdp.events.resolved), the killed worker had applied events since its last start
  (its /metrics), and not every event had even been acknowledged by the ingest yet;
* every profile's computed traits, read through both workers' views, equal the oracle; the audience sizes too;
* cdp.profile.changes (read_committed) holds, per user, one `orders` change per Order Completed messageId, no
  messageId twice, the values 1, 2, ... n in order: nothing lost, nothing counted twice;
* cdp.audience.membership (read_committed) holds each (profile, audience, entered) once, for exactly the users
  the oracle puts in the audience, and no exit;
* nothing was dead-lettered.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.integration.test_compute_stage import compute_metric
from tests.integration.test_identity_stage import view
from tests.support import WRITE_KEY, Pipeline, free_port, wait_until

EVENTS, USERS, BATCH = 20_000, 400, 100
RATE = 250  # events/s offered: the stream lasts ~80 s, long enough for three kill-restart cycles (~20 s each)
KILLS = 3
GATES = (0.4, 0.7, 0.9, 1.0)  # the sender holds at this share of the stream until the next kill happened
KILL_AFTER_APPLIED = 300  # the victim applied this many events since its (re)start before it is killed
ORDERS_K, LTV_L = 40, 2_100  # about half the users reach each (400 users x ~40 orders x ~50 revenue)
COMPUTE = {
    "traits": [
        {"key": "orders", "kind": "count", "event": "Order Completed"},
        {"key": "ltv", "kind": "sum", "event": "Order Completed", "property": "revenue"},
    ],
    "audiences": [
        {"key": "loyal", "when": {"trait": "orders", "gte": ORDERS_K}},
        {"key": "big_spender", "when": {"trait": "ltv", "gte": LTV_L}},
    ],
}


def stream(seed: int, run: str) -> list[list[dict[str, Any]]]:
    """EVENTS track calls in batches of BATCH: 80 % Order Completed, each with a unique messageId and revenue."""
    rng = random.Random(seed)
    calls = []
    for n in range(EVENTS):
        event = "Order Completed" if rng.random() < 0.8 else "Product Viewed"
        calls.append({"type": "track", "messageId": f"{run}-{n}", "userId": f"u{rng.randrange(USERS)}-{run}", "event": event,
                      "properties": {"revenue": rng.randrange(1, 101)}})  # fmt: skip
    return [calls[first : first + BATCH] for first in range(0, EVENTS, BATCH)]


@dataclass
class Oracle:
    """Per userId: the messageIds of its Order Completed calls, and the revenue they sum to."""

    orders: dict[str, list[str]]
    ltv: dict[str, int]

    @classmethod
    def of(cls, calls: list[dict[str, Any]]) -> Oracle:
        orders: dict[str, list[str]] = defaultdict(list)
        ltv: dict[str, int] = defaultdict(int)
        for call in calls:
            if call["event"] == "Order Completed":
                orders[call["userId"]].append(call["messageId"])
                ltv[call["userId"]] += call["properties"]["revenue"]
        return cls(dict(orders), dict(ltv))

    def traits(self, user: str) -> dict[str, Any]:
        """The computed traits a profile view shows (a count or sum of nothing is 0 there)."""
        return {"orders": len(self.orders.get(user, [])), "ltv": self.ltv.get(user, 0)}

    def audiences(self, user: str) -> set[str]:
        traits = self.traits(user)
        return {key for key, member in (("loyal", traits["orders"] >= ORDERS_K), ("big_spender", traits["ltv"] >= LTV_L)) if member}


class Sender(threading.Thread):
    """Sends the batches at RATE events/s as an SDK would: a 429/503 (or no answer) is retried after Retry-After
    until it is a 200; only batches answered 200 count. It holds at GATES[kills] of the stream until the next
    kill happened, so the stream can't end before the last kill whatever the restarts cost."""

    def __init__(self, pipeline: Pipeline, batches: list[list[dict[str, Any]]]) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.batches = pipeline, batches
        self.acked: list[dict[str, Any]] = []
        self.statuses: Counter[int | str] = Counter()
        self.kills = 0
        self.held_s = 0.0  # time spent waiting at a gate
        self.error: str | None = None

    def run(self) -> None:
        session = requests.Session()
        started = time.monotonic()
        try:
            for index, batch in enumerate(self.batches):
                while (index + 1) * BATCH > GATES[self.kills] * EVENTS:
                    time.sleep(0.1)
                    self.held_s += 0.1
                time.sleep(max(0.0, started + self.held_s + index * BATCH / RATE - time.monotonic()))
                self._send(session, batch)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = f"{type(exc).__name__}: {exc}"

    def _send(self, session: requests.Session, batch: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = session.post(f"{self.pipeline.url}/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, ""), timeout=30)
            except requests.RequestException as exc:  # the outcome is unknown: send the same messageIds again
                self.statuses[type(exc).__name__] += 1
                retry_after = 1.0
            else:
                self.statuses[response.status_code] += 1
                if response.status_code == 200:
                    self.acked.extend(batch)
                    return
                if response.status_code not in (429, 503):
                    raise AssertionError(f"the ingest answered {response.status_code}: {response.text[:300]}")
                retry_after = float(response.headers.get("Retry-After", "1"))
            if time.monotonic() > deadline:
                raise AssertionError(f"no 200 within 120 s for a batch; answers so far: {dict(self.statuses)}")
            time.sleep(retry_after)


def applied_by(port: int) -> int:
    """Events compute applied in the worker on `port` since it started (0 while it is not answering)."""
    try:
        return compute_metric(port, "events")
    except requests.RequestException:
        return 0


def explain(pipeline: Pipeline, oracle: Oracle, user: str) -> str:
    """Where a user's Order Completed calls went: resolved by identity (how often, to which profiles), and counted
    by compute (the `orders` changes on cdp.profile.changes), so a failure says which stage lost or doubled them."""
    mine = set(oracle.orders.get(user, []))
    resolved = [r.value for r in pipeline.read("events.resolved", until=lambda rs: True, timeout=10)]
    times = Counter(r["event"]["message_id"] for r in resolved if r["event"]["message_id"] in mine)
    profiles = {r["profile_id"] for r in resolved if r["event"]["message_id"] in mine}
    changes = [r.value for r in pipeline.read("profile.changes", until=lambda rs: True, timeout=10)]
    counted = Counter(c["message_id"] for c in changes if c["profile_id"] in profiles and c["trait"] == "orders")
    return (f"{user}: {len(mine)} Order Completed sent; on events.resolved {len(times)} of them (to profiles {sorted(profiles)}), "
            f"never {sorted(mine - set(times))[:5]}, more than once {[m for m, n in times.items() if n > 1][:5]}; "
            f"counted in orders changes {len(counted)}, more than once {[m for m, n in counted.items() if n > 1][:5]}, "
            f"never {sorted(mine - set(counted))[:5]}")


def test_three_sigkills_while_events_flow_lose_nothing_and_count_nothing_twice(kafka_bootstrap: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    pipeline = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, extra_config=COMPUTE)
    pipeline.create_topics()
    other = free_port()
    try:
        started = time.monotonic()
        pipeline.start("ingest")
        pipeline.start("worker")
        victim = pipeline.start("worker", CDP_WEB_PORT=str(other))
        ports = [pipeline.web_port, other]
        sender = Sender(pipeline, stream(17, run))
        sender.start()

        kills: list[dict[str, Any]] = []
        for kill in range(KILLS):
            before = kills[-1]["committed"] if kills else 0

            def ready(before: int = before) -> bool:
                assert sender.error is None, f"sender: {sender.error}"
                return applied_by(other) >= KILL_AFTER_APPLIED and sum(pipeline.committed("events.resolved").values()) > before

            wait_until(ready, timeout=120, interval=0.2, what=f"kill {kill + 1}: the victim to apply {KILL_AFTER_APPLIED} events "
                       f"since its start and compute to commit past offset sum {before} on events.resolved")  # fmt: skip
            applied, committed = applied_by(other), sum(pipeline.committed("events.resolved").values())
            pipeline.stop(victim, signal.SIGKILL)
            kills.append({"at_s": round(time.monotonic() - started, 1), "victim_applied": applied, "committed": committed,
                          "acked": len(sender.acked)})  # fmt: skip
            sender.kills += 1
            victim = pipeline.start("worker", CDP_WEB_PORT=str(other))  # same port, same data dir
        print(f"\nkills: {kills}")

        sender.join(timeout=300)
        assert not sender.is_alive() and sender.error is None, f"sender: {sender.error}; answers: {dict(sender.statuses)}"
        stream_s = time.monotonic() - started
        assert len(sender.acked) == EVENTS
        for number, kill in enumerate(kills, 1):  # each kill landed mid-stream
            assert kill["victim_applied"] > 0, f"kill {number}: the victim had applied no event: {kills}"
            assert 0 < kill["committed"] and kill["acked"] < EVENTS, f"kill {number}: not between the first and last event: {kills}"
            assert number == 1 or kill["committed"] > kills[number - 2]["committed"], f"kill {number}: no event flowed since the last: {kills}"

        oracle = Oracle.of(sender.acked)
        users = [f"u{n}-{run}" for n in range(USERS)]
        session = requests.Session()
        mismatch: list[Any] = []

        def converged() -> bool:
            for user in users:
                response = session.get(f"http://127.0.0.1:{random.choice(ports)}/v1/identifiers/user_id/{user}", timeout=30)
                body = response.json() if response.status_code == 200 else {}
                if body.get("computed_traits") != oracle.traits(user) or set(body.get("audiences", [])) != oracle.audiences(user):
                    mismatch[:] = [user, oracle.traits(user), oracle.audiences(user), response.status_code, body]
                    return False
            return True

        try:
            wait_until(converged, timeout=240, what="every profile's traits and audiences to equal the oracle", interval=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last mismatch (user, expected traits, audiences, status, view): {mismatch}; "
                                 f"{explain(pipeline, oracle, mismatch[0])}") from None
        drained_s = time.monotonic() - started

        profile_of: dict[str, str] = {}
        for user in users:  # and each worker, not a random one, answers the same
            bodies = [view(port, f"/v1/identifiers/user_id/{user}").json() for port in ports]
            assert bodies[0] == bodies[1] and bodies[0]["computed_traits"] == oracle.traits(user), (user, bodies)
            profile_of[bodies[0]["profile_id"]] = user
        assert len(profile_of) == USERS, "one profile per userId"
        for port in ports:
            sizes = {a["key"]: a["size"] for a in view(port, "/v1/audiences").json()["audiences"]}
            assert sizes == {key: sum(key in oracle.audiences(u) for u in users) for key in ("loyal", "big_spender")}, sizes

        changes = [r.value for r in pipeline.read("profile.changes", until=lambda rs: True, timeout=10)]
        memberships = [r.value for r in pipeline.read("audience.membership", until=lambda rs: True, timeout=10)]
        assert {c["profile_id"] for c in changes + memberships} <= set(profile_of), "changes only for the users sent"
        by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for change in changes:  # one partition per profile: a profile's changes are in the order they were made
            by_user[profile_of[change["profile_id"]]].append(change)
        for user in users:
            orders = [c for c in by_user[user] if c["trait"] == "orders"]
            counted = Counter(c["message_id"] for c in orders)
            twice = [m for m, n in counted.items() if n > 1]
            lost = set(oracle.orders.get(user, [])) - set(counted)
            assert not twice and not lost and set(counted) == set(oracle.orders.get(user, [])), (
                f"{user}: orders counted twice {twice[:5]}, never counted {sorted(lost)[:5]}, "
                f"counted but not an Order Completed {sorted(set(counted) - set(oracle.orders.get(user, [])))[:5]}")  # fmt: skip
            assert [c["new_value"] for c in orders] == list(range(1, len(counted) + 1)), f"{user}: orders went {orders}"
            ltv = [c["new_value"] for c in by_user[user] if c["trait"] == "ltv"]
            assert len(ltv) == len(orders) and (ltv[-1] if ltv else 0) == oracle.ltv.get(user, 0), f"{user}: ltv went {ltv}"
            seqs = [c["seq"] for c in by_user[user]]
            assert seqs == sorted(set(seqs)), f"{user}: sequence numbers repeat or go back"

        transitions = Counter((profile_of[m["profile_id"]], m["audience"], m["transition"]) for m in memberships)
        repeated = {t: n for t, n in transitions.items() if n > 1}
        assert not repeated, f"membership changes seen more than once: {list(repeated.items())[:5]}"
        wanted = {(u, a, "entered") for u in users for a in oracle.audiences(u)}
        assert set(transitions) == wanted, f"missing {sorted(wanted - set(transitions))[:5]}, unexpected {sorted(set(transitions) - wanted)[:5]}"
        seqs_seen = Counter((m["profile_id"], m["seq"]) for m in memberships) + Counter((c["profile_id"], c["seq"]) for c in changes)
        assert max(seqs_seen.values()) == 1, "a sequence number shared by two changes of one profile"

        dead = pipeline.read("events.dead-letter", until=lambda rs: True, timeout=5)
        assert not dead, f"{len(dead)} records dead-lettered, e.g. {dead[0].value}"
        print(f"stream {stream_s:.0f} s, drained {drained_s:.0f} s, checked {time.monotonic() - started:.0f} s after start; "
              f"sender held {sender.held_s:.1f} s at gates; answers {dict(sender.statuses)}; "
              f"membership changes {len(memberships)}, trait changes {len(changes)}")  # fmt: skip
    finally:
        pipeline.stop_all()
