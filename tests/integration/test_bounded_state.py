"""Bounded state on real Kafka: events received over 20 hours flow through a worker whose memo horizon is 3 hours
(`topics.memo_horizon`, with a short retention); the memos of events received before the horizon leave the
stores as tombstones on the changelogs, the ones within it stay, and every count is right."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import requests

from agents.memo import HOUR_MS
from tests.integration.test_compute_stage import compute_metric
from tests.poison import CODECS, raw_event
from tests.support import Pipeline, Read, wait_until
from topology.runtime.producer import AsyncProducer, Record, producer_config

USERS, PER_HOUR, HOURS, KEPT_HOURS = 10, 5, 20, 3


def last_value_by_key(records: list[Read], prefix: bytes) -> dict[tuple[int, bytes], bytes | None]:
    """A changelog's last record per partition and key under `prefix`: what a compacted topic converges to."""
    last: dict[tuple[int, bytes], bytes | None] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        if record.key is not None and record.key.startswith(prefix):
            last[(record.partition, record.key)] = record.raw
    return last


def _is_pack(key: bytes) -> bool:
    return key[10:11] == b"#"  # <kind>@<hour>#<id> (topology/runtime/memo_packs.py)


def _expired_packs_gone(records: list[Read], kind: bytes, cutoff: bytes) -> bool:
    """Every pack of an hour past the horizon has its tombstone (and there were some)."""
    last = last_value_by_key(records, kind)
    expired = [value for (_, key), value in last.items() if _is_pack(key) and key[2:10] < cutoff]
    return bool(expired) and all(value is None for value in expired)


def test_memos_older_than_the_horizon_leave_store_and_changelog_as_tombstones(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    pipeline = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, prefix=prefix, extra_config={
        "topics": {"prefix": prefix, "partitions": 4, "replication": 1, "retention": "90m", "memo_horizon": "3h"},
        "ingest": {"dedup_window": "10m"},
        "traits": [{"key": "orders", "kind": "count", "event": "Order Completed"}],
    })  # fmt: skip
    pipeline.create_topics()
    try:
        worker = pipeline.start("worker")
        now = int(time.time() * 1000)
        first_hour = now - now % HOUR_MS - HOURS * HOUR_MS
        records = []
        for hour in range(HOURS):  # oldest first: dedup's stream time only moves forward
            for user in range(USERS):
                for n in range(PER_HOUR):
                    at = first_hour + hour * HOUR_MS + n * 1000 + user
                    event = raw_event(message_id=f"{prefix}-{hour}-{user}-{n}", user_id=f"u{user}", anonymous_id=None,
                                      event="Order Completed", timestamp=at, received_at=at)  # fmt: skip
                    records.append(Record(pipeline.topic("events.accepted"), event["message_id"].encode(), CODECS["raw_event"].encode(event)))
        producer = AsyncProducer(producer_config(kafka_bootstrap, 30_000))
        asyncio.run(producer.write_all(records))
        producer.close(10)
        total = USERS * PER_HOUR * HOURS
        wait_until(lambda: compute_metric(pipeline.web_port, "events") >= total, timeout=120, what="compute to apply every event")
        expired_hours = HOURS - KEPT_HOURS  # hours that ended more than 3 h before now (the current one is not in the input)
        expected = dict.fromkeys(("compute", "identity"), USERS * PER_HOUR * expired_hours)  # a memo per event each
        memos = dict.fromkeys(("compute", "identity"), total)

        def memos_expired(stage: str) -> int:
            text = requests.get(f"http://127.0.0.1:{pipeline.web_port}/metrics", timeout=10).text
            return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                       if line.startswith("cdp_memos_expired_total") and f'stage="{stage}"' in line)  # fmt: skip

        wait_until(lambda: all(memos_expired(stage) >= expected[stage] for stage in expected), timeout=60,
                   what="both stages to expire the memos past the horizon")  # fmt: skip
        assert {stage: memos_expired(stage) for stage in expected} == expected

        cutoff = f"{(first_hour // HOUR_MS) + expired_hours:08d}".encode()
        for stage, kind in (("compute", b"s@"), ("identity", b"r@")):  # memos go to the changelog in packs
            changelog = pipeline.read(f"{stage}.state", until=lambda rs, k=kind: _expired_packs_gone(rs, k, cutoff), timeout=60, decode=False)
            last = last_value_by_key(changelog, kind)
            assert not [key for key, value in last.items() if value is not None and not _is_pack(key[1])], "no memo on its own"
            written: set[tuple[int, str]] = set()  # every memo any pack held, by partition
            kept: set[tuple[int, str]] = set()  # ... and those in packs not deleted
            for record in changelog:
                if record.key and record.key.startswith(kind) and record.raw is not None:
                    members = {(record.partition, key) for key in CODECS[f"{stage}_state"].decode(record.raw)["record"]["pack"]}
                    written |= members
                    if last[(record.partition, record.key)] is not None:
                        kept |= members
            assert len(written) == memos[stage], stage  # every event left its memos once
            assert len(kept) == memos[stage] - expected[stage], stage  # those past the horizon are gone
            assert all(key[2:10] >= cutoff.decode() for _, key in kept)

        changes = pipeline.read("profile.changes", until=lambda rs: len(rs) >= total, timeout=60)
        final: dict[str, Any] = defaultdict(int)
        for change in changes:
            final[change.value["profile_id"]] = max(final[change.value["profile_id"]], change.value["new_value"])
        assert sorted(final.values()) == [PER_HOUR * HOURS] * USERS  # nothing lost, nothing twice
        pipeline.stop(worker)
    finally:
        pipeline.stop_all()
