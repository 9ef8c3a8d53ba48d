"""The `kafka` kind: each delivery written as a JSON record (Segment's shapes, agents/sync/payloads.py) to a topic of
this cluster or another one.

    {"name": "lake", "kind": "kafka", "topic": "crm.audiences", "bootstrap": "other-cluster:9092", "batch": {"size": 100}}

Keyed by profile id (so a profile's records stay in order in one partition), with a `cdp-delivery-id` header: the
delivery's id, the same on every retry, for consumers to deduplicate on. The producer is idempotent (acks=all) and
the destination's own: a cluster that is down delays only this destination. A write Kafka did not acknowledge in
`timeout` is retried like a webhook's 503; the whole batch goes again (its records that did arrive are repeated
with the same id).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from agents.errors import CdpError
from agents.sync.destinations import Destination
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt
from topology.destinations import Kind, SenderContext, Settings
from topology.runtime.producer import AsyncProducer, Record, producer_config

TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
HEADER = "cdp-delivery-id"


def check(settings: Mapping[str, Any]) -> dict[str, Any]:
    checking = Settings("kafka", settings, ("topic", "bootstrap", "timeout", "batch"))
    topic = settings.get("topic")
    if not isinstance(topic, str) or not TOPIC.match(topic) or topic in (".", ".."):
        checking.problem(f"topic must be a Kafka topic name (letters, digits, '.', '_', '-'), not {topic!r:.80}")
    bootstrap = settings.get("bootstrap")
    if bootstrap is not None and (not isinstance(bootstrap, str) or not bootstrap.strip()):
        checking.problem("bootstrap is host:port[,host:port...] of the destination's cluster (default: the pipeline's)")
    timeout = checking.duration_ms("timeout", "30s", 1_000, 300_000)
    return checking.done({"topic": topic, "bootstrap": bootstrap, "timeout_ms": timeout, "batch_size": checking.batch_size(100, 10_000)})


class KafkaSender:
    def __init__(self, destination: Destination, context: SenderContext) -> None:
        settings = destination.settings
        self.topic, self.max_batch = settings["topic"], settings["batch_size"]
        self._producer = AsyncProducer(producer_config(settings["bootstrap"] or context.bootstrap, settings["timeout_ms"]))

    async def send(self, deliveries: Sequence[Delivery]) -> Attempt:
        records = [Record(self.topic, d.profile_id.encode(), orjson.dumps(d.payload), headers=((HEADER, d.id.encode()),)) for d in deliveries]
        try:
            await self._producer.write_all(records)
        except CdpError as exc:
            return Attempt(None, str(exc)[:300])
        return Attempt(None, outcome="delivered")

    async def close(self) -> None:
        await asyncio.to_thread(self._producer.close, 5.0)


KIND = Kind("kafka", check, KafkaSender)
