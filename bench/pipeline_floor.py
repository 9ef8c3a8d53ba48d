"""The floor of `cdp bench pipeline`: the pipeline's three hops in one plain confluent-kafka loop."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import Bench, broker_cpu
from topology.codecs import AvroCodec, SchemaRepository
from topology.runtime.producer import producer_config
from topology.topics import EVENTS_ACCEPTED


def floor(bench: Bench, events: int, run: int = 0) -> dict[str, Any]:
    """Three hops through the broker in one confluent-kafka loop, one thread, the project's producer settings:
    accepted → decode RawEvent, a dict of seen messageIds → encode → floor.raw; floor.raw → decode, a dict of
    identifiers to profiles → encode ResolvedEvent → floor.resolved; floor.resolved → decode, counts per
    profile → encode ProfileChange → floor.changes. Read from the pipeline's own input, after it finished."""
    settings = bench.settings
    prefix, partitions = settings.topics.prefix, settings.topics.partitions
    hops = [f"{prefix}.floor{run}.raw", f"{prefix}.floor{run}.resolved", f"{prefix}.floor{run}.changes"]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(t, partitions, 1) for t in hops]).values():
        future.result()
    repository = SchemaRepository.load()
    raw_codec, resolved_codec = AvroCodec("raw_event", repository), AvroCodec("resolved_event", repository)
    change_codec = AvroCodec("profile_change", repository)
    accepted = EVENTS_ACCEPTED.name(settings)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{prefix}.floor{run}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})  # fmt: skip
    consumer.subscribe([accepted, hops[0], hops[1]])
    producer = Producer(producer_config(settings.kafka_bootstrap, 60_000))
    seen: set[str] = set()
    profiles: dict[str, str] = {}
    counts: Counter[tuple[str, str]] = Counter()
    done = 0
    started = cpu0 = broker0 = 0.0

    def send(topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:
                producer.poll(0.01)

    while done < events:
        batch = consumer.consume(num_messages=2_000, timeout=1.0)
        if batch and not started:
            started, cpu0, broker0 = time.perf_counter(), time.process_time(), broker_cpu(bench)
        for message in batch:
            if message.error() is not None:
                continue
            topic, value = message.topic(), message.value()
            if topic == accepted:
                raw = raw_codec.decode(value)
                if raw["message_id"] not in seen:
                    seen.add(raw["message_id"])
                    send(hops[0], message.key(), raw_codec.encode(raw), message.partition())
            elif topic == hops[0]:
                raw = raw_codec.decode(value)
                ids = [i for i in (raw["user_id"], raw["anonymous_id"]) if i]
                profile = next((profiles[i] for i in ids if i in profiles), f"p-{ids[0]}")
                for identifier in ids:
                    profiles[identifier] = profile
                identifiers = [{"type": "user_id" if i == raw["user_id"] else "anonymous_id", "value": i} for i in ids]
                encoded = resolved_codec.encode({"profile_id": profile, "identifiers": identifiers, "event": raw})
                send(hops[1], profile.encode(), encoded, message.partition())
            else:
                resolved = resolved_codec.decode(value)
                event = resolved["event"]
                name = event["event"] or event["type"]
                counts[resolved["profile_id"], name] += 1
                change = {"profile_id": resolved["profile_id"], "trait": f"count_{name}", "origin": "computed",
                          "old_value": counts[resolved["profile_id"], name] - 1, "new_value": counts[resolved["profile_id"], name],
                          "timestamp": event["timestamp"], "message_id": event["message_id"], "seq": done}  # fmt: skip
                send(hops[2], message.key(), change_codec.encode(change), message.partition())
                done += 1
        producer.poll(0)
    producer.flush(60)
    seconds, cpu, broker = time.perf_counter() - started, time.process_time() - cpu0, broker_cpu(bench) - broker0
    consumer.close()
    return {"events": done, "seconds": round(seconds, 2), "events_per_s": round(done / seconds, 1),
            "cpu_us_per_event": round(cpu / done * 1e6, 1),
            "broker_cpu_us_per_event": round(broker / done * 1e6, 1) if bench.broker_pid else None}  # fmt: skip
