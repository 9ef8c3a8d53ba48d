"""`cdp topics`: create the declared topics that are missing and verify the ones that exist.

Topics are created explicitly (the local broker has auto-creation off), with the configured partition count and
replication; a topic whose partition count differs from the declaration is reported, never silently altered,
because changing it would move keys between partitions and break co-partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic

from agents.errors import ConfigError
from topology.config import Settings
from topology.stages.dedup import CATCH_UP_GRACE_MS
from topology.topics import ALL_TOPICS, TopicSpec


@dataclass(frozen=True)
class TopicReport:
    """What `ensure_topics` found or did for one topic."""

    name: str
    partitions: int
    status: str  # "created" | "ok" | "mismatch"
    detail: str = ""


def topic_config(spec: TopicSpec, settings: Settings) -> dict[str, str]:
    """acks=all means "on min.insync.replicas copies": with replication 3, a 200 rests on at least 2."""
    durability = {"min.insync.replicas": str(min(2, settings.topics.replication))}
    if spec.compacted:
        return {"cleanup.policy": "compact", **durability}
    return {"cleanup.policy": "delete", "retention.ms": str(settings.topics.retention_ms), **durability}


def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = ALL_TOPICS, timeout: float = 30.0) -> list[TopicReport]:
    """Create what is missing, check what exists; raises ConfigError if the cluster can't be reached."""
    if settings.topics.retention_ms < settings.ingest.dedup_window_ms + CATCH_UP_GRACE_MS:
        raise ConfigError(
            "topics.retention must be at least ingest.dedup_window + 1h: the dedup stage rebuilds its memory "
            "from cdp.events.raw, so raw events must outlive the window"
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except Exception as exc:  # KafkaException: the message is all the user needs
        raise ConfigError(f"can't reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    reports: list[TopicReport] = []
    missing: list[NewTopic] = []
    for spec in specs:
        name, wanted = spec.name(settings), spec.partition_count(settings)
        if name in existing:
            have = len(existing[name].partitions)
            if have == wanted:
                reports.append(TopicReport(name, have, "ok"))
            else:
                reports.append(TopicReport(name, have, "mismatch", f"has {have} partitions, the config says {wanted}"))
        else:
            missing.append(NewTopic(name, wanted, settings.topics.replication, config=topic_config(spec, settings)))
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items() if missing else ():
        try:
            future.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a concurrent `cdp topics` won the race: fine
                raise ConfigError(f"can't create topic {name}: {exc}") from exc
        reports.append(TopicReport(name, next(t.num_partitions for t in missing if t.topic == name), "created"))
    return reports


def check_copartitioned(settings: Settings, pairs: tuple[tuple[TopicSpec, TopicSpec], ...], timeout: float = 30.0) -> None:
    """Refuse to start a stage whose input and output differ in partition count (or don't exist).

    The dedup stage writes partition p of its input to partition p of its output; with a different count it would
    stall on writes to a partition that doesn't exist, far from the cause. Say it at start instead.
    """
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        topics = admin.list_topics(timeout=timeout).topics
    except Exception as exc:
        raise ConfigError(f"can't reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    for source, target in pairs:
        names = source.name(settings), target.name(settings)
        missing = [name for name in names if name not in topics]
        if missing:
            raise ConfigError(f"topics {missing} don't exist: run `cdp topics` first")
        counts = [len(topics[name].partitions) for name in names]
        if counts[0] != counts[1]:
            raise ConfigError(f"{names[0]} has {counts[0]} partitions but {names[1]} has {counts[1]}; they must match")
